package qcow2

// WriteBack writes the metadata that completed writes changed (refcount
// blocks, L2 slices, L1 entries) to the file, in Flush's crash order and
// with the fdatasyncs that order needs, but without Flush's final one and
// without applying deferred frees. Afterwards every write that completed
// before the call survives the end of this process (SIGKILL, an OOM kill)
// while the host stays up: its data and the entries that map it are in the
// file, if only in the host's page cache. A power cut before the next
// Flush may still lose them, as it may lose any unflushed write, and
// leaves no corruption. When no L2 or L1 entry is dirty (an overwrite in
// place, a read) it writes and syncs nothing.
//
// Its fdatasyncs are those of the crash order: one before the L2 slices
// when an entry depends on unsynced writes, one more before L1 entries
// for new L2 tables. On an image with lazy refcounts a write over zero or
// unallocated clusters (no backing file) needs none (lazylink.go); copy on
// write after a snapshot and new L2 tables still do, as does every
// allocating write on an image without lazy refcounts.
//
// Without it, an allocating write lives in the metadata cache until a
// Flush or an eviction. That is enough for a client that dies with the
// server, not for one that outlives it: a /dev/nbdX that a restarted
// server takes over never resends a write it saw acknowledged, and the
// FLUSH it sends next reaches a process that never knew of that write.
// Such a server calls WriteBack before acknowledging a write.
func (img *Image) WriteBack() error {
	if err := img.checkOpen(false); err != nil || img.readOnly {
		return err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if !img.l2.hasDirty() && len(img.l1Dirty) == 0 {
		return nil
	}
	if img.syncErr != nil {
		return img.syncErr
	}
	// The L2 cache writes refcount blocks and syncs before the first
	// slice reaches the file (orderBeforeL2Write).
	if err := img.l2.flush(); err != nil {
		return err
	}
	if len(img.l1Dirty) == 0 {
		return nil
	}
	// New L2 tables are durable before the L1 entries that point at them.
	if err := img.sync(); err != nil {
		return err
	}
	return img.writeL1()
}
