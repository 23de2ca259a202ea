package main

import (
	"archive/tar"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
	"time"
)

// entry is one file of a layer: its normalized tar header and, for a
// regular file, where its bytes come from.
type entry struct {
	hdr tar.Header
	// open returns the file's bytes; only regular files have it.
	open func() (io.ReadCloser, error)
	// linkKey groups the names of one file with several hard links:
	// entries with the same non-empty key are one file. The first of them
	// in layer order carries the bytes, the others become tar hard links
	// to it, so an extractor always meets a link's target first.
	linkKey string
}

// layerEntries is what a source yields: its entries in any order, plus
// what was left out and what must be closed after the layer is written.
type layerEntries struct {
	entries []entry
	dropped int // device nodes and FIFOs: the runtime provides /dev
	closer  io.Closer
}

func (l *layerEntries) close() error {
	if l.closer == nil {
		return nil
	}
	return l.closer.Close()
}

// cleanName turns a source path ("./usr/bin", "/etc/", "bin") into the
// layer's form ("usr/bin"), or "" for the root itself. It refuses names
// that climb out of the root.
func cleanName(name string) (string, error) {
	n := path.Clean("/" + strings.TrimPrefix(name, "./"))
	for _, part := range strings.Split(name, "/") {
		if part == ".." {
			return "", fmt.Errorf("%q climbs out of the layer", name)
		}
	}
	return strings.TrimPrefix(n, "/"), nil
}

// normalize keeps of a header only what the layer means and fixes the
// rest, so that the same files give the same bytes: a fixed mtime, no
// atime/ctime, no user or group names (extractors use the numbers), no
// extended attributes, no device numbers, and only the permission,
// setuid, setgid and sticky bits of the mode.
func normalize(h tar.Header, epoch time.Time) tar.Header {
	out := tar.Header{
		Typeflag: h.Typeflag,
		Name:     h.Name,
		Linkname: h.Linkname,
		Size:     h.Size,
		Mode:     h.Mode & 0o7777,
		Uid:      h.Uid,
		Gid:      h.Gid,
		ModTime:  epoch,
	}
	switch out.Typeflag {
	case tar.TypeDir:
		out.Name += "/"
		out.Size = 0
	case tar.TypeSymlink, tar.TypeLink:
		out.Size = 0
	}
	return out
}

// sortEntries puts the entries in path order (a directory before what it
// holds, since a prefix sorts first), refuses a path given twice, and
// turns every hard-link group into one regular file plus links to it.
func sortEntries(entries []entry) error {
	sort.Slice(entries, func(i, j int) bool { return entries[i].hdr.Name < entries[j].hdr.Name })
	first := map[string]string{} // linkKey -> name of the entry carrying the bytes
	for i := range entries {
		e := &entries[i]
		if i > 0 && entries[i-1].hdr.Name == e.hdr.Name {
			return fmt.Errorf("%q is given twice", e.hdr.Name)
		}
		if e.linkKey == "" {
			continue
		}
		target, ok := first[e.linkKey]
		if !ok {
			first[e.linkKey] = e.hdr.Name
			continue
		}
		e.hdr.Typeflag = tar.TypeLink
		e.hdr.Linkname = target
		e.hdr.Size = 0
		e.open = nil
	}
	return nil
}

// writeLayer writes the entries, already sorted, as an uncompressed tar.
func writeLayer(w io.Writer, entries []entry) error {
	tw := tar.NewWriter(w)
	for i := range entries {
		if err := writeEntry(tw, &entries[i]); err != nil {
			return err
		}
	}
	return tw.Close()
}

func writeEntry(tw *tar.Writer, e *entry) error {
	hdr := e.hdr
	if err := tw.WriteHeader(&hdr); err != nil {
		return fmt.Errorf("%s: %w", hdr.Name, err)
	}
	if hdr.Typeflag != tar.TypeReg {
		return nil
	}
	r, err := e.open()
	if err != nil {
		return err
	}
	defer r.Close()
	n, err := io.CopyN(tw, r, hdr.Size)
	if err != nil {
		return fmt.Errorf("%s: %d of %d bytes copied (changed while read?): %w", hdr.Name, n, hdr.Size, err)
	}
	return nil
}
