package imagecli

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

var qcow2Magic = []byte{'Q', 'F', 'I', 0xfb}

// probeFormat reports "qcow2" for a file starting with the qcow2 magic and
// "raw" otherwise, as qemu-img's probing does for these two formats.
func probeFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("could not open '%s': %w", path, err)
	}
	defer f.Close()
	magic := make([]byte, len(qcow2Magic))
	if _, err := io.ReadFull(f, magic); err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
		return "", fmt.Errorf("could not read '%s': %w", path, err)
	}
	if bytes.Equal(magic, qcow2Magic) {
		return formatQcow2, nil
	}
	return formatRaw, nil
}

// resolveFormat returns the -f value, probing when it is empty.
func resolveFormat(path, format string) (string, error) {
	if format == "" {
		return probeFormat(path)
	}
	if err := checkFormat(format); err != nil {
		return "", err
	}
	return format, nil
}

// disk is an open image of either format, as info, resize and convert see it.
type disk interface {
	io.ReaderAt
	Size() int64
	Close() error
}

// rawDisk is a raw image: the file is the disk.
type rawDisk struct {
	*os.File
	size int64
}

func (d *rawDisk) Size() int64 { return d.size }

var (
	_ disk = (*rawDisk)(nil)
	_ disk = (*qcow2.Image)(nil)
)

// openRaw opens a raw image; flag is os.O_RDONLY or os.O_RDWR.
func openRaw(path string, flag int) (*rawDisk, error) {
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("could not open '%s': %w", path, err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("could not open '%s': %w", path, err)
	}
	return &rawDisk{File: f, size: fi.Size()}, nil
}

// openQcow2 opens a qcow2 image and names the file in the error.
func openQcow2(path string, opts qcow2.OpenOptions) (*qcow2.Image, error) {
	opts.Lock = true
	img, err := qcow2.Open(absPath(path), opts)
	if err != nil {
		return nil, fmt.Errorf("could not open '%s': %w", path, err)
	}
	return img, nil
}

// openDisk opens path read-only in format ("" probes). Backing files are
// followed unless noBacking.
func openDisk(path, format string, noBacking bool) (disk, string, error) {
	format, err := resolveFormat(path, format)
	if err != nil {
		return nil, "", err
	}
	if format == formatRaw {
		d, err := openRaw(path, os.O_RDONLY)
		if err != nil {
			return nil, "", err
		}
		return d, format, nil
	}
	img, err := openQcow2(path, qcow2.OpenOptions{ReadOnly: true, NoBacking: noBacking})
	if err != nil {
		return nil, "", err
	}
	return img, format, nil
}

// absPath makes path absolute for pkg/qcow2, whose backing-file root check
// compares a relative image path's backing against an absolute root (or the
// reverse) and refuses the backing file; messages keep the user's path.
func absPath(path string) string {
	if abs, err := filepath.Abs(path); err == nil {
		return abs
	}
	return path
}

// diskUsage is the space the file takes on the host (st_blocks * 512),
// qemu-img's "disk size"; ok is false where the platform does not say.
func diskUsage(path string) (n int64, ok bool) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return st.Blocks * 512, true
}
