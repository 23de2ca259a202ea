package qcow2

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"os"
)

// Create makes a new qcow2 v3 image at path (which must not exist) and
// opens it for writing. A backing file named in opts is trusted, as the
// caller chose it: it is opened wherever it is. On failure nothing is left
// behind.
func Create(path string, opts CreateOptions) (*Image, error) {
	if err := opts.normalize(); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, opts.Perm)
	if err != nil {
		return nil, err
	}
	img, err := createOn(OSFile{f}, path, opts)
	if err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	return img, nil
}

// CreateFile formats an empty host file and opens it for writing.
func CreateFile(f File, opts CreateOptions) (*Image, error) {
	if err := opts.normalize(); err != nil {
		return nil, err
	}
	return createOn(f, "", opts)
}

func createOn(f File, path string, opts CreateOptions) (*Image, error) {
	if err := format(f, opts); err != nil {
		return nil, err
	}
	return openImage(f, path, OpenOptions{BackingRoot: string(os.PathSeparator)})
}

// format writes an empty image: header in cluster 0, then the refcount
// table, the refcount blocks and the L1 table (QEMU's layout: for small
// images the table is cluster 1, the block cluster 2 and L1 cluster 3).
func format(f File, opts CreateOptions) error {
	cb := uint(bits.TrailingZeros(uint(opts.ClusterSize)))
	cs := int64(opts.ClusterSize)
	order := uint(bits.TrailingZeros(uint(opts.RefcountBits)))
	l1Entries := l1EntriesFor(opts.Size, cb)
	l1Clusters := (l1Entries*8 + cs - 1) / cs
	perBlock := int64(1) << (cb + 3 - order)
	tableClusters, blocks := int64(1), int64(1)
	for {
		total := 1 + tableClusters + blocks + l1Clusters
		nb := (total + perBlock - 1) / perBlock
		nt := (nb*8 + cs - 1) / cs
		if nb == blocks && nt == tableClusters {
			break
		}
		blocks, tableClusters = nb, nt
	}
	total := 1 + tableClusters + blocks + l1Clusters
	meta := make([]byte, total*cs) // all clusters after the header, zeroed
	for b := range blocks {
		off := (1 + tableClusters + b) * cs
		binary.BigEndian.PutUint64(meta[cs+b*8:], uint64(off))
		for c := b * perBlock; c < min(total, (b+1)*perBlock); c++ {
			putRefcount(meta[off:off+cs], c-b*perBlock, order, 1)
		}
	}
	h := newHeader(opts, cb, order)
	h.refcountTableOffset = uint64(cs)
	h.refcountTableClusters = uint32(tableClusters)
	h.l1TableOffset = uint64((1 + tableClusters + blocks) * cs)
	h.l1Size = uint32(l1Entries)
	hdr, err := h.encode()
	if err != nil {
		return err
	}
	copy(meta, hdr)
	if err := writeFull(f, meta, 0); err != nil {
		return err
	}
	return f.Sync()
}

func newHeader(opts CreateOptions, clusterBits, order uint) *header {
	h := &header{
		version:       3,
		clusterBits:   uint32(clusterBits),
		size:          uint64(opts.Size),
		refcountOrder: uint32(order),
		headerLength:  headerLengthWithCompression,
		featureTable:  defaultFeatureTable(),
		backingFile:   opts.BackingFile,
		backingFormat: opts.BackingFormat,
	}
	if opts.LazyRefcounts {
		h.compatible |= compatLazyRefcounts
	}
	if opts.CompressionType != CompressionZlib {
		// As QEMU does: only a non-default type sets the incompatible bit.
		h.compressionType = opts.CompressionType
		h.incompatible |= incompatCompression
	}
	if clusterBits <= 12 {
		// Like qemu-img create (checked against 7.2): clusters of 4 KiB and
		// less get no optional feature name table, leaving cluster 0 as
		// QEMU's byte for byte.
		h.featureTable = nil
	}
	return h
}
