package qcow2_test

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"runtime/debug"
	"sync"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Property tests: random operations checked against an in-memory model,
// then the consistency checker, then qemu-img check. -long (or
// QCOW2_TEST_LONG=1) multiplies the operation counts; -seed replays a run.

type propConfig struct {
	clusterSize int
	size        int64 // virtual size; not cluster aligned, to exercise the tail
	ops         int   // operations in the default run
}

var propConfigs = []propConfig{
	{clusterSize: 512, size: 2<<20 + 1536, ops: 2500},
	{clusterSize: 4096, size: 6<<20 + 512, ops: 2500},
	{clusterSize: 65536, size: 24<<20 + 1536, ops: 1500},
	{clusterSize: 2 << 20, size: 40<<20 + 1536, ops: 300},
}

func opsScale() int {
	switch {
	case longRun():
		return 20
	case testing.Short():
		return 0 // divided below: a tenth
	default:
		return 1
	}
}

func scaledOps(n int) int {
	if s := opsScale(); s > 0 {
		return n * s
	}
	return max(n/10, 20)
}

func TestPropertyRandomOps(t *testing.T) {
	for _, c := range propConfigs {
		for _, rb := range []int{1, 16, 64} {
			lazy := rb == 16
			name := fmt.Sprintf("cluster=%d/refcount=%d/lazy=%v", c.clusterSize, rb, lazy)
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				path := filepath.Join(t.TempDir(), "prop.qcow2")
				img := mustCreate(t, path, qcow2.CreateOptions{Size: c.size, ClusterSize: c.clusterSize,
					RefcountBits: rb, LazyRefcounts: lazy})
				h := newHarness(t, newRand(t), img, path, make([]byte, c.size))
				for range scaledOps(c.ops) {
					h.step(defaultMix)
				}
				finishChecked(t, h)
			})
		}
	}
}

// finishChecked compares everything, checks the open image, closes it, and
// checks the file with our checker and qemu-img's.
func finishChecked(t *testing.T, h *harness) {
	t.Helper()
	h.verifyAll()
	r, err := h.img.Check(qcow2.CheckOptions{})
	requireClean(t, "Check before Close", r, err)
	if err := h.img.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	r, err = qcow2.CheckFile(h.path, qcow2.CheckOptions{})
	requireClean(t, "CheckFile after Close", r, err)
	if haveQemu(t) {
		requireQemuClean(t, h.path)
		qemuCompare(t, h.path, h.m)
	}
}

// TestPropertyMemFile runs the random operations on an injected in-memory
// host file, with the smallest metadata cache, and checks the bytes it
// leaves behind by opening them again.
func TestPropertyMemFile(t *testing.T) {
	for _, cs := range []int{512, 65536} {
		t.Run(fmt.Sprintf("cluster=%d", cs), func(t *testing.T) {
			t.Parallel()
			f := newMemFile(nil)
			size := int64(64*cs + 512)
			img, err := qcow2.CreateFile(f, qcow2.CreateOptions{Size: size, ClusterSize: cs, RefcountBits: 8})
			if err != nil {
				t.Fatalf("CreateFile: %v", err)
			}
			h := newHarness(t, newRand(t), img, "", make([]byte, size))
			for range scaledOps(1500) {
				h.step(defaultMix)
			}
			h.verifyAll()
			if err := img.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			img, err = qcow2.OpenFile(newMemFile(f.bytes()), qcow2.OpenOptions{CacheSize: 4096})
			if err != nil {
				t.Fatalf("OpenFile of the closed image: %v", err)
			}
			defer img.Close()
			h.img = img
			h.verifyAll()
			r, err := img.Check(qcow2.CheckOptions{})
			requireClean(t, "Check", r, err)
		})
	}
}

// concurrency layout: each worker owns a byte range that is not cluster
// aligned, so neighbours share clusters (and race to allocate them); after
// the owned ranges comes a range every worker writes, each with its own
// byte value.
type concLayout struct {
	workers int
	own     int64 // bytes per worker
	shared  int64
}

func (l concLayout) size() int64 { return int64(l.workers)*l.own + l.shared }

