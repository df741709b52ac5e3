#!/usr/bin/env python3
"""What a workload reads, in uncompressed and eStargz-compressed bytes.

Usage: needed.py [--exec NAME] [--list FILE] [--pages FILE] STRACE ROOTFS ESGZ_LAYOUT LAYER_DIR...

STRACE is `strace -f -e trace=execve,openat,open` of the workload run with
`chroot ROOTFS`. It is read from the first exec of NAME (the workload's
program, by base name: python3, bash, gcc, a script's name; default
python3), which leaves out what chroot itself loads. Counted: every regular
file opened from there, every program exec'd (a chain such as gcc -> cc1
-> as -> collect2 -> ld is decided at run time) with its ELF interpreter or
`#!` interpreter, which the kernel reads without an open. Each is resolved
inside ROOTFS and attributed to the top-most LAYER_DIR that has it; files
in no layer (what the workload wrote itself, /proc) are not counted. Its
compressed size is the sum of its chunks' extents in that layer of the
eStargz image at ESGZ_LAYOUT (`oci:DIR:esgz` written by stargaze convert):
an entry's extent runs to the next entry's offset, or to the TOC for the
last one. Prints `key value` lines: files, bytes, compressed_bytes,
toc_bytes (every layer's TOC and footer, which mounting needs). `--list
FILE` also writes the files, in the order the workload first opened or
exec'd them, one path per line: the prioritized files list of `stargaze
convert --prioritized-files`.

`--pages FILE` (bench/pagecache.py's `resident` after the same run, paths
under the LAYER_DIRs) adds touched_bytes and touched_compressed_bytes: only
the pages the workload read or mapped (with the kernel's readahead), and the
compressed extents of the chunks that hold them. For a program that maps a
large file and touches a few pages of it (a JVM's lib/modules) that is what
a lazy pull needs; counting whole files overstates it.
"""

import io
import json
import os
import re
import struct
import sys
import tarfile

CALL = re.compile(r'^(\d+)\s+(.*)$')
EXEC = re.compile(r'execve\("([^"]+)"')
OPEN = re.compile(r'open(?:at)?\((?:AT_FDCWD, )?"([^"]+)", ([A-Z_|]+)[^)]*\)\s*=\s*\d+')
RESULT_OK = re.compile(r'\)\s*=\s*0\s*$')


def calls(trace):
    """The trace's calls, one line each: strace -f splits a call that another
    process interrupts into `<unfinished ...>` and `<... NAME resumed>`."""
    pending = {}
    for line in open(trace, errors="replace").read().splitlines():
        m = CALL.match(line)
        pid, text = (m.group(1), m.group(2)) if m else ("", line)
        if text.endswith("<unfinished ...>"):
            pending[pid] = text[: -len("<unfinished ...>")]
        elif text.startswith("<... ") and " resumed>" in text:
            yield pending.pop(pid, "") + text.split(" resumed>", 1)[1]
        else:
            yield text


def opened_files(trace, start):
    """Paths in the order the workload first needed them, from the first
    exec of a program named `start`."""
    lines = list(calls(trace))
    at = next((i for i, line in enumerate(lines)
               if (m := EXEC.search(line)) and os.path.basename(m.group(1)) == start), None)
    if at is None:
        sys.exit(f"needed.py: {trace} has no exec of {start!r}: is --exec the workload's program?")
    paths = []
    for line in lines[at:]:
        m = EXEC.search(line)
        if m and line.startswith("execve(") and RESULT_OK.search(line):
            paths.append(("exec", m.group(1)))
            continue
        m = OPEN.search(line)
        if m and line.startswith("open") and "O_DIRECTORY" not in m.group(2):
            paths.append(("open", m.group(1)))
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


def interpreter(full):
    """The program the kernel loads to run `full`: its ELF PT_INTERP or the
    `#!` line's interpreter; None for a static binary or data."""
    try:
        with open(full, "rb") as f:
            head = f.read(4096)
            if head.startswith(b"#!"):
                words = head[2:].split(b"\n", 1)[0].split()
                return words[0].decode() if words else None
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
                return None
            end = "<" if head[5] == 1 else ">"
            phoff, = struct.unpack_from(end + "Q", head, 0x20)
            phentsize, phnum = struct.unpack_from(end + "HH", head, 0x36)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                ptype, _, offset, _, _, filesz = struct.unpack(end + "IIQQQQ", f.read(40))
                if ptype == 3:  # PT_INTERP
                    f.seek(offset)
                    return f.read(filesz).rstrip(b"\0").decode()
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    return None


def layer_extents(layout):
    """Per layer (bottom first): ({path: [(chunk offset, chunk size,
    compressed bytes)]}, bytes of the TOC and footer)."""
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
        chunks = {}
        for e in toc["entries"]:
            if e["type"] in ("reg", "chunk") and e.get("offset"):
                name = "/" + e["name"].lstrip("./")
                size = e.get("chunkSize") or e.get("size", 0)
                chunks.setdefault(name, []).append((e.get("chunkOffset", 0), size, following[e["offset"]] - e["offset"]))
        out.append((chunks, len(data) - toc_off))
    return out


def main():
    args = sys.argv[1:]
    opts = {"--list": None, "--exec": "python3", "--pages": None}
    while args[:1] and args[0] in opts:
        opts[args[0]], args = args[1], args[2:]
    listing, start = opts["--list"], opts["--exec"]
    trace, root, layout, layers = args[0], args[1], args[2], args[3:]

    def top_layer(path):
        return next((k for k in range(len(layers) - 1, -1, -1) if os.path.lexists(layers[k] + path)), None)

    files = {}  # path -> (size, layer); dicts keep insertion order: first needed first

    def add(path, how):
        r = resolve(root, path if path.startswith("/") else "/" + path)
        full = root + r
        if r in files or not os.path.isfile(full) or os.path.islink(full):
            return
        k = top_layer(r)
        if k is None:
            return
        files[r] = (os.path.getsize(full), k)
        if how == "exec":
            interp = interpreter(full)
            if interp:
                add(interp, "exec")

    for how, path in opened_files(trace, start):
        add(path, how)
    extents = layer_extents(layout)
    compressed = sum(c for path, (_, k) in files.items() for _, _, c in extents[k][0].get(path, []))
    if listing:
        with open(listing, "w") as f:
            f.writelines(p.lstrip("/") + "\n" for p in files)
    print(f"files {len(files)}")
    print(f"bytes {sum(size for size, _ in files.values())}")
    print(f"compressed_bytes {compressed}")
    print(f"toc_bytes {sum(t for _, t in extents)}")
    if opts["--pages"]:
        pages = {}
        for line in open(opts["--pages"]):
            path, _, ranges = line.rstrip("\n").partition("\t")
            pages[path] = [tuple(map(int, r.split("-"))) for r in ranges.split(",") if r]
        touched = touched_compressed = 0
        for path, (_, k) in files.items():
            ranges = pages.get(layers[k] + path, [])
            touched += sum(b - a for a, b in ranges)
            touched_compressed += sum(c for off, size, c in extents[k][0].get(path, [])
                                      if any(a < off + size and off < b for a, b in ranges))
        print(f"touched_bytes {touched}")
        print(f"touched_compressed_bytes {touched_compressed}")


if __name__ == "__main__":
    main()
