#!/usr/bin/env python3
"""What a workload reads, in uncompressed and eStargz-compressed bytes.

Usage: needed.py [--list FILE] STRACE ROOTFS ESGZ_LAYOUT LAYER_DIR...

STRACE is `strace -f -e trace=execve,openat,open` of the workload run with
`chroot ROOTFS`. Every regular file it opened (after the exec of python3),
plus the executable and its ELF interpreter, is resolved inside ROOTFS and
attributed to the top-most LAYER_DIR that has it. Its compressed size is the
sum of its chunks' extents in that layer of the eStargz image at ESGZ_LAYOUT
(`oci:DIR:esgz` written by stargaze convert): an entry's extent runs to the
next entry's offset, or to the TOC for the last one. Prints `key value`
lines: files, bytes, compressed_bytes, toc_bytes (every layer's TOC and
footer, which mounting needs). `--list FILE` also writes the files, in the
order the workload first opened them, one path per line: the prioritized
files list of `stargaze convert --prioritized-files`.
"""

import io
import json
import os
import re
import sys
import tarfile


def opened_files(trace):
    lines = open(trace).read().splitlines()
    start = next((i for i, line in enumerate(lines) if re.search(r'execve\("[^"]*python3', line)), 0)
    paths = ["/usr/bin/python3", "/lib64/ld-linux-x86-64.so.2"]
    for line in lines[start:]:
        m = re.search(r'open(?:at)?\((?:AT_FDCWD, )?"([^"]+)", ([A-Z_|]+)[^)]*\)\s*=\s*\d+', line)
        if m and "O_DIRECTORY" not in m.group(2):
            paths.append(m.group(1))
    return paths


def resolve(root, path):
    """`path` with symlinks resolved inside `root`."""
    parts, cur, hops = [p for p in path.split("/") if p], "/", 0
    while parts:
        name = parts.pop(0)
        cand = os.path.normpath(os.path.join(cur, name))
        full = root + cand
        if os.path.islink(full) and hops < 40:
            target = os.readlink(full)
            hops += 1
            parts = [p for p in target.split("/") if p] + parts
            cur = "/" if target.startswith("/") else cur
        else:
            cur = cand
    return cur


def layer_extents(layout):
    """Per layer (bottom first): ({path: compressed bytes of its chunks},
    bytes of the TOC and footer)."""
    index = json.load(open(os.path.join(layout, "index.json")))
    blob = lambda d: os.path.join(layout, "blobs", "sha256", d.split(":")[1])
    manifest = json.load(open(blob(index["manifests"][0]["digest"])))
    out = []
    for layer in manifest["layers"]:
        data = open(blob(layer["digest"]), "rb").read()
        footer = data[-51:]
        at = footer.find(b"STARGZ")
        toc_off = int(footer[at - 16:at], 16)
        with tarfile.open(fileobj=io.BytesIO(data[toc_off:]), mode="r:gz") as tf:
            toc = json.load(tf.extractfile("stargz.index.json"))
        offsets = sorted({e["offset"] for e in toc["entries"] if e.get("offset")} | {toc_off})
        following = {o: offsets[i + 1] for i, o in enumerate(offsets[:-1])}
        sizes = {}
        for e in toc["entries"]:
            if e["type"] in ("reg", "chunk") and e.get("offset"):
                name = "/" + e["name"].lstrip("./")
                sizes[name] = sizes.get(name, 0) + following[e["offset"]] - e["offset"]
        out.append((sizes, len(data) - toc_off))
    return out


def main():
    args = sys.argv[1:]
    listing = None
    if args[:1] == ["--list"]:
        listing, args = args[1], args[2:]
    trace, root, layout, layers = args[0], args[1], args[2], args[3:]
    files = {}
    for p in opened_files(trace):
        r = resolve(root, p if p.startswith("/") else "/" + p)
        full = root + r
        if os.path.isfile(full) and not os.path.islink(full):
            files[r] = os.path.getsize(full)
    extents = layer_extents(layout)
    compressed = 0
    for path in files:
        for k in range(len(layers) - 1, -1, -1):
            if os.path.lexists(layers[k] + path):
                compressed += extents[k][0].get(path, 0)
                break
    if listing:
        # dicts keep insertion order: first opens first
        with open(listing, "w") as f:
            f.writelines(p.lstrip("/") + "\n" for p in files)
    print(f"files {len(files)}")
    print(f"bytes {sum(files.values())}")
    print(f"compressed_bytes {compressed}")
    print(f"toc_bytes {sum(t for _, t in extents)}")


if __name__ == "__main__":
    main()
