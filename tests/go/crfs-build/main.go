// crfs-build writes a tar as a legacy stargz blob, the way the CRFS writer
// (google/crfs, before eStargz) wrote them: the stargz writer of Debian's
// github.com/containerd/stargz-snapshotter/estargz (CRFS's descendant,
// which still appends entries the same way: a gzip member per chunk, a
// whole-file digest on each regular file) with a compressor that writes
// what CRFS wrote at the end: a TOC without the `chunkDigest` fields
// eStargz added, and the 47-byte legacy footer (the Extra field holding
// `%016xSTARGZ` without a subfield header, built as the package's own
// footer test builds it). No landmark files are added (eStargz added them).
//
// Usage: crfs-build TAR OUT_BLOB [CHUNK_SIZE]
//
// It prints the TOC digest and the diffID (sha256 of the uncompressed
// stream), one per line. Built by stargaze's test kit in GOPATH mode
// against /usr/share/gocode; test tooling, not part of the product.
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"os"
	"strconv"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"
)

// legacyCompressor is estargz.GzipCompressor with CRFS's TOC and footer.
type legacyCompressor struct{}

func (legacyCompressor) Writer(w io.Writer) (io.WriteCloser, error) {
	return gzip.NewWriterLevel(w, gzip.BestCompression)
}

func (legacyCompressor) WriteTOCAndFooter(w io.Writer, off int64, toc *estargz.JTOC, diffHash hash.Hash) (digest.Digest, error) {
	for _, e := range toc.Entries {
		e.ChunkDigest = ""
	}
	tocJSON, err := json.MarshalIndent(toc, "", "\t")
	if err != nil {
		return "", err
	}
	gz, _ := gzip.NewWriterLevel(w, gzip.BestCompression)
	gw := io.Writer(gz)
	if diffHash != nil {
		gw = io.MultiWriter(gz, diffHash)
	}
	tw := tar.NewWriter(gw)
	if err := tw.WriteHeader(&tar.Header{
		Typeflag: tar.TypeReg,
		Name:     estargz.TOCTarName,
		Size:     int64(len(tocJSON)),
	}); err != nil {
		return "", err
	}
	if _, err := tw.Write(tocJSON); err != nil {
		return "", err
	}
	if err := tw.Close(); err != nil {
		return "", err
	}
	if err := gz.Close(); err != nil {
		return "", err
	}
	if _, err := w.Write(legacyFooterBytes(off)); err != nil {
		return "", err
	}
	return digest.FromBytes(tocJSON), nil
}

// legacyFooterBytes is the 47-byte CRFS footer (estargz's gzip_test.go).
func legacyFooterBytes(tocOff int64) []byte {
	buf := bytes.NewBuffer(make([]byte, 0, 47))
	gz, _ := gzip.NewWriterLevel(buf, gzip.NoCompression)
	gz.Header.Extra = []byte(fmt.Sprintf("%016xSTARGZ", tocOff))
	gz.Close()
	if buf.Len() != 47 {
		panic(fmt.Sprintf("footer buffer = %d, not 47", buf.Len()))
	}
	return buf.Bytes()
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: crfs-build TAR OUT_BLOB [CHUNK_SIZE]")
		os.Exit(2)
	}
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "crfs-build:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	in, err := os.Open(args[0])
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(args[1])
	if err != nil {
		return err
	}
	w := estargz.NewWriterWithCompressor(out, legacyCompressor{})
	if len(args) > 2 {
		n, err := strconv.Atoi(args[2])
		if err != nil {
			return fmt.Errorf("chunk size %q: %w", args[2], err)
		}
		w.ChunkSize = n
	}
	if err := w.AppendTar(in); err != nil {
		out.Close()
		return err
	}
	tocDigest, err := w.Close()
	if err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	fmt.Println(tocDigest)
	fmt.Println(w.DiffID())
	return nil
}
