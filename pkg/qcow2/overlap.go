package qcow2

import "fmt"

// Metadata overlap checks (QEMU's "cached" level): before any metadata or
// data write, the target must not overlap the header, the active L1 table,
// the refcount table or the snapshot table. Data writes must also miss every
// cached L2 table and refcount block.

type extent struct{ off, end int64 }

func (img *Image) fixedMetadata() [4]extent {
	cs := img.clusterSize
	h := img.h
	l1End := int64(h.l1TableOffset) + (int64(len(img.l1))*8+cs-1)/cs*cs
	rtEnd := int64(h.refcountTableOffset) + int64(h.refcountTableClusters)*cs
	return [4]extent{
		{0, cs},
		{int64(h.l1TableOffset), l1End},
		{int64(h.refcountTableOffset), rtEnd},
		{int64(h.snapshotsOffset), int64(h.snapshotsOffset) + img.snapshotTableBytes()},
	}
}

// snapshotTableBytes is the snapshot table's exact length on disk.
func (img *Image) snapshotTableBytes() int64 { return snapshotTableLen(img.snapshots) }

// checkMetadataWrite vets a write of an L2 table or refcount block slice.
func (img *Image) checkMetadataWrite(off, length int64) error {
	for _, m := range img.fixedMetadata() {
		if off < m.end && m.off < off+length {
			return img.markCorrupt("metadata write at %#x+%#x overlaps fixed metadata at %#x", off, length, m.off)
		}
	}
	return nil
}

// checkDataWrite vets a guest data write to host [off, off+length).
func (img *Image) checkDataWrite(off, length int64) error {
	if err := img.checkMetadataWrite(off, length); err != nil {
		return err
	}
	tables := img.tableClusters()
	for c := off >> img.clusterBits; c <= (off+length-1)>>img.clusterBits; c++ {
		if _, ok := tables[c]; ok || img.l2.holdsCluster(c) || img.rc.holdsCluster(c) {
			return img.markCorrupt("data write at %#x overlaps an L2 table or refcount block", c<<img.clusterBits)
		}
	}
	return nil
}

// tableClusters indexes the clusters of the active L2 tables and of the
// refcount blocks, rebuilt from the in-memory L1 and refcount tables after
// either changes (tablesChanged).
func (img *Image) tableClusters() map[int64]struct{} {
	if img.tableIndex != nil {
		return img.tableIndex
	}
	idx := make(map[int64]struct{}, len(img.l1)+len(img.rcTable))
	for _, e := range img.l1 {
		if e.offset() != 0 {
			idx[e.offset()>>img.clusterBits] = struct{}{}
		}
	}
	for _, e := range img.rcTable {
		if e.offset() != 0 {
			idx[e.offset()>>img.clusterBits] = struct{}{}
		}
	}
	img.tableIndex = idx
	return idx
}

// tablesChanged must follow any change to an L1 or refcount table entry.
func (img *Image) tablesChanged() { img.tableIndex = nil }

// markCorrupt records an inconsistency: the corrupt bit is set on disk
// (best effort) and every later write fails. It returns the error to hand up.
func (img *Image) markCorrupt(format string, args ...any) error {
	err := fmt.Errorf(format+": %w", append(args, ErrCorrupt)...)
	if img.corrupt || img.readOnly {
		img.corrupt = true
		return err
	}
	img.corrupt = true
	img.h.incompatible |= incompatCorrupt
	if img.writeHeader() == nil {
		_ = img.sync()
	}
	return err
}

// orderBeforeL2Write runs before any L2 slice reaches the disk: refcount
// blocks are written, and everything an L2 entry may point at (data, new
// tables, refcounts) is synced first. On an image with lazy refcounts the
// refcount blocks need not be durable first (a crash rebuilds them), nor
// the data of lazy links (lazylink.go): neither counts in writeGen there.
func (img *Image) orderBeforeL2Write() error {
	if img.rc.hasDirty() {
		if err := img.rc.flush(); err != nil {
			return err
		}
		if !img.lazy.on {
			img.writeGen++
		}
	}
	if img.writeGen == img.syncedGen {
		return nil
	}
	g := img.writeGen
	if err := img.sync(); err != nil {
		return err
	}
	img.syncedGen = g
	return nil
}
