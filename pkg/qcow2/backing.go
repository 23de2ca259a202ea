package qcow2

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// backingReader is the read side of a backing image (qcow2 or raw).
type backingReader interface {
	io.ReaderAt
	Size() int64
	Close() error
}

// maxBackingDepth bounds backing chains (and loops through symlinks).
const maxBackingDepth = 16

type rawBacking struct {
	f    *os.File
	size int64
}

func (r *rawBacking) ReadAt(p []byte, off int64) (int, error) { return r.f.ReadAt(p, off) }
func (r *rawBacking) Size() int64                             { return r.size }
func (r *rawBacking) Close() error                            { return r.f.Close() }

// openBacking opens the backing file named in the header, refusing any path
// that resolves outside the allowed root.
func (img *Image) openBacking() error {
	name := img.h.backingFile
	if name == "" || img.opts.NoBacking {
		return nil
	}
	path, err := img.resolveBacking(name)
	if err != nil {
		return err
	}
	depth := img.opts.backingDepth + 1
	if depth > maxBackingDepth {
		return fmt.Errorf("backing chain deeper than %d: %w", maxBackingDepth, ErrUnsupported)
	}
	format := img.h.backingFormat
	if format == "" {
		format = probeFormat(path)
	}
	switch format {
	case "raw":
		f, err := os.Open(path)
		if err != nil {
			return fmt.Errorf("backing file: %w", err)
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return err
		}
		img.backing = &rawBacking{f: f, size: fi.Size()}
	case "qcow2":
		opts := OpenOptions{ReadOnly: true, BackingRoot: img.backingRoot(), CacheSize: img.opts.CacheSize, backingDepth: depth}
		b, err := Open(path, opts)
		if err != nil {
			return fmt.Errorf("backing file: %w", err)
		}
		img.backing = b
	default:
		return fmt.Errorf("backing format %q: %w", format, ErrUnsupported)
	}
	return nil
}

func (img *Image) backingRoot() string {
	if img.opts.BackingRoot != "" {
		return img.opts.BackingRoot
	}
	if img.path == "" {
		return ""
	}
	return filepath.Dir(img.path)
}

// resolveBacking turns the header's backing name into a path inside the
// root: relative names are relative to the image's directory, symlinks are
// resolved, and the result must stay under the (resolved) root.
func (img *Image) resolveBacking(name string) (string, error) {
	root := img.backingRoot()
	if root == "" {
		return "", fmt.Errorf("backing file %q with no root to resolve it in: %w", name, ErrBackingOutsideRoot)
	}
	if strings.HasPrefix(name, "json:") || strings.Contains(name, "://") {
		return "", fmt.Errorf("backing file %q is not a plain path: %w", name, ErrUnsupported)
	}
	p := name
	if !filepath.IsAbs(p) {
		base := root
		if img.path != "" {
			base = filepath.Dir(img.path)
		}
		p = filepath.Join(base, p)
	}
	root, err := filepath.Abs(root)
	if err != nil {
		return "", err
	}
	if p, err = filepath.Abs(p); err != nil {
		return "", err
	}
	realRoot, err := filepath.EvalSymlinks(root)
	if err != nil {
		return "", fmt.Errorf("backing root %q: %w", root, err)
	}
	real, err := filepath.EvalSymlinks(p)
	if err != nil {
		return "", fmt.Errorf("backing file %q: %w", name, err)
	}
	rel, err := filepath.Rel(realRoot, real)
	if err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) || filepath.IsAbs(rel) {
		return "", fmt.Errorf("backing file %q resolves to %q, outside %q: %w", name, real, realRoot, ErrBackingOutsideRoot)
	}
	return real, nil
}

// probeFormat says "qcow2" for files with the qcow2 magic, else "raw".
func probeFormat(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return "raw"
	}
	defer f.Close()
	var m [4]byte
	if _, err := io.ReadFull(f, m[:]); err == nil && string(m[:]) == "QFI\xfb" {
		return "qcow2"
	}
	return "raw"
}

func (img *Image) closeBacking() {
	if img.backing != nil {
		img.backing.Close()
		img.backing = nil
	}
}

// readBacking fills p with the backing image's bytes at off (zeros past its
// end or without a backing file).
func (img *Image) readBacking(p []byte, off int64) error {
	if img.backing == nil {
		clear(p)
		return nil
	}
	bs := img.backing.Size()
	n := int64(len(p))
	if off >= bs {
		clear(p)
		return nil
	}
	if off+n > bs {
		clear(p[bs-off:])
		p = p[:bs-off]
	}
	if err := readFull(img.backing, p, off); err != nil {
		return fmt.Errorf("backing file: %w", err)
	}
	return nil
}
