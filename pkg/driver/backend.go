package driver

import (
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
type servedImage struct{ *qcow2.Image }

var _ nbdattach.Backend = servedImage{}

func (s servedImage) WriteAt(p []byte, off int64) (int, error) {
	n, err := s.Image.WriteAt(p, off)
	if err != nil {
		return n, err
	}
	return n, s.Image.WriteBack()
}

func (s servedImage) WriteZeroes(off, length int64, mayUnmap bool) error {
	if err := s.Image.WriteZeroes(off, length, mayUnmap); err != nil {
		return err
	}
	return s.Image.WriteBack()
}
