package qcow2_test

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Fuzz targets for the on-disk parser. The committed seed corpus in
// testdata/fuzz/FuzzOpen holds small images made by qemu-img (regenerate
// with `go test -run TestGenerateFuzzCorpus -update-corpus`); run the
// fuzzer with `go test -run '^$' -fuzz FuzzOpen ./pkg/qcow2/`.

var flagUpdateCorpus = flag.Bool("update-corpus", false, "regenerate testdata/fuzz/FuzzOpen from qemu-img")

// fuzzAllocBound is what one input may allocate: the largest tables QEMU
// accepts (32 MiB L1, 8 MiB refcount table, 64 MiB snapshot table), a 2 MiB
// header cluster, the metadata cache, and the checker's per-cluster state.
const fuzzAllocBound = 256 << 20

const fuzzInputTimeout = 20 * time.Second

func FuzzOpen(f *testing.F) {
	f.Add(handImage{clusterBits: 9, size: 1 << 20}.bytes())
	f.Add(handImage{clusterBits: 12, size: 100 << 20}.bytes())
	f.Add([]byte("QFI\xfb"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 16<<20 {
			t.Skip("inputs are bounded to 16 MiB")
		}
		// A hang is a bug too: the fuzzer has no per-input timeout, but a
		// panic on another goroutine makes it record this input as a crasher.
		watchdog := time.AfterFunc(fuzzInputTimeout, func() {
			panic(fmt.Sprintf("FuzzOpen: one input (%d bytes) took over %v", len(data), fuzzInputTimeout))
		})
		defer watchdog.Stop()
		alloc := allocatedBy(func() { fuzzOpenOnce(t, data) })
		if alloc > fuzzAllocBound+4*uint64(len(data)) {
			t.Errorf("a %d byte image made us allocate %d MiB", len(data), alloc>>20)
		}
	})
}

// acceptableErr: a sentinel, or the host file refusing a write far past
// its end (memFile's bound; a real file would grow sparsely).
func acceptableErr(err error) bool {
	return err == nil || wrapsSentinel(err) || errors.Is(err, syscall.ENOSPC)
}

func fuzzOpenOnce(t *testing.T, data []byte) {
	img, err := qcow2.OpenFile(newMemFile(data), qcow2.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		if !wrapsSentinel(err) {
			t.Fatalf("OpenFile: error wraps no sentinel: %v", err)
		}
		return
	}
	defer func() {
		if img != nil {
			img.Close()
		}
	}()
	info := img.Info()
	size := img.Size()
	if size < 0 || size != info.VirtualSize || info.ClusterSize < 512 || info.ClusterSize > 2<<20 ||
		info.RefcountBits < 1 || info.RefcountBits > 64 {
		t.Fatalf("implausible image accepted: Size()=%d Info()=%+v", size, info)
	}
	before, _ := fuzzReads(t, img, size)
	if _, err := img.Check(qcow2.CheckOptions{}); !acceptableErr(err) {
		t.Fatalf("Check: error wraps no sentinel: %v", err)
	}
	err = img.Close()
	img = nil
	if !acceptableErr(err) {
		t.Fatalf("Close of a read-only image: %v", err)
	}
	if info.Corrupt {
		return
	}
	// An image our checker calls clean must stay clean through our writes.
	// Checkers only see refcounts of clusters inside the file, so the file
	// is first padded with zeros over the clusters a small write may
	// allocate: a stray refcount there is then a leak the first check sees.
	cs := int64(info.ClusterSize)
	padded := make([]byte, (int64(len(data))+cs-1)/cs*cs+min(32*cs, 8<<20))
	copy(padded, data)
	img, err = qcow2.OpenFile(newMemFile(padded), qcow2.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		t.Fatalf("OpenFile after padding with zeros: %v", err)
	}
	r, err := img.Check(qcow2.CheckOptions{})
	if err != nil || !r.Clean() {
		return
	}
	fuzzWriteClean(t, padded, size, before)
}

// fuzzReads reads the first, last and a middle range and one past the end,
// returning what the first range read (nil if it failed).
func fuzzReads(t *testing.T, img *qcow2.Image, size int64) ([]byte, error) {
	var first []byte
	var firstErr error
	for i, off := range []int64{0, size / 2, max(0, size-3000), size} {
		p := make([]byte, 4096)
		n, err := img.ReadAt(p, off)
		want := int(min(4096, max(0, size-off)))
		if err != nil && err != io.EOF {
			if !wrapsSentinel(err) {
				t.Fatalf("ReadAt(4096 at %#x): error wraps no sentinel: %v", off, err)
			}
			if i == 0 {
				firstErr = err
			}
			continue
		}
		if n != want || (n < len(p) && err != io.EOF) {
			t.Fatalf("ReadAt(4096 at %#x) of a %d byte image: n=%d err=%v, want n=%d", off, size, n, err, want)
		}
		if i == 0 {
			first = p[:n]
		}
	}
	return first, firstErr
}

