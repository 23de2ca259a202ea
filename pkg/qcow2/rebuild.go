package qcow2

import (
	"encoding/binary"
	"fmt"
)

// rebuildRefcounts replaces the whole refcount structure with one computed
// from the references the checker found (QEMU's rebuild_refcount_structure),
// for when a referenced cluster has no refcount block to fix in place. The
// new table and blocks go past the end of the file and describe themselves.
//
// Crash order: blocks and table are written and synced before the header
// switches to them; the old structure is simply no longer referenced.
func (ck *checker) rebuildRefcounts() error {
	img := ck.img
	for _, c := range ck.rcStruct {
		ck.refs[c]--
	}
	start := int64(len(ck.refs))
	var tableClusters int64
	var blocks []int64
	for i := 0; ; i++ {
		if i > 64 {
			return fmt.Errorf("refcount rebuild did not converge: %w", ErrCorrupt)
		}
		end := start + tableClusters + int64(len(blocks))
		nb := ck.neededBlocks(start, end)
		nt := (int64(nb[len(nb)-1]+1)*8 + img.clusterSize - 1) / img.clusterSize
		if len(nb) == len(blocks) && nt == tableClusters {
			break
		}
		blocks, tableClusters = nb, nt
	}
	return ck.installRebuilt(start, tableClusters, blocks)
}

// neededBlocks lists the block indices covering referenced clusters below
// start and every cluster of the new structure in [start, end).
func (ck *checker) neededBlocks(start, end int64) []int64 {
	rb := ck.img.rbBits()
	var out []int64
	last := int64(-1)
	add := func(bi int64) {
		if bi != last {
			out = append(out, bi)
			last = bi
		}
	}
	for c, r := range ck.refs {
		if r > 0 {
			add(int64(c) >> rb)
		}
	}
	for c := start; c < end; c++ {
		add(c >> rb)
	}
	if len(out) == 0 {
		add(0)
	}
	return out
}

func (ck *checker) installRebuilt(start, tableClusters int64, blocks []int64) error {
	img := ck.img
	cs, rb := img.clusterSize, img.rbBits()
	end := start + tableClusters + int64(len(blocks))
	// The new structure counts as written from now on (endCluster), and
	// what was known about free clusters no longer holds.
	img.endCluster = max(img.endCluster, end)
	img.forgetZeroClusters()
	table := make([]byte, tableClusters*cs)
	for i, bi := range blocks {
		boff := (start + tableClusters + int64(i)) << img.clusterBits
		binary.BigEndian.PutUint64(table[bi*8:], uint64(boff))
		buf := make([]byte, cs)
		for c := bi << rb; c < (bi+1)<<rb; c++ {
			switch {
			case c < int64(len(ck.refs)):
				putRefcount(buf, c-bi<<rb, img.rcOrder, uint64(ck.refs[c]))
			case c >= start && c < end:
				putRefcount(buf, c-bi<<rb, img.rcOrder, 1)
			}
		}
		if err := writeFull(img.f, buf, boff); err != nil {
			return err
		}
	}
	if err := writeFull(img.f, table, start<<img.clusterBits); err != nil {
		return err
	}
	if err := img.sync(); err != nil {
		return err
	}
	img.h.refcountTableOffset, img.h.refcountTableClusters = uint64(start<<img.clusterBits), uint32(tableClusters)
	if err := img.writeHeader(); err != nil {
		return err
	}
	if err := img.sync(); err != nil {
		return err
	}
	img.rcTable = make([]rtEntry, tableClusters*cs/8)
	for i := range img.rcTable {
		img.rcTable[i] = rtEntry(binary.BigEndian.Uint64(table[i*8:]))
	}
	img.rc.clear()
	img.tablesChanged()
	img.freeHint = 0
	return nil
}
