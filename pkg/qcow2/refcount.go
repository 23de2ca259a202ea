package qcow2

import (
	"encoding/binary"
	"fmt"
	"slices"
)

// Refcount blocks are arrays of (1 << rcOrder)-bit big-endian counters; for
// widths under a byte the first entry sits in the least significant bits,
// as QEMU packs them.

// rbBits is log2 of the number of refcount entries in one refcount block.
func (img *Image) rbBits() uint { return img.clusterBits + 3 - img.rcOrder }

func (img *Image) maxRefcount() uint64 {
	if img.rcOrder == 6 {
		return ^uint64(0)
	}
	return 1<<(1<<img.rcOrder) - 1
}

// refcountSlot locates the cached slice holding a cluster's refcount. ok is
// false when no refcount block covers the cluster (its refcount is 0).
func (img *Image) refcountSlot(cluster int64) (s *slice, idx int64, ok bool, err error) {
	bi := cluster >> img.rbBits()
	if bi >= int64(len(img.rcTable)) {
		return nil, 0, false, nil
	}
	e := img.rcTable[bi]
	if e.offset() == 0 {
		return nil, 0, false, nil
	}
	if e.reservedSet() || e.offset()%img.clusterSize != 0 || e.offset() < img.clusterSize {
		return nil, 0, false, img.markCorrupt("refcount block %d at %#x is invalid", bi, uint64(e))
	}
	ii := cluster & (1<<img.rbBits() - 1)
	perSlice := img.rc.size * 8 >> img.rcOrder
	s, err = img.rc.get(e.offset() + ii/perSlice*img.rc.size)
	if err != nil {
		return nil, 0, false, err
	}
	return s, ii % perSlice, true, nil
}

// refcount returns a cluster's reference count.
func (img *Image) refcount(cluster int64) (uint64, error) {
	s, idx, ok, err := img.refcountSlot(cluster)
	if !ok || err != nil {
		return 0, err
	}
	return getRefcount(s.buf, idx, img.rcOrder), nil
}

// setRefcount stores a cluster's reference count. The covering refcount
// block must exist (allocClusters makes sure of that).
func (img *Image) setRefcount(cluster int64, v uint64) error {
	if v > img.maxRefcount() {
		return fmt.Errorf("refcount of cluster %d would exceed %d-bit refcounts: %w", cluster, 1<<img.rcOrder, ErrInvalid)
	}
	s, idx, ok, err := img.refcountSlot(cluster)
	if err != nil {
		return err
	}
	if !ok {
		return img.markCorrupt("no refcount block for cluster %d", cluster)
	}
	putRefcount(s.buf, idx, img.rcOrder, v)
	img.rc.markDirty(s)
	if v == 0 && cluster < img.freeHint {
		img.freeHint = cluster
	}
	if v != 0 {
		img.clusterUsed(cluster)
	}
	return nil
}

// addRefcount adds delta to a cluster's refcount, refusing over- and
// underflow (an underflow means the image double-frees: corruption).
func (img *Image) addRefcount(cluster int64, delta int64) error {
	v, err := img.refcount(cluster)
	if err != nil {
		return err
	}
	if delta < 0 && v < uint64(-delta) {
		return img.markCorrupt("refcount of cluster %d would drop below zero", cluster)
	}
	return img.setRefcount(cluster, uint64(int64(v)+delta))
}

func getRefcount(buf []byte, i int64, order uint) uint64 {
	switch order {
	case 0, 1, 2:
		perByte := int64(8 >> order)
		shift := uint(i%perByte) << order
		return uint64(buf[i/perByte]>>shift) & (1<<(1<<order) - 1)
	case 3:
		return uint64(buf[i])
	case 4:
		return uint64(binary.BigEndian.Uint16(buf[i*2:]))
	case 5:
		return uint64(binary.BigEndian.Uint32(buf[i*4:]))
	default:
		return binary.BigEndian.Uint64(buf[i*8:])
	}
}

func putRefcount(buf []byte, i int64, order uint, v uint64) {
	switch order {
	case 0, 1, 2:
		perByte := int64(8 >> order)
		shift := uint(i%perByte) << order
		mask := byte(1<<(1<<order)-1) << shift
		buf[i/perByte] = buf[i/perByte]&^mask | byte(v)<<shift&mask
	case 3:
		buf[i] = byte(v)
	case 4:
		binary.BigEndian.PutUint16(buf[i*2:], uint16(v))
	case 5:
		binary.BigEndian.PutUint32(buf[i*4:], uint32(v))
	default:
		binary.BigEndian.PutUint64(buf[i*8:], v)
	}
}

