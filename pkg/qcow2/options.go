package qcow2

import (
	"fmt"
	"math/bits"
	"os"
	"time"
)

// CreateOptions describe a new image. Zero values pick QEMU's defaults.
type CreateOptions struct {
	// Size is the virtual disk size in bytes. It is rounded up to a multiple
	// of 512, as QEMU does.
	Size int64
	// ClusterSize is a power of two from 512 B to 2 MiB; 0 means 64 KiB.
	ClusterSize int
	// RefcountBits is a power of two from 1 to 64; 0 means 16.
	RefcountBits int
	// LazyRefcounts sets the lazy_refcounts compatible feature: the image is
	// marked dirty while open for writing and its refcounts are rebuilt if it
	// was not closed cleanly.
	LazyRefcounts bool
	// BackingFile and BackingFormat ("qcow2" or "raw") name a backing image
	// for unallocated clusters. They are recorded as given.
	BackingFile   string
	BackingFormat string
	// CompressionType is CompressionZlib (the zero value) or CompressionZstd:
	// how compressed clusters (WriteCompressed) are compressed. zstd is
	// recorded as QEMU records it: header byte 104 set to 1 and the
	// "compression type" incompatible feature bit, so readers that only
	// know zlib refuse the image.
	CompressionType uint8
	// Perm is the permission of the new file; 0 means 0600.
	Perm os.FileMode
}

func (o *CreateOptions) normalize() error {
	if o.Size < 0 || o.Size > maxVirtualSize {
		return fmt.Errorf("size %d: %w", o.Size, ErrInvalid)
	}
	o.Size = (o.Size + 511) &^ 511
	if o.ClusterSize == 0 {
		o.ClusterSize = 1 << defaultClusterBits
	}
	if o.ClusterSize < 1<<minClusterBits || o.ClusterSize > 1<<maxClusterBits || bits.OnesCount(uint(o.ClusterSize)) != 1 {
		return fmt.Errorf("cluster size %d must be a power of two between 512 and 2097152: %w", o.ClusterSize, ErrInvalid)
	}
	if o.RefcountBits == 0 {
		o.RefcountBits = 1 << defaultRefcountOrder
	}
	if o.RefcountBits < 1 || o.RefcountBits > 64 || bits.OnesCount(uint(o.RefcountBits)) != 1 {
		return fmt.Errorf("refcount bits %d must be a power of two between 1 and 64: %w", o.RefcountBits, ErrInvalid)
	}
	if l1EntriesFor(o.Size, uint(bits.TrailingZeros(uint(o.ClusterSize))))*8 > maxL1Bytes {
		return fmt.Errorf("size %d needs an L1 table over %d bytes; use a larger cluster size: %w", o.Size, maxL1Bytes, ErrInvalid)
	}
	if len(o.BackingFile) > maxBackingNameLen {
		return fmt.Errorf("backing file name of %d bytes: %w", len(o.BackingFile), ErrInvalid)
	}
	switch o.BackingFormat {
	case "", "qcow2", "raw":
	default:
		return fmt.Errorf("backing format %q (want qcow2 or raw): %w", o.BackingFormat, ErrInvalid)
	}
	if o.CompressionType != CompressionZlib && o.CompressionType != CompressionZstd {
		return fmt.Errorf("compression type %d (want zlib or zstd): %w", o.CompressionType, ErrInvalid)
	}
	if o.Perm == 0 {
		o.Perm = 0o600
	}
	return nil
}

// OpenOptions control how an image is opened.
type OpenOptions struct {
	// ReadOnly opens the image without write access; writes fail with
	// ErrReadOnly and nothing in the file changes.
	ReadOnly bool
	// CacheSize bounds the metadata cache (L2 tables and refcount blocks) in
	// bytes; 0 means DefaultCacheSize.
	CacheSize int64
	// BackingRoot is the directory backing files must resolve inside
	// (symlinks included). Empty means the directory of the image.
	BackingRoot string
	// NoBacking opens the image without its backing file: unallocated
	// clusters read as zeros.
	NoBacking bool
	// Lock takes QEMU-compatible image locks (see lock.go) for as long as
	// the image is open: a writer excludes every other opener, readers
	// exclude writers, and qemu-img honours the same locks. Long-lived
	// users (the driver, `image serve` and `image map`) set it.
	Lock bool

	backingDepth int // how deep in a backing chain this image is opened
}

// DefaultCacheSize splits 3/4 for L2 slices (mapping 24 GiB of guest data
// with 64 KiB clusters) and 1/4 for refcount slices.
const DefaultCacheSize = 4 << 20

// Info describes an open image, for `image info`.
type Info struct {
	VirtualSize     int64
	ClusterSize     int
	Version         int    // 2 or 3
	Compat          string // "0.10" (v2) or "1.1" (v3)
	RefcountBits    int
	LazyRefcounts   bool
	Corrupt         bool
	Dirty           bool
	CompressionType string // "zlib" or "zstd"
	BackingFile     string
	BackingFormat   string
	Snapshots       []SnapshotInfo
}

// SnapshotInfo describes one internal snapshot.
type SnapshotInfo struct {
	ID          string
	Name        string
	Date        time.Time
	VMClock     time.Duration
	VMStateSize uint64
	// VirtualSize is the disk size when the snapshot was taken.
	VirtualSize int64
}

// Repair selects what Check fixes.
type Repair int

const (
	RepairNone  Repair = iota // report only
	RepairLeaks               // fix clusters whose refcount is too high
	RepairAll                 // also fix refcounts that are too low and COPIED flags
)

// CheckOptions control Check.
type CheckOptions struct {
	Repair Repair
}

// CheckResult mirrors `qemu-img check --output=json`.
type CheckResult struct {
	Corruptions        int64
	Leaks              int64
	CheckErrors        int64
	CorruptionsFixed   int64
	LeaksFixed         int64
	ImageEndOffset     int64
	TotalClusters      int64
	AllocatedClusters  int64
	FragmentedClusters int64
	CompressedClusters int64
	// Problems are human-readable lines like qemu-img's
	// "ERROR cluster 5 refcount=1 reference=2" or "Leaked cluster 9 refcount=1 reference=0".
	Problems []string
}

// Clean reports whether no corruption, leak or check error remains.
func (r *CheckResult) Clean() bool {
	return r.Corruptions == 0 && r.Leaks == 0 && r.CheckErrors == 0
}
