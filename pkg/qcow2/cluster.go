package qcow2

import (
	"encoding/binary"
)

// Guest-to-host translation: guest offset -> L1 index -> L2 table -> L2
// entry. L2 tables are cached in slices; the caller holds mu.

func (img *Image) l1Index(guestOff int64) int64 { return guestOff >> (img.clusterBits + img.l2Bits) }
func (img *Image) l2Index(guestOff int64) int64 {
	return guestOff >> img.clusterBits & (1<<img.l2Bits - 1)
}

// l2Slot returns the cached slice holding entry idx of the L2 table at
// tableOff and the entry's byte offset inside it.
func (img *Image) l2Slot(tableOff, idx int64) (*slice, int64, error) {
	pos := idx * 8
	s, err := img.l2.get(tableOff + pos&^(img.l2.size-1))
	if err != nil {
		return nil, 0, err
	}
	return s, pos & (img.l2.size - 1), nil
}

func (s *slice) l2(pos int64) l2Entry { return l2Entry(binary.BigEndian.Uint64(s.buf[pos:])) }

func (img *Image) setL2(s *slice, pos int64, e l2Entry) {
	binary.BigEndian.PutUint64(s.buf[pos:], uint64(e))
	img.l2.markDirty(s)
}

// l2Table returns the host offset of the active L2 table for a guest offset
// (0 if none), validating what L1 says.
func (img *Image) l2Table(guestOff int64) (int64, error) {
	i := img.l1Index(guestOff)
	if i >= int64(len(img.l1)) {
		return 0, nil
	}
	return img.validL2Offset(img.l1[i], int(i))
}

// validL2Offset vets an L1 entry's table offset before it is followed.
func (img *Image) validL2Offset(e l1Entry, i int) (int64, error) {
	off := e.offset()
	if off == 0 {
		return 0, nil
	}
	if off%img.clusterSize != 0 || off < img.clusterSize {
		return 0, img.markCorrupt("L1 entry %d points at unaligned or reserved offset %#x", i, off)
	}
	return off, nil
}

// lookup returns the active L2 entry for the cluster holding guestOff.
func (img *Image) lookup(guestOff int64) (l2Entry, error) { return img.lookupL1(img.l1, guestOff) }

// lookupL1 returns the L2 entry for guestOff in the tree of l1. The caller
// holds mu.
func (img *Image) lookupL1(l1 []l1Entry, guestOff int64) (l2Entry, error) {
	i := img.l1Index(guestOff)
	if i >= int64(len(l1)) {
		return 0, nil
	}
	t, err := img.validL2Offset(l1[i], int(i))
	if t == 0 || err != nil {
		return 0, err
	}
	s, pos, err := img.l2Slot(t, img.l2Index(guestOff))
	if err != nil {
		return 0, err
	}
	return img.vetL2Entry(s.l2(pos), guestOff)
}

// vetL2Entry refuses an L2 entry whose cluster offset is unaligned.
func (img *Image) vetL2Entry(e l2Entry, guestOff int64) (l2Entry, error) {
	if !e.compressed() && e.offset()&(img.clusterSize-1) != 0 {
		return 0, img.markCorrupt("L2 entry for guest offset %#x is unaligned (%#x)", guestOff, uint64(e))
	}
	return e, nil
}

// l2ForWrite returns the slot of a guest cluster's L2 entry in a table that
// may be modified: a missing table is allocated, and a table shared with a
// snapshot is copied first (COW), as is the COPIED flag fixed up.
//
// Crash order: the new table is written before its L1 entry changes; the
// L1 entry only reaches the disk at flush, after a sync (see flush).
func (img *Image) l2ForWrite(guestOff int64) (*slice, int64, error) {
	if img.corrupt {
		return nil, 0, img.markCorrupt("refusing to modify a corrupt image")
	}
	t, err := img.l2Table(guestOff)
	if err != nil {
		return nil, 0, err
	}
	i := img.l1Index(guestOff)
	switch {
	case t == 0:
		t, err = img.newL2Table(i, 0)
	case !img.l1[i].copied():
		t, err = img.unshareL2Table(i, t)
	}
	if err != nil {
		return nil, 0, err
	}
	return img.l2Slot(t, img.l2Index(guestOff))
}

// newL2Table allocates an L2 table for L1 index i, filled from the table at
// src (or zeros), and points L1 at it in memory.
func (img *Image) newL2Table(i, src int64) (int64, error) {
	off, err := img.allocClusters(1)
	if err != nil {
		return 0, err
	}
	buf := make([]byte, img.clusterSize)
	if src != 0 {
		if err := img.readTableThroughCache(src, buf); err != nil {
			return 0, err
		}
	}
	if err := img.checkMetadataWrite(off, img.clusterSize); err != nil {
		return 0, err
	}
	if err := writeFull(img.f, buf, off); err != nil {
		return 0, err
	}
	img.l2.invalidate(off)
	img.writeGen++
	img.l1[i] = makeL1Entry(off, true)
	img.l1Dirty[i] = true
	img.tablesChanged()
	return off, nil
}

// unshareL2Table makes the table behind L1 entry i writable: if its
// refcount is 1 only the COPIED flag was missing; otherwise it is copied and
// the old table loses one reference once the new L1 entry is durable.
func (img *Image) unshareL2Table(i, t int64) (int64, error) {
	rc, err := img.refcount(t >> img.clusterBits)
	if err != nil {
		return 0, err
	}
	switch rc {
	case 0:
		return 0, img.markCorrupt("L2 table at %#x has refcount 0", t)
	case 1:
		img.l1[i] = makeL1Entry(t, true)
		img.l1Dirty[i] = true
		return t, nil
	}
	nt, err := img.newL2Table(i, t)
	if err != nil {
		return 0, err
	}
	img.deferFree(t, img.clusterSize)
	return nt, nil
}

// readTableThroughCache reads a whole L2 table, preferring cached slices
// (which may be newer than the disk).
func (img *Image) readTableThroughCache(off int64, buf []byte) error {
	for pos := int64(0); pos < img.clusterSize; pos += img.l2.size {
		if s, ok := img.l2.slices[off+pos]; ok {
			copy(buf[pos:], s.buf)
			continue
		}
		if err := readFull(img.f, buf[pos:pos+img.l2.size], off+pos); err != nil {
			return err
		}
	}
	return nil
}

// writeL1 writes the dirty L1 entries. The caller has synced the tables
// they point at.
func (img *Image) writeL1() error {
	if len(img.l1Dirty) == 0 {
		return nil
	}
	var e [8]byte
	for i := range img.l1Dirty {
		binary.BigEndian.PutUint64(e[:], uint64(img.l1[i]))
		if err := writeFull(img.f, e[:], int64(img.h.l1TableOffset)+i*8); err != nil {
			return err
		}
	}
	clear(img.l1Dirty)
	return nil
}
