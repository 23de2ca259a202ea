package qcow2

import (
	"bytes"
	"compress/flate"
	"fmt"
	"io"
)

// readCompressed decompresses the cluster behind a compressed descriptor
// and copies bytes [in, in+len(p)) of it into p.
func (img *Image) readCompressed(e l2Entry, p []byte, in int64) error {
	off, n := e.compressedRange(img.clusterBits)
	n = min(n, img.clusterSize+img.clusterSize/2+512) // bound what a hostile descriptor can make us read
	src := make([]byte, n)
	if err := readFull(img.f, src, off); err != nil {
		return err
	}
	cluster := make([]byte, img.clusterSize)
	if err := img.decompress(src, cluster); err != nil {
		return fmt.Errorf("compressed cluster at %#x: %w", off, err)
	}
	copy(p, cluster[in:])
	return nil
}

func (img *Image) decompress(src, dst []byte) error {
	switch img.h.compressionType {
	case CompressionZlib:
		r := flate.NewReader(bytes.NewReader(src))
		defer r.Close()
		if _, err := io.ReadFull(r, dst); err != nil {
			return fmt.Errorf("deflate: %v: %w", err, ErrCorrupt)
		}
		return nil
	default:
		return fmt.Errorf("compression type %d: %w", img.h.compressionType, ErrUnsupported)
	}
}
