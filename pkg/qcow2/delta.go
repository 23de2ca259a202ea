package qcow2

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// Changed-block tracking: which clusters differ between two internal
// snapshots, found by comparing their trees instead of their bytes.
//
// A snapshot's L2 tables and clusters are never changed in place (a write
// to the active layer copies whatever it shares), so an L1 entry that both
// snapshots point at the same L2 table covers a range that reads the same
// in both: it is skipped without reading the table. This is what makes a
// delta of a large, mostly unchanged disk cheap. Where the tables differ,
// runs of entries are compared as bytes first, then entry by entry. A cluster
// is changed when its kind differs (data, compressed, zero, unallocated) or
// its host offset (data) or descriptor (compressed) does; two zero clusters
// read the same and are unchanged whatever their preallocation. So the
// delta holds every cluster whose bytes differ, and may hold some that read
// the same (rewritten with the bytes they had, or a zero cluster where none
// was allocated): it says what was written, as a tree can, not what a byte
// compare would find.

// Change is a run of the guest disk reported by SnapshotDelta or
// SnapshotAllocated.
type Change struct {
	Start, Length int64
	// Zero: the run reads as zeros in the (target) snapshot: zero clusters,
	// and unallocated clusters of an image without a backing file.
	Zero bool
}

// SnapshotDelta lists the runs of [off, off+length) of target's disk
// (clipped to target's virtual size) whose clusters target maps
// differently from base. Both are snapshot ids or names (id first), of this
// image. The runs are whole clusters, clipped to the window, in order,
// adjacent ones merged when they agree on Zero. Neither snapshot can be
// deleted while the walk runs (see OpenSnapshot).
func (img *Image) SnapshotDelta(base, target string, off, length int64) ([]Change, error) {
	bv, err := img.OpenSnapshot(base)
	if err != nil {
		return nil, err
	}
	defer bv.Close()
	tv, err := img.OpenSnapshot(target)
	if err != nil {
		return nil, err
	}
	defer tv.Close()
	return img.diffTrees(bv.l1, tv.l1, tv.Size(), off, length)
}

// SnapshotAllocated lists the runs of [off, off+length) of the snapshot's
// disk (clipped to its size) that its own tables allocate: data,
// compressed and zero clusters (Zero set on the last), as SnapshotDelta
// would list them against an empty disk. What a backing file provides is
// not listed.
func (img *Image) SnapshotAllocated(snapshot string, off, length int64) ([]Change, error) {
	v, err := img.OpenSnapshot(snapshot)
	if err != nil {
		return nil, err
	}
	defer v.Close()
	return img.diffTrees(nil, v.l1, v.Size(), off, length)
}

// diffTrees compares the trees of l1 tables a and b (a nil table is an
// empty disk) over [off, off+length) of a disk of size bytes, L1 entry by
// L1 entry. Both trees must be ones that are not modified (snapshots').
func (img *Image) diffTrees(a, b []l1Entry, size, off, length int64) ([]Change, error) {
	if err := img.checkOpen(false); err != nil {
		return nil, err
	}
	if off < 0 || length < 0 {
		return nil, fmt.Errorf("delta of %d bytes at %d: %w", length, off, ErrInvalid)
	}
	end := size
	if length < size-off {
		end = off + length
	}
	w := &treeDiff{img: img, holesZero: img.backing == nil, a: make([]byte, img.clusterSize),
		b: make([]byte, img.clusterSize), none: make([]byte, img.clusterSize)}
	span := int64(1) << (img.clusterBits + img.l2Bits) // guest bytes per L2 table
	for pos := off; pos < end; {
		i := img.l1Index(pos)
		next := min(end, (i+1)*span)
		if err := w.table(l1At(a, i), l1At(b, i), int(i), pos, next); err != nil {
			return nil, err
		}
		pos = next
	}
	return w.out, nil
}

func l1At(t []l1Entry, i int64) l1Entry {
	if i < int64(len(t)) {
		return t[i]
	}
	return 0
}

