package qcow2

import "errors"

// Sentinel errors. Every error the package returns wraps one of these (or a
// host I/O error such as syscall.ENOSPC), so callers decide with errors.Is.
var (
	// ErrNotQcow2 means the file does not start with the qcow2 magic.
	ErrNotQcow2 = errors.New("qcow2: not a qcow2 image")
	// ErrUnsupported means the image uses a feature this engine does not
	// implement (encryption, external data files, unknown incompatible bits).
	ErrUnsupported = errors.New("qcow2: unsupported image feature")
	// ErrCorrupt means the metadata is inconsistent. Once seen on a writable
	// image the corrupt bit is set and further writes are refused.
	ErrCorrupt = errors.New("qcow2: image is corrupt")
	// ErrReadOnly is returned for writes to an image opened read-only.
	ErrReadOnly = errors.New("qcow2: image is read-only")
	// ErrClosed is returned for any operation after Close.
	ErrClosed = errors.New("qcow2: image is closed")
	// ErrInvalid is returned for bad arguments: offsets out of range, bad sizes,
	// bad create options.
	ErrInvalid = errors.New("qcow2: invalid argument")
	// ErrShrink is returned when a resize would cut off allocated data.
	ErrShrink = errors.New("qcow2: cannot shrink: clusters are allocated beyond the new size")
	// ErrSnapshotNotFound is returned when no snapshot has the given id or name.
	ErrSnapshotNotFound = errors.New("qcow2: snapshot not found")
	// ErrSnapshotExists is returned when a snapshot name is already taken.
	ErrSnapshotExists = errors.New("qcow2: snapshot already exists")
	// ErrSnapshotInUse is returned when deleting a snapshot that an open
	// SnapshotView is reading.
	ErrSnapshotInUse = errors.New("qcow2: snapshot is in use")
	// ErrLocked means another process (QEMU, or another of ours) has the
	// image open in a way that conflicts: a writer excludes everyone else
	// and readers exclude writers, as QEMU's image locking does.
	ErrLocked = errors.New("qcow2: image is in use by another process")
	// ErrBackingOutsideRoot is returned when a backing file path resolves
	// outside the directory the caller allowed.
	ErrBackingOutsideRoot = errors.New("qcow2: backing file outside the allowed root")
	// ErrSyncFailed means an fdatasync of the host file failed. It is
	// sticky: Linux may have dropped the dirty pages that sync covered, so
	// no later sync can vouch for them, and every later flush (and Close)
	// fails with it, wrapping the first error, until the image is reopened.
	ErrSyncFailed = errors.New("qcow2: a flush to the host file failed; reopen the image")
)
