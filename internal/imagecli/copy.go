package imagecli

import (
	"context"
	"errors"
	"io"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-qcow2/csi-qcow2/internal/sparsecopy"
)

// copySparse copies src into dst, which reads as zeros, skipping what src
// does not allocate and not writing blocks of zeros (sparsecopy.Copy).
func copySparse(ctx context.Context, src disk, dst io.WriterAt, block int64) error {
	return sparsecopy.Copy(ctx, src, src.Size(), dst, block)
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

var _ sparsecopy.AllocationMap = (*rawDisk)(nil)
