package qcow2

import (
	"encoding/binary"
	"fmt"
	"os"
)

// Check verifies the image's metadata as `qemu-img check` does: every
// cluster's refcount against the references found by walking the header,
// the L1/L2 tables of the image and of every snapshot, the snapshot table
// and the refcount structure itself; and the COPIED flags. With a repair
// mode it fixes what it found and reports what remains.
func (img *Image) Check(opts CheckOptions) (*CheckResult, error) {
	if err := img.checkOpen(opts.Repair != RepairNone); err != nil {
		return nil, err
	}
	img.ioGate.Lock()
	defer img.ioGate.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	if !img.readOnly && !img.corrupt {
		upTo, err := img.persist()
		if err != nil {
			return nil, err
		}
		if err := img.applyFrees(upTo); err != nil {
			return nil, err
		}
		if _, err := img.persist(); err != nil {
			return nil, err
		}
	}
	return img.check(opts.Repair, false)
}

// CheckFile checks the image at path, opening it read-only for a plain
// check (so dirty or corrupt-marked images can be examined) and writable
// for a repair. It takes the image locks either way, so it refuses
// (ErrLocked) an image that another process has open for writing: a
// repair of a live image would corrupt it. A successful RepairAll clears
// the corrupt bit.
func CheckFile(path string, opts CheckOptions) (*CheckResult, error) {
	if opts.Repair == RepairNone {
		img, err := Open(path, OpenOptions{ReadOnly: true, NoBacking: true, Lock: true})
		if err != nil {
			return nil, err
		}
		defer img.Close()
		return img.Check(opts)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	if err := lockImage(f, true); err != nil {
		f.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	img, err := openForRepair(OSFile{f}, path)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	res, err := img.check(opts.Repair, false)
	if err == nil && opts.Repair == RepairAll && res.Corruptions == 0 {
		img.corrupt = false
		img.h.incompatible &^= incompatCorrupt
		err = img.writeHeader()
	}
	img.readOnly = false
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	return res, err
}

// openForRepair opens an image writable without refusing a corrupt bit or
// repairing on its own; the caller runs check with a repair mode.
func openForRepair(f File, path string) (*Image, error) {
	img, err := openImage(f, path, OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		return nil, err
	}
	img.readOnly = false
	return img, nil
}

// check does the work; the caller holds the locks (or owns the image).
func (img *Image) check(repair Repair, quiet bool) (*CheckResult, error) {
	ck, err := newChecker(img)
	if err != nil {
		return nil, err
	}
	if err := ck.countReferences(); err != nil {
		return nil, err
	}
	fixed, err := ck.compare(repair)
	if err != nil {
		return nil, err
	}
	if err := ck.checkCopied(repair); err != nil {
		return nil, err
	}
	if !fixed {
		return ck.res, nil
	}
	if err := img.rc.flush(); err != nil {
		return nil, err
	}
	if err := img.sync(); err != nil {
		return nil, err
	}
	again, err := img.check(RepairNone, quiet)
	if err != nil {
		return nil, err
	}
	again.LeaksFixed = ck.res.Leaks - again.Leaks
	again.CorruptionsFixed = ck.res.Corruptions - again.Corruptions
	return again, nil
}

// checker accumulates the references found while walking the metadata.
type checker struct {
	img      *Image
	fileSize int64
	refs     []uint32 // references found, per host cluster
	rcStruct []int64  // clusters of the refcount table and blocks
	res      *CheckResult
	lastData int64 // for fragmentation counting
	rebuild  bool  // a referenced cluster has no refcount block
}

func newChecker(img *Image) (*checker, error) {
	fs, err := img.f.Size()
	if err != nil {
		return nil, err
	}
	n := (fs + img.clusterSize - 1) >> img.clusterBits
	return &checker{
		img: img, fileSize: fs, refs: make([]uint32, n),
		res: &CheckResult{TotalClusters: (img.size + img.clusterSize - 1) >> img.clusterBits},
	}, nil
}

func (ck *checker) corruption(format string, args ...any) {
	ck.res.Corruptions++
	ck.res.Problems = append(ck.res.Problems, "ERROR "+fmt.Sprintf(format, args...))
}

// ref records one reference to every cluster in [off, off+length).
func (ck *checker) ref(off, length int64, what string) bool {
	if length <= 0 {
		return true
	}
	first, last := off>>ck.img.clusterBits, (off+length-1)>>ck.img.clusterBits
	if off < 0 || last >= int64(len(ck.refs)) {
		ck.corruption("%s at %#x is outside the image file", what, off)
		return false
	}
	for c := first; c <= last; c++ {
		ck.refs[c]++
	}
	return true
}

func (ck *checker) countReferences() error {
	img := ck.img
	cs := img.clusterSize
	ck.ref(0, cs, "header")
	if err := ck.walkL1(img.l1, int64(img.h.l1TableOffset), true); err != nil {
		return err
	}
	for i := range img.snapshots {
		s := &img.snapshots[i]
		l1, err := readTable(img.f, s.l1Offset, s.l1Size, ck.fileSize, "snapshot L1 table")
		if err != nil {
			ck.corruption("snapshot %q: %v", s.name, err)
			continue
		}
		entries := make([]l1Entry, len(l1))
		for j, v := range l1 {
			entries[j] = l1Entry(v)
		}
		if err := ck.walkL1(entries, s.l1Offset, false); err != nil {
			return err
		}
	}
	ck.ref(int64(img.h.snapshotsOffset), img.snapshotTableBytes(), "snapshot table")
	return ck.countRefcountStructure()
}

func (ck *checker) countRefcountStructure() error {
	img := ck.img
	rtOff := int64(img.h.refcountTableOffset)
	ck.ref(rtOff, int64(img.h.refcountTableClusters)*img.clusterSize, "refcount table")
	for c := rtOff >> img.clusterBits; c < rtOff>>img.clusterBits+int64(img.h.refcountTableClusters); c++ {
		ck.rcStruct = append(ck.rcStruct, c)
	}
	for i, e := range img.rcTable {
		off := e.offset()
		if off == 0 {
			continue
		}
		if off%img.clusterSize != 0 || e.reservedSet() {
			ck.corruption("refcount block %d is not cluster aligned; refcount table entry corrupted", i)
			continue
		}
		if ck.ref(off, img.clusterSize, fmt.Sprintf("refcount block %d", i)) {
			ck.rcStruct = append(ck.rcStruct, off>>img.clusterBits)
		}
	}
	return nil
}

func (ck *checker) walkL1(l1 []l1Entry, l1Off int64, active bool) error {
	img := ck.img
	ck.ref(l1Off, int64(len(l1))*8, "L1 table")
	buf := make([]byte, img.clusterSize)
	for i, e := range l1 {
		off := e.offset()
		if off == 0 {
			continue
		}
		if off%img.clusterSize != 0 {
			ck.corruption("L2 table offset=%#x: L2 table is not cluster aligned; L1 entry %d corrupted", off, i)
			continue
		}
		if !ck.ref(off, img.clusterSize, "L2 table") {
			continue
		}
		if err := readFull(img.f, buf, off); err != nil {
			return err
		}
		ck.lastData = 0 // QEMU counts fragmentation within each L2 table
		ck.walkL2(buf, active)
	}
	return nil
}

func (ck *checker) walkL2(buf []byte, active bool) {
	img := ck.img
	for j := 0; j < len(buf); j += 8 {
		e := l2Entry(binary.BigEndian.Uint64(buf[j:]))
		switch {
		case e.compressed():
			off, n := e.compressedRange(img.clusterBits)
			ck.ref(off, n, "compressed cluster")
			if active { // compressed clusters count as fragmented, as in QEMU
				ck.res.AllocatedClusters++
				ck.res.CompressedClusters++
				ck.res.FragmentedClusters++
			}
		case e.offset() != 0:
			off := e.offset()
			if off%img.clusterSize != 0 {
				ck.corruption("offset=%#x: Cluster is not properly aligned; L2 entry corrupted", off)
				continue
			}
			ck.ref(off, img.clusterSize, "data cluster")
			if active {
				ck.res.AllocatedClusters++
				if ck.lastData != 0 && off != ck.lastData+img.clusterSize {
					ck.res.FragmentedClusters++
				}
				ck.lastData = off
			}
		}
	}
}

// compare sets each cluster's refcount against its references and repairs
// what the mode allows. It reports whether anything was changed.
func (ck *checker) compare(repair Repair) (bool, error) {
	img := ck.img
	fixed := false
	highest := int64(-1)
	for c := range int64(len(ck.refs)) {
		disk, err := ck.diskRefcount(c)
		if err != nil {
			return false, err
		}
		want := uint64(ck.refs[c])
		if disk > 0 || want > 0 {
			highest = c
		}
		if disk == want {
			continue
		}
		leak := disk > want
		if leak {
			ck.res.Leaks++
			ck.res.Problems = append(ck.res.Problems, fmt.Sprintf("Leaked cluster %d refcount=%d reference=%d", c, disk, want))
		} else {
			ck.corruption("cluster %d refcount=%d reference=%d", c, disk, want)
		}
		if repair == RepairAll || (repair == RepairLeaks && leak) {
			if !img.hasRefcountBlock(c) {
				ck.rebuild = true
				continue
			}
			if err := img.setRefcount(c, want); err != nil {
				return false, err
			}
			fixed = true
		}
	}
	ck.res.ImageEndOffset = (highest + 1) << img.clusterBits
	if ck.rebuild && repair == RepairAll {
		return true, ck.rebuildRefcounts()
	}
	return fixed, nil
}

// diskRefcount reads a refcount without treating a bad block as fatal.
func (ck *checker) diskRefcount(c int64) (uint64, error) {
	img := ck.img
	bi := c >> img.rbBits()
	if bi >= int64(len(img.rcTable)) {
		return 0, nil
	}
	e := img.rcTable[bi]
	if e.offset() == 0 || e.offset()%img.clusterSize != 0 || e.reservedSet() || e.offset() >= ck.fileSize {
		return 0, nil
	}
	return img.refcount(c)
}

// checkCopied verifies the COPIED flags of the active tables against the
// refcounts (as now on disk, after any repair).
func (ck *checker) checkCopied(repair Repair) error {
	img := ck.img
	buf := make([]byte, img.clusterSize)
	for i, e := range img.l1 {
		off := e.offset()
		if off == 0 || off%img.clusterSize != 0 || off>>img.clusterBits >= int64(len(ck.refs)) {
			continue
		}
		rc, err := ck.diskRefcount(off >> img.clusterBits)
		if err != nil {
			return err
		}
		if (rc == 1) != e.copied() {
			ck.corruption("OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d", i, uint64(e), rc)
			if repair == RepairAll {
				img.l1[i] = makeL1Entry(off, rc == 1)
				img.l1Dirty[int64(i)] = true
			}
		}
		if err := readFull(img.f, buf, off); err != nil {
			return err
		}
		if err := ck.checkCopiedL2(buf, off, repair); err != nil {
			return err
		}
	}
	if repair == RepairAll && len(img.l1Dirty) > 0 {
		return img.writeL1()
	}
	return nil
}

func (ck *checker) checkCopiedL2(buf []byte, tableOff int64, repair Repair) error {
	img := ck.img
	changed := false
	for j := 0; j < len(buf); j += 8 {
		e := l2Entry(binary.BigEndian.Uint64(buf[j:]))
		if e.compressed() || e.offset() == 0 || e.offset()%img.clusterSize != 0 {
			continue
		}
		rc, err := ck.diskRefcount(e.offset() >> img.clusterBits)
		if err != nil {
			return err
		}
		if (rc == 1) == e.copied() {
			continue
		}
		ck.corruption("OFLAG_COPIED data cluster: l2_entry=%x refcount=%d", uint64(e), rc)
		if repair == RepairAll {
			e &^= l2Entry(flagCopied)
			if rc == 1 {
				e |= l2Entry(flagCopied)
			}
			binary.BigEndian.PutUint64(buf[j:], uint64(e))
			changed = true
		}
	}
	if !changed {
		return nil
	}
	img.l2.invalidate(tableOff)
	return writeFull(img.f, buf, tableOff)
}
