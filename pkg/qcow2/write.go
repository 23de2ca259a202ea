package qcow2

import (
	"fmt"
)

// maxAllocBytes bounds one allocating host write (and the clusters one
// planning step reserves).
const maxAllocBytes = 8 << 20

// writePlan is what one planning step under mu decided for the head of a
// write: wait for another writer, write in place, or allocate.
type writePlan struct {
	wait    chan struct{}
	n       int64 // guest bytes covered
	host    int64 // host offset to write at (in place: of the first byte)
	inPlace bool
	first   int64     // allocating: first guest cluster index
	old     []l2Entry // allocating: the entries being replaced
	lazy    bool      // allocating: a lazy link, if durablyInFile at link time (lazylink.go)
	extend  int64     // allocating: the file length to sync first (planExtension)
}

// WriteAt writes p at guest offset off (io.WriterAt). Writes past the
// virtual size fail with ErrInvalid.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := img.checkOpen(true); err != nil {
		return 0, err
	}
	img.ioGate.RLock()
	defer img.ioGate.RUnlock()
	if err := img.checkRange(off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		n, err := img.writeStep(p[done:], off+int64(done))
		done += int(n)
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

func (img *Image) checkRange(off, n int64) error {
	size := img.Size()
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("range %d+%d outside a %d-byte disk: %w", off, n, size, ErrInvalid)
	}
	return nil
}

// writeStep writes a prefix of p and returns how much it wrote.
func (img *Image) writeStep(p []byte, off int64) (int64, error) {
	img.mu.Lock()
	plan, err := img.planWrite(int64(len(p)), off)
	img.mu.Unlock()
	switch {
	case err != nil:
		return 0, err
	case plan.wait != nil:
		<-plan.wait
		return 0, nil
	case plan.inPlace:
		return plan.n, writeFull(img.f, p[:plan.n], plan.host)
	}
	return img.allocatingWrite(p, off, plan)
}

// inPlace reports whether a cluster can be overwritten where it is.
func (img *Image) inPlace(e l2Entry) (bool, error) {
	if entryKind(e) != kindData {
		return false, nil
	}
	if e.copied() {
		return true, nil
	}
	rc, err := img.refcount(e.offset() >> img.clusterBits)
	return rc == 1, err
}

// planWrite decides how to write the first bytes of [off, off+length).
func (img *Image) planWrite(length, off int64) (writePlan, error) {
	if img.corrupt {
		return writePlan{}, fmt.Errorf("refusing to write to an image found corrupt: %w", ErrCorrupt)
	}
	c := off >> img.clusterBits
	if ch := img.inflight[c]; ch != nil {
		return writePlan{wait: ch}, nil
	}
	e, err := img.lookup(off)
	if err != nil {
		return writePlan{}, err
	}
	ok, err := img.inPlace(e)
	if err != nil {
		return writePlan{}, err
	}
	if ok {
		return img.planInPlace(e, length, off)
	}
	return img.planAllocation(e, length, off)
}

// planInPlace extends an in-place write over following clusters that are
// host-contiguous and writable in place.
func (img *Image) planInPlace(e l2Entry, length, off int64) (writePlan, error) {
	if !e.copied() {
		if err := img.setCopied(off, e); err != nil {
			return writePlan{}, err
		}
	}
	in := off & (img.clusterSize - 1)
	plan := writePlan{inPlace: true, host: e.offset() + in, n: min(length, img.clusterSize-in)}
	for next := off + plan.n; plan.n < length && plan.n < maxAllocBytes; next += img.clusterSize {
		if img.inflight[next>>img.clusterBits] != nil {
			break
		}
		ne, err := img.lookup(next)
		if err != nil || !ne.copied() || entryKind(ne) != kindData || ne.offset() != plan.host+plan.n {
			break
		}
		plan.n += min(length-plan.n, img.clusterSize)
	}
	return plan, img.checkDataWrite(plan.host, plan.n)
}

func (img *Image) setCopied(off int64, e l2Entry) error {
	s, pos, err := img.l2ForWrite(off)
	if err != nil {
		return err
	}
	img.setL2(s, pos, e|l2Entry(flagCopied))
	return nil
}

