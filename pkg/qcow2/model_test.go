package qcow2_test

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// harness drives an image and an in-memory model of its guest contents with
// the same operations, and compares them on every read.
type harness struct {
	t    testing.TB
	rng  *rand.Rand
	img  *qcow2.Image
	m    []byte // the model: what the guest must read
	cs   int64  // cluster size, to aim operations at cluster boundaries
	path string // the image file, for reopen ("" if the image cannot be reopened)

	maxSize int64 // Resize grows no further than this
	ops     int   // operations run, for failure messages
	last    string
}

func newHarness(t testing.TB, rng *rand.Rand, img *qcow2.Image, path string, model []byte) *harness {
	info := img.Info()
	if int64(len(model)) != img.Size() {
		t.Fatalf("model of %d bytes for an image of %d", len(model), img.Size())
	}
	return &harness{t: t, rng: rng, img: img, m: model, cs: int64(info.ClusterSize), path: path,
		maxSize: 2 * int64(len(model))}
}

func (h *harness) fatalf(format string, args ...any) {
	h.t.Helper()
	h.t.Fatalf("op %d (%s): "+format, append([]any{h.ops, h.last}, args...)...)
}

func (h *harness) size() int64 { return int64(len(h.m)) }

// randRange picks an operation range: tiny, sub-cluster, cluster aligned,
// crossing clusters, ending exactly at the image end, or large.
func (h *harness) randRange() (off, n int64) {
	size, cs, r := h.size(), h.cs, h.rng
	maxLen := min(size, max(3*cs, 64<<10), 4<<20)
	switch r.IntN(10) {
	case 0:
		n = 1 + r.Int64N(min(600, size))
		off = r.Int64N(size - n + 1)
	case 1, 2:
		n = 1 + r.Int64N(min(cs, size))
		off = r.Int64N(size - n + 1)
	case 3, 4:
		n = min(cs*(1+r.Int64N(3)), size/cs*cs)
		if n == 0 {
			n = size
		}
		off = r.Int64N((size-n)/cs+1) * cs
	case 5, 6:
		n = 1 + r.Int64N(maxLen)
		c := r.Int64N(size/cs + 1) // a cluster boundary to straddle
		off = max(0, min(c*cs-r.Int64N(n), size-n))
	case 7:
		n = 1 + r.Int64N(maxLen)
		off = size - n
	default:
		n = 1 + r.Int64N(maxLen)
		off = r.Int64N(size - n + 1)
	}
	return off, n
}

func (h *harness) write(off int64, p []byte) {
	h.t.Helper()
	n, err := h.img.WriteAt(p, off)
	if err != nil || n != len(p) {
		h.fatalf("WriteAt(%d bytes at %#x): n=%d err=%v", len(p), off, n, err)
	}
	copy(h.m[off:], p)
}

func (h *harness) writeZeroes(off, n int64, mayUnmap bool) {
	h.t.Helper()
	if err := h.img.WriteZeroes(off, n, mayUnmap); err != nil {
		h.fatalf("WriteZeroes(%#x, %d, %v): %v", off, n, mayUnmap, err)
	}
	clear(h.m[off : off+n])
}

// discard frees the whole clusters inside [off, off+n). The last cluster of
// an image whose size is not cluster aligned is whole when the range covers
// it to the end (QEMU discards it); an engine may also leave it, so that
// cluster must read either as before or as zeros.
func (h *harness) discard(off, n int64) {
	h.t.Helper()
	if err := h.img.Discard(off, n); err != nil {
		h.fatalf("Discard(%#x, %d): %v", off, n, err)
	}
	start := (off + h.cs - 1) / h.cs * h.cs
	end := (off + n) / h.cs * h.cs
	if start < end {
		clear(h.m[start:end])
	}
	tail := h.size() / h.cs * h.cs
	if off+n == h.size() && tail < h.size() && off <= tail && tail >= start {
		got := make([]byte, h.size()-tail)
		h.readAt(got, tail)
		if !bytes.Equal(got, h.m[tail:]) && !allZero(got) {
			h.fatalf("after Discard(%#x, %d) the partial tail cluster at %#x is neither unchanged nor zero: %s",
				off, n, tail, firstDiff(got, h.m[tail:]))
		}
		copy(h.m[tail:], got)
	}
}

