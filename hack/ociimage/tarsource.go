package main

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// compressedMagic names the compressions a layer source may not have: the
// writer's layers are uncompressed, and it does not unpack.
var compressedMagic = []struct {
	magic []byte
	name  string
}{
	{[]byte{0x1f, 0x8b}, "gzip"},
	{[]byte{0x28, 0xb5, 0x2f, 0xfd}, "zstd"},
	{[]byte{0xfd, '7', 'z', 'X', 'Z', 0}, "xz"},
	{[]byte("BZh"), "bzip2"},
}

// tarEntries lists an uncompressed tar as a layer. Owners, modes, links
// are the tar's own; names lose a leading "./" or "/". The bytes are not
// read now: each regular file remembers where its data starts in the
// file, which stays open until the layer is written.
func tarEntries(file string, epoch time.Time) (_ *layerEntries, err error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	l := &layerEntries{closer: f}
	defer func() {
		if err != nil {
			f.Close()
		}
	}()
	if err := refuseCompressed(f, file); err != nil {
		return nil, err
	}
	hardLinks := map[string]string{} // link name -> target name
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		e, keep, err := tarEntry(f, h, epoch)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		if !keep {
			if isDevice(h.Typeflag) {
				l.dropped++
			}
			continue
		}
		if e.hdr.Typeflag == tar.TypeLink {
			hardLinks[e.hdr.Name] = e.hdr.Linkname
		}
		l.entries = append(l.entries, e)
	}
	if err := resolveHardLinks(l.entries, hardLinks); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	return l, nil
}

func refuseCompressed(f *os.File, file string) error {
	head := make([]byte, 6)
	n, err := io.ReadFull(f, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return err
	}
	for _, c := range compressedMagic {
		if bytes.HasPrefix(head[:n], c.magic) {
			return fmt.Errorf("%s is %s-compressed; give the tar uncompressed", file, c.name)
		}
	}
	_, err = f.Seek(0, io.SeekStart)
	return err
}

// tarEntry makes the entry for one tar header; keep is false for what a
// layer does not carry (device nodes, FIFOs, global headers). The tar
// reader reads no further than the header, so the file's offset is where
// this entry's data starts.
func tarEntry(f *os.File, h *tar.Header, epoch time.Time) (e entry, keep bool, err error) {
	switch h.Typeflag {
	case tar.TypeReg, tar.TypeRegA:
		h.Typeflag = tar.TypeReg
		off, err := f.Seek(0, io.SeekCurrent)
		if err != nil {
			return e, false, err
		}
		size := h.Size
		e.open = func() (io.ReadCloser, error) {
			return io.NopCloser(io.NewSectionReader(f, off, size)), nil
		}
	case tar.TypeDir, tar.TypeSymlink, tar.TypeLink:
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo, tar.TypeXGlobalHeader:
		return e, false, nil
	default:
		return e, false, fmt.Errorf("%s: unsupported tar entry type %q", h.Name, h.Typeflag)
	}
	for k := range h.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return e, false, fmt.Errorf("%s: sparse files are not supported", h.Name)
		}
	}
	name, err := cleanName(h.Name)
	if err != nil {
		return e, false, err
	}
	if name == "" {
		return e, false, nil // the root directory itself
	}
	hc := *h
	hc.Name = name
	if hc.Typeflag == tar.TypeLink {
		if hc.Linkname, err = cleanName(h.Linkname); err != nil {
			return e, false, err
		}
	}
	e.hdr = normalize(hc, epoch)
	return e, true, nil
}

func isDevice(t byte) bool { return t == tar.TypeChar || t == tar.TypeBlock || t == tar.TypeFifo }

// resolveHardLinks gives every member of a hard-link group the target's
// header and bytes and one linkKey, so that sortEntries can choose which
// of the names carries the bytes (the tar's own choice may sort after a
// link to it).
func resolveHardLinks(entries []entry, links map[string]string) error {
	if len(links) == 0 {
		return nil
	}
	byName := make(map[string]int, len(entries))
	for i, e := range entries {
		byName[e.hdr.Name] = i
	}
	for i := range entries {
		e := &entries[i]
		if e.hdr.Typeflag != tar.TypeLink {
			continue
		}
		target := e.hdr.Linkname
		for hops := 0; ; hops++ {
			next, isLink := links[target]
			if !isLink {
				break
			}
			if hops > len(links) {
				return fmt.Errorf("hard link %s: loop", e.hdr.Name)
			}
			target = next
		}
		ti, ok := byName[target]
		if !ok || entries[ti].hdr.Typeflag != tar.TypeReg {
			return fmt.Errorf("hard link %s: target %s is not a regular file of the tar", e.hdr.Name, target)
		}
		t := &entries[ti]
		t.linkKey = target
		name := e.hdr.Name
		e.hdr = t.hdr
		e.hdr.Name = name
		e.open = t.open
		e.linkKey = target
	}
	return nil
}
