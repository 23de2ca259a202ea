package qcow2

import (
	"container/list"
	"slices"
)

// slice is a cached metadataSliceSize-byte (or cluster-sized, if smaller)
// piece of an L2 table or refcount block, as QEMU caches L2 slices.
type slice struct {
	off   int64 // host offset of the slice
	buf   []byte
	dirty bool
	elem  *list.Element
}

// sliceCache is a bounded write-back LRU cache of metadata slices. It is not
// safe for concurrent use: the image's metadata lock guards it. A slice
// returned by get is valid until the next get on the same cache.
type sliceCache struct {
	f        File
	size     int64 // bytes per slice
	max      int
	slices   map[int64]*slice
	clusters map[int64]int // cluster index -> number of cached slices in it
	lru      list.List     // front = most recently used
	bits     uint          // cluster bits, to index clusters
	ndirty   int
	// dirty lists the slices marked dirty since the last flush, so that
	// flush (after every write, with WriteBack) need not walk the whole
	// cache. Entries written back or dropped since are skipped; a slice
	// may appear twice.
	dirty []*slice
	// beforeWriteback runs before any dirty slice is written to disk. The L2
	// cache uses it to enforce "refcounts and data durable before the L2
	// entries that point at them".
	beforeWriteback func() error
	// checkWrite vets a metadata write against the overlap rules.
	checkWrite func(off, length int64) error
	// cachedOnly makes get fail with errNotCached instead of reading a
	// slice from the disk (TryReadAt sets it while it holds mu).
	cachedOnly bool
}

func newSliceCache(f File, sliceSize int64, clusterBits uint, bytes int64) *sliceCache {
	n := int(bytes / sliceSize)
	if n < 16 {
		n = 16
	}
	return &sliceCache{
		f: f, size: sliceSize, max: n, bits: clusterBits,
		slices: make(map[int64]*slice), clusters: make(map[int64]int),
	}
}

// get returns the slice at off, loading it (and evicting the least recently
// used slice) if needed.
func (c *sliceCache) get(off int64) (*slice, error) {
	if s, ok := c.slices[off]; ok {
		c.lru.MoveToFront(s.elem)
		return s, nil
	}
	if c.cachedOnly {
		return nil, errNotCached
	}
	if err := c.evictIfFull(); err != nil {
		return nil, err
	}
	s := &slice{off: off, buf: make([]byte, c.size)}
	if err := readFull(c.f, s.buf, off); err != nil {
		return nil, err
	}
	c.insert(s)
	return s, nil
}

// put installs a slice whose contents the caller provides (a new table).
func (c *sliceCache) put(off int64, buf []byte) (*slice, error) {
	if s, ok := c.slices[off]; ok {
		copy(s.buf, buf)
		c.markDirty(s)
		c.lru.MoveToFront(s.elem)
		return s, nil
	}
	if err := c.evictIfFull(); err != nil {
		return nil, err
	}
	s := &slice{off: off, buf: append([]byte(nil), buf...)}
	c.insert(s)
	c.markDirty(s)
	return s, nil
}

func (c *sliceCache) insert(s *slice) {
	s.elem = c.lru.PushFront(s)
	c.slices[s.off] = s
	c.clusters[s.off>>c.bits]++
}

func (c *sliceCache) evictIfFull() error {
	for len(c.slices) >= c.max {
		victim := c.lru.Back().Value.(*slice)
		if err := c.writeback(victim); err != nil {
			return err
		}
		c.remove(victim)
	}
	return nil
}

// markDirty records that s must be written back before it is dropped.
func (c *sliceCache) markDirty(s *slice) {
	if s.dirty {
		return
	}
	s.dirty = true
	c.ndirty++
	if len(c.dirty) >= 2*c.max { // written back by evictions, never flushed
		c.dirty = slices.DeleteFunc(c.dirty, func(s *slice) bool { return !s.dirty })
	}
	c.dirty = append(c.dirty, s)
}

func (c *sliceCache) remove(s *slice) {
	if s.dirty {
		s.dirty = false
		c.ndirty--
	}
	c.lru.Remove(s.elem)
	delete(c.slices, s.off)
	if c.clusters[s.off>>c.bits]--; c.clusters[s.off>>c.bits] == 0 {
		delete(c.clusters, s.off>>c.bits)
	}
}

func (c *sliceCache) writeback(s *slice) error {
	if !s.dirty {
		return nil
	}
	if c.beforeWriteback != nil {
		if err := c.beforeWriteback(); err != nil {
			return err
		}
	}
	if c.checkWrite != nil {
		if err := c.checkWrite(s.off, c.size); err != nil {
			return err
		}
	}
	if err := writeFull(c.f, s.buf, s.off); err != nil {
		return err
	}
	s.dirty = false
	c.ndirty--
	return nil
}

// hasDirty reports whether any slice awaits writeback.
func (c *sliceCache) hasDirty() bool { return c.ndirty > 0 }

// flush writes every dirty slice (no sync; the caller orders syncs).
func (c *sliceCache) flush() error {
	for i, s := range c.dirty {
		if err := c.writeback(s); err != nil {
			c.dirty = append(c.dirty[:0], c.dirty[i:]...)
			return err
		}
	}
	clear(c.dirty)
	c.dirty = c.dirty[:0]
	return nil
}

// invalidate drops every cached slice of the cluster at off without writing
// it (the cluster was freed or rewritten behind the cache).
func (c *sliceCache) invalidate(clusterOff int64) {
	if c.clusters[clusterOff>>c.bits] == 0 {
		return
	}
	for o := clusterOff; o < clusterOff+(int64(1)<<c.bits); o += c.size {
		if s, ok := c.slices[o]; ok {
			c.remove(s)
		}
	}
}

// clear drops everything, dirty or not (after a repair rewrote metadata).
func (c *sliceCache) clear() {
	c.slices = make(map[int64]*slice)
	c.clusters = make(map[int64]int)
	c.lru.Init()
	c.ndirty = 0
	c.dirty = nil
}

// holdsCluster reports whether any slice of the given cluster is cached:
// a data write landing there would overwrite live metadata.
func (c *sliceCache) holdsCluster(cluster int64) bool { return c.clusters[cluster] > 0 }
