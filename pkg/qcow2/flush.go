package qcow2

import "errors"

// Flush makes every write that completed before the call durable
// (fdatasync), then applies deferred frees. Once a sync has failed, Flush
// fails with ErrSyncFailed until the image is reopened (see sync).
//
// Crash order, enforced here and in orderBeforeL2Write:
//  1. refcount blocks are written, then everything is synced: data and
//     refcounts reach the disk before any L2 entry that relies on them;
//  2. L2 slices are written, then synced, before L1 entries that point at
//     new tables are written;
//  3. only once the L2/L1 changes that dropped references are durable do
//     the refcounts of the dropped clusters fall (a crash leaks, never
//     corrupts), and freed clusters are punched out before reuse.
//
// Between Flushes, L2 slices evicted from the cache or written by WriteBack
// follow 1 and 2, but for what lazy refcounts make unnecessary
// (lazylink.go).
func (img *Image) Flush() error {
	if err := img.checkOpen(false); err != nil || img.readOnly {
		return err
	}
	img.mu.Lock()
	upTo, err := img.persist()
	pending := upTo > img.freedSeq
	img.mu.Unlock()
	if err != nil || !pending {
		return err
	}
	img.ioGate.Lock()
	defer img.ioGate.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.applyFrees(upTo)
}

// persist writes all dirty metadata in crash-safe order and syncs. It
// returns the sequence number up to which pending reference drops are now
// safe to apply. The caller holds mu.
func (img *Image) persist() (uint64, error) {
	if img.syncErr != nil {
		// Even with nothing left to write, a flush must not report
		// success after a failed sync (see sync).
		return 0, img.syncErr
	}
	if err := img.rc.flush(); err != nil {
		return 0, err
	}
	if img.unsynced.Load() || img.writeGen != img.syncedGen {
		g := img.writeGen
		if err := img.sync(); err != nil {
			return 0, err
		}
		img.syncedGen = g
	}
	n := img.freedSeq + uint64(len(img.pendingFree))
	if !img.l2.hasDirty() && len(img.l1Dirty) == 0 {
		return n, nil
	}
	if err := img.l2.flush(); err != nil {
		return 0, err
	}
	if len(img.l1Dirty) > 0 {
		if err := img.sync(); err != nil {
			return 0, err
		}
		if err := img.writeL1(); err != nil {
			return 0, err
		}
	}
	return n, img.sync()
}

// applyFrees drops the deferred references numbered below upTo that are
// still pending (a concurrent flush may have applied some). The caller
// holds ioGate exclusively (no I/O can still target a freed cluster) and mu.
func (img *Image) applyFrees(upTo uint64) error {
	for img.freedSeq < upTo && len(img.pendingFree) > 0 {
		r := img.pendingFree[0]
		img.pendingFree = img.pendingFree[1:]
		img.freedSeq++
		if err := img.freeRange(r); err != nil {
			return err
		}
	}
	if len(img.pendingFree) == 0 {
		img.pendingFree = nil // let the backing array go
	}
	return nil
}

// Close flushes everything, applies all deferred frees, writes the
// resulting refcounts, clears the dirty bit and closes the file. The image
// is unusable afterwards, even if Close fails. After a failed sync it
// writes nothing more, closes the file and returns ErrSyncFailed: writes
// since the last good flush may be lost, as in a crash.
func (img *Image) Close() error {
	if img.closed.Swap(true) {
		return ErrClosed
	}
	img.ioGate.Lock()
	defer img.ioGate.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	var err error
	if !img.readOnly {
		err = img.closeWritable()
	}
	img.closeBacking()
	return errors.Join(err, img.f.Close())
}

func (img *Image) closeWritable() error {
	for range 3 { // frees dirty refcounts, which the next round persists
		upTo, err := img.persist()
		if err != nil {
			return err
		}
		if upTo == img.freedSeq {
			break
		}
		if err := img.applyFrees(upTo); err != nil {
			return err
		}
	}
	if _, err := img.persist(); err != nil {
		return err
	}
	img.trimExtension()
	if img.h.incompatible&incompatDirty == 0 || img.corrupt {
		return nil
	}
	img.h.incompatible &^= incompatDirty
	if err := img.writeHeader(); err != nil {
		return err
	}
	return img.sync()
}
