#!/usr/bin/env python3
"""merge_containerd.py SNIPPET CONFIG: what an operator does with
deploy/containerd.toml — add its tables to containerd's config.

The snippet's tables are appended (its `version` line is dropped: the config
has its own); a table the config already defines is an error, not a silent
override, and the result must parse as TOML and have the snippet's values.
"""

import sys
import tomllib


def tables(doc, prefix=()):
    for key, value in doc.items():
        if isinstance(value, dict):
            yield prefix + (key,), value
            yield from tables(value, prefix + (key,))


def main():
    snippet_path, config_path = sys.argv[1], sys.argv[2]
    snippet_text = open(snippet_path).read()
    config_text = open(config_path).read()
    snippet, config = tomllib.loads(snippet_text), tomllib.loads(config_text)
    if config.get("version") != snippet.get("version"):
        sys.exit(f"{config_path} is config version {config.get('version')}, the snippet {snippet.get('version')}")
    have = dict(tables(config))
    for path, value in tables(snippet):
        leaves = {k: v for k, v in value.items() if not isinstance(v, dict)}
        if path in have and any(k in have[path] for k in leaves):
            sys.exit(f"{config_path} already sets [{'.'.join(path)}]: merge {snippet_path} by hand")
    body = "\n".join(l for l in snippet_text.splitlines() if not l.startswith("version"))
    merged = config_text.rstrip("\n") + f"\n\n# stargaze ({snippet_path})\n" + body + "\n"
    result = tomllib.loads(merged)
    for path, value in tables(snippet):
        got = result
        for k in path:
            got = got[k]
        for k, v in value.items():
            if not isinstance(v, dict) and got.get(k) != v:
                sys.exit(f"merging into {config_path} lost {'.'.join(path)}.{k}")
    with open(config_path, "w") as f:
        f.write(merged)
    print(f"   merged {snippet_path} into {config_path}")


if __name__ == "__main__":
    main()
