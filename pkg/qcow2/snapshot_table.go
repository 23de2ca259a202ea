package qcow2

import (
	"encoding/binary"
	"fmt"
	"time"
)

// snapshot is one entry of the snapshot table.
type snapshot struct {
	l1Offset    int64
	l1Size      int64
	id, name    string
	dateSec     uint32
	dateNsec    uint32
	vmClockNsec uint64
	vmStateSize uint64 // from the 32-bit field or the extra data's 64-bit one
	diskSize    int64  // from extra data; the image size if absent
	extra       []byte // extra data as read, rewritten with our fields
}

const snapshotFixedLen = 40

// readSnapshotTable loads the snapshot table, entry by entry, bounding the
// total size and each entry's fields before allocating.
func readSnapshotTable(f File, h *header, fileSize int64) ([]snapshot, error) {
	if h.nbSnapshots == 0 {
		return nil, nil
	}
	off := int64(h.snapshotsOffset)
	end := min(fileSize, off+maxSnapshotTableBytes)
	snaps := make([]snapshot, 0, min(int(h.nbSnapshots), 1024))
	for i := uint32(0); i < h.nbSnapshots; i++ {
		s, n, err := readSnapshotEntry(f, off, end, h)
		if err != nil {
			return nil, fmt.Errorf("snapshot %d: %w", i, err)
		}
		snaps = append(snaps, s)
		off += n
	}
	return snaps, nil
}

func readSnapshotEntry(f File, off, end int64, h *header) (snapshot, int64, error) {
	var s snapshot
	fixed := make([]byte, snapshotFixedLen)
	if off+snapshotFixedLen > end {
		return s, 0, fmt.Errorf("table overruns the file: %w", ErrCorrupt)
	}
	if err := readFull(f, fixed, off); err != nil {
		return s, 0, err
	}
	be := binary.BigEndian
	s.l1Offset = int64(be.Uint64(fixed[0:]))
	s.l1Size = int64(be.Uint32(fixed[8:]))
	idLen, nameLen := int64(be.Uint16(fixed[12:])), int64(be.Uint16(fixed[14:]))
	s.dateSec, s.dateNsec = be.Uint32(fixed[16:]), be.Uint32(fixed[20:])
	s.vmClockNsec = be.Uint64(fixed[24:])
	s.vmStateSize = uint64(be.Uint32(fixed[32:]))
	extraLen := int64(be.Uint32(fixed[36:]))
	if extraLen > maxSnapshotExtraData {
		return s, 0, fmt.Errorf("extra data of %d bytes: %w", extraLen, ErrCorrupt)
	}
	// QEMU pads each entry to 8 bytes but may end the file before the last
	// entry's padding.
	used := snapshotFixedLen + extraLen + idLen + nameLen
	total := (used + 7) &^ 7
	if off+used > end {
		return s, 0, fmt.Errorf("table overruns the file: %w", ErrCorrupt)
	}
	rest := make([]byte, extraLen+idLen+nameLen)
	if err := readFull(f, rest, off+snapshotFixedLen); err != nil {
		return s, 0, err
	}
	s.extra = rest[:extraLen]
	s.id = string(rest[extraLen : extraLen+idLen])
	s.name = string(rest[extraLen+idLen:])
	s.diskSize = int64(h.size)
	if extraLen >= 8 {
		s.vmStateSize = be.Uint64(s.extra[0:])
	}
	if extraLen >= 16 {
		s.diskSize = int64(be.Uint64(s.extra[8:]))
	}
	if err := s.validate(h); err != nil {
		return s, 0, err
	}
	return s, total, nil
}

func (s *snapshot) validate(h *header) error {
	cs := int64(h.clusterSize())
	if s.l1Offset%cs != 0 || s.l1Offset < 0 || s.l1Offset > maxVirtualSize {
		return fmt.Errorf("L1 table offset %#x not aligned: %w", s.l1Offset, ErrCorrupt)
	}
	if s.l1Size*8 > maxL1Bytes {
		return fmt.Errorf("L1 table of %d entries: %w", s.l1Size, ErrCorrupt)
	}
	if s.diskSize < 0 || s.diskSize > maxVirtualSize {
		return fmt.Errorf("disk size %d: %w", s.diskSize, ErrCorrupt)
	}
	return nil
}

// encodeSnapshotTable lays out the table as QEMU writes it, with 24 bytes
// of extra data (large vmstate size, disk size, icount) at least.
func encodeSnapshotTable(snaps []snapshot) []byte {
	be := binary.BigEndian
	var buf []byte
	for _, s := range snaps {
		extra := s.extra
		if len(extra) < 24 {
			extra = append(append([]byte(nil), extra...), make([]byte, 24-len(extra))...)
			if len(s.extra) < 24 {
				be.PutUint64(extra[16:], ^uint64(0)) // icount unknown
			}
		}
		be.PutUint64(extra[0:], s.vmStateSize)
		be.PutUint64(extra[8:], uint64(s.diskSize))
		e := make([]byte, snapshotFixedLen)
		be.PutUint64(e[0:], uint64(s.l1Offset))
		be.PutUint32(e[8:], uint32(s.l1Size))
		be.PutUint16(e[12:], uint16(len(s.id)))
		be.PutUint16(e[14:], uint16(len(s.name)))
		be.PutUint32(e[16:], s.dateSec)
		be.PutUint32(e[20:], s.dateNsec)
		be.PutUint64(e[24:], s.vmClockNsec)
		be.PutUint32(e[32:], uint32(min(s.vmStateSize, 1<<32-1)))
		be.PutUint32(e[36:], uint32(len(extra)))
		e = append(e, extra...)
		e = append(e, s.id...)
		e = append(e, s.name...)
		for len(e)%8 != 0 {
			e = append(e, 0)
		}
		buf = append(buf, e...)
	}
	return buf
}

func (s *snapshot) info() SnapshotInfo {
	return SnapshotInfo{
		ID: s.id, Name: s.name,
		Date:        time.Unix(int64(s.dateSec), int64(s.dateNsec)),
		VMClock:     time.Duration(s.vmClockNsec),
		VMStateSize: s.vmStateSize,
		VirtualSize: s.diskSize,
	}
}

// snapshotInfos lists the snapshots; the caller holds mu.
func (img *Image) snapshotInfos() []SnapshotInfo {
	out := make([]SnapshotInfo, len(img.snapshots))
	for i := range img.snapshots {
		out[i] = img.snapshots[i].info()
	}
	return out
}
