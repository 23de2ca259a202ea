package imagecli

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/csi-qcow2/csi-qcow2/pkg/nbdattach"
	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// exportBackend is an open image that serve and map hand to an NBD export.
type exportBackend interface {
	nbdattach.Backend
	Close() error
}

var (
	_ exportBackend = (*qcow2.Image)(nil)
	_ exportBackend = (*rawBackend)(nil)
)

// openBackend opens path for serving: a qcow2 image with its backing chain,
// or a raw file. format "" probes.
func openBackend(path, format string, readOnly bool) (exportBackend, error) {
	format, err := resolveFormat(path, format)
	if err != nil {
		return nil, err
	}
	if format == formatQcow2 {
		return openQcow2(path, qcow2.OpenOptions{ReadOnly: readOnly})
	}
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	d, err := openRaw(path, flag)
	if err != nil {
		return nil, err
	}
	return &rawBackend{rawDisk: d, readOnly: readOnly}, nil
}

// rawBackend serves a raw file: zeroing and discarding punch holes where
// the host filesystem can.
type rawBackend struct {
	*rawDisk
	readOnly bool
}

// Flush makes every completed write durable.
func (b *rawBackend) Flush() error {
	if b.readOnly {
		return nil
	}
	return unix.Fdatasync(int(b.Fd()))
}

// Discard punches the range out of the file. A filesystem that cannot
// punch holes answers errors.ErrUnsupported, which the export treats as
// "nothing to do" (TRIM is advisory).
func (b *rawBackend) Discard(off, length int64) error {
	return b.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

// WriteZeroes punches a hole when it may unmap, and otherwise zeroes the
// range keeping its blocks allocated (NBD_CMD_FLAG_NO_HOLE). Where the
// filesystem cannot, errors.ErrUnsupported makes the export write zeros.
func (b *rawBackend) WriteZeroes(off, length int64, mayUnmap bool) error {
	if mayUnmap {
		return b.Discard(off, length)
	}
	return b.fallocate(unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

func (b *rawBackend) fallocate(mode uint32, off, length int64) error {
	err := unix.Fallocate(int(b.Fd()), mode, off, length)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		return fmt.Errorf("fallocate: %w", errors.ErrUnsupported)
	}
	if err != nil {
		return fmt.Errorf("fallocate %d+%d: %w", off, length, err)
	}
	return nil
}

// Close syncs a writable file and closes it.
func (b *rawBackend) Close() error {
	return errors.Join(b.Flush(), b.File.Close())
}
