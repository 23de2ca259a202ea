package qcow2

import "fmt"

// Lazy links: allocating writes that need no fdatasync before their L2
// entry reaches the file.
//
// The strict crash order (orderBeforeL2Write) syncs before any L2 slice is
// written once something an entry may point at was written since the last
// sync, because an entry that survives a power cut needs
//  (a) the refcounts counting its cluster, or the cluster can be allocated
//      twice after the cut;
//  (b) the data written into its cluster, or the cut shows the cluster's
//      previous host contents where the guest had its old data;
//  (c) a new L2 table or refcount block it goes through.
// A server that writes metadata back after every write (WriteBack) then
// pays an fdatasync per allocating write.
//
// An image with lazy refcounts needs no (a): it is marked dirty, durably,
// while open (prepareForWrite), and a writable open after a crash rebuilds
// its refcounts from the tables before anything else. A link needs no (b)
// when
//  1. every entry it replaces reads as zeros without data: a zero cluster,
//     or an unallocated one in an image without a backing file; and
//  2. every new host cluster reads as zeros on disk for as long as its data
//     has not reached the disk: it lies below durableEnd, and either nothing
//     was ever written there (it was at or past endCluster when allocated)
//     or it was punched out and a sync completed since (lazyLinks.known).
// A cut that keeps such an entry and loses the data then shows zeros where
// the guest had zeros: the unflushed write is lost, which it may be. These
// links are lazy: they do not count in writeGen. Everything else keeps the
// strict order: links over data (copy on write after a snapshot, over a
// compressed cluster or a backing file), new L2 tables, new refcount blocks
// and tables, compressed writes, snapshots, images without lazy refcounts.
// Flush keeps its order too (persist syncs data and refcounts first).
//
// Why 2 is needed. Reusing a freed cluster is not safe by itself: the
// punch freeRange issues reaches the disk at the next sync at the earliest
// and may be unsupported, and freeUnlinked frees without punching. A lazy
// link to such a cluster could show, after a cut, the image's own stale
// data (another guest region's, a deleted snapshot's, old metadata) at a
// guest offset that never held it. And an entry that survives a cut while
// the write that extended the file past its cluster does not would point
// past the end of the file, which check counts as corruption and the next
// allocation could hand out again. So the file is extended ahead of lazy
// allocations (ftruncate, then fdatasync), by a quarter of its allocated
// size within [minExtendAhead, maxExtendAhead], and Close trims what was
// not used. The fdatasync, which writes back every dirty page of the file,
// runs on the writer that asked for the extension without mu held, while
// other writes go on; a link whose clusters the durable length does not yet
// cover is strict.
//
// This relies on the host filesystem never showing a hole's old blocks
// after a power cut (ext4 with data=ordered, the default, XFS and btrfs
// do not; ext4 with data=writeback may), and on fdatasync making a
// completed ftruncate or hole punch durable.

// Once lazy links come within half a step of the durable length, the file
// is extended, durably, a step past the allocated end: a quarter of the
// allocated size, within these bounds. That is a few dozen fdatasyncs
// while a fresh image allocates its first GiB, one per 64 MiB after that.
const (
	minExtendAhead = 1 << 20
	maxExtendAhead = 64 << 20
)

// lazyLinks is the state lazy links need. The caller holds mu.
type lazyLinks struct {
	on bool // lazy refcounts, and the dirty bit is durable
	// durableEnd is a cluster index below which the file's length is
	// durable; extending is the length (in clusters) the file was extended
	// to while a writer syncs that, 0 if none does.
	durableEnd, extending int64
	// known holds free clusters that were punched and synced since, and
	// pending those punched since the last sync.
	known, pending clusterSet
}

// enableLazyLinks turns lazy links on for an image with lazy refcounts
// once its dirty bit is durable; the file's length is durable too, as
// prepareForWrite has just synced.
func (img *Image) enableLazyLinks() {
	if img.h.compatible&compatLazyRefcounts == 0 || img.h.incompatible&incompatDirty == 0 {
		return
	}
	size, err := img.f.Size()
	if err != nil {
		return // strict links only
	}
	img.lazy = lazyLinks{on: true, durableEnd: size >> img.clusterBits}
}

