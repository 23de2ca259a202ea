package qcow2

import (
	"bytes"
	"compress/flate"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
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
	if err := decompressCluster(img.h.compressionType, src, cluster); err != nil {
		return fmt.Errorf("compressed cluster at %#x: %w", off, err)
	}
	copy(p, cluster[in:])
	return nil
}

// decompressCluster fills dst (one cluster) from the compressed bytes in
// src. src is the whole sector range of the descriptor, so it may go on past
// the compressed stream with padding or the next compressed cluster: both
// decoders stop as soon as dst is full.
func decompressCluster(typ uint8, src, dst []byte) error {
	switch typ {
	case CompressionZlib:
		// Raw deflate, as QEMU writes it (window bits -12).
		r := flate.NewReader(bytes.NewReader(src))
		defer r.Close()
		if _, err := io.ReadFull(r, dst); err != nil {
			return fmt.Errorf("deflate: %v: %w", err, ErrCorrupt)
		}
		return nil
	case CompressionZstd:
		d, err := getZstdDecoder()
		if err != nil {
			return err
		}
		defer zstdDecoders.Put(d)
		if err := d.Reset(onlyReader{bytes.NewReader(src)}); err != nil {
			return fmt.Errorf("zstd: %v: %w", err, ErrCorrupt)
		}
		if _, err := io.ReadFull(d, dst); err != nil {
			return fmt.Errorf("zstd: %v: %w", err, ErrCorrupt)
		}
		return nil
	default:
		return fmt.Errorf("compression type %d: %w", typ, ErrUnsupported)
	}
}

// onlyReader hides bytes.Reader's other methods so the zstd decoder streams
// instead of decoding all of src (which may hold more than one frame).
type onlyReader struct{ r io.Reader }

func (o onlyReader) Read(p []byte) (int, error) { return o.r.Read(p) }

// zstdDecoders caches decoders, which are costly to set up. It holds no
// configuration, only reusable scratch state, so it is not per image.
var zstdDecoders sync.Pool

// zstdMaxWindow bounds the window a frame may ask for: a cluster is at most
// 2 MiB, and a hostile frame must not make us allocate more.
const zstdMaxWindow = 1 << maxClusterBits

func getZstdDecoder() (*zstd.Decoder, error) {
	if d, ok := zstdDecoders.Get().(*zstd.Decoder); ok {
		return d, nil
	}
	d, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(1), // synchronous: no goroutines, no read-ahead
		zstd.WithDecoderLowmem(true),
		zstd.WithDecoderMaxWindow(zstdMaxWindow),
		zstd.WithDecoderMaxMemory(2*zstdMaxWindow))
	if err != nil {
		return nil, fmt.Errorf("zstd decoder: %w", err)
	}
	return d, nil
}
