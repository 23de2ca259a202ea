package qcow2

import "fmt"

// Extent is a run of the guest address space that reads one way, as one
// entry of `qemu-img map --output=json` describes it.
type Extent struct {
	Start, Length int64
	// Depth is the layer of the backing chain the bytes come from: 0 is
	// this image, 1 its backing file and so on. An unallocated run has the
	// depth of the bottom of the chain, or, past the end of a shorter
	// backing file, of the last layer that covers it (as in qemu-img map).
	Depth int
	// Present: some layer allocates the run (data, compressed or a zero
	// cluster); it does not read as zeros merely for lack of a layer.
	Present bool
	// Zero: the run reads as zeros (zero clusters and unallocated runs).
	Zero bool
	// Data: the run's bytes are stored in the file of layer Depth.
	Data bool
	// Compressed: one or more compressed clusters (Offset is -1).
	Compressed bool
	// Offset is the host file offset of the run in layer Depth, or -1 when
	// it has none (compressed, unallocated, zero clusters without storage).
	Offset int64
}

// Extents lists [off, off+length) of the guest disk (clipped to its size)
// as runs that read one way, looking through the backing chain for what
// this image does not allocate. Adjacent runs that agree, with contiguous
// host offsets, are merged, as qemu-img map merges them.
func (img *Image) Extents(off, length int64) ([]Extent, error) {
	if err := img.checkOpen(false); err != nil {
		return nil, err
	}
	return img.extentsL1(func() []l1Entry { return img.l1 }, img.Size(), off, length, 0)
}

// Extents lists the snapshot's disk as Image.Extents lists the image's.
func (v *SnapshotView) Extents(off, length int64) ([]Extent, error) {
	if v.closed.Load() {
		return nil, ErrClosed
	}
	if err := v.img.checkOpen(false); err != nil {
		return nil, err
	}
	return v.img.extentsL1(func() []l1Entry { return v.l1 }, v.Size(), off, length, 0)
}

// extentsL1 walks the tree of l1 (read under mu: the active table can be
// replaced) cluster by cluster.
func (img *Image) extentsL1(l1 func() []l1Entry, size, off, length int64, depth int) ([]Extent, error) {
	if off < 0 || length < 0 {
		return nil, fmt.Errorf("extents of %d bytes at %d: %w", length, off, ErrInvalid)
	}
	end := size
	if length < size-off {
		end = off + length
	}
	var out extentList
	for pos := off; pos < end; {
		n := min(end-pos, img.clusterSize-pos&(img.clusterSize-1))
		img.mu.Lock()
		e, err := img.lookupL1(l1(), pos)
		img.mu.Unlock()
		if err != nil {
			return nil, err
		}
		if entryKind(e) != kindUnallocated {
			out.add(clusterExtent(e, pos, n, pos&(img.clusterSize-1), depth))
			pos += n
			continue
		}
		// An unallocated run goes to the backing file whole.
		run := n
		for pos+run < end {
			img.mu.Lock()
			ne, err := img.lookupL1(l1(), pos+run)
			img.mu.Unlock()
			if err != nil {
				return nil, err
			}
			if entryKind(ne) != kindUnallocated {
				break
			}
			run += min(end-pos-run, img.clusterSize)
		}
		below, err := img.backingExtents(pos, run, depth)
		if err != nil {
			return nil, err
		}
		for _, x := range below {
			out.add(x)
		}
		pos += run
	}
	return out, nil
}

// clusterExtent describes n bytes at guest offset pos, in bytes from in of
// a cluster this layer allocates.
func clusterExtent(e l2Entry, pos, n, in int64, depth int) Extent {
	x := Extent{Start: pos, Length: n, Depth: depth, Present: true, Offset: -1}
	switch {
	case e.compressed():
		x.Data, x.Compressed = true, true
	case e.zero():
		x.Zero = true
		if e.offset() != 0 {
			x.Offset = e.offset() + in // preallocated zero cluster
		}
	default:
		x.Data, x.Offset = true, e.offset()+in
	}
	return x
}

// backingExtents describes a run this layer (at depth) leaves unallocated.
func (img *Image) backingExtents(pos, n int64, depth int) ([]Extent, error) {
	hole := func(start, length int64, d int) Extent {
		return Extent{Start: start, Length: length, Depth: d, Zero: true, Offset: -1}
	}
	var bsize int64
	var below []Extent
	switch b := img.backing.(type) {
	case nil:
		return []Extent{hole(pos, n, depth)}, nil
	case *Image:
		bsize = b.Size()
		if pos < bsize {
			var err error
			if below, err = b.extentsL1(func() []l1Entry { return b.l1 }, bsize, pos, n, depth+1); err != nil {
				return nil, err
			}
		}
	default: // raw: every byte is data at its own offset
		bsize = b.Size()
		if pos < bsize {
			l := min(n, bsize-pos)
			below = []Extent{{Start: pos, Length: l, Depth: depth + 1, Present: true, Data: true, Offset: pos}}
		}
	}
	if pos+n > bsize {
		// Past the end of a shorter backing file: zeros, which qemu-img map
		// reports at this layer's depth.
		from := max(pos, bsize)
		below = append(below, hole(from, pos+n-from, depth))
	}
	return below, nil
}

// extentList merges adjacent extents that agree.
type extentList []Extent

func (l *extentList) add(x Extent) {
	if k := len(*l); k > 0 {
		p := &(*l)[k-1]
		same := p.Depth == x.Depth && p.Present == x.Present && p.Zero == x.Zero && p.Data == x.Data &&
			p.Compressed == x.Compressed && p.Start+p.Length == x.Start
		if same && (p.Offset < 0) == (x.Offset < 0) && (p.Offset < 0 || p.Offset+p.Length == x.Offset) {
			p.Length += x.Length
			return
		}
	}
	*l = append(*l, x)
}