// zeroWithoutData reports whether an entry reads as zeros without any data
// behind it, whatever the file holds (condition 1 above). It is stricter
// than readsZero: an image opened with NoBacking still has a backing file
// another opener reads.
func (img *Image) zeroWithoutData(e l2Entry) bool {
	switch entryKind(e) {
	case kindZero:
		return true
	case kindUnallocated:
		return img.h.backingFile == ""
	}
	return false
}

// canLinkLazily reports whether a link replacing old may be lazy, as far as
// the old entries go.
func (img *Image) canLinkLazily(old []l2Entry) bool {
	if !img.lazy.on {
		return false
	}
	for _, e := range old {
		if !img.zeroWithoutData(e) {
			return false
		}
	}
	return true
}

// runReadsZero reports whether every cluster of [start, start+n), about to
// be allocated, reads as zeros on disk until written (condition 2 above,
// but for durableEnd). It runs before allocRun moves endCluster.
func (img *Image) runReadsZero(start, n int64) bool {
	for c := start; c < min(start+n, img.endCluster); c++ {
		if !img.lazy.known.has(c) {
			return false
		}
	}
	return true
}

// planExtension extends the file, if lazy links up to cluster end come
// near the durable length and no extension is under way, and returns the
// new length in clusters for the caller to sync with syncExtension and
// report to extensionDone; 0 if there is nothing to sync. Clusters past
// endCluster hold nothing, so the new range reads as zeros. The caller
// holds mu, which keeps endCluster, and so what may not be cut, still.
func (img *Image) planExtension(end int64) int64 {
	ahead := min(max(img.endCluster/4, minExtendAhead>>img.clusterBits), maxExtendAhead>>img.clusterBits)
	ahead = max(ahead, 1)
	if img.lazy.extending != 0 || end+ahead/2 <= img.lazy.durableEnd {
		return 0
	}
	target := max(end, img.endCluster, img.lazy.durableEnd) + ahead
	size, err := img.f.Size()
	if err != nil {
		return 0
	}
	// Never shorten: a file may end past endCluster, in the last
	// cluster's tail or after a failed write.
	target = max(target, (size+img.clusterSize-1)>>img.clusterBits)
	if img.f.Truncate(target<<img.clusterBits) != nil {
		return 0
	}
	img.lazy.extending = target
	return target
}

// syncExtension makes an extension durable. It runs without mu, so that
// other writes go on during the fdatasync; syncMu orders it with sync,
// which adopts its failure (sticky, as every failed fdatasync is).
func (img *Image) syncExtension() bool {
	img.syncMu.Lock()
	defer img.syncMu.Unlock()
	if img.syncErr != nil || img.extensionErr != nil {
		return false
	}
	if err := img.f.Sync(); err != nil {
		img.extensionErr = fmt.Errorf("%w: %w", ErrSyncFailed, err)
		return false
	}
	return true
}

// extensionDone records how the extension to target went. The caller
// holds mu.
func (img *Image) extensionDone(target int64, ok bool) {
	img.lazy.extending = 0
	if ok {
		img.lazy.durableEnd = max(img.lazy.durableEnd, target)
	}
}

// durablyInFile reports whether clusters below end lie inside the file's
// durable length. The caller holds mu.
func (img *Image) durablyInFile(end int64) bool { return end <= img.lazy.durableEnd }

// trimExtension shortens the file to the allocated end at Close, dropping
// what planExtension added and no allocation used. Best effort: the rest is
// a hole that nothing references.
func (img *Image) trimExtension() {
	if !img.lazy.on {
		return
	}
	end := img.endCluster << img.clusterBits
	if size, err := img.f.Size(); err == nil && size > end {
		_ = img.f.Truncate(end)
	}
}

