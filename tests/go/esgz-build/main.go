// esgz-build converts a tar into an eStargz blob with the reference Go
// library (github.com/containerd/stargz-snapshotter/estargz, as packaged by
// Debian): the code `ctr-remote image convert --estargz` runs for each
// layer. It prints the TOC digest, so that tests can mount layers written by
// the Go converter next to ours.
//
// Usage: esgz-build TAR OUT_BLOB [CHUNK_SIZE]
//
// It is built by stargaze's test kit in GOPATH mode against
// /usr/share/gocode; it is test tooling, not part of the product.
package main

import (
	"fmt"
	"io"
	"os"
	"strconv"

	"github.com/containerd/stargz-snapshotter/estargz"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: esgz-build TAR OUT_BLOB [CHUNK_SIZE]")
		os.Exit(2)
	}
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "esgz-build:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	in, err := os.Open(args[0])
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	var opts []estargz.Option
	if len(args) > 2 {
		n, err := strconv.Atoi(args[2])
		if err != nil {
			return fmt.Errorf("chunk size %q: %w", args[2], err)
		}
		opts = append(opts, estargz.WithChunkSize(n))
	}
	blob, err := estargz.Build(io.NewSectionReader(in, 0, st.Size()), opts...)
	if err != nil {
		return err
	}
	defer blob.Close()
	out, err := os.Create(args[1])
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, blob); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	fmt.Println(blob.TOCDigest())
	return nil
}
