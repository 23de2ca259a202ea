package qcow2

import (
	"encoding/binary"
	"fmt"
	"strings"
)

// header is the in-memory form of the image header (cluster 0): the fixed
// fields, the header extensions and the backing file name.
type header struct {
	version               uint32
	backingFileOffset     uint64
	backingFileSize       uint32
	clusterBits           uint32
	size                  uint64
	cryptMethod           uint32
	l1Size                uint32
	l1TableOffset         uint64
	refcountTableOffset   uint64
	refcountTableClusters uint32
	nbSnapshots           uint32
	snapshotsOffset       uint64
	incompatible          uint64
	compatible            uint64
	autoclear             uint64
	refcountOrder         uint32
	headerLength          uint32
	compressionType       uint8

	backingFile   string
	backingFormat string
	featureTable  []byte      // the feature name table, kept as read
	unknown       []extension // extensions we do not interpret, preserved
}

// extension is a header extension kept byte for byte.
type extension struct {
	typ  uint32
	data []byte
}

func (h *header) clusterSize() int64 { return 1 << h.clusterBits }

// decodeHeader parses cluster 0. buf holds at least the first cluster of the
// file (or the whole file if it is shorter). Every size is bounded before use.
func decodeHeader(buf []byte) (*header, error) {
	if len(buf) < v2HeaderLength {
		return nil, fmt.Errorf("file is %d bytes, shorter than a header: %w", len(buf), ErrNotQcow2)
	}
	be := binary.BigEndian
	if be.Uint32(buf[0:]) != magic {
		return nil, ErrNotQcow2
	}
	h := &header{
		version:               be.Uint32(buf[4:]),
		backingFileOffset:     be.Uint64(buf[8:]),
		backingFileSize:       be.Uint32(buf[16:]),
		clusterBits:           be.Uint32(buf[20:]),
		size:                  be.Uint64(buf[24:]),
		cryptMethod:           be.Uint32(buf[32:]),
		l1Size:                be.Uint32(buf[36:]),
		l1TableOffset:         be.Uint64(buf[40:]),
		refcountTableOffset:   be.Uint64(buf[48:]),
		refcountTableClusters: be.Uint32(buf[56:]),
		nbSnapshots:           be.Uint32(buf[60:]),
		snapshotsOffset:       be.Uint64(buf[64:]),
		refcountOrder:         defaultRefcountOrder,
		headerLength:          v2HeaderLength,
	}
	if err := h.decodeV3(buf); err != nil {
		return nil, err
	}
	if err := h.validate(int64(len(buf))); err != nil {
		return nil, err
	}
	if err := h.decodeExtensions(buf); err != nil {
		return nil, err
	}
	if err := h.decodeBackingName(buf); err != nil {
		return nil, err
	}
	return h, h.checkFeatures()
}

func (h *header) decodeV3(buf []byte) error {
	switch h.version {
	case 2:
		return nil
	case 3:
	default:
		return fmt.Errorf("version %d: %w", h.version, ErrUnsupported)
	}
	if len(buf) < v3HeaderLength {
		return fmt.Errorf("v3 header truncated: %w", ErrCorrupt)
	}
	be := binary.BigEndian
	h.incompatible = be.Uint64(buf[72:])
	h.compatible = be.Uint64(buf[80:])
	h.autoclear = be.Uint64(buf[88:])
	h.refcountOrder = be.Uint32(buf[96:])
	h.headerLength = be.Uint32(buf[100:])
	if h.headerLength < v3HeaderLength || int64(h.headerLength) > int64(len(buf)) {
		return fmt.Errorf("header length %d: %w", h.headerLength, ErrCorrupt)
	}
	if h.headerLength > v3HeaderLength {
		h.compressionType = buf[104]
	}
	return nil
}

