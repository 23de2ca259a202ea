package qcow2

import "fmt"

// zeroMode says what a whole-cluster zeroing operation leaves behind.
type zeroMode int

const (
	zeroUnmap   zeroMode = iota // zero cluster, host cluster freed
	zeroKeep                    // zero cluster, host cluster kept (NBD NO_HOLE)
	zeroDiscard                 // unallocated (or zero, over a backing file)
)

// WriteZeroes makes [off, off+length) read as zeros. Whole clusters become
// zero clusters (v3) instead of written zeros; with mayUnmap their host
// clusters are freed, otherwise kept allocated. Partial clusters at the
// edges are written with zeros. On v2 images, which have no zero flag,
// zeros are written.
func (img *Image) WriteZeroes(off, length int64, mayUnmap bool) error {
	if err := img.checkOpen(true); err != nil {
		return err
	}
	img.ioGate.RLock()
	defer img.ioGate.RUnlock()
	if err := img.checkRange(off, length); err != nil {
		return err
	}
	if img.h.version < 3 {
		return img.writeZeroBytes(off, length)
	}
	mode := zeroKeep
	if mayUnmap {
		mode = zeroUnmap
	}
	return img.forWholeClusters(off, length, mode, img.writeZeroBytes)
}

// Discard drops the guest data in [off, off+length): whole clusters are
// deallocated (reading as zeros, or as zero clusters over a backing file)
// and their host clusters are freed and punched out of the file once the
// change is durable (the next Flush). Partial clusters are left alone, as
// discard is advisory.
func (img *Image) Discard(off, length int64) error {
	if err := img.checkOpen(true); err != nil {
		return err
	}
	img.ioGate.RLock()
	defer img.ioGate.RUnlock()
	if err := img.checkRange(off, length); err != nil {
		return err
	}
	return img.forWholeClusters(off, length, zeroDiscard, func(int64, int64) error { return nil })
}

// forWholeClusters applies mode to the whole clusters inside the range and
// partial to the pieces at either edge.
func (img *Image) forWholeClusters(off, length int64, mode zeroMode, partial func(off, n int64) error) error {
	end := off + length
	first := (off + img.clusterSize - 1) &^ (img.clusterSize - 1)
	last := end &^ (img.clusterSize - 1)
	if end == img.Size() {
		last = first + (end-first+img.clusterSize-1)&^(img.clusterSize-1) // the image's last, partial cluster counts as whole
	}
	if first >= last {
		return partial(off, length)
	}
	if first > off {
		if err := partial(off, first-off); err != nil {
			return err
		}
	}
	for c := first >> img.clusterBits; c < last>>img.clusterBits; {
		done, err := img.zeroCluster(c, mode)
		if err != nil {
			return err
		}
		if done {
			c++
		}
	}
	if last < end {
		return partial(last, end-last)
	}
	return nil
}

// zeroCluster rewrites one cluster's L2 entry; done is false when it had
// to wait for an in-flight write to that cluster first.
func (img *Image) zeroCluster(c int64, mode zeroMode) (done bool, err error) {
	img.mu.Lock()
	if ch := img.inflight[c]; ch != nil {
		img.mu.Unlock()
		<-ch
		return false, nil
	}
	defer img.mu.Unlock()
	g := c << img.clusterBits
	e, err := img.lookup(g)
	if err != nil {
		return false, err
	}
	ne, keep, err := img.zeroedEntry(e, mode)
	if err != nil || ne == e {
		return true, err
	}
	s, pos, err := img.l2ForWrite(g)
	if err != nil {
		return false, err
	}
	img.setL2(s, pos, ne)
	if !keep {
		img.deferFreeEntry(e)
	}
	return true, nil
}

// zeroedEntry is the entry a cluster gets, and whether it keeps the old
// host cluster.
func (img *Image) zeroedEntry(e l2Entry, mode zeroMode) (l2Entry, bool, error) {
	masked := img.backing != nil
	switch mode {
	case zeroKeep:
		if ok, err := img.inPlace(e); ok || err != nil {
			return zeroL2Entry(e.offset(), true), true, err
		}
		if e.zero() && e.offset() != 0 && e.copied() {
			return e, true, nil
		}
		return zeroL2Entry(0, false), false, nil
	case zeroDiscard:
		if masked && img.h.version >= 3 {
			return zeroL2Entry(0, false), false, nil
		}
		if masked {
			return e, true, nil // v2 over a backing file cannot hide it
		}
		return 0, false, nil
	default:
		if e == 0 && !masked {
			return 0, false, nil
		}
		return zeroL2Entry(0, false), false, nil
	}
}

// writeZeroBytes writes explicit zeros, in bounded chunks.
func (img *Image) writeZeroBytes(off, n int64) error {
	zeros := make([]byte, min(n, maxAllocBytes))
	for n > 0 {
		k := min(n, int64(len(zeros)))
		for done := int64(0); done < k; {
			w, err := img.writeStep(zeros[done:k], off+done)
			if err != nil {
				return fmt.Errorf("writing zeros: %w", err)
			}
			done += w
		}
		off, n = off+k, n-k
	}
	return nil
}
