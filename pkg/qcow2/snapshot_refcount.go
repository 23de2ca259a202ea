package qcow2

import (
	"encoding/binary"
	"fmt"
)

// Refcount bookkeeping for whole L1 trees (QEMU's
// qcow2_update_snapshot_refcount): taking a snapshot adds a reference to
// every L2 table and cluster the active L1 reaches, deleting one drops the
// references its L1 held, and the COPIED flags of the active tables are then
// recomputed from the refcounts. All of it runs with ioGate held exclusively
// and mu held, so no I/O is in flight and no deferred free is needed.

// rcCursor reads and changes many refcounts, fetching a refcount slice from
// the cache only when a cluster falls outside the one it holds: a walk over
// an L2 table, whose clusters are mostly ascending, costs one cache lookup
// per slice rather than per cluster.
type rcCursor struct {
	img         *Image
	s           *slice
	first, next int64 // clusters [first, next) live in s
}

// reset forgets the held slice (after anything else used the cache).
func (c *rcCursor) reset() { c.s = nil }

// slot returns the slice and index of a cluster's refcount; s is nil when
// no refcount block covers the cluster.
func (c *rcCursor) slot(cluster int64) (*slice, int64, error) {
	if c.s != nil && cluster >= c.first && cluster < c.next {
		return c.s, cluster - c.first, nil
	}
	s, idx, ok, err := c.img.refcountSlot(cluster)
	if err != nil || !ok {
		c.s = nil
		return nil, 0, err
	}
	perSlice := c.img.rc.size * 8 >> c.img.rcOrder
	c.s, c.first, c.next = s, cluster-idx, cluster-idx+perSlice
	return s, idx, nil
}

func (c *rcCursor) get(cluster int64) (uint64, error) {
	s, idx, err := c.slot(cluster)
	if s == nil || err != nil {
		return 0, err
	}
	return getRefcount(s.buf, idx, c.img.rcOrder), nil
}

// add changes a cluster's refcount by delta (+1 or -1). A cluster whose
// refcount falls to zero is freed as freeRange frees it: its cached slices
// are dropped and its bytes punched out.
func (c *rcCursor) add(cluster, delta int64) error {
	img := c.img
	s, idx, err := c.slot(cluster)
	if err != nil {
		return err
	}
	if s == nil {
		return img.markCorrupt("cluster %d is referenced but no refcount block covers it", cluster)
	}
	v := getRefcount(s.buf, idx, img.rcOrder)
	switch {
	case delta > 0 && v+uint64(delta) > img.maxRefcount():
		return fmt.Errorf("refcount of cluster %d would exceed %d-bit refcounts: %w", cluster, 1<<img.rcOrder, ErrInvalid)
	case delta < 0 && v < uint64(-delta):
		return img.markCorrupt("refcount of cluster %d would drop below zero", cluster)
	}
	nv := uint64(int64(v) + delta)
	putRefcount(s.buf, idx, img.rcOrder, nv)
	img.rc.markDirty(s)
	if nv != 0 {
		img.clusterUsed(cluster)
		return nil
	}
	img.freeHint = min(img.freeHint, cluster)
	img.l2.invalidate(cluster << img.clusterBits)
	img.rc.invalidate(cluster << img.clusterBits)
	c.reset()
	// Advisory, as in freeRange.
	if img.f.PunchHole(cluster<<img.clusterBits, img.clusterSize) == nil {
		img.punched(cluster)
	}
	return nil
}

// addRange changes the refcount of every cluster [off, off+length) touches.
// A failed increment takes back the ones before it, so an entry is counted
// whole or not at all.
func (c *rcCursor) addRange(off, length, delta int64) error {
	first := off >> c.img.clusterBits
	for cl := first; cl <= (off+length-1)>>c.img.clusterBits; cl++ {
		if err := c.add(cl, delta); err != nil {
			for k := first; k < cl && delta > 0; k++ {
				_ = c.add(k, -delta)
			}
			return err
		}
	}
	return nil
}

// forEachL2Entry calls fn for every entry of the L2 table at t, in order,
// through the cache. fn may change the entry in place (it returns the new
// value); changed slices are marked dirty. fn must not use the L2 cache.
func (img *Image) forEachL2Entry(t int64, fn func(j int64, e l2Entry) (l2Entry, error)) error {
	per := img.l2.size / 8
	for pos := int64(0); pos < img.clusterSize; pos += img.l2.size {
		s, err := img.l2.get(t + pos)
		if err != nil {
			return err
		}
		for k := int64(0); k < per; k++ {
			e := l2Entry(binary.BigEndian.Uint64(s.buf[k*8:]))
			ne, err := fn(pos/8+k, e)
			if err != nil {
				return err
			}
			if ne != e {
				binary.BigEndian.PutUint64(s.buf[k*8:], uint64(ne))
				img.l2.markDirty(s)
			}
		}
	}
	return nil
}

// entryRefs changes the refcount of the host storage one L2 entry holds.
func (img *Image) entryRefs(c *rcCursor, t int64, e l2Entry, delta int64) error {
	switch {
	case e.compressed():
		off, n := e.compressedRange(img.clusterBits)
		return c.addRange(off, n, delta)
	case e.offset() != 0:
		if e.offset()%img.clusterSize != 0 || e.offset() == t {
			return img.markCorrupt("L2 entry %#x in the table at %#x is invalid", uint64(e), t)
		}
		return c.add(e.offset()>>img.clusterBits, delta)
	}
	return nil
}

