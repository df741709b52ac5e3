#!/usr/bin/env python3
"""Write an OCI image layout from layer directories, as an image builder would.

Usage: mkimage.py [--cmd JSON] OUT TAG LAYER_DIR...

The first directory is a root filesystem (debootstrap output); the others are
overlayfs upper directories of later build steps. Upper directories are
translated the way docker and buildkit write layers: a 0/0 character device
(overlayfs's whiteout) becomes an empty `.wh.NAME`, and a directory marked
`trusted.overlay.opaque=y` gets `.wh..wh..opq` when a lower layer has it
(overlayfs marks every directory it creates opaque; only these matter).
Entries are sorted, owners numeric, mtimes whole seconds; /dev, /proc and /sys
are left empty in the base layer. Layers are gzip level 6 (what docker uses).
The config's Cmd is `--cmd` (a JSON array; default ["python3"]).
Prints one line per layer: tar bytes, gzip bytes, entries, regular files.
"""

import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile


def main():
    args = sys.argv[1:]
    cmd = ["python3"]
    if args[:1] == ["--cmd"]:
        cmd, args = json.loads(args[1]), args[2:]
    out, tag, dirs = args[0], args[1], args[2:]
    blobs = os.path.join(out, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def put(data):
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, digest), "wb") as f:
            f.write(data)
        return "sha256:" + digest

    def entries(root):
        yield ""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            for name in sorted(dirnames + filenames):
                yield name if rel == "." else os.path.join(rel, name)

    diff_ids, layers = [], []
    for n, root in enumerate(dirs):
        buf = io.BytesIO()
        count = regular = 0
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for rel in entries(root):
                path = os.path.join(root, rel)
                st = os.lstat(path)
                if n == 0 and rel.split("/")[0] in ("dev", "proc", "sys") and "/" in rel:
                    continue
                if n > 0 and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    wh = tarfile.TarInfo(os.path.join(os.path.dirname(rel), ".wh." + os.path.basename(rel)))
                    wh.mtime = int(st.st_mtime)
                    tf.addfile(wh)
                    count += 1
                    continue
                info = tf.gettarinfo(path, arcname="./" + rel if rel else "./")
                info.uname = info.gname = ""
                info.mtime = int(info.mtime)
                if info.isreg():
                    with open(path, "rb") as f:
                        tf.addfile(info, f)
                    regular += 1
                else:
                    tf.addfile(info)
                count += 1
                if n > 0 and stat.S_ISDIR(st.st_mode):
                    try:
                        opaque = os.getxattr(path, "trusted.overlay.opaque") == b"y"
                    except OSError:
                        opaque = False
                    if opaque and any(os.path.isdir(os.path.join(lower, rel)) for lower in dirs[:n]):
                        tf.addfile(tarfile.TarInfo(os.path.join(rel, ".wh..wh..opq")))
        raw = buf.getvalue()
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        gz = gzip.compress(raw, compresslevel=6, mtime=0)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(gz), "size": len(gz)})
        print(f"layer {n + 1}: {len(raw)} tar bytes, {len(gz)} gzip bytes, {count} entries, {regular} regular files")

    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
            "Cmd": cmd,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(config), "size": len(config)},
        "layers": layers,
    }).encode()
    with open(os.path.join(out, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": put(manifest),
            "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }]}, f)


if __name__ == "__main__":
    main()
