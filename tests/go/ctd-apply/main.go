// ctd-apply unpacks a layer into a directory with containerd's own
// applier (github.com/containerd/containerd/archive, as packaged by
// Debian), the way containerd's diff service applies a layer onto an
// overlayfs snapshot: the layer (a tar, or a gzip or zstd blob such as an
// eStargz or zstd:chunked one) is decompressed by containerd's
// compression.DecompressStream as its walking differ does, whiteouts
// become 0/0 character devices, `.wh..wh..opq` the trusted.overlay.opaque
// xattr, and the xattrs of the tar are set as containerd sets them.
// Tests compare stargaze's lazily mounted layers with this reference.
//
// Usage: ctd-apply LAYER DIR [PARENT_DIR...]
//
// It is built by stargaze's test kit in GOPATH mode against
// /usr/share/gocode; it is test tooling, not part of the product.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/containerd/archive"
	"github.com/containerd/containerd/archive/compression"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: ctd-apply LAYER DIR [PARENT_DIR...]")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2], os.Args[3:]); err != nil {
		fmt.Fprintln(os.Stderr, "ctd-apply:", err)
		os.Exit(1)
	}
}

func run(tarPath, dir string, parents []string) error {
	in, err := os.Open(tarPath)
	if err != nil {
		return err
	}
	defer in.Close()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	tar, err := compression.DecompressStream(in)
	if err != nil {
		return err
	}
	defer tar.Close()
	// As containerd's diff/apply does for an overlay mount.
	opts := []archive.ApplyOpt{archive.WithConvertWhiteout(archive.OverlayConvertWhiteout)}
	if len(parents) > 0 {
		opts = append(opts, archive.WithParents(parents))
	}
	_, err = archive.Apply(context.Background(), dir, tar, opts...)
	return err
}