// maxTailScan bounds how many free clusters trimFreeTail looks at: the
// extension is at most maxExtendAhead, plus what a failed write may add.
const maxTailScan = 1 << 20

// trimFreeTail does for an image that was not closed what trimExtension
// does at Close: it shortens the file to just past its last cluster with a
// reference count, dropping the extension ahead of lazy links a crash (or
// a killed process) left behind, which would otherwise stay in the file
// for good (endCluster starts at the file's length).
//
// It runs only right after a dirty image's repair left no leak and no
// corruption: the refcounts then equal the references the checker just
// counted from every table, so a cluster with refcount 0 is one nothing
// points at, and cutting it loses nothing. Crash order: none is needed; a
// cut before the truncate reaches the disk leaves the longer file, which
// reads the same.
func (img *Image) trimFreeTail() error {
	end := img.endCluster
	for n := 0; end > 1 && n < maxTailScan; n++ {
		r, err := img.refcount(end - 1)
		if err != nil {
			return err
		}
		if r != 0 {
			break
		}
		end--
	}
	size, err := img.f.Size()
	if err != nil {
		return err
	}
	if size <= end<<img.clusterBits {
		return nil
	}
	if err := img.f.Truncate(end << img.clusterBits); err != nil {
		return fmt.Errorf("trimming the free tail of the file to %d bytes: %w", end<<img.clusterBits, err)
	}
	img.endCluster = end
	return nil
}

// punched notes that a cluster whose refcount dropped to 0 was punched
// out; it reads as zeros on disk once a sync has completed.
func (img *Image) punched(c int64) {
	if img.lazy.on {
		img.lazy.pending.add(c)
	}
}

// clusterUsed notes that a cluster got a reference: whatever is written
// into it next must reach the disk before an entry relies on it reading as
// zeros.
func (img *Image) clusterUsed(c int64) {
	img.lazy.known.remove(c)
	img.lazy.pending.remove(c)
}

// punchesSynced runs after every successful sync: the punches issued
// before it are durable. The caller holds mu, as punches are issued under
// it, so none can slip in between the sync and this.
func (img *Image) punchesSynced() {
	img.lazy.known.addAll(img.lazy.pending)
	img.lazy.pending = nil
}

// forgetZeroClusters drops what is known about free clusters, for when
// metadata was rewritten behind the allocator (a refcount rebuild).
func (img *Image) forgetZeroClusters() {
	img.lazy.known, img.lazy.pending = nil, nil
}

// clusterSet is a set of host cluster indices: a bitmap in pages of 4096
// clusters, a page allocated while it holds any. At most a bit per cluster
// of the image (2 MiB for 1 TiB of 64 KiB clusters), and only for freed
// clusters.
type clusterSet map[int64]*[64]uint64

func (s clusterSet) has(c int64) bool {
	p := s[c>>12]
	return p != nil && p[c>>6&63]&(1<<(c&63)) != 0
}

func (s *clusterSet) add(c int64) {
	if *s == nil {
		*s = make(clusterSet)
	}
	p := (*s)[c>>12]
	if p == nil {
		p = new([64]uint64)
		(*s)[c>>12] = p
	}
	p[c>>6&63] |= 1 << (c & 63)
}

func (s clusterSet) remove(c int64) {
	p := s[c>>12]
	if p == nil || p[c>>6&63]&(1<<(c&63)) == 0 {
		return
	}
	p[c>>6&63] &^= 1 << (c & 63)
	if *p == ([64]uint64{}) {
		delete(s, c>>12)
	}
}

func (s *clusterSet) addAll(o clusterSet) {
	if len(o) == 0 {
		return
	}
	if *s == nil {
		*s = make(clusterSet, len(o))
	}
	for k, p := range o {
		q := (*s)[k]
		if q == nil {
			q = new([64]uint64)
			(*s)[k] = q
		}
		for i := range p {
			q[i] |= p[i]
		}
	}
}