// planAllocation reserves new host clusters for a run of guest clusters
// that cannot be written in place, and marks them in flight.
func (img *Image) planAllocation(e l2Entry, length, off int64) (writePlan, error) {
	first := off >> img.clusterBits
	in := off & (img.clusterSize - 1)
	plan := writePlan{first: first, old: []l2Entry{e}}
	covered := img.clusterSize - in
	for next := (first + 1) << img.clusterBits; covered < length && covered < maxAllocBytes; next += img.clusterSize {
		if img.inflight[next>>img.clusterBits] != nil || img.l1Index(next) != img.l1Index(off) {
			break
		}
		ne, err := img.lookup(next)
		if err != nil {
			return writePlan{}, err
		}
		if ok, err := img.inPlace(ne); ok || err != nil {
			break
		}
		plan.old = append(plan.old, ne)
		covered += img.clusterSize
	}
	plan.n = min(length, covered)
	if _, _, err := img.l2ForWrite(off); err != nil {
		return writePlan{}, err
	}
	k := int64(len(plan.old))
	host, zero, err := img.allocRun(k)
	if err != nil {
		return writePlan{}, err
	}
	if err := img.checkDataWrite(host, k*img.clusterSize); err != nil {
		return writePlan{}, err
	}
	plan.host = host
	if zero && img.canLinkLazily(plan.old) {
		plan.lazy = true
		plan.extend = img.planExtension(host>>img.clusterBits + k)
	}
	ch := make(chan struct{})
	for i := range plan.old {
		img.inflight[first+int64(i)] = ch
	}
	return plan, nil
}

// allocatingWrite writes guest data plus the copy-on-write head and tail
// of the first and last cluster in one host write, then links the clusters.
//
// Crash order: the data is written before the L2 entries point at it; the
// L2 slices reach the disk only after a sync (orderBeforeL2Write), unless
// the link is lazy: then the entries may reach the disk first, as the
// clusters read as zeros where the guest had zeros (lazylink.go).
func (img *Image) allocatingWrite(p []byte, off int64, plan writePlan) (int64, error) {
	k := int64(len(plan.old))
	extended := plan.extend != 0 && img.syncExtension()
	err := img.writeWithCOW(p[:plan.n], off, plan)
	img.mu.Lock()
	defer img.mu.Unlock()
	defer img.releaseInflight(plan)
	if plan.extend != 0 {
		img.extensionDone(plan.extend, extended)
	}
	plan.lazy = plan.lazy && img.durablyInFile(plan.host>>img.clusterBits+k)
	linked := int64(0)
	if err == nil {
		linked, err = img.linkClusters(plan)
	}
	if err != nil {
		img.freeUnlinked(plan.host+linked<<img.clusterBits, k-linked)
		return 0, err
	}
	return plan.n, nil
}

// writeWithCOW writes the guest bytes p at their place in the freshly
// allocated clusters, filling the rest of the first and last cluster from
// what they held before. When that is all zeros, the clusters are zeroed
// with ZeroRange and only p is written (QEMU's handle_alloc_space), which
// saves writing up to a cluster of zeros per small write.
func (img *Image) writeWithCOW(p []byte, off int64, plan writePlan) error {
	k := int64(len(plan.old))
	total := k * img.clusterSize
	head := off - plan.first<<img.clusterBits
	tail := total - head - int64(len(p))
	if head == 0 && tail == 0 {
		return writeFull(img.f, p, plan.host)
	}
	if (head == 0 || img.readsZero(plan.old[0])) && (tail == 0 || img.readsZero(plan.old[k-1])) {
		if img.f.ZeroRange(plan.host, total) == nil {
			return writeFull(img.f, p, plan.host+head)
		}
	}
	buf := make([]byte, total)
	copy(buf[head:], p)
	if head > 0 {
		if err := img.readOld(plan.old[0], plan.first, buf[:head], 0); err != nil {
			return err
		}
	}
	if tail > 0 {
		if err := img.readOld(plan.old[k-1], plan.first+k-1, buf[total-tail:], img.clusterSize-tail); err != nil {
			return err
		}
	}
	return writeFull(img.f, buf, plan.host)
}

// readsZero reports whether a cluster described by e reads as all zeros
// without looking at data: a zero cluster, or unallocated with no backing.
func (img *Image) readsZero(e l2Entry) bool {
	switch entryKind(e) {
	case kindZero:
		return true
	case kindUnallocated:
		return img.backing == nil
	}
	return false
}

// linkClusters points the L2 entries at the freshly written clusters and
// returns how many it linked.
func (img *Image) linkClusters(plan writePlan) (int64, error) {
	if !plan.lazy {
		img.writeGen++ // the data and refcounts are synced before the entries
	}
	for i, old := range plan.old {
		g := (plan.first + int64(i)) << img.clusterBits
		s, pos, err := img.l2ForWrite(g)
		if err != nil {
			return int64(i), err
		}
		img.setL2(s, pos, makeL2Entry(plan.host+int64(i)<<img.clusterBits, true))
		img.deferFreeEntry(old)
	}
	return int64(len(plan.old)), nil
}

// freeUnlinked returns clusters that no L2 entry ever pointed at.
func (img *Image) freeUnlinked(host, k int64) {
	for c := host >> img.clusterBits; c < host>>img.clusterBits+k; c++ {
		_ = img.setRefcount(c, 0)
	}
}

func (img *Image) releaseInflight(plan writePlan) {
	ch := img.inflight[plan.first]
	for i := range plan.old {
		delete(img.inflight, plan.first+int64(i))
	}
	close(ch)
}
