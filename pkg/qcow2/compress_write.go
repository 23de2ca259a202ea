package qcow2

import (
	"bytes"
	"compress/flate"
	"fmt"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// Compressed writes, for `convert -c`: a whole cluster is compressed and
// packed byte by byte after the previous compressed cluster, as QEMU's
// qcow2_alloc_bytes packs them. Every host cluster a compressed cluster's
// bytes touch holds one reference for it.

// compressedTail is the partly filled host cluster that WriteCompressed
// packs compressed clusters into. The caller holds mu.
type compressedTail struct {
	next int64 // host offset of the next free byte; 0: none
	// last is the descriptor written most recently into the tail and guest
	// its guest offset: while the active L2 entry still holds it, the host
	// cluster is referenced and so cannot have been freed and reused.
	last  l2Entry
	guest int64
}

// deflateChunk is the window QEMU inflates with (window bits 12). Go's
// deflate uses a 32 KiB window, so each 4 KiB of input is compressed on its
// own and the blocks are chained: no match reaches further back than QEMU's
// decoder can follow.
const deflateChunk = 4096

// WriteCompressed writes p compressed at guest offset off, as `qemu-img
// convert -c` does. off must be cluster aligned and p one whole cluster, or
// the rest of the disk when the last cluster is partial (it is padded with
// zeros). The cluster must not be allocated (unallocated or a zero cluster
// without host storage), since compressed data cannot be overwritten in
// place. If compressing does not make the cluster smaller than a cluster,
// p is written normally.
func (img *Image) WriteCompressed(p []byte, off int64) error {
	if err := img.checkOpen(true); err != nil {
		return err
	}
	cs, n, size := img.clusterSize, int64(len(p)), img.Size()
	if off < 0 || off%cs != 0 || off >= size || !(n == cs && off+n <= size || n < cs && off+n == size) {
		return fmt.Errorf("compressed write of %d bytes at %d: want one whole cluster of %d bytes: %w", n, off, cs, ErrInvalid)
	}
	src := p
	if n < cs {
		src = make([]byte, cs)
		copy(src, p)
	}
	z, err := compressCluster(img.h.compressionType, src, int(cs-1))
	if err != nil {
		return err
	}
	if z == nil {
		_, err := img.WriteAt(p, off)
		return err
	}
	img.ioGate.RLock()
	defer img.ioGate.RUnlock()
	return img.writeCompressed(z, off)
}

func (img *Image) writeCompressed(z []byte, off int64) error {
	c := off >> img.clusterBits
	img.mu.Lock()
	for img.inflight[c] != nil {
		ch := img.inflight[c]
		img.mu.Unlock()
		<-ch
		img.mu.Lock()
	}
	host, desc, err := img.placeCompressed(off, int64(len(z)))
	if err != nil {
		img.mu.Unlock()
		return err
	}
	ch := make(chan struct{})
	img.inflight[c] = ch
	img.mu.Unlock()

	err = writeFull(img.f, z, host)

	img.mu.Lock()
	defer img.mu.Unlock()
	defer func() {
		delete(img.inflight, c)
		close(ch)
	}()
	// Crash order: the data is written before the L2 entry points at it;
	// writeGen makes the L2 writeback sync first (orderBeforeL2Write).
	img.writeGen++
	if err == nil {
		var s *slice
		var pos int64
		if s, pos, err = img.l2ForWrite(off); err == nil {
			img.setL2(s, pos, desc)
			img.ctail.last, img.ctail.guest = desc, off
			return nil
		}
	}
	img.ctail = compressedTail{}
	if ferr := img.freeRange(hostRange{host, int64(len(z))}); ferr != nil {
		return fmt.Errorf("%w (and freeing the compressed bytes: %v)", err, ferr)
	}
	return err
}

// placeCompressed checks that the guest cluster at off is unallocated,
// reserves n bytes of host storage for it and returns their offset and the
// descriptor. The caller holds mu.
func (img *Image) placeCompressed(off, n int64) (int64, l2Entry, error) {
	e, err := img.lookup(off)
	if err != nil {
		return 0, 0, err
	}
	if e.compressed() || e.offset() != 0 {
		return 0, 0, fmt.Errorf("compressed write at %d: the cluster is allocated: %w", off, ErrInvalid)
	}
	host, err := img.allocBytes(n)
	if err != nil {
		return 0, 0, err
	}
	if err := img.checkDataWrite(host, n); err != nil {
		return 0, 0, err
	}
	x := 62 - (img.clusterBits - 8)
	sectors := (host+n-1)>>9 - host>>9
	return host, l2Entry(uint64(host) | uint64(sectors)<<x | flagCompressed), nil
}

// allocBytes reserves n (< cluster size) bytes for compressed data, after
// the previous compressed cluster if it still fits (or if the next host
// cluster is the one allocated), else at the start of a new cluster. Every
// cluster the bytes touch gains one reference.
func (img *Image) allocBytes(n int64) (int64, error) {
	t, cs := &img.ctail, img.clusterSize
	if t.next != 0 {
		e, err := img.lookup(t.guest)
		if err != nil {
			return 0, err
		}
		rc, err := img.refcount(t.next >> img.clusterBits)
		if err != nil {
			return 0, err
		}
		if e != t.last || rc >= img.maxRefcount() {
			t.next = 0
		}
	}
	off, fresh := t.next, int64(-1)
	if off == 0 || cs-off&(cs-1) < n {
		nc, err := img.allocClusters(1) // its reference is this cluster's
		if err != nil {
			return 0, err
		}
		if off == 0 || nc != (off+cs-1)&^(cs-1) {
			off = nc
		}
		fresh = nc >> img.clusterBits
	}
	for cl := off >> img.clusterBits; cl <= (off+n-1)>>img.clusterBits; cl++ {
		if cl == fresh {
			continue
		}
		if err := img.addRefcount(cl, 1); err != nil {
			if fresh >= 0 {
				img.freeUnlinked(fresh<<img.clusterBits, 1)
			}
			t.next = 0
			return 0, err
		}
	}
	t.next = off + n
	if t.next&(cs-1) == 0 {
		t.next = 0
	}
	return off, nil
}

// compressCluster compresses one cluster as QEMU does for the image's
// compression type; it returns nil if the result is over limit bytes.
func compressCluster(typ uint8, src []byte, limit int) ([]byte, error) {
	var out []byte
	switch typ {
	case CompressionZlib:
		var b bytes.Buffer
		w, _ := deflaters.Get().(*flate.Writer)
		if w == nil {
			var err error
			if w, err = flate.NewWriter(&b, flate.DefaultCompression); err != nil {
				return nil, err
			}
		}
		defer deflaters.Put(w)
		for i := 0; i < len(src); i += deflateChunk {
			w.Reset(&b)
			if _, err := w.Write(src[i:min(i+deflateChunk, len(src))]); err != nil {
				return nil, err
			}
			var err error
			if i+deflateChunk < len(src) {
				err = w.Flush() // a byte-aligned, non-final block boundary
			} else {
				err = w.Close()
			}
			if err != nil {
				return nil, err
			}
			if b.Len() > limit {
				return nil, nil
			}
		}
		out = b.Bytes()
	case CompressionZstd:
		e, _ := zstdEncoders.Get().(*zstd.Encoder)
		if e == nil {
			var err error
			if e, err = zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1)); err != nil {
				return nil, fmt.Errorf("zstd encoder: %w", err)
			}
		}
		defer zstdEncoders.Put(e)
		out = e.EncodeAll(src, make([]byte, 0, len(src)))
	default:
		return nil, fmt.Errorf("compression type %d: %w", typ, ErrUnsupported)
	}
	if len(out) > limit {
		return nil, nil
	}
	return out, nil
}

// deflaters and zstdEncoders cache compressors, which are costly to set up;
// they hold scratch state only.
var deflaters, zstdEncoders sync.Pool