func fuzzWriteClean(t *testing.T, data []byte, size int64, first []byte) {
	f := newMemFile(data)
	img, err := qcow2.OpenFile(f, qcow2.OpenOptions{NoBacking: true})
	if err != nil {
		if !wrapsSentinel(err) {
			t.Fatalf("read-write OpenFile: error wraps no sentinel: %v", err)
		}
		return
	}
	if size == 0 {
		img.Close()
		return
	}
	pat := bytes.Repeat([]byte{0x5c}, int(min(size, 700)))
	at := max(0, size/2-300)
	if _, err := img.WriteAt(pat, at); err != nil {
		if !acceptableErr(err) {
			t.Fatalf("WriteAt on a clean image: %v", err)
		}
		img.Close()
		return
	}
	got := make([]byte, len(pat))
	if _, err := img.ReadAt(got, at); (err != nil && err != io.EOF) || !bytes.Equal(got, pat) {
		t.Fatalf("read after write on a clean image: err=%v %s", err, firstDiff(got, pat))
	}
	if first != nil && at >= int64(len(first)) {
		p := make([]byte, len(first))
		if _, err := img.ReadAt(p, 0); (err == nil || err == io.EOF) && !bytes.Equal(p, first) {
			t.Fatalf("a write at %#x changed the data at 0: %s", at, firstDiff(p, first))
		}
	}
	if err := img.Close(); err != nil {
		if !acceptableErr(err) {
			t.Fatalf("Close: %v", err)
		}
		return
	}
	img, err = qcow2.OpenFile(newMemFile(f.bytes()), qcow2.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		t.Fatalf("reopen after writing to a clean image: %v", err)
	}
	defer img.Close()
	r, err := img.Check(qcow2.CheckOptions{})
	if err != nil || !r.Clean() {
		t.Fatalf("a clean image is not clean after one write: %+v err=%v", r, err)
	}
	if _, err := img.ReadAt(got, at); (err != nil && err != io.EOF) || !bytes.Equal(got, pat) {
		t.Fatalf("read after reopen: err=%v %s", err, firstDiff(got, pat))
	}
}

// FuzzReadWrite runs an operation sequence decoded from the input on a
// fresh in-memory image and checks it against the model, then the checker.
func FuzzReadWrite(f *testing.F) {
	f.Add(byte(0), []byte("\x00\x00\x10\x00\x20\x01\x00\x0f\xf0\x01\x00\x02\x00\x00\x00\x04\x00"))
	f.Add(byte(0x85), []byte("\x00\x00\x00\x00\x01\x02\x00\x00\x00\x01\x03\x00\x80\x00\x80\x05\x00\x00\x00\x00"))
	f.Add(byte(0x12), bytes.Repeat([]byte{0x00, 0x7f, 0xff, 0x10, 0x00, 0x04, 0x00, 0x00, 0xff, 0xff}, 8))
	f.Fuzz(func(t *testing.T, cfg byte, ops []byte) {
		cs := []int{512, 4096, 65536}[cfg%3]
		rb := []int{1, 2, 4, 8, 16, 32, 64}[(cfg/3)%7]
		size := int64(24*cs) + int64(cfg&0x60)*16
		mf := newMemFile(nil)
		img, err := qcow2.CreateFile(mf, qcow2.CreateOptions{Size: size, ClusterSize: cs, RefcountBits: rb, LazyRefcounts: cfg&0x80 != 0})
		if err != nil {
			t.Fatalf("CreateFile: %v", err)
		}
		h := newHarness(t, rand.New(rand.NewPCG(uint64(cfg), uint64(len(ops)))), img, "", make([]byte, size))
		for ; len(ops) >= 5 && h.ops < 200; ops = ops[5:] {
			h.ops++
			size := h.size()
			off := int64(ops[1])<<8 | int64(ops[2])
			off = off * size >> 16
			n := min(1+(int64(ops[3])<<8|int64(ops[4]))*int64(cs)>>12, size-off)
			switch ops[0] % 8 {
			case 0, 1:
				h.last = "write"
				h.write(off, fill(h.rng, n))
			case 2:
				h.last = "write zeroes"
				h.writeZeroes(off, n, ops[0]&0x80 != 0)
			case 3:
				h.last = "discard"
				h.discard(off, n)
			case 4:
				h.last = "read"
				h.read(off, n+int64(ops[0]>>4))
			case 5:
				h.last = "flush"
				h.flush()
			case 6:
				h.last = "resize"
				if grow := int64(ops[1]) * 512; size+grow <= 4*int64(24*cs) {
					h.resize(size + grow)
				}
			case 7:
				h.last = "check"
				r, err := h.img.Check(qcow2.CheckOptions{})
				requireClean(t, "Check", r, err)
			}
		}
		h.verifyAll()
		if err := img.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		img, err = qcow2.OpenFile(newMemFile(mf.bytes()), qcow2.OpenOptions{})
		if err != nil {
			t.Fatalf("reopen: %v", err)
		}
		defer img.Close()
		h.img = img
		h.verifyAll()
		r, err := img.Check(qcow2.CheckOptions{})
		requireClean(t, "Check after reopen", r, err)
	})
}