// validate checks the fixed fields against the spec and against the bounds
// that keep later allocations proportional to what is on disk.
func (h *header) validate(bufLen int64) error {
	if h.clusterBits < minClusterBits || h.clusterBits > maxClusterBits {
		return fmt.Errorf("cluster bits %d: %w", h.clusterBits, ErrUnsupported)
	}
	cs := h.clusterSize()
	if int64(h.headerLength) > cs {
		return fmt.Errorf("header length %d exceeds the cluster size: %w", h.headerLength, ErrCorrupt)
	}
	if h.refcountOrder > maxRefcountOrder {
		return fmt.Errorf("refcount order %d: %w", h.refcountOrder, ErrUnsupported)
	}
	if h.cryptMethod != 0 {
		return fmt.Errorf("encrypted images (method %d): %w", h.cryptMethod, ErrUnsupported)
	}
	if h.size > maxVirtualSize {
		return fmt.Errorf("virtual size %d too large: %w", h.size, ErrCorrupt)
	}
	if uint64(h.l1Size)*8 > maxL1Bytes {
		return fmt.Errorf("L1 table of %d entries too large: %w", h.l1Size, ErrCorrupt)
	}
	if need := l1EntriesFor(int64(h.size), uint(h.clusterBits)); int64(h.l1Size) < need {
		return fmt.Errorf("L1 table of %d entries is too small for %d bytes: %w", h.l1Size, h.size, ErrCorrupt)
	}
	if uint64(h.refcountTableClusters)*uint64(cs) > maxRefcountTableBytes || h.refcountTableClusters == 0 {
		return fmt.Errorf("refcount table of %d clusters: %w", h.refcountTableClusters, ErrCorrupt)
	}
	if h.nbSnapshots > maxSnapshots {
		return fmt.Errorf("%d snapshots: %w", h.nbSnapshots, ErrCorrupt)
	}
	for _, o := range []struct {
		name string
		off  uint64
	}{{"L1 table", h.l1TableOffset}, {"refcount table", h.refcountTableOffset}, {"snapshot table", h.snapshotsOffset}} {
		if o.off%uint64(cs) != 0 || o.off > maxVirtualSize {
			return fmt.Errorf("%s offset %#x is not cluster aligned: %w", o.name, o.off, ErrCorrupt)
		}
	}
	if h.refcountTableOffset == 0 || (h.l1TableOffset == 0 && h.l1Size > 0) {
		return fmt.Errorf("refcount or L1 table at offset 0: %w", ErrCorrupt)
	}
	return nil
}

// checkFeatures refuses what this engine cannot handle safely.
func (h *header) checkFeatures() error {
	if h.incompatible&incompatDataFile != 0 {
		return fmt.Errorf("external data file: %w", ErrUnsupported)
	}
	if h.incompatible&incompatExtendedL2 != 0 {
		return fmt.Errorf("extended L2 entries (subclusters): %w", ErrUnsupported)
	}
	if unknown := h.incompatible &^ incompatKnownHandled; unknown != 0 {
		return fmt.Errorf("unknown incompatible features %s: %w", h.featureNames(0, unknown), ErrUnsupported)
	}
	hasType := h.incompatible&incompatCompression != 0
	switch {
	case h.compressionType != CompressionZlib && h.compressionType != CompressionZstd:
		return fmt.Errorf("compression type %d: %w", h.compressionType, ErrUnsupported)
	case hasType != (h.compressionType != CompressionZlib):
		return fmt.Errorf("compression type %d disagrees with the incompatible bit: %w", h.compressionType, ErrCorrupt)
	}
	return nil
}

// featureNames names the set bits of one feature kind from the image's own
// feature name table, falling back to "bit N".
func (h *header) featureNames(kind byte, bits uint64) string {
	var names []string
	for bit := 0; bit < 64; bit++ {
		if bits&(1<<bit) == 0 {
			continue
		}
		name := fmt.Sprintf("bit %d", bit)
		for t := h.featureTable; len(t) >= 48; t = t[48:] {
			if t[0] == kind && int(t[1]) == bit {
				name = strings.TrimRight(string(t[2:48]), "\x00")
			}
		}
		names = append(names, name)
	}
	return strings.Join(names, ", ")
}

func (h *header) decodeExtensions(buf []byte) error {
	off := int64(h.headerLength)
	end := min(int64(len(buf)), h.clusterSize())
	if h.backingFileOffset != 0 && int64(h.backingFileOffset) < end {
		end = int64(h.backingFileOffset)
	}
	be := binary.BigEndian
	for off+8 <= end {
		typ, n := be.Uint32(buf[off:]), int64(be.Uint32(buf[off+4:]))
		off += 8
		if typ == extEnd {
			return nil
		}
		if n > end-off || n > maxExtensionBytes {
			return fmt.Errorf("header extension %#x of %d bytes overruns the header: %w", typ, n, ErrCorrupt)
		}
		if err := h.applyExtension(typ, buf[off:off+n]); err != nil {
			return err
		}
		off += (n + 7) &^ 7
	}
	return nil
}

func (h *header) applyExtension(typ uint32, data []byte) error {
	switch typ {
	case extBackingFormat:
		h.backingFormat = string(data)
	case extFeatureTable:
		h.featureTable = append([]byte(nil), data...)
	case extEncryption:
		return fmt.Errorf("encryption header: %w", ErrUnsupported)
	case extDataFile:
		return fmt.Errorf("external data file %q: %w", string(data), ErrUnsupported)
	default:
		h.unknown = append(h.unknown, extension{typ: typ, data: append([]byte(nil), data...)})
	}
	return nil
}