func TestConcurrentReadWrite(t *testing.T) {
	for _, c := range []struct{ cs, ops int }{{4096, 600}, {65536, 400}, {2 << 20, 60}} {
		cs := c.cs
		t.Run(fmt.Sprintf("cluster=%d", cs), func(t *testing.T) {
			l := concLayout{workers: 8, own: int64(cs)*5/2 + 512, shared: 3*int64(cs) + 1024}
			size := (l.size() + 511) &^ 511
			path := filepath.Join(t.TempDir(), "conc.qcow2")
			img := mustCreate(t, path, qcow2.CreateOptions{Size: size, ClusterSize: cs})
			rng := newRand(t)
			model := make([]byte, size)
			written := make([][]bool, l.workers) // per worker: which shared bytes it wrote
			ops := scaledOps(c.ops)
			var wg sync.WaitGroup
			errs := make(chan error, l.workers)
			for w := range l.workers {
				written[w] = make([]bool, l.shared)
				seed := rng.Uint64()
				wg.Go(func() {
					defer recoverTo(errs, fmt.Sprintf("worker %d (seed %#x)", w, seed))
					errs <- concWorker(img, l, w, model[int64(w)*l.own:int64(w+1)*l.own], written[w], ops, int64(cs), seed)
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Error(err)
				}
			}
			if t.Failed() {
				return
			}
			got := readAll(t, img)
			base := int64(l.workers) * l.own
			for i := range l.shared {
				v := got[base+i]
				switch {
				case v == 0:
					for w := range l.workers {
						if written[w][i] {
							t.Fatalf("shared byte %#x written by worker %d reads 0: a lost write", base+i, w)
						}
					}
				case int(v) > l.workers || !written[v-1][i]:
					t.Fatalf("shared byte %#x reads %d, a value no worker wrote there", base+i, v)
				}
			}
			copy(model[base:], got[base:])
			h := newHarness(t, rng, img, path, model)
			finishChecked(t, h)
		})
	}
}

// concWorker writes, zeroes, discards and reads its own range (checking
// every read exactly) and writes and reads the shared range (checking that
// every byte is 0 or some worker's value). It runs on its own goroutine, so
// it reports instead of calling t.Fatal.
func concWorker(img *qcow2.Image, l concLayout, w int, own []byte, written []bool, ops int, cs int64, seed uint64) error {
	rng := rand.New(rand.NewPCG(seed, uint64(w)))
	base, sharedBase := int64(w)*l.own, int64(l.workers)*l.own
	for op := range ops {
		fail := func(format string, args ...any) error {
			return fmt.Errorf("worker %d op %d (seed %#x): %s", w, op, seed, fmt.Sprintf(format, args...))
		}
		n := 1 + rng.Int64N(min(l.own, 2*cs))
		off := rng.Int64N(l.own - n + 1)
		switch k := rng.IntN(20); {
		case k < 6:
			p := fill(rng, n)
			if _, err := img.WriteAt(p, base+off); err != nil {
				return fail("WriteAt(%d at %#x): %v", n, base+off, err)
			}
			copy(own[off:], p)
		case k < 7:
			if err := img.WriteZeroes(base+off, n, rng.IntN(2) == 0); err != nil {
				return fail("WriteZeroes(%#x, %d): %v", base+off, n, err)
			}
			clear(own[off : off+n])
		case k < 8:
			// Only clusters entirely inside the own range: neighbours own the rest.
			start := (base + off + cs - 1) / cs * cs
			end := (base + off + n) / cs * cs
			if start < end {
				if err := img.Discard(start, end-start); err != nil {
					return fail("Discard(%#x, %d): %v", start, end-start, err)
				}
				clear(own[start-base : end-base])
			}
		case k < 12:
			p := make([]byte, n)
			if _, err := img.ReadAt(p, base+off); err != nil && err != io.EOF {
				return fail("ReadAt(%d at %#x): %v", n, base+off, err)
			}
			if !bytes.Equal(p, own[off:off+n]) {
				return fail("ReadAt(%d at %#x) of the worker's own range: %s", n, base+off, firstDiff(p, own[off:off+n]))
			}
		case k < 16:
			n := 1 + rng.Int64N(min(l.shared, 2*cs))
			off := rng.Int64N(l.shared - n + 1)
			if _, err := img.WriteAt(bytes.Repeat([]byte{byte(w + 1)}, int(n)), sharedBase+off); err != nil {
				return fail("WriteAt(%d at %#x) shared: %v", n, sharedBase+off, err)
			}
			for i := off; i < off+n; i++ {
				written[i] = true
			}
		case k < 19:
			n := 1 + rng.Int64N(min(l.shared, 2*cs))
			off := rng.Int64N(l.shared - n + 1)
			p := make([]byte, n)
			if _, err := img.ReadAt(p, sharedBase+off); err != nil && err != io.EOF {
				return fail("ReadAt(%d at %#x) shared: %v", n, sharedBase+off, err)
			}
			for i, v := range p {
				if int(v) > l.workers || (v == byte(w+1) && !written[off+int64(i)]) {
					return fail("shared byte %#x reads %d", sharedBase+off+int64(i), v)
				}
				if v == 0 && written[off+int64(i)] {
					return fail("shared byte %#x this worker wrote reads 0", sharedBase+off+int64(i))
				}
			}
		default:
			if err := img.Flush(); err != nil {
				return fail("Flush: %v", err)
			}
		}
	}
	return nil
}

// recoverTo turns a panic on a worker goroutine into an error for the test,
// so that one engine panic does not kill the whole test binary.
func recoverTo(errs chan<- error, who string) {
	if r := recover(); r != nil {
		errs <- fmt.Errorf("%s panicked: %v\n%s", who, r, debug.Stack())
	}
}

// TestConcurrentFlushDiscard: Flush from several goroutines while others
// free clusters. Every deferred free must be applied exactly once.
func TestConcurrentFlushDiscard(t *testing.T) {
	const cs, workers, rounds = 65536, 4, 50
	img, err := qcow2.CreateFile(newMemFile(nil), qcow2.CreateOptions{Size: workers * rounds * cs, ClusterSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	errs := make(chan error, 2*workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			defer recoverTo(errs, fmt.Sprintf("worker %d", w))
			buf := bytes.Repeat([]byte{byte(w + 1)}, 4096)
			for i := range rounds {
				off := int64(w*rounds+i) * cs
				if _, err := img.WriteAt(buf, off); err != nil {
					errs <- fmt.Errorf("worker %d: WriteAt(%#x): %w", w, off, err)
					return
				}
				if err := img.Discard(off, cs); err != nil {
					errs <- fmt.Errorf("worker %d: Discard(%#x): %w", w, off, err)
					return
				}
				if err := img.Flush(); err != nil {
					errs <- fmt.Errorf("worker %d: Flush: %w", w, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	r, err := img.Check(qcow2.CheckOptions{})
	requireClean(t, "Check", r, err)
}
