package driver

import (
	"sync"

	"github.com/csi-qcow2/csi-qcow2/pkg/nbdattach"
	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// servedImage is a staged image as /dev/nbdX sees it. The device outlives
// this process: when the driver is killed, the kernel keeps the filesystem
// mounted, holds its I/O until a new driver reconnects (recover.go), and
// resends only the requests that were never acknowledged. So a write must
// be in the image file, with the metadata that maps it, before it is
// acknowledged. The qcow2 metadata cache is write-back; without WriteBack a
// write acknowledged by a killed driver is lost (its L2 entry died with the
// process), and the FLUSH that follows reaches a driver that never saw it
// and succeeds: fsync returns 0 over lost data.
//
// WriteBack costs no fdatasync for an overwrite in place, nor, on an image
// with lazy refcounts (volumes get them unless the StorageClass says
// lazyRefcounts: "false"), for a write over unallocated or zero clusters;
// it does cost one for copy on write after a snapshot, for a new L2 table
// (one per 512 MiB of guest space with 64 KiB clusters) and for every
// allocating write to an image without lazy refcounts. Discard is left
// write-back: a lost one makes the range read its old data, which TRIM
// allows.
//
// gate is the volume's write gate (stagedVolume.gate): every request that
// changes what the disk holds (WRITE, WRITE_ZEROES, TRIM) holds it shared
// until it is done, and a group snapshot holds it exclusively, so no such
// request is in flight or starts while the group is cut (groupcut.go).
// READ and FLUSH pass: they change nothing a snapshot captures.
type servedImage struct {
	*qcow2.Image
	gate *sync.RWMutex
}

var _ nbdattach.Backend = servedImage{}

func (s servedImage) WriteAt(p []byte, off int64) (int, error) {
	s.gate.RLock()
	defer s.gate.RUnlock()
	n, err := s.Image.WriteAt(p, off)
	if err != nil {
		return n, err
	}
	return n, s.Image.WriteBack()
}

func (s servedImage) WriteZeroes(off, length int64, mayUnmap bool) error {
	s.gate.RLock()
	defer s.gate.RUnlock()
	if err := s.Image.WriteZeroes(off, length, mayUnmap); err != nil {
		return err
	}
	return s.Image.WriteBack()
}

func (s servedImage) Discard(off, length int64) error {
	s.gate.RLock()
	defer s.gate.RUnlock()
	return s.Image.Discard(off, length)
}
