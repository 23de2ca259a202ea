package qcow2

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// File is the host file an image lives in. It is an interface so tests can
// inject faults (ENOSPC, EIO) and record write/flush order for power-cut
// simulation; *os.File is wrapped by OSFile.
type File interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes every completed write durable (fdatasync).
	Sync() error
	// Size is the current length of the file.
	Size() (int64, error)
	// Truncate sets the length of the file.
	Truncate(size int64) error
	// PunchHole deallocates a byte range; it reads back as zeros afterwards.
	// Filesystems without hole punching may return an error; callers treat
	// that as advisory.
	PunchHole(off, length int64) error
	// ZeroRange makes [off, off+length) read as zeros, extending the file
	// if it ends earlier, without writing the zeros where the filesystem
	// can avoid it. An error means the caller must write zeros itself.
	ZeroRange(off, length int64) error
	Close() error
}

// OSFile adapts *os.File to File.
type OSFile struct{ *os.File }

var _ File = OSFile{}

// Sync issues fdatasync: data and the metadata needed to read it back.
func (f OSFile) Sync() error {
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return fmt.Errorf("fdatasync %s: %w", f.Name(), err)
	}
	return nil
}

// Size returns the file's length.
func (f OSFile) Size() (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// PunchHole deallocates [off, off+length) keeping the file size.
func (f OSFile) PunchHole(off, length int64) error {
	err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if err != nil {
		return fmt.Errorf("punch hole at %#x+%#x: %w", off, length, err)
	}
	return nil
}

// ZeroRange uses fallocate(FALLOC_FL_ZERO_RANGE), which allocates
// unwritten extents (and extends the file) instead of writing zeros.
func (f OSFile) ZeroRange(off, length int64) error {
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE, off, length); err != nil {
		return fmt.Errorf("zero range at %#x+%#x: %w", off, length, err)
	}
	return nil
}

// ReadAtNoWait fills p from off only if the whole range is in the page
// cache: preadv2 with RWF_NOWAIT (Linux 4.14+) fails with EAGAIN instead of
// waiting for the disk. Anything short of a full read reports false.
func (f OSFile) ReadAtNoWait(p []byte, off int64) bool {
	if len(p) == 0 || off < 0 || unsafe.Sizeof(uintptr(0)) < 8 {
		return len(p) == 0 // 32-bit: the offset would need splitting
	}
	iov := unix.Iovec{Base: &p[0]}
	iov.SetLen(len(p))
	// On 64-bit Linux the offset is the fourth argument whole (pos_h 0).
	n, _, errno := unix.Syscall6(unix.SYS_PREADV2, f.Fd(), uintptr(unsafe.Pointer(&iov)), 1,
		uintptr(off), 0, unix.RWF_NOWAIT)
	runtime.KeepAlive(p)
	return errno == 0 && int(n) == len(p)
}

// readFull reads exactly len(p) bytes at off; bytes beyond the end of the
// host file read as zeros (clusters may be allocated past EOF until written).
func readFull(f io.ReaderAt, p []byte, off int64) error {
	n, err := f.ReadAt(p, off)
	if err == io.EOF || (err == nil && n == len(p)) {
		clear(p[n:])
		return nil
	}
	if err != nil {
		return fmt.Errorf("read %d bytes at %#x: %w", len(p), off, err)
	}
	return nil
}

// writeFull writes all of p at off.
func writeFull(f io.WriterAt, p []byte, off int64) error {
	if _, err := f.WriteAt(p, off); err != nil {
		return fmt.Errorf("write %d bytes at %#x: %w", len(p), off, err)
	}
	return nil
}
