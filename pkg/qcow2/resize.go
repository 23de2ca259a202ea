package qcow2

import (
	"encoding/binary"
	"fmt"
)

// Resize changes the virtual size (rounded up to 512 bytes). Growing may
// move the L1 table; shrinking is refused with ErrShrink if any cluster
// past the new end is allocated. Snapshots keep their own sizes.
func (img *Image) Resize(size int64) error {
	if err := img.checkOpen(true); err != nil {
		return err
	}
	if size < 0 || size > maxVirtualSize {
		return fmt.Errorf("size %d: %w", size, ErrInvalid)
	}
	size = (size + 511) &^ 511
	img.ioGate.Lock()
	defer img.ioGate.Unlock()
	img.mu.Lock()
	old, err := img.resizeLocked(size)
	img.mu.Unlock()
	if err != nil || size <= old || old&(img.clusterSize-1) == 0 {
		return err
	}
	// Bytes past the old end in its last cluster may hold data from before
	// an earlier shrink (or a backing file's): make them read as zeros.
	tail := min(size, (old+img.clusterSize-1)&^(img.clusterSize-1)) - old
	return img.writeZeroBytes(old, tail)
}

func (img *Image) resizeLocked(size int64) (int64, error) {
	old := img.size
	if img.corrupt {
		return old, fmt.Errorf("image was found corrupt: %w", ErrCorrupt)
	}
	if img.h.version < 3 && len(img.snapshots) > 0 && size != old {
		// v2 snapshots do not record their size; QEMU refuses too.
		return old, fmt.Errorf("resizing a v2 (compat=0.10) image that has snapshots: %w", ErrUnsupported)
	}
	if size < old {
		if err := img.checkUnallocatedFrom(size); err != nil {
			return old, err
		}
	}
	if need := l1EntriesFor(size, img.clusterBits); need > int64(len(img.l1)) {
		if need*8 > maxL1Bytes {
			return old, fmt.Errorf("size %d needs an L1 table over %d bytes: %w", size, maxL1Bytes, ErrInvalid)
		}
		if err := img.growL1(need); err != nil {
			return old, err
		}
	}
	img.size, img.h.size = size, uint64(size)
	if err := img.writeHeader(); err != nil {
		return old, err
	}
	return old, img.sync()
}

// checkUnallocatedFrom refuses a shrink that would cut off allocated data.
func (img *Image) checkUnallocatedFrom(size int64) error {
	start := (size + img.clusterSize - 1) &^ (img.clusterSize - 1)
	for g := start; g < img.size; g += img.clusterSize {
		if g&(1<<(img.clusterBits+img.l2Bits)-1) == 0 {
			t, err := img.l2Table(g)
			if err != nil {
				return err
			}
			if t == 0 {
				g += 1<<(img.clusterBits+img.l2Bits) - img.clusterSize
				continue
			}
		}
		e, err := img.lookup(g)
		if err != nil {
			return err
		}
		if e != 0 {
			return fmt.Errorf("guest cluster at %#x is allocated: %w", g, ErrShrink)
		}
	}
	return nil
}

// growL1 moves the L1 table to a larger one.
//
// Crash order: everything is persisted first (so the copy is current and
// durable), the new table is written and synced with its refcounts, the
// header is switched and synced, then the old table is freed.
func (img *Image) growL1(need int64) error {
	if _, err := img.persist(); err != nil {
		return err
	}
	clusters := (need*8 + img.clusterSize - 1) / img.clusterSize
	off, err := img.allocClusters(clusters)
	if err != nil {
		return err
	}
	buf := make([]byte, clusters*img.clusterSize)
	for i, e := range img.l1 {
		binary.BigEndian.PutUint64(buf[i*8:], uint64(e))
	}
	if err := img.checkMetadataWrite(off, int64(len(buf))); err != nil {
		return err
	}
	if err := writeFull(img.f, buf, off); err != nil {
		return err
	}
	if err := img.rc.flush(); err != nil {
		return err
	}
	if err := img.sync(); err != nil {
		return err
	}
	oldOff, oldLen := int64(img.h.l1TableOffset), int64(len(img.l1))*8
	img.h.l1TableOffset, img.h.l1Size = uint64(off), uint32(need)
	if err := img.writeHeader(); err != nil {
		return err
	}
	if err := img.sync(); err != nil {
		return err
	}
	img.l1 = append(img.l1, make([]l1Entry, need-int64(len(img.l1)))...)
	if oldLen == 0 {
		return nil
	}
	return img.freeRange(hostRange{oldOff, (oldLen + img.clusterSize - 1) &^ (img.clusterSize - 1)})
}
