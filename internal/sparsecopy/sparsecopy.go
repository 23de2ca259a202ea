// Package sparsecopy copies a disk into a destination that reads as zeros
// and keeps the copy sparse: runs the source's allocation map says read as
// zeros are skipped unread, and blocks that read as zeros are not written.
// Convert (internal/imagecli) and the driver's clone and restore
// (pkg/driver) both copy this way.
package sparsecopy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Chunk is how much Copy reads per call; a multiple of every block size
// (qcow2 clusters are at most 2 MiB).
const Chunk = 4 << 20

// AllocationMap reports whether [off, off+length) starts with data the
// source stores (allocated) or with a run that reads as zeros, and how long
// that run is (at most length).
type AllocationMap interface {
	Allocated(off, length int64) (allocated bool, n int64, err error)
}

// ExtentLister is what qcow2 images and snapshot views answer: their
// extents through the backing chain (qcow2.Image.Extents).
type ExtentLister interface {
	Extents(off, length int64) ([]qcow2.Extent, error)
}

var (
	_ ExtentLister = (*qcow2.Image)(nil)
	_ ExtentLister = (*qcow2.SnapshotView)(nil)
)

// extentMap is the allocation map of a qcow2 source: a run that reads as
// zeros (zero clusters, and clusters no layer of the chain allocates) is
// skipped unread; anything else, compressed clusters included, is read.
type extentMap struct{ ExtentLister }

func (m extentMap) Allocated(off, length int64) (bool, int64, error) {
	ext, err := m.Extents(off, length)
	if err != nil || len(ext) == 0 {
		return true, length, err
	}
	return !ext[0].Zero, ext[0].Length, nil
}

// MapOf returns the allocation map of src: its extents if it lists them,
// itself if it is an AllocationMap, or nil when none is known (everything
// is read).
func MapOf(src io.ReaderAt) AllocationMap {
	if l, ok := src.(ExtentLister); ok {
		return extentMap{l}
	}
	m, _ := src.(AllocationMap)
	return m
}

// Copy copies size bytes of src into dst, which reads as zeros, in Chunk
// pieces: runs of whole blocks the allocation map of src (MapOf) reports
// as zeros are not read, and blocks of zeros are not written. block is the
// granularity of both (a power of two dividing Chunk).
func Copy(ctx context.Context, src io.ReaderAt, size int64, dst io.WriterAt, block int64) error {
	am := MapOf(src)
	buf := make([]byte, Chunk)
	zero := make([]byte, block)
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("interrupted: %w", err)
		}
		n := min(int64(Chunk), size-off)
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
