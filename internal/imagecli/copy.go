package imagecli

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// copyChunk is how much convert reads per call; a multiple of every block
// size (qcow2 clusters are at most 2 MiB).
const copyChunk = 4 << 20

// allocationMap reports whether [off, off+length) starts with data the
// source stores (allocated) or with a run that reads as zeros, and how long
// that run is (at most length).
type allocationMap interface {
	Allocated(off, length int64) (allocated bool, n int64, err error)
}

// extentLister is what qcow2 images and snapshot views answer: their
// extents through the backing chain (qcow2.Image.Extents).
type extentLister interface {
	Extents(off, length int64) ([]qcow2.Extent, error)
}

var (
	_ extentLister = (*qcow2.Image)(nil)
	_ extentLister = (*qcow2.SnapshotView)(nil)
)

// extentMap is the allocation map of a qcow2 source: a run that reads as
// zeros (zero clusters, and clusters no layer of the chain allocates) is
// skipped unread; anything else, compressed clusters included, is read.
type extentMap struct{ extentLister }

func (m extentMap) Allocated(off, length int64) (bool, int64, error) {
	ext, err := m.Extents(off, length)
	if err != nil || len(ext) == 0 {
		return true, length, err
	}
	return !ext[0].Zero, ext[0].Length, nil
}

// sourceMap returns the allocation map of src, or nil when none is known.
func sourceMap(src disk) allocationMap {
	if l, ok := src.(extentLister); ok {
		return extentMap{l}
	}
	m, _ := src.(allocationMap)
	return m
}

// copySparse copies src into dst, which reads as zeros, in copyChunk
// pieces, skipping unallocated runs and not writing blocks of zeros.
func copySparse(ctx context.Context, src disk, dst io.WriterAt, block int64) error {
	size := src.Size()
	am := sourceMap(src)
	buf := make([]byte, copyChunk)
	zero := make([]byte, block)
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("interrupted: %w", err)
		}
		n := min(int64(copyChunk), size-off)
		if am != nil {
			alloc, run, err := am.Allocated(off, n)
			if err != nil {
				return fmt.Errorf("allocation status at %d: %w", off, err)
			}
			if skip := run / block * block; !alloc && skip > 0 {
				off += skip
				continue
			}
		}
		got, err := src.ReadAt(buf[:n], off)
		if err != nil && !(errors.Is(err, io.EOF) && int64(got) == n) {
			return fmt.Errorf("read at %d: %w", off, err)
		}
		if err := writeNonZero(dst, buf[:n], off, zero); err != nil {
			return err
		}
		off += n
	}
	return nil
}

// writeNonZero writes p at off, one WriteAt per run of blocks that are not
// all zeros. len(zero) is the block size.
func writeNonZero(dst io.WriterAt, p []byte, off int64, zero []byte) error {
	start := -1 // start of the pending run of non-zero blocks
	for i := 0; i < len(p); i += len(zero) {
		end := min(i+len(zero), len(p))
		isData := !bytes.Equal(p[i:end], zero[:end-i])
		switch {
		case isData && start < 0:
			start = i
		case !isData && start >= 0:
			if err := writeRun(dst, p[start:i], off+int64(start)); err != nil {
				return err
			}
			start = -1
		}
	}
	if start >= 0 {
		return writeRun(dst, p[start:], off+int64(start))
	}
	return nil
}

func writeRun(dst io.WriterAt, p []byte, off int64) error {
	if _, err := dst.WriteAt(p, off); err != nil {
		return fmt.Errorf("write at %d: %w", off, err)
	}
	return nil
}

// Allocated reports data and holes of a raw file with SEEK_DATA and
// SEEK_HOLE. Where the filesystem cannot say, everything is data.
func (d *rawDisk) Allocated(off, length int64) (bool, int64, error) {
	data, err := d.Seek(off, unix.SEEK_DATA)
	switch {
	case errors.Is(err, syscall.ENXIO):
		return false, length, nil // only a hole up to the end of the file
	case err != nil:
		return true, length, nil
	case data > off:
		return false, min(data-off, length), nil
	}
	hole, err := d.Seek(off, unix.SEEK_HOLE)
	if err != nil || hole <= off {
		return true, length, nil
	}
	return true, min(hole-off, length), nil
}

var _ allocationMap = (*rawDisk)(nil)