func (h *header) decodeBackingName(buf []byte) error {
	if h.backingFileOffset == 0 {
		return nil
	}
	if h.backingFileSize == 0 || h.backingFileSize > maxBackingNameLen {
		return fmt.Errorf("backing file name of %d bytes: %w", h.backingFileSize, ErrCorrupt)
	}
	end := h.backingFileOffset + uint64(h.backingFileSize)
	if end > uint64(h.clusterSize()) || end > uint64(len(buf)) {
		return fmt.Errorf("backing file name outside the header cluster: %w", ErrCorrupt)
	}
	h.backingFile = string(buf[h.backingFileOffset:end])
	return nil
}

// encode lays out the header, its extensions and the backing file name as
// they go into cluster 0. Unknown autoclear bits are cleared, as the spec
// requires of a writer that does not understand them.
func (h *header) encode() ([]byte, error) {
	h.autoclear = 0
	be := binary.BigEndian
	buf := make([]byte, h.headerLength)
	be.PutUint32(buf[0:], magic)
	be.PutUint32(buf[4:], h.version)
	be.PutUint32(buf[20:], h.clusterBits)
	be.PutUint64(buf[24:], h.size)
	be.PutUint32(buf[32:], h.cryptMethod)
	be.PutUint32(buf[36:], h.l1Size)
	be.PutUint64(buf[40:], h.l1TableOffset)
	be.PutUint64(buf[48:], h.refcountTableOffset)
	be.PutUint32(buf[56:], h.refcountTableClusters)
	be.PutUint32(buf[60:], h.nbSnapshots)
	be.PutUint64(buf[64:], h.snapshotsOffset)
	if h.version >= 3 {
		be.PutUint64(buf[72:], h.incompatible)
		be.PutUint64(buf[80:], h.compatible)
		be.PutUint64(buf[88:], h.autoclear)
		be.PutUint32(buf[96:], h.refcountOrder)
		be.PutUint32(buf[100:], h.headerLength)
		if h.headerLength > v3HeaderLength {
			buf[104] = h.compressionType
		}
	}
	buf = h.appendExtensions(buf)
	if h.backingFile != "" {
		h.backingFileOffset = uint64(len(buf))
		h.backingFileSize = uint32(len(h.backingFile))
		buf = append(buf, h.backingFile...)
	} else {
		h.backingFileOffset, h.backingFileSize = 0, 0
	}
	be.PutUint64(buf[8:], h.backingFileOffset)
	be.PutUint32(buf[16:], h.backingFileSize)
	if int64(len(buf)) > h.clusterSize() {
		return nil, fmt.Errorf("header and extensions (%d bytes) do not fit in one cluster: %w", len(buf), ErrInvalid)
	}
	return buf, nil
}

func (h *header) appendExtensions(buf []byte) []byte {
	if h.version < 3 && h.backingFormat == "" && len(h.unknown) == 0 {
		return buf
	}
	if h.backingFormat != "" {
		buf = appendExtension(buf, extBackingFormat, []byte(h.backingFormat))
	}
	if h.featureTable != nil {
		buf = appendExtension(buf, extFeatureTable, h.featureTable)
	}
	// Unknown extensions are kept byte for byte. The bitmaps extension is
	// among them: with its autoclear bit cleared, QEMU treats it as stale.
	for _, e := range h.unknown {
		buf = appendExtension(buf, e.typ, e.data)
	}
	return appendExtension(buf, extEnd, nil)
}

func appendExtension(buf []byte, typ uint32, data []byte) []byte {
	buf = binary.BigEndian.AppendUint32(buf, typ)
	buf = binary.BigEndian.AppendUint32(buf, uint32(len(data)))
	buf = append(buf, data...)
	for len(buf)%8 != 0 {
		buf = append(buf, 0)
	}
	return buf
}

// defaultFeatureTable is the feature name table QEMU writes, so that tools
// can name bits they do not know.
func defaultFeatureTable() []byte {
	features := []struct {
		kind, bit byte
		name      string
	}{
		{0, 0, "dirty bit"}, {0, 1, "corrupt bit"}, {0, 2, "external data file"},
		{0, 3, "compression type"}, {0, 4, "extended L2 entries"},
		{1, 0, "lazy refcounts"}, {2, 0, "bitmaps"}, {2, 1, "raw external data"},
	}
	t := make([]byte, 0, 48*len(features))
	for _, f := range features {
		e := make([]byte, 48)
		e[0], e[1] = f.kind, f.bit
		copy(e[2:], f.name)
		t = append(t, e...)
	}
	return t
}

// l1EntriesFor is the number of L1 entries a virtual size needs.
func l1EntriesFor(size int64, clusterBits uint) int64 {
	perL2 := int64(1) << (2*clusterBits - 3) // bytes one L2 table maps
	return (size + perL2 - 1) / perL2
}
