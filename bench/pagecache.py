#!/usr/bin/env python3
"""The page cache of an image's layer directories, for what a workload touches.

    pagecache.py evict LAYER_DIR...          drop their files' cached pages
    pagecache.py resident OUT LAYER_DIR...   write which bytes are cached

Run `evict`, the workload (in a chroot of an overlay of the directories:
overlayfs reads a lower file through that file's own page cache), then
`resident`: what is cached is what the workload read or mapped, page by
page, plus the kernel's readahead (which a lazy mount's reads get too).
That is the measure for a program that maps large files and touches a few
pages of them (a JVM's lib/modules, libjvm.so), where counting whole opened
files overstates what it needs. OUT has one line per file with cached pages:
its path, a tab, comma-separated byte ranges `start-end` (end exclusive).
"""
import ctypes
import mmap
import os
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def regular_files(dirs):
    for top in dirs:
        for dirpath, _, names in os.walk(top):
            for name in names:
                path = os.path.join(dirpath, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    yield path


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident(path):
    """[(start, end)] byte ranges of `path` in the page cache."""
    size = os.path.getsize(path)
    if size == 0:
        return []
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        try:
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    ranges, start = [], None
    for i in range(pages + 1):
        cached = i < pages and vec[i] & 1
        if cached and start is None:
            start = i
        elif not cached and start is not None:
            ranges.append((start * PAGE, min(i * PAGE, size)))
            start = None
    return ranges


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "evict":
        for path in regular_files(args):
            evict(path)
    elif cmd == "resident":
        with open(args[0], "w") as out:
            for path in regular_files(args[1:]):
                ranges = resident(path)
                if ranges:
                    out.write(path + "\t" + ",".join(f"{a}-{b}" for a, b in ranges) + "\n")
    else:
        sys.exit(f"pagecache.py: unknown command {cmd} (evict, resident)")


if __name__ == "__main__":
    main()
