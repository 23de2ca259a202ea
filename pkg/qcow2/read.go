package qcow2

import (
	"fmt"
	"io"
)

// extentKind is what backs a run of guest bytes.
type extentKind int

const (
	kindUnallocated extentKind = iota // backing file, else zeros
	kindZero                          // reads as zeros
	kindData                          // host clusters, contiguous
	kindCompressed                    // one compressed cluster
)

// mapping describes a run of guest bytes that can be served one way.
type mapping struct {
	kind  extentKind
	host  int64 // kindData: host offset of the first byte
	n     int64
	entry l2Entry // kindCompressed: the descriptor
}

func entryKind(e l2Entry) extentKind {
	switch {
	case e.compressed():
		return kindCompressed
	case e.zero():
		return kindZero
	case e.offset() != 0:
		return kindData
	}
	return kindUnallocated
}

// mapRead translates [off, off+length) through the active L1 table into
// the longest run starting at off that reads one way. The caller holds mu.
func (img *Image) mapRead(off, length int64) (mapping, error) {
	return img.mapReadL1(img.l1, off, length)
}

// mapReadL1 is mapRead over the tree of l1.
func (img *Image) mapReadL1(l1 []l1Entry, off, length int64) (mapping, error) {
	e, err := img.lookupL1(l1, off)
	if err != nil {
		return mapping{}, err
	}
	in := off & (img.clusterSize - 1)
	m := mapping{kind: entryKind(e), n: min(length, img.clusterSize-in), entry: e}
	if m.kind == kindData {
		m.host = e.offset() + in
	}
	if m.kind == kindCompressed {
		return m, nil
	}
	for next := off + m.n; m.n < length; next += img.clusterSize {
		ne, err := img.lookupL1(l1, next)
		if err != nil || entryKind(ne) != m.kind || (m.kind == kindData && ne.offset() != m.host+m.n) {
			break
		}
		m.n += min(length-m.n, img.clusterSize)
	}
	return m, nil
}

// ReadAt reads len(p) bytes at guest offset off (io.ReaderAt). Reads past
// the virtual size return io.EOF.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if err := img.checkOpen(false); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, fmt.Errorf("read at negative offset %d: %w", off, ErrInvalid)
	}
	img.ioGate.RLock()
	defer img.ioGate.RUnlock()
	size := img.Size()
	if off >= size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > size-off {
		p, eof = p[:size-off], io.EOF
	}
	if err := img.readAt(p, off); err != nil {
		return 0, err
	}
	return len(p), eof
}

// readAt fills p from guest offset off; the caller holds ioGate shared, so
// no cluster it maps can be freed and reused underneath it.
func (img *Image) readAt(p []byte, off int64) error {
	for len(p) > 0 {
		img.mu.Lock()
		m, err := img.mapRead(off, int64(len(p)))
		img.mu.Unlock()
		if err != nil {
			return err
		}
		if err := img.readMapped(m, p[:m.n], off); err != nil {
			return err
		}
		p, off = p[m.n:], off+m.n
	}
	return nil
}

func (img *Image) readMapped(m mapping, p []byte, off int64) error {
	switch m.kind {
	case kindData:
		return readFull(img.f, p, m.host)
	case kindZero:
		clear(p)
		return nil
	case kindCompressed:
		return img.readCompressed(m.entry, p, off&(img.clusterSize-1))
	default:
		return img.readBacking(p, off)
	}
}

// readOld reads bytes [in, in+len(p)) of a guest cluster as the entry e
// describes it (for copy-on-write of the parts a write does not cover).
func (img *Image) readOld(e l2Entry, guestCluster int64, p []byte, in int64) error {
	m := mapping{kind: entryKind(e), entry: e, n: int64(len(p))}
	if m.kind == kindData {
		m.host = e.offset() + in
	}
	return img.readMapped(m, p, guestCluster<<img.clusterBits+in)
}