// allocClusters allocates n contiguous clusters and returns the host offset
// of the first. Their refcounts are set in the cache (dirty); the caller
// must not publish an L2/L1 entry for them before those refcounts are
// durable, which orderBeforeL2Write enforces (but for lazy links).
func (img *Image) allocClusters(n int64) (int64, error) {
	off, _, err := img.allocRun(n)
	return off, err
}

// allocRun is allocClusters that also reports whether every cluster of the
// run reads as zeros on disk until written (runReadsZero, lazylink.go).
func (img *Image) allocRun(n int64) (off int64, zero bool, err error) {
	if img.corrupt {
		return 0, false, fmt.Errorf("image was found corrupt: %w", ErrCorrupt)
	}
	start, firstFree, err := img.findFree(n)
	if err != nil {
		return 0, false, err
	}
	zero = img.lazy.on && img.runReadsZero(start, n)
	// New refcount blocks (or a new table) go past the run, so it stays free.
	if err := img.ensureRefcountBlocks(start, n); err != nil {
		return 0, false, err
	}
	for c := start; c < start+n; c++ {
		if err := img.setRefcount(c, 1); err != nil {
			return 0, false, err
		}
	}
	img.freeHint = firstFree
	if firstFree == start {
		img.freeHint = start + n
	}
	img.endCluster = max(img.endCluster, start+n)
	return start << img.clusterBits, zero, nil
}

// findFree returns the first run of n free clusters at or after freeHint,
// and the first free cluster seen (the next search's starting point).
func (img *Image) findFree(n int64) (start, firstFree int64, err error) {
	start, firstFree = img.freeHint, -1
	for c := img.freeHint; c < start+n; c++ {
		if c >= img.endCluster && !img.hasRefcountBlock(c) {
			// Nothing past the end of the file is allocated unless a
			// refcount block says so; skip to the end of this block.
			if firstFree < 0 {
				firstFree = c
			}
			next := (c>>img.rbBits() + 1) << img.rbBits()
			if next >= start+n {
				break
			}
			c = next - 1
			continue
		}
		rc, err := img.refcount(c)
		if err != nil {
			return 0, 0, err
		}
		if rc != 0 {
			start = c + 1
			continue
		}
		if firstFree < 0 {
			firstFree = c
		}
	}
	if firstFree < 0 {
		firstFree = start
	}
	return start, firstFree, nil
}

func (img *Image) hasRefcountBlock(cluster int64) bool {
	bi := cluster >> img.rbBits()
	return bi < int64(len(img.rcTable)) && img.rcTable[bi].offset() != 0
}

// ensureRefcountBlocks creates the refcount blocks (and, if needed, a
// larger refcount table) that clusters [start, start+n) need, placing them
// after both the run and the end of the image.
func (img *Image) ensureRefcountBlocks(start, n int64) error {
	for range 8 {
		at := max(img.endCluster, start+n)
		blocks, err := img.blocksToCreate(start, n, at)
		if err != nil || len(blocks) == 0 {
			return err
		}
		if top := blocks[len(blocks)-1]; top >= int64(len(img.rcTable)) {
			if err := img.growRefcountTable(top+1, start+n); err != nil {
				return err
			}
			continue // the table moved the end of the image: lay out again
		}
		return img.createRefcountBlocks(blocks, at)
	}
	return fmt.Errorf("refcount block layout did not converge: %w", ErrCorrupt)
}

// blocksToCreate lists, sorted, the missing refcount blocks for the run
// plus those that a run of new blocks at cluster at would need itself.
func (img *Image) blocksToCreate(start, n, at int64) ([]int64, error) {
	need := map[int64]bool{}
	for bi := start >> img.rbBits(); bi <= (start+n-1)>>img.rbBits(); bi++ {
		if !img.hasRefcountBlock(bi << img.rbBits()) {
			need[bi] = true
		}
	}
	for i := 0; len(need) > 0; i++ {
		if i > 64 {
			return nil, fmt.Errorf("refcount block layout did not converge: %w", ErrCorrupt)
		}
		grew := false
		for c := at; c < at+int64(len(need)); c++ {
			if bi := c >> img.rbBits(); !need[bi] && !img.hasRefcountBlock(c) {
				need[bi], grew = true, true
			}
		}
		if !grew {
			break
		}
	}
	blocks := make([]int64, 0, len(need))
	for bi := range need {
		blocks = append(blocks, bi)
	}
	slices.Sort(blocks)
	return blocks, nil
}