// addTreeRefs adds one reference to every L2 table and cluster reachable
// from l1. If a refcount would overflow, the references already added are
// taken back and the error returned. It changes no L2 table: clearCopied
// does that once the new refcounts are durable, so that evicting a dirty L2
// slice never has to wait for a sync of refcounts (orderBeforeL2Write).
func (img *Image) addTreeRefs(l1 []l1Entry) error {
	c := &rcCursor{img: img}
	for i, le := range l1 {
		t, err := img.validL2Offset(le, i)
		if err != nil {
			return err
		}
		if t == 0 {
			continue
		}
		done := int64(-1) // entries of this table already counted
		err = img.forEachL2Entry(t, func(j int64, e l2Entry) (l2Entry, error) {
			if err := img.entryRefs(c, t, e, 1); err != nil {
				return e, err
			}
			done = j
			return e, nil
		})
		if err == nil {
			err = c.add(t>>img.clusterBits, 1)
		}
		if err != nil {
			return img.undoTreeRefs(l1[:i], t, done, err)
		}
	}
	return nil
}

// clearCopied clears the COPIED flags in every L2 table reachable from l1,
// whose clusters are now shared. The caller clears them in l1 itself.
func (img *Image) clearCopied(l1 []l1Entry) error {
	for i, le := range l1 {
		t, err := img.validL2Offset(le, i)
		if t == 0 || err != nil {
			if err != nil {
				return err
			}
			continue
		}
		err = img.forEachL2Entry(t, func(_ int64, e l2Entry) (l2Entry, error) {
			return e &^ l2Entry(flagCopied), nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// undoTreeRefs takes back what addTreeRefs added before it failed: whole
// tables in done, plus entries [0, last] of the table at t.
func (img *Image) undoTreeRefs(done []l1Entry, t, last int64, cause error) error {
	c := &rcCursor{img: img}
	err := img.forEachL2Entry(t, func(j int64, e l2Entry) (l2Entry, error) {
		if j > last {
			return e, nil
		}
		return e, img.entryRefs(c, t, e, -1)
	})
	if err == nil {
		err = img.dropTreeRefs(done)
	}
	if err != nil {
		return fmt.Errorf("%w (and undoing the refcount changes: %v)", cause, err)
	}
	return cause
}

// dropTreeRefs drops one reference from every L2 table and cluster
// reachable from l1, freeing what reaches zero. Nothing may reference the
// tree through l1 any more, on disk included.
func (img *Image) dropTreeRefs(l1 []l1Entry) error {
	c := &rcCursor{img: img}
	for i, le := range l1 {
		t, err := img.validL2Offset(le, i)
		if err != nil {
			return err
		}
		if t == 0 {
			continue
		}
		err = img.forEachL2Entry(t, func(_ int64, e l2Entry) (l2Entry, error) {
			return e, img.entryRefs(c, t, e, -1)
		})
		if err != nil {
			return err
		}
		// The table itself last: at zero its cached slices are dropped.
		if err := c.add(t>>img.clusterBits, -1); err != nil {
			return err
		}
	}
	return nil
}

// fixCopied sets the COPIED flag on every active L1 and L2 entry whose
// cluster has refcount one, and clears it elsewhere (QEMU's
// qcow2_update_snapshot_refcount with addend 0).
func (img *Image) fixCopied() error {
	c := &rcCursor{img: img}
	for i, le := range img.l1 {
		t, err := img.validL2Offset(le, i)
		if err != nil {
			return err
		}
		if t == 0 {
			continue
		}
		rc, err := c.get(t >> img.clusterBits)
		if err != nil {
			return err
		}
		if ne := makeL1Entry(t, rc == 1); ne != le {
			img.l1[i] = ne
			img.tablesChanged()
			img.l1Dirty[int64(i)] = true
		}
		err = img.forEachL2Entry(t, func(_ int64, e l2Entry) (l2Entry, error) {
			if e.compressed() || e.offset() == 0 {
				return e, nil
			}
			rc, err := c.get(e.offset() >> img.clusterBits)
			if err != nil {
				return e, err
			}
			if rc == 1 {
				return e | l2Entry(flagCopied), nil
			}
			return e &^ l2Entry(flagCopied), nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// readL1 reads a snapshot's L1 table.
func (img *Image) readL1(off, n int64) ([]l1Entry, error) {
	fs, err := img.f.Size()
	if err != nil {
		return nil, err
	}
	t, err := readTable(img.f, off, n, fs, "snapshot L1 table")
	if err != nil {
		return nil, err
	}
	l1 := make([]l1Entry, len(t))
	for i, v := range t {
		l1[i] = l1Entry(v)
	}
	return l1, nil
}

// writeNewTable allocates clusters for buf, writes it and returns its
// offset (0 for an empty buf). It is not yet durable.
func (img *Image) writeNewTable(buf []byte) (int64, error) {
	if len(buf) == 0 {
		return 0, nil
	}
	n := (int64(len(buf)) + img.clusterSize - 1) >> img.clusterBits
	off, err := img.allocClusters(n)
	if err != nil {
		return 0, err
	}
	if err := img.checkMetadataWrite(off, int64(len(buf))); err != nil {
		return 0, err
	}
	if err := writeFull(img.f, buf, off); err != nil {
		return 0, err
	}
	img.writeGen++
	return off, nil
}

func encodeL1(l1 []l1Entry) []byte {
	buf := make([]byte, len(l1)*8)
	for i, e := range l1 {
		binary.BigEndian.PutUint64(buf[i*8:], uint64(e))
	}
	return buf
}
