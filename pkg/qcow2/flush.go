package qcow2

import "errors"

// Flush makes every write that completed before the call durable
// (fdatasync), then applies deferred frees.
//
// Crash order, enforced here and in orderBeforeL2Write:
//  1. refcount blocks are written, then everything is synced: data and
//     refcounts reach the disk before any L2 entry that relies on them;
//  2. L2 slices are written, then synced, before L1 entries that point at
//     new tables are written;
//  3. only once the L2/L1 changes that dropped references are durable do
//     the refcounts of the dropped clusters fall (a crash leaks, never
//     corrupts), and freed clusters are punched out before reuse.
func (img *Image) Flush() error {
	if err := img.checkOpen(false); err != nil || img.readOnly {
		return err
	}
	img.mu.Lock()
	n, err := img.persist()
	img.mu.Unlock()
	if err != nil || n == 0 {
		return err
	}
	img.ioGate.Lock()
	defer img.ioGate.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.applyFrees(n)
}

// persist writes all dirty metadata in crash-safe order and syncs. It
// returns how many pending frees are now safe to apply. The caller holds mu.
func (img *Image) persist() (int, error) {
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
	n := len(img.pendingFree)
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

// applyFrees drops the first n deferred references. The caller holds
// ioGate exclusively (no I/O can still target a freed cluster) and mu.
func (img *Image) applyFrees(n int) error {
	for _, r := range img.pendingFree[:n] {
		if err := img.freeRange(r); err != nil {
			return err
		}
	}
	img.pendingFree = append(img.pendingFree[:0], img.pendingFree[n:]...)
	return nil
}

// Close flushes everything, applies all deferred frees, writes the
// resulting refcounts, clears the dirty bit and closes the file. The image
// is unusable afterwards, even if Close fails.
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
		n, err := img.persist()
		if err != nil {
			return err
		}
		if n == 0 {
			break
		}
		if err := img.applyFrees(n); err != nil {
			return err
		}
	}
	if _, err := img.persist(); err != nil {
		return err
	}
	if img.h.incompatible&incompatDirty == 0 || img.corrupt {
		return nil
	}
	img.h.incompatible &^= incompatDirty
	if err := img.writeHeader(); err != nil {
		return err
	}
	return img.sync()
}