// corpusImage is one seed: qemu-img create options and qemu-io commands,
// plus an optional step (snapshot, compression, crash) and a mangling.
type corpusImage struct {
	name   string
	opts   string
	size   string
	qemuIO []string
	extra  func(t *testing.T, dir, path string) string // returns the path to keep
	mangle func(b []byte) []byte
}

var corpusIO = []string{"write -P 0xab 0 3k", "write -P 0xcd 9000 1000", "write -z 12k 2k", "discard 2k 1k", "write -P 0x11 15k 1k"}

func corpusImages() []corpusImage {
	snapshot := func(t *testing.T, dir, path string) string {
		run(t, dir, "qemu-img", "snapshot", "-c", "s1", path)
		run(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 0xee 0 1k", path)
		return path
	}
	compress := func(t *testing.T, dir, path string) string {
		out := filepath.Join(dir, "compressed.qcow2")
		run(t, dir, "qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2", "-o", "cluster_size=512", path, out)
		return out
	}
	crash := func(t *testing.T, dir, path string) string {
		runCode(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 0x77 5k 2k", "-c", "flush", "-c", "abort", path)
		return path
	}
	backing := func(t *testing.T, dir, path string) string {
		run(t, dir, "qemu-img", "rebase", "-u", "-b", "base.raw", "-F", "raw", path)
		return path
	}
	truncateAt := func(n int) func([]byte) []byte {
		return func(b []byte) []byte { return b[:min(n, len(b))] }
	}
	return []corpusImage{
		{name: "c512", opts: "cluster_size=512"},
		{name: "c512-refcount1", opts: "cluster_size=512,refcount_bits=1"},
		{name: "c512-refcount64", opts: "cluster_size=512,refcount_bits=64"},
		{name: "c512-v2", opts: "cluster_size=512,compat=0.10"},
		{name: "c512-lazy-dirty", opts: "cluster_size=512,lazy_refcounts=on", extra: crash},
		{name: "c512-snapshot", opts: "cluster_size=512", extra: snapshot},
		{name: "c512-compressed", opts: "cluster_size=512", extra: compress},
		{name: "c512-prealloc-metadata", opts: "cluster_size=512,preallocation=metadata", size: "16k", qemuIO: []string{"write -P 1 0 1k"}},
		{name: "c512-backing-name", opts: "cluster_size=512", qemuIO: []string{"write -P 9 1k 1k"}, extra: backing},
		{name: "c4k", opts: "cluster_size=4096", size: "1M", qemuIO: []string{"write -P 0x42 4k 1k"}},
		{name: "c512-zstd", opts: "cluster_size=512,compression_type=zstd", qemuIO: []string{"write -P 3 0 1k"}},
		{name: "trunc-100", opts: "cluster_size=512", mangle: truncateAt(100)},
		{name: "trunc-1000", opts: "cluster_size=512", mangle: truncateAt(1000)},
		{name: "trunc-half", opts: "cluster_size=512", mangle: func(b []byte) []byte { return b[:len(b)/2] }},
		{name: "mangled-l1", opts: "cluster_size=512", mangle: func(b []byte) []byte {
			l1 := be.Uint64(b[40:])
			be.PutUint64(b[l1:], be.Uint64(b[l1:])+512+8)
			return b
		}},
		{name: "mangled-refcount-table", opts: "cluster_size=512", mangle: func(b []byte) []byte {
			rt := be.Uint64(b[48:])
			be.PutUint64(b[rt:], 0xffff_ffff_0000)
			return b
		}},
		{name: "mangled-l1-size", opts: "cluster_size=512", mangle: func(b []byte) []byte {
			be.PutUint32(b[36:], 0x00400000)
			return b
		}},
	}
}

// TestGenerateFuzzCorpus writes the FuzzOpen seed corpus. Trailing zeros are
// trimmed (they read back as zeros) to keep the files small.
func TestGenerateFuzzCorpus(t *testing.T) {
	if !*flagUpdateCorpus {
		t.Skip("run with -update-corpus to regenerate testdata/fuzz/FuzzOpen")
	}
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	out := filepath.Join("testdata", "fuzz", "FuzzOpen")
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range corpusImages() {
		dir := t.TempDir()
		size := c.size
		if size == "" {
			size = "16k"
		}
		q := qemuImage{name: c.name, opts: c.opts, size: size, qemuIO: c.qemuIO}
		if q.qemuIO == nil {
			q.qemuIO = corpusIO
		}
		path := makeQemuImage(t, dir, q)
		if c.extra != nil {
			path = c.extra(t, dir, path)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if c.mangle != nil {
			b = c.mangle(b)
		}
		b = bytes.TrimRight(b, "\x00")
		entry := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)
		if err := os.WriteFile(filepath.Join(out, c.name), []byte(entry), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: %d bytes of image, %d bytes of corpus", c.name, len(b), len(entry))
	}
}
