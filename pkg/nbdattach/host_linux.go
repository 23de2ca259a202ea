//go:build linux

package nbdattach

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// hostBlockDevices is blockDevices on the real node: dir is /sys/block,
// root the same as an fs.FS.
type hostBlockDevices struct {
	dir  string
	root fs.FS
}

var _ blockDevices = hostBlockDevices{}

func (h hostBlockDevices) sys() fs.FS { return h.root }

// flush fsyncs the block device: the kernel writes back the device's dirty
// page cache and then sends NBD_CMD_FLUSH, which the server answers only
// once everything is durable. A read-only descriptor is enough for fsync and
// also works on a read-only device. It is opened O_EXCL, which a mounted
// filesystem (or anyone else holding the device exclusively) makes fail
// with EBUSY: a disconnect must not pull a device from under a mount.
func (hostBlockDevices) flush(ctx context.Context, index int) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	fd, err := openExclusive(index)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Fsync(fd); err != nil {
		return fmt.Errorf("fsync %s: %w", DevicePath(index), err)
	}
	return nil
}

// claim opens the device O_EXCL, as flush does, and closes it at once.
// Opening does no I/O, so it returns at once on a device whose server is
// gone.
func (hostBlockDevices) claim(index int) error {
	fd, err := openExclusive(index)
	if err != nil {
		return err
	}
	return unix.Close(fd)
}

func openExclusive(index int) (int, error) {
	fd, err := unix.Open(DevicePath(index), unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err == unix.EBUSY {
		return -1, fmt.Errorf("%s is mounted or held exclusively: %w: %w", DevicePath(index), ErrDeviceBusy, err)
	}
	if err != nil {
		return -1, fmt.Errorf("opening %s: %w", DevicePath(index), err)
	}
	return fd, nil
}

// setIOTimeout writes the block queue's request timer in milliseconds.
// The kernel applies it to requests started from then on.
func (h hostBlockDevices) setIOTimeout(index int, d time.Duration) error {
	name := filepath.Join(h.dir, fmt.Sprintf("nbd%d", index), sysfsIOTimeoutFile)
	if err := os.WriteFile(name, []byte(strconv.FormatInt(d.Milliseconds(), 10)), 0); err != nil {
		return fmt.Errorf("nbdattach: setting the request timer of nbd%d: %w", index, err)
	}
	return nil
}
