package qcow2

import (
	"fmt"
	"io"
	"sync/atomic"
)

// SnapshotView reads an internal snapshot's disk without reverting to it
// (io.ReaderAt). It is safe for concurrent use, and safe while the image is
// written: a snapshot's tables and clusters are never changed in place
// (writes copy them) and cannot be freed while it exists, and the snapshot
// cannot be deleted while a view of it is open (ErrSnapshotInUse). Each read
// holds ioGate shared, as a guest read does, so Close waits for it.
type SnapshotView struct {
	img    *Image
	info   SnapshotInfo
	l1     []l1Entry
	key    int64 // the snapshot's L1 offset, which identifies it while it exists
	closed atomic.Bool
}

var _ io.ReaderAt = (*SnapshotView)(nil)

// OpenSnapshot opens a read-only view of a snapshot, by id or name (id
// first). Close it to allow the snapshot to be deleted.
func (img *Image) OpenSnapshot(idOrName string) (*SnapshotView, error) {
	if err := img.checkOpen(false); err != nil {
		return nil, err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	i := img.findSnapshot(idOrName)
	if i < 0 {
		return nil, fmt.Errorf("snapshot %q: %w", idOrName, ErrSnapshotNotFound)
	}
	sn := &img.snapshots[i]
	l1, err := img.readL1(sn.l1Offset, sn.l1Size)
	if err != nil {
		return nil, err
	}
	if img.views == nil {
		img.views = make(map[int64]int)
	}
	img.views[sn.l1Offset]++
	return &SnapshotView{img: img, info: sn.info(), l1: l1, key: sn.l1Offset}, nil
}

// Size is the snapshot's virtual disk size.
func (v *SnapshotView) Size() int64 { return v.info.VirtualSize }

// Info describes the snapshot.
func (v *SnapshotView) Info() SnapshotInfo { return v.info }

// Close releases the snapshot. Reads after Close fail with ErrClosed.
func (v *SnapshotView) Close() error {
	if v.closed.Swap(true) {
		return ErrClosed
	}
	img := v.img
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.views[v.key]--; img.views[v.key] <= 0 {
		delete(img.views, v.key)
	}
	return nil
}

// ReadAt reads the snapshot's disk at off. Reads past its size return
// io.EOF; clusters the snapshot does not allocate read from the backing
// file, or as zeros.
func (v *SnapshotView) ReadAt(p []byte, off int64) (int, error) {
	img := v.img
	if v.closed.Load() {
		return 0, ErrClosed
	}
	if err := img.checkOpen(false); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, fmt.Errorf("read at negative offset %d: %w", off, ErrInvalid)
	}
	size := v.Size()
	if off >= size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > size-off {
		p, eof = p[:size-off], io.EOF
	}
	img.ioGate.RLock()
	defer img.ioGate.RUnlock()
	for done := 0; done < len(p); {
		img.mu.Lock()
		m, err := img.mapReadL1(v.l1, off+int64(done), int64(len(p)-done))
		img.mu.Unlock()
		if err != nil {
			return done, err
		}
		if err := img.readMapped(m, p[done:done+int(m.n)], off+int64(done)); err != nil {
			return done, err
		}
		done += int(m.n)
	}
	return len(p), eof
}
