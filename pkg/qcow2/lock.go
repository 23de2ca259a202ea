package qcow2

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Image locking, compatible with QEMU's (block/file-posix.c): open file
// description (OFD) read locks on single bytes. Byte 100+i means "holds
// permission i", byte 200+i means "does not share permission i", for the
// permissions consistent-read (0), write (1) and resize (3). A writer holds
// 100, 101, 103, 201 and 203; a reader holds 100 and 201. Before locking,
// an opener tests the bytes it would conflict with. So qemu-img refuses an
// image we serve, and we refuse one QEMU (or another of our processes)
// has open for writing.
const (
	lockPermBase   = 100
	lockSharedBase = 200
	permRead       = 0
	permWrite      = 1
	permResize     = 3
)

// lockImage takes the locks for a reader or a writer, or fails with
// ErrLocked naming the permission another opener holds or refuses to share.
func lockImage(f *os.File, write bool) error {
	perms, unshared := []int{permRead}, []int{permWrite}
	if write {
		perms = []int{permRead, permWrite, permResize}
		unshared = []int{permWrite, permResize}
	}
	for _, p := range perms {
		if held, err := lockHeld(f, int64(lockSharedBase+p)); err != nil || held {
			return lockError(err, "another process does not share the %s permission", p)
		}
	}
	for _, p := range unshared {
		if held, err := lockHeld(f, int64(lockPermBase+p)); err != nil || held {
			return lockError(err, "another process holds the %s permission", p)
		}
	}
	for _, p := range perms {
		if err := setReadLock(f, int64(lockPermBase+p)); err != nil {
			return err
		}
	}
	for _, p := range unshared {
		if err := setReadLock(f, int64(lockSharedBase+p)); err != nil {
			return err
		}
	}
	return nil
}

func lockError(err error, format string, perm int) error {
	if err != nil {
		return err
	}
	name := map[int]string{permRead: "consistent read", permWrite: "write", permResize: "resize"}[perm]
	return fmt.Errorf(format+": %w", name, ErrLocked)
}

// lockHeld reports whether another open file description holds a lock on
// the byte.
func lockHeld(f *os.File, off int64) (bool, error) {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: off, Len: 1}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
		return false, fmt.Errorf("test image lock at byte %d: %w", off, err)
	}
	return lk.Type != unix.F_UNLCK, nil
}

func setReadLock(f *os.File, off int64) error {
	lk := unix.Flock_t{Type: unix.F_RDLCK, Whence: 0, Start: off, Len: 1}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		if err == unix.EAGAIN || err == unix.EACCES {
			return fmt.Errorf("image lock at byte %d is taken: %w", off, ErrLocked)
		}
		return fmt.Errorf("image lock at byte %d: %w", off, err)
	}
	return nil
}

// InUse reports whether the image at path is open with locks by anyone:
// QEMU, or a process of ours (an open of this process's own counts too,
// for OFD locks belong to the open file, not the process). It takes no
// lock itself and reads nothing but the lock state.
func InUse(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	for _, base := range []int64{lockPermBase, lockSharedBase} {
		for _, p := range []int64{permRead, permWrite, permResize} {
			held, err := lockHeld(f, base+p)
			if err != nil || held {
				return held, err
			}
		}
	}
	return false, nil
}
