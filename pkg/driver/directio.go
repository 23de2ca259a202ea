package driver

import (
	"errors"
	"io"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Direct I/O for the cross-node copy. A copy reads a whole snapshot on one
// node and writes a whole new image on another. Through the page cache
// that costs each side a copy of every byte between the cache and the
// copy's buffers, and it pushes out of the cache what the node's Pods
// keep there, for data read or written once. So the holder reads the
// snapshot's data clusters from the image file with O_DIRECT, and the
// receiver writes the new image's data the same way; both fall back to
// the page cache for whatever O_DIRECT cannot take (a filesystem that
// refuses it, such as tmpfs; an unaligned piece; compressed clusters or
// ones of a backing file).
//
// Coherence: Linux writes back the page cache's dirty pages of a range
// before an O_DIRECT read or write of it, and drops its cached pages after
// an O_DIRECT write, so a direct read sees what the engine wrote through
// the cache, and a later read through the cache sees a direct write.
// Durability does not change: an fdatasync of any descriptor of the file
// covers the direct writes (the receiver's Flush before its rename).

// directAlign is the alignment O_DIRECT gets here, for the buffer's
// address, the length and the file offset: the page size, which is a
// multiple of every logical block size Linux supports.
const directAlign = 4096

// alignedBuffer returns n bytes at an address that is a multiple of
// directAlign.
func alignedBuffer(n int) []byte {
	b := make([]byte, n+directAlign)
	skip := (directAlign - int(uintptr(unsafe.Pointer(unsafe.SliceData(b)))%directAlign)) % directAlign
	return b[skip : skip+n : skip+n]
}

// directOK reports whether p at off can go through an O_DIRECT descriptor.
func directOK(p []byte, off int64) bool {
	return len(p) > 0 && len(p)%directAlign == 0 && off%directAlign == 0 &&
		uintptr(unsafe.Pointer(unsafe.SliceData(p)))%directAlign == 0
}

// openDirect opens path with O_DIRECT, or fails where the filesystem does
// not support it.
func openDirect(path string, flag int) (*os.File, error) {
	return os.OpenFile(path, flag|unix.O_DIRECT|unix.O_CLOEXEC, 0)
}

// snapshotReader reads a snapshot's data for the peer service: runs the
// allocation map places in the image's own file (uncompressed data) from
// direct, the rest through the view.
type snapshotReader struct {
	view   *qcow2.SnapshotView
	direct *os.File // the image file, O_DIRECT; nil reads all through view
	// directBytes counts what was read from direct.
	directBytes int64
}

// newSnapshotReader opens path, the view's image file, for direct reads;
// without O_DIRECT everything is read through the view.
func newSnapshotReader(view *qcow2.SnapshotView, path string) *snapshotReader {
	f, err := openDirect(path, os.O_RDONLY)
	if err != nil {
		f = nil
	}
	return &snapshotReader{view: view, direct: f}
}

// readExtent fills p with the guest bytes at off, which lie in e. The
// view guarantees e's clusters are neither freed nor rewritten while it
// is open (a write to the volume copies them), so the file holds the
// snapshot's bytes where the map says, as they are: the engine refuses
// encrypted images and external data files, the two cases where it
// would not.
func (r *snapshotReader) readExtent(p []byte, e qcow2.Extent, off int64) error {
	if r.direct != nil && e.Data && e.Depth == 0 && !e.Compressed && e.Offset >= 0 {
		host := e.Offset + (off - e.Start)
		if directOK(p, host) {
			// A short read (the file ends inside the last cluster) or a
			// refusal falls through to the view, which reads it as
			// QEMU would.
			if n, _ := r.direct.ReadAt(p, host); n == len(p) {
				r.directBytes += int64(n)
				return nil
			}
		}
	}
	if _, err := r.view.ReadAt(p, off); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}

func (r *snapshotReader) Close() error {
	if r.direct == nil {
		return nil
	}
	return r.direct.Close()
}

// directFile is the host file of a copy's new image: qcow2.OSFile for the
// engine's metadata and small writes, with aligned data writes of at
// least directMinWrite bytes sent through a second descriptor opened with
// O_DIRECT. The engine never writes metadata and data into the same
// cluster, and it writes a cluster's data before the L2 entry that points
// at it (the crash order) whichever descriptor carries it.
type directFile struct {
	qcow2.OSFile
	direct *os.File
}

var _ qcow2.File = directFile{}

// directMinWrite: smaller writes (headers, table slices) stay in the page
// cache, where the engine reads them back.
const directMinWrite = 64 << 10

// createDirectFile creates path for a new image; ok is false where the
// filesystem refuses O_DIRECT, and the caller uses the plain file.
func createDirectFile(path string) (f directFile, ok bool, err error) {
	plain, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return directFile{}, false, err
	}
	direct, err := openDirect(path, os.O_WRONLY)
	if err != nil {
		return directFile{OSFile: qcow2.OSFile{File: plain}}, false, nil
	}
	return directFile{OSFile: qcow2.OSFile{File: plain}, direct: direct}, true, nil
}

func (f directFile) WriteAt(p []byte, off int64) (int, error) {
	if f.direct != nil && len(p) >= directMinWrite && directOK(p, off) {
		return f.direct.WriteAt(p, off)
	}
	return f.OSFile.WriteAt(p, off)
}

func (f directFile) Close() error {
	var err error
	if f.direct != nil {
		err = f.direct.Close()
	}
	return errors.Join(err, f.OSFile.Close())
}
