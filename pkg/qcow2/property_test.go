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
	{clusterSize: 512, size: 2<<20 + 1536, ops: 5000},
	{clusterSize: 4096, size: 6<<20 + 512, ops: 5000},
	{clusterSize: 65536, size: 24<<20 + 1536, ops: 3000},
	{clusterSize: 2 << 20, size: 40<<20 + 1536, ops: 600},
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
	workers   int
	own       int64 // bytes per worker
	shared    int64
	writeBack bool // WriteBack after every operation, as the driver does
}

func (l concLayout) size() int64 { return int64(l.workers)*l.own + l.shared }

func TestConcurrentReadWrite(t *testing.T) {
	for _, c := range []struct {
		cs, ops int
		lazy    bool // lazy refcounts, and WriteBack after every write
	}{{4096, 600, false}, {65536, 400, false}, {2 << 20, 60, false}, {4096, 600, true}, {65536, 400, true}} {
		cs := c.cs
		t.Run(fmt.Sprintf("cluster=%d,lazy+writeback=%v", cs, c.lazy), func(t *testing.T) {
			l := concLayout{workers: 8, own: int64(cs)*5/2 + 512, shared: 3*int64(cs) + 1024, writeBack: c.lazy}
			size := (l.size() + 511) &^ 511
			path := filepath.Join(t.TempDir(), "conc.qcow2")
			img := mustCreate(t, path, qcow2.CreateOptions{Size: size, ClusterSize: cs, LazyRefcounts: c.lazy})
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
					errs <- runConcWorker(img, l, w, model[int64(w)*l.own:int64(w+1)*l.own], written[w], ops, int64(cs), seed)
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
type concWorker struct {
	img              *qcow2.Image
	l                concLayout
	w                int
	own              []byte // the model of the worker's own range
	written          []bool // shared bytes this worker wrote
	cs               int64
	seed             uint64
	rng              *rand.Rand
	base, sharedBase int64
}

func runConcWorker(img *qcow2.Image, l concLayout, w int, own []byte, written []bool, ops int, cs int64, seed uint64) error {
	c := &concWorker{img: img, l: l, w: w, own: own, written: written, cs: cs, seed: seed,
		rng: rand.New(rand.NewPCG(seed, uint64(w))), base: int64(w) * l.own, sharedBase: int64(l.workers) * l.own}
	for op := range ops {
		var err error
		switch k := c.rng.IntN(20); {
		case k < 12:
			err = c.ownOp(k)
		case k < 19:
			err = c.sharedOp(k < 16)
		default:
			err = img.Flush()
		}
		if err == nil && l.writeBack {
			err = img.WriteBack()
		}
		if err != nil {
			return fmt.Errorf("worker %d op %d (seed %#x): %w", w, op, seed, err)
		}
	}
	return nil
}

func (c *concWorker) ownOp(k int) error {
	n := 1 + c.rng.Int64N(min(c.l.own, 2*c.cs))
	off := c.rng.Int64N(c.l.own - n + 1)
	at := c.base + off
	switch {
	case k < 6:
		p := fill(c.rng, n)
		if _, err := c.img.WriteAt(p, at); err != nil {
			return fmt.Errorf("WriteAt(%d at %#x): %w", n, at, err)
		}
		copy(c.own[off:], p)
	case k < 7:
		if err := c.img.WriteZeroes(at, n, c.rng.IntN(2) == 0); err != nil {
			return fmt.Errorf("WriteZeroes(%#x, %d): %w", at, n, err)
		}
		clear(c.own[off : off+n])
	case k < 8:
		// Only clusters entirely inside the own range: neighbours own the rest.
		start := (at + c.cs - 1) / c.cs * c.cs
		end := (at + n) / c.cs * c.cs
		if start < end {
			if err := c.img.Discard(start, end-start); err != nil {
				return fmt.Errorf("Discard(%#x, %d): %w", start, end-start, err)
			}
			clear(c.own[start-c.base : end-c.base])
		}
	default:
		p := make([]byte, n)
		if _, err := c.img.ReadAt(p, at); err != nil && err != io.EOF {
			return fmt.Errorf("ReadAt(%d at %#x): %w", n, at, err)
		}
		if !bytes.Equal(p, c.own[off:off+n]) {
			return fmt.Errorf("ReadAt(%d at %#x) of the worker's own range: %s", n, at, firstDiff(p, c.own[off:off+n]))
		}
	}
	return nil
}

func (c *concWorker) sharedOp(write bool) error {
	n := 1 + c.rng.Int64N(min(c.l.shared, 2*c.cs))
	off := c.rng.Int64N(c.l.shared - n + 1)
	at := c.sharedBase + off
	if write {
		if _, err := c.img.WriteAt(bytes.Repeat([]byte{byte(c.w + 1)}, int(n)), at); err != nil {
			return fmt.Errorf("WriteAt(%d at %#x) shared: %w", n, at, err)
		}
		for i := off; i < off+n; i++ {
			c.written[i] = true
		}
		return nil
	}
	p := make([]byte, n)
	if _, err := c.img.ReadAt(p, at); err != nil && err != io.EOF {
		return fmt.Errorf("ReadAt(%d at %#x) shared: %w", n, at, err)
	}
	for i, v := range p {
		mine := c.written[off+int64(i)]
		if int(v) > c.l.workers || (v == byte(c.w+1) && !mine) {
			return fmt.Errorf("shared byte %#x reads %d", at+int64(i), v)
		}
		if v == 0 && mine {
			return fmt.Errorf("shared byte %#x this worker wrote reads 0", at+int64(i))
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
