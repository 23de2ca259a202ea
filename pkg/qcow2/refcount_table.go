package qcow2

import (
	"encoding/binary"
	"fmt"
)

// growRefcountTable replaces the refcount table with one of at least need
// entries, placed at or after cluster after. The new table and the refcount blocks needed to describe it are
// laid out together past the end of the image (QEMU's approach), so the
// table can account for itself without recursion.
//
// Crash order: new blocks and table are written and synced, then the
// header is switched and synced, and only then is the old table freed.
func (img *Image) growRefcountTable(need, after int64) error {
	cs := img.clusterSize
	entries := max(need, int64(len(img.rcTable))*3/2, cs/8)
	start := max(img.endCluster, after)
	var tableClusters, newBlocks int64
	var blockIdx []int64
	for i := 0; ; i++ {
		if i > 64 {
			return fmt.Errorf("refcount table layout did not converge: %w", ErrCorrupt)
		}
		tableClusters = (entries*8 + cs - 1) / cs
		blockIdx = img.uncoveredBlocks(start, tableClusters+newBlocks)
		grown := entries
		if n := len(blockIdx); n > 0 && blockIdx[n-1] >= entries {
			grown = blockIdx[n-1] + 1
		}
		if int64(len(blockIdx)) == newBlocks && grown == entries {
			break
		}
		newBlocks, entries = int64(len(blockIdx)), grown
	}
	if tableClusters*cs > maxRefcountTableBytes {
		return fmt.Errorf("refcount table would exceed %d bytes: %w", maxRefcountTableBytes, ErrInvalid)
	}
	return img.installRefcountTable(start, tableClusters, blockIdx, entries)
}

// uncoveredBlocks lists the refcount block indices that clusters
// [start, start+n) need and that the current table does not provide.
func (img *Image) uncoveredBlocks(start, n int64) []int64 {
	var out []int64
	for bi := start >> img.rbBits(); bi <= (start+n-1)>>img.rbBits(); bi++ {
		if bi < int64(len(img.rcTable)) && img.rcTable[bi].offset() != 0 {
			continue
		}
		out = append(out, bi)
	}
	return out
}

func (img *Image) installRefcountTable(start, tableClusters int64, blockIdx []int64, entries int64) error {
	cs := img.clusterSize
	region := tableClusters + int64(len(blockIdx))
	newTable := make([]rtEntry, entries)
	copy(newTable, img.rcTable)
	blocks := make(map[int64][]byte, len(blockIdx))
	for i, bi := range blockIdx {
		newTable[bi] = rtEntry((start + tableClusters + int64(i)) << img.clusterBits)
		blocks[bi] = make([]byte, cs)
	}
	// The region counts as written from now on, used or not (endCluster).
	img.endCluster = max(img.endCluster, start+region)
	// Every cluster of the region gets refcount 1, in a new block or an old one.
	for c := start; c < start+region; c++ {
		bi := c >> img.rbBits()
		if b, ok := blocks[bi]; ok {
			putRefcount(b, c&(1<<img.rbBits()-1), img.rcOrder, 1)
		} else if err := img.setRefcount(c, 1); err != nil {
			return err
		}
	}
	for bi, b := range blocks {
		if err := writeFull(img.f, b, newTable[bi].offset()); err != nil {
			return err
		}
	}
	buf := make([]byte, tableClusters*cs)
	for i, e := range newTable {
		binary.BigEndian.PutUint64(buf[i*8:], uint64(e))
	}
	tableOff := start << img.clusterBits
	if err := writeFull(img.f, buf, tableOff); err != nil {
		return err
	}
	// Old blocks touched above must be durable too before the switch.
	if err := img.rc.flush(); err != nil {
		return err
	}
	if err := img.sync(); err != nil {
		return err
	}
	oldOff, oldClusters := int64(img.h.refcountTableOffset), int64(img.h.refcountTableClusters)
	img.h.refcountTableOffset, img.h.refcountTableClusters = uint64(tableOff), uint32(tableClusters)
	if err := img.writeHeader(); err != nil {
		return err
	}
	if err := img.sync(); err != nil {
		return err
	}
	img.rcTable = newTable
	img.tablesChanged()
	img.writeGen++
	return img.freeRange(hostRange{oldOff, oldClusters * cs})
}
