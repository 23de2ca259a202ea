package main

import (
	"archive/tar"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// dirEntries lists a directory as a layer: the directory is the layer's
// root (it has no entry of its own). Every entry is owned by 0:0, since a
// directory a build script staged says nothing about the image's users;
// a source that needs other owners is given as a tar.
func dirEntries(root string, epoch time.Time) (*layerEntries, error) {
	l := &layerEntries{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == root {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		e, keep, err := dirEntry(p, filepath.ToSlash(rel), fi, epoch)
		if err != nil {
			return err
		}
		if !keep {
			l.dropped++
			return nil
		}
		l.entries = append(l.entries, e)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return l, nil
}

// dirEntry makes the entry for one file; keep is false for a device node
// or a FIFO, which a layer does not carry.
func dirEntry(p, name string, fi fs.FileInfo, epoch time.Time) (e entry, keep bool, err error) {
	h := tar.Header{Name: name, Mode: tarMode(fi.Mode())}
	switch m := fi.Mode(); {
	case m.IsDir():
		h.Typeflag = tar.TypeDir
	case m.IsRegular():
		h.Typeflag = tar.TypeReg
		h.Size = fi.Size()
		e.open = func() (io.ReadCloser, error) { return os.Open(p) }
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Nlink > 1 {
			e.linkKey = fmt.Sprintf("%d:%d", st.Dev, st.Ino)
		}
	case m&fs.ModeSymlink != 0:
		h.Typeflag = tar.TypeSymlink
		if h.Linkname, err = os.Readlink(p); err != nil {
			return e, false, err
		}
	case m&(fs.ModeDevice|fs.ModeCharDevice|fs.ModeNamedPipe) != 0:
		return e, false, nil
	default:
		return e, false, fmt.Errorf("%s: unsupported file type %v", p, m.Type())
	}
	e.hdr = normalize(h, epoch)
	return e, true, nil
}

// tarMode is the tar form of a file's permission and special bits.
func tarMode(m fs.FileMode) int64 {
	mode := int64(m.Perm())
	if m&fs.ModeSetuid != 0 {
		mode |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		mode |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		mode |= 0o1000
	}
	return mode
}
