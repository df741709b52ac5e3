// esgz-verify opens an eStargz or zstd:chunked blob with the reference Go
// reader (github.com/containerd/stargz-snapshotter/estargz, as packaged by
// Debian), verifies the TOC digest and every chunk digest, reads every
// regular file, and prints the tree it sees as JSON lines so that a test
// can compare it with what stargaze wrote.
//
// Usage: esgz-verify BLOB TOC_DIGEST
//
// It is built by stargaze's test kit in GOPATH mode against
// /usr/share/gocode; it is test tooling, not part of the product.
package main

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"sort"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	digest "github.com/opencontainers/go-digest"
)

type record struct {
	Path     string            `json:"path"`
	Type     string            `json:"type"`
	Mode     uint32            `json:"mode"`
	UID      int               `json:"uid"`
	GID      int               `json:"gid"`
	Uname    string            `json:"uname"`
	Size     int64             `json:"size"`
	Link     string            `json:"link,omitempty"`
	DevMajor int               `json:"devMajor"`
	DevMinor int               `json:"devMinor"`
	NumLink  int               `json:"nlink"`
	Xattrs   map[string]string `json:"xattrs,omitempty"`
	SHA256   string            `json:"sha256,omitempty"`
	Chunks   int               `json:"chunks,omitempty"`
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "esgz-verify: "+format+"\n", args...)
	os.Exit(1)
}

func unixMode(e *estargz.TOCEntry) uint32 {
	m := e.Stat().Mode()
	out := uint32(m.Perm())
	if m&os.ModeSetuid != 0 {
		out |= 0o4000
	}
	if m&os.ModeSetgid != 0 {
		out |= 0o2000
	}
	if m&os.ModeSticky != 0 {
		out |= 0o1000
	}
	return out
}

func main() {
	if len(os.Args) != 3 {
		fail("usage: esgz-verify BLOB TOC_DIGEST")
	}
	f, err := os.Open(os.Args[1])
	if err != nil {
		fail("%v", err)
	}
	st, err := f.Stat()
	if err != nil {
		fail("%v", err)
	}
	sr := io.NewSectionReader(f, 0, st.Size())
	r, err := estargz.Open(sr, estargz.WithDecompressors(new(zstdchunked.Decompressor)))
	if err != nil {
		fail("open: %v", err)
	}
	want, err := digest.Parse(os.Args[2])
	if err != nil {
		fail("toc digest: %v", err)
	}
	verifier, err := r.VerifyTOC(want)
	if err != nil {
		fail("verify TOC: %v", err)
	}
	root, ok := r.Lookup("")
	if !ok {
		fail("no root")
	}
	enc := json.NewEncoder(os.Stdout)
	files, chunks := 0, 0
	var walk func(p string, e *estargz.TOCEntry)
	walk = func(p string, e *estargz.TOCEntry) {
		rec := record{
			Path: p, Type: e.Type, Mode: unixMode(e), UID: e.UID, GID: e.GID, Uname: e.Uname,
			Size: e.Size, Link: e.LinkName, DevMajor: e.DevMajor, DevMinor: e.DevMinor, NumLink: e.NumLink,
		}
		if e.Type != "symlink" {
			rec.Link = ""
		}
		if len(e.Xattrs) > 0 {
			rec.Xattrs = map[string]string{}
			for k, v := range e.Xattrs {
				rec.Xattrs[k] = base64.StdEncoding.EncodeToString(v)
			}
		}
		if e.Type == "reg" {
			files++
			fr, err := r.OpenFile(p)
			if err != nil {
				fail("%s: open: %v", p, err)
			}
			h := sha256.New()
			if _, err := io.Copy(h, fr); err != nil {
				fail("%s: read: %v", p, err)
			}
			rec.SHA256 = fmt.Sprintf("sha256:%x", h.Sum(nil))
			if e.Digest != "" && e.Digest != rec.SHA256 {
				fail("%s: content %s does not match TOC digest %s", p, rec.SHA256, e.Digest)
			}
			// Verify every chunk against its chunkDigest, as the snapshotter does.
			for off := int64(0); off < e.Size; {
				ce, ok := r.ChunkEntryForOffset(p, off)
				if !ok {
					fail("%s: no chunk at offset %d", p, off)
				}
				v, err := verifier.Verifier(ce)
				if err != nil {
					fail("%s: chunk at %d: %v", p, off, err)
				}
				if _, err := io.Copy(v, io.NewSectionReader(fr, ce.ChunkOffset, ce.ChunkSize)); err != nil {
					fail("%s: chunk at %d: %v", p, off, err)
				}
				if !v.Verified() {
					fail("%s: chunk at %d does not match its chunkDigest", p, off)
				}
				chunks++
				rec.Chunks++
				off = ce.ChunkOffset + ce.ChunkSize
			}
		}
		if err := enc.Encode(rec); err != nil {
			fail("%v", err)
		}
		if e.Type == "dir" {
			var names []string
			e.ForeachChild(func(name string, _ *estargz.TOCEntry) bool {
				names = append(names, name)
				return true
			})
			sort.Strings(names)
			for _, n := range names {
				c, _ := e.LookupChild(n)
				walk(path.Join(p, n), c)
			}
		}
	}
	walk("", root)
	fmt.Fprintf(os.Stderr, "esgz-verify: TOC %s verified; %d files, %d chunks verified\n", want, files, chunks)
}