func allZero(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

func (h *harness) readAt(p []byte, off int64) {
	h.t.Helper()
	n, err := h.img.ReadAt(p, off)
	if n != len(p) || (err != nil && err != io.EOF) {
		h.fatalf("ReadAt(%d bytes at %#x): n=%d err=%v", len(p), off, n, err)
	}
}

// read compares a range with the model. Ranges may run past the end, where
// io.ReaderAt semantics apply: a short count and io.EOF.
func (h *harness) read(off, n int64) {
	h.t.Helper()
	p := make([]byte, n)
	got, err := h.img.ReadAt(p, off)
	want := max(0, min(n, h.size()-off))
	switch {
	case int64(got) != want:
		h.fatalf("ReadAt(%d bytes at %#x) on a %d byte image: n=%d want %d (err %v)", n, off, h.size(), got, want, err)
	case want < n && err != io.EOF:
		h.fatalf("ReadAt(%d bytes at %#x) past the end of a %d byte image: err=%v, want io.EOF", n, off, h.size(), err)
	case want == n && err != nil && !(err == io.EOF && off+n == h.size()):
		h.fatalf("ReadAt(%d bytes at %#x): err=%v", n, off, err)
	}
	if !bytes.Equal(p[:got], h.m[off:off+want]) {
		h.fatalf("ReadAt(%d bytes at %#x) differs from the model: %s", n, off, firstDiff(p[:got], h.m[off:off+want]))
	}
}

// verifyAll compares the whole disk with the model.
func (h *harness) verifyAll() {
	h.t.Helper()
	got := readAll(h.t, h.img)
	if !bytes.Equal(got, h.m) {
		h.fatalf("image differs from the model: %s", firstDiff(got, h.m))
	}
}

func (h *harness) resize(size int64) {
	h.t.Helper()
	err := h.img.Resize(size)
	if info := h.img.Info(); info.Version == 2 && len(info.Snapshots) > 0 {
		// QEMU refuses to resize v2 images with snapshots, and so do we.
		if !errors.Is(err, qcow2.ErrUnsupported) {
			h.fatalf("Resize(%d) of a v2 image with snapshots: %v, want ErrUnsupported", size, err)
		}
		return
	}
	if err != nil {
		h.fatalf("Resize(%d) from %d: %v", size, h.size(), err)
	}
	if got := h.img.Size(); got != size {
		h.fatalf("Size() after Resize(%d) = %d", size, got)
	}
	if size > h.size() {
		h.m = append(h.m, make([]byte, size-h.size())...)
	} else {
		h.m = h.m[:size]
	}
}

func (h *harness) flush() {
	h.t.Helper()
	if err := h.img.Flush(); err != nil {
		h.fatalf("Flush: %v", err)
	}
}

// reopen closes the image and opens it again with a random metadata cache
// size (small ones force evictions), then compares everything.
func (h *harness) reopen() {
	h.t.Helper()
	if err := h.img.Close(); err != nil {
		h.fatalf("Close: %v", err)
	}
	if _, err := h.img.ReadAt(make([]byte, 1), 0); !errors.Is(err, qcow2.ErrClosed) {
		h.fatalf("ReadAt after Close: err=%v, want ErrClosed", err)
	}
	var cache int64
	if h.rng.IntN(2) == 0 {
		cache = 64 << 10
	}
	img, err := qcow2.Open(h.path, qcow2.OpenOptions{CacheSize: cache})
	if err != nil {
		h.fatalf("reopen %s: %v", h.path, err)
	}
	h.img = img
	if got := img.Size(); got != h.size() {
		h.fatalf("Size() after reopen = %d, want %d", got, h.size())
	}
	h.verifyAll()
}

// checkHostSize bounds the host file: guest data (at most the largest
// virtual size), plus metadata, plus a few clusters of slack. A runaway
// allocator shows here long before it fills the disk.
func (h *harness) checkHostSize() {
	h.t.Helper()
	if h.path == "" {
		return
	}
	fi, err := os.Stat(h.path)
	if err != nil {
		h.fatalf("stat: %v", err)
	}
	if bound := 2*h.maxSize + 64*h.cs + 8<<20; fi.Size() > bound {
		h.fatalf("host file is %d bytes for at most %d guest bytes (cluster size %d), over the bound of %d",
			fi.Size(), h.maxSize, h.cs, bound)
	}
}

// opMix weighs the random operations.
type opMix struct {
	write, read, zero, zeroUnmap, discard, flush, reopen, resize, check int
}

var defaultMix = opMix{write: 30, read: 25, zero: 8, zeroUnmap: 8, discard: 8, flush: 3, reopen: 1, resize: 1, check: 1}

// step runs one random operation.
func (h *harness) step(mix opMix) {
	h.t.Helper()
	h.ops++
	reopen := mix.reopen
	if h.path == "" {
		reopen = 0
	}
	weights := []int{mix.write, mix.read, mix.zero, mix.zeroUnmap, mix.discard, mix.flush, reopen, mix.resize, mix.check}
	total := 0
	for _, w := range weights {
		total += w
	}
	pick := h.rng.IntN(total)
	kind := 0
	for ; pick >= weights[kind]; kind++ {
		pick -= weights[kind]
	}
	off, n := h.randRange()
	defer h.checkHostSize()
	switch kind {
	case 0:
		h.last = "write"
		h.write(off, fill(h.rng, n))
	case 1:
		h.last = "read"
		if h.rng.IntN(8) == 0 { // run past the end
			n += h.rng.Int64N(3 * h.cs)
		}
		h.read(off, n)
	case 2:
		h.last = "write zeroes"
		h.writeZeroes(off, n, false)
	case 3:
		h.last = "write zeroes, may unmap"
		h.writeZeroes(off, n, true)
	case 4:
		h.last = "discard"
		h.discard(off, n)
	case 5:
		h.last = "flush"
		h.flush()
	case 6:
		h.last = "reopen"
		h.reopen()
	case 7:
		h.last = "resize"
		if grow := h.rng.Int64N(4*h.cs) + 1; h.size()+grow <= h.maxSize {
			h.resize((h.size() + grow + 511) &^ 511)
		}
	case 8:
		h.last = "check"
		r, err := h.img.Check(qcow2.CheckOptions{})
		if err != nil || !r.Clean() {
			h.fatalf("Check on the open image: %+v err=%v", r, err)
		}
	}
}