// createRefcountBlocks writes new refcount blocks at clusters at, at+1, ...
// Each cluster of that run gets refcount 1, in a new block or an old one.
//
// Crash order: the blocks, and the old blocks holding their refcounts, are
// written and synced before the refcount table entries point at them.
func (img *Image) createRefcountBlocks(blocks []int64, at int64) error {
	bufs := make(map[int64][]byte, len(blocks))
	for _, bi := range blocks {
		bufs[bi] = make([]byte, img.clusterSize)
	}
	for c := at; c < at+int64(len(blocks)); c++ {
		if b, ok := bufs[c>>img.rbBits()]; ok {
			putRefcount(b, c&(1<<img.rbBits()-1), img.rcOrder, 1)
		} else if err := img.setRefcount(c, 1); err != nil {
			return err
		}
	}
	// The run counts as written from now on, hooked up or not (endCluster).
	img.endCluster = max(img.endCluster, at+int64(len(blocks)))
	for i, bi := range blocks {
		off := (at + int64(i)) << img.clusterBits
		if err := img.checkMetadataWrite(off, img.clusterSize); err != nil {
			return err
		}
		if err := writeFull(img.f, bufs[bi], off); err != nil {
			return err
		}
	}
	if err := img.rc.flush(); err != nil {
		return err
	}
	if err := img.sync(); err != nil {
		return err
	}
	// Each table entry is written before the in-memory table uses it, as
	// QEMU's alloc_refcount_block does: were a failed write left in
	// memory, refcounts kept in that block would be flushed to a block
	// the table on disk never points at, and the clusters they count
	// would read as free (refcount 0) after a restart. For the same reason
	// a block is hooked up only once the block counting its own cluster
	// is (installOrder), so an error part way leaves every hooked-up
	// block counted; the blocks left out are unused and their clusters
	// leak.
	var e [8]byte
	img.writeGen++
	order, err := installOrder(blocks, at, img.rbBits())
	if err != nil {
		return err
	}
	for _, i := range order {
		bi, off := blocks[i], (at+int64(i))<<img.clusterBits
		binary.BigEndian.PutUint64(e[:], uint64(off))
		if err := writeFull(img.f, e[:], int64(img.h.refcountTableOffset)+bi*8); err != nil {
			return err
		}
		img.rcTable[bi] = rtEntry(off)
		img.tablesChanged()
	}
	return nil
}

// installOrder orders new refcount blocks (sorted indices, block i stored
// at cluster at+i) so that each comes after the new block holding its own
// refcount, if that is another new block. Clusters and indices increase
// together, so "counted by" never loops except on a block counting itself.
func installOrder(blocks []int64, at int64, rbBits uint) ([]int, error) {
	pos := make(map[int64]int, len(blocks))
	for i, bi := range blocks {
		pos[bi] = i
	}
	done := make([]bool, len(blocks))
	order := make([]int, 0, len(blocks))
	for len(order) < len(blocks) {
		n := len(order)
		for i := range blocks {
			j, ok := pos[(at+int64(i))>>rbBits]
			if !done[i] && (!ok || j == i || done[j]) {
				done[i] = true
				order = append(order, i)
			}
		}
		if len(order) == n { // cannot happen, see above
			return nil, fmt.Errorf("new refcount blocks count each other: %w", ErrCorrupt)
		}
	}
	return order, nil
}

// deferFree queues one reference drop for a host range, applied once the
// metadata change that dropped the reference is durable.
func (img *Image) deferFree(off, length int64) {
	img.pendingFree = append(img.pendingFree, hostRange{off, length})
}

// deferFreeEntry queues the host storage an L2 entry referenced.
func (img *Image) deferFreeEntry(e l2Entry) {
	switch {
	case e.compressed():
		off, n := e.compressedRange(img.clusterBits)
		img.deferFree(off, n)
	case e.offset() != 0:
		img.deferFree(e.offset(), img.clusterSize)
	}
}

// freeRange drops one reference from every cluster the range touches.
// Clusters that become free are punched out of the host file first, so a
// later allocation of them never exposes old bytes.
func (img *Image) freeRange(r hostRange) error {
	first := r.off >> img.clusterBits
	last := (r.off + r.length - 1) >> img.clusterBits
	for c := first; c <= last; c++ {
		v, err := img.refcount(c)
		if err != nil {
			return err
		}
		if v == 0 {
			return img.markCorrupt("double free of cluster %d", c)
		}
		if v == 1 {
			img.l2.invalidate(c << img.clusterBits)
			img.rc.invalidate(c << img.clusterBits)
			// Punching is advisory: a filesystem without it keeps the bytes,
			// which only this image can ever read back, and which a lazy
			// link must not rely on reading as zeros (lazylink.go).
			if img.f.PunchHole(c<<img.clusterBits, img.clusterSize) == nil {
				img.punched(c)
			}
		}
		if err := img.setRefcount(c, v-1); err != nil {
			return err
		}
	}
	return nil
}
