package qcow2

// On-disk layout of qcow2, after QEMU's docs/interop/qcow2.txt and qcow2.h.
// All integers are big-endian.

const (
	magic = 0x514649fb // "QFI\xfb"

	minClusterBits     = 9  // 512 B
	maxClusterBits     = 21 // 2 MiB
	defaultClusterBits = 16 // 64 KiB

	defaultRefcountOrder = 4 // 16-bit refcounts
	maxRefcountOrder     = 6 // 64-bit refcounts

	v2HeaderLength = 72
	v3HeaderLength = 104 // without the optional compression_type byte
	// headerLengthWithCompression is what QEMU writes: 104 plus the
	// compression_type byte, padded to a multiple of 8.
	headerLengthWithCompression = 112

	// Bounds applied to sizes read from disk before anything is allocated.
	maxL1Bytes            = 32 << 20  // QEMU's QCOW_MAX_L1_SIZE
	maxRefcountTableBytes = 8 << 20   // QEMU's QCOW_MAX_REFTABLE_SIZE
	maxSnapshots          = 65536     // QEMU's QCOW_MAX_SNAPSHOTS
	maxSnapshotTableBytes = 64 << 20  // QEMU's QCOW_MAX_SNAPSHOTS_SIZE
	maxBackingNameLen     = 1023      // QEMU's limit
	maxVirtualSize        = 1 << 55   // offsets are 56 bits wide
	maxExtensionBytes     = 2 << 20   // header extensions live in cluster 0
	metadataSliceSize     = 4096      // cache granularity for L2/refcount tables
	maxSnapshotNameLen    = 65535     // name_size is a uint16
	maxSnapshotExtraData  = 1024      // QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
	maxFeatureTableBytes  = 48 * 1000 // a generous bound on the name table
)

// Incompatible feature bits.
const (
	incompatDirty        uint64 = 1 << 0
	incompatCorrupt      uint64 = 1 << 1
	incompatDataFile     uint64 = 1 << 2
	incompatCompression  uint64 = 1 << 3
	incompatExtendedL2   uint64 = 1 << 4
	incompatKnownHandled        = incompatDirty | incompatCorrupt | incompatCompression
)

// Compatible and autoclear feature bits.
const (
	compatLazyRefcounts uint64 = 1 << 0

	autoclearBitmaps     uint64 = 1 << 0
	autoclearDataFileRaw uint64 = 1 << 1
)

// Header extension types.
const (
	extEnd           uint32 = 0x00000000
	extBackingFormat uint32 = 0xe2792aca
	extFeatureTable  uint32 = 0x6803f857
	extBitmaps       uint32 = 0x23852875
	extEncryption    uint32 = 0x0537be77
	extDataFile      uint32 = 0x44415441
)

// Compression types (header byte 104).
const (
	CompressionZlib uint8 = 0
	CompressionZstd uint8 = 1
)

// Entry flag bits shared by L1 and L2 entries.
const (
	flagCopied     uint64 = 1 << 63
	flagCompressed uint64 = 1 << 62
	flagZero       uint64 = 1 << 0
	offsetMask     uint64 = 0x00fffffffffffe00 // bits 9-55
	l1ReservedMask uint64 = 0x7f000000000001ff
	l2ReservedMask uint64 = 0x3f000000000001fe
	rtReservedMask uint64 = 0x1ff
)

// l1Entry is one entry of an L1 table: the host offset of an L2 table and
// the COPIED flag (the table's refcount is exactly one).
type l1Entry uint64

func (e l1Entry) offset() int64     { return int64(uint64(e) & offsetMask) }
func (e l1Entry) copied() bool      { return uint64(e)&flagCopied != 0 }
func (e l1Entry) reservedSet() bool { return uint64(e)&l1ReservedMask != 0 }

func makeL1Entry(off int64, copied bool) l1Entry {
	e := uint64(off) & offsetMask
	if copied {
		e |= flagCopied
	}
	return l1Entry(e)
}

// l2Entry is one entry of an L2 table: a standard or a compressed cluster
// descriptor plus the COPIED and compressed flags.
type l2Entry uint64

func (e l2Entry) compressed() bool { return uint64(e)&flagCompressed != 0 }
func (e l2Entry) copied() bool     { return uint64(e)&flagCopied != 0 }

// zero reports the v3 all-zeroes flag of a standard descriptor.
func (e l2Entry) zero() bool { return !e.compressed() && uint64(e)&flagZero != 0 }

// offset is the host cluster offset of a standard descriptor (0: none).
func (e l2Entry) offset() int64 { return int64(uint64(e) & offsetMask) }

func (e l2Entry) reservedSet() bool {
	return !e.compressed() && uint64(e)&l2ReservedMask != 0
}

// compressedRange decodes a compressed descriptor: the host byte offset of
// the compressed data and the number of bytes that may hold it (whole
// 512-byte sectors, the first one counted from the offset's sector start).
func (e l2Entry) compressedRange(clusterBits uint) (off int64, length int64) {
	x := 62 - (clusterBits - 8)
	v := uint64(e) &^ (flagCopied | flagCompressed)
	off = int64(v & (1<<x - 1))
	sectors := int64(v>>x) + 1
	length = sectors*512 - (off & 511)
	return off, length
}

func makeL2Entry(off int64, copied bool) l2Entry {
	e := uint64(off) & offsetMask
	if copied {
		e |= flagCopied
	}
	return l2Entry(e)
}

// zeroL2Entry is a v3 zero cluster; with a host offset it is a preallocated
// zero cluster whose host cluster stays allocated.
func zeroL2Entry(off int64, copied bool) l2Entry {
	return makeL2Entry(off, copied) | l2Entry(flagZero)
}

// rtEntry is one refcount table entry: the host offset of a refcount block.
type rtEntry uint64

func (e rtEntry) offset() int64     { return int64(uint64(e) &^ rtReservedMask) }
func (e rtEntry) reservedSet() bool { return uint64(e)&rtReservedMask != 0 }