// treeDiff is one walk of diffTrees.
type treeDiff struct {
	img       *Image
	holesZero bool   // unallocated clusters read as zeros (no backing file)
	a, b      []byte // the two L2 tables being compared
	none      []byte // an absent table: all entries unallocated
	out       []Change
}

// table compares guest range [pos, end) of L1 entry i, ea in a and eb in b.
func (w *treeDiff) table(ea, eb l1Entry, i int, pos, end int64) error {
	img := w.img
	img.mu.Lock()
	ta, err := img.validL2Offset(ea, i)
	tb := int64(0)
	if err == nil {
		tb, err = img.validL2Offset(eb, i)
	}
	img.mu.Unlock()
	if err != nil || ta == tb {
		return err // the same table, or none in either: unchanged
	}
	ra, err := w.load(ta, w.a)
	if err != nil {
		return err
	}
	rb, err := w.load(tb, w.b)
	if err != nil {
		return err
	}
	const run = 64 // entries compared as bytes before one by one
	base := int64(i) << (img.clusterBits + img.l2Bits)
	first, last := img.l2Index(pos), img.l2Index(end-1)
	for k := first; k <= last; {
		next := min(last+1, (k/run+1)*run)
		if bytes.Equal(ra[k*8:next*8], rb[k*8:next*8]) {
			k = next
			continue
		}
		for ; k < next; k++ {
			x, y := l2Entry(binary.BigEndian.Uint64(ra[k*8:])), l2Entry(binary.BigEndian.Uint64(rb[k*8:]))
			if x == y {
				continue
			}
			g := base + k<<img.clusterBits
			if err := w.compare(x, y, max(g, pos), min(g+img.clusterSize, end)); err != nil {
				return err
			}
		}
	}
	return nil
}

// load returns the L2 table at t (0: none) in buf. A table not in the
// cache is read whole, directly, and not cached: a walk must not evict the
// slices the guest's I/O uses, and a snapshot's table is never written in
// place (a write copies it), so what the file holds is current. A table
// with slices in the cache is read through it, as the cache may hold the
// newest copy of a slice. mu is held for the cache only.
func (w *treeDiff) load(t int64, buf []byte) ([]byte, error) {
	if t == 0 {
		return w.none, nil
	}
	img := w.img
	img.mu.Lock()
	cached := img.l2.clusters[t>>img.clusterBits] > 0
	if cached {
		for o := int64(0); o < img.clusterSize; o += img.l2.size {
			s, err := img.l2.get(t + o)
			if err != nil {
				img.mu.Unlock()
				return nil, err
			}
			copy(buf[o:], s.buf)
		}
	}
	img.mu.Unlock()
	if !cached {
		if err := readFull(img.f, buf, t); err != nil {
			return nil, fmt.Errorf("L2 table at %#x: %w", t, err)
		}
	}
	return buf, nil
}

// compare records guest range [g, e) of one cluster, mapped by x in a and
// y in b (two different entries), if they map it to different bytes.
func (w *treeDiff) compare(x, y l2Entry, g, e int64) error {
	img := w.img
	img.mu.Lock()
	x, err := img.vetL2Entry(x, g)
	if err == nil {
		y, err = img.vetL2Entry(y, g)
	}
	img.mu.Unlock()
	if err != nil {
		return err
	}
	if !sameCluster(x, y) {
		w.add(Change{Start: g, Length: e - g, Zero: y.zero() || w.holesZero && entryKind(y) == kindUnallocated})
	}
	return nil
}

func (w *treeDiff) add(c Change) {
	if k := len(w.out); k > 0 {
		if p := &w.out[k-1]; p.Zero == c.Zero && p.Start+p.Length == c.Start {
			p.Length += c.Length
			return
		}
	}
	w.out = append(w.out, c)
}

// sameCluster reports whether two L2 entries map a cluster to the same
// bytes: same kind and same storage (the COPIED flag, a refcount hint,
// does not count).
func sameCluster(a, b l2Entry) bool {
	k := entryKind(a)
	if k != entryKind(b) {
		return false
	}
	switch k {
	case kindData:
		return a.offset() == b.offset()
	case kindCompressed:
		return a == b
	}
	return true // both zero, or both unallocated
}
