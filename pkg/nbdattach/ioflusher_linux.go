//go:build linux

package nbdattach

import (
	"errors"
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// SetIOFlusher puts the process in the PR_SET_IO_FLUSHER state (Linux 5.6+):
// memory it allocates is never reclaimed by starting I/O, and its writes to
// the host file are not throttled on the devices they are meant to clean.
// A process that serves a block device of its own host (the CSI node
// driver, `csi-qcow2 image map`, or `image serve` with a kernel client such
// as nbd-client) needs it: otherwise reclaim can wait for dirty pages of
// /dev/nbdN to be written back, which waits for this process, which waits
// for that reclaim.
//
// The flag belongs to a thread and is inherited by the threads it creates.
// The Go runtime already runs several threads, so the prctl is made on all
// of them with syscall.AllThreadsSyscall6. That is refused when cgo is in
// use (ENOTSUP); only the calling thread is marked then, and the error says
// so: build with CGO_ENABLED=0, as the shipped binary is.
//
// The kernel answers EPERM without CAP_SYS_RESOURCE and EINVAL before 5.6;
// callers carry on without the flag and may report the error as a note.
func SetIOFlusher() error {
	_, _, errno := syscall.AllThreadsSyscall6(unix.SYS_PRCTL, unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0, 0)
	if errno == 0 {
		return nil
	}
	if errno != syscall.ENOTSUP {
		return fmt.Errorf("cannot mark the process PR_SET_IO_FLUSHER: %w", errno)
	}
	if err := unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("cannot mark the process PR_SET_IO_FLUSHER: %w", err)
	}
	return errors.New("PR_SET_IO_FLUSHER set on one thread only: a cgo build cannot set it on all threads")
}
