package qcow2_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// hostOp is one mutation of the host file, as the engine issued it.
type hostOp struct {
	punch  bool
	zero   bool // ZeroRange: like a punch, but it extends the file
	off    int64
	data   []byte // write
	length int64  // punch
}

// crashFile records every write and punch the engine issues to the host
// file and what the last completed Sync made durable, so a test can build
// the file as a power cut could leave it: everything synced, plus any
// subset of the later writes, landing in any order.
type crashFile struct {
	*memFile
	mu      sync.Mutex
	durable []byte
	pending []hostOp
	// onSync, if set, runs before each Sync: a chance to cut power in
	// the middle of an operation (inside a flush, a table growth...).
	onSync func()
}

func newCrashFile() *crashFile { return &crashFile{memFile: newMemFile(nil)} }

func (c *crashFile) WriteAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n, err := c.memFile.WriteAt(p, off)
	if err == nil {
		c.pending = append(c.pending, hostOp{off: off, data: bytes.Clone(p)})
	}
	return n, err
}

func (c *crashFile) PunchHole(off, length int64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pending = append(c.pending, hostOp{punch: true, off: off, length: length})
	return c.memFile.PunchHole(off, length)
}

func (c *crashFile) ZeroRange(off, length int64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pending = append(c.pending, hostOp{zero: true, off: off, length: length})
	return c.memFile.ZeroRange(off, length)
}

func (c *crashFile) Sync() error {
	if c.onSync != nil {
		c.onSync()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, op := range c.pending {
		c.durable = applyHostOp(c.durable, op)
	}
	c.pending = nil
	return nil
}

// crashImage returns the durable file plus a random subset of the writes
// since the last sync, applied in a random order.
func (c *crashFile) crashImage(rng *rand.Rand) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	img := bytes.Clone(c.durable)
	var kept []hostOp
	for _, op := range c.pending {
		if rng.IntN(2) == 0 {
			kept = append(kept, op)
		}
	}
	rng.Shuffle(len(kept), func(i, j int) { kept[i], kept[j] = kept[j], kept[i] })
	for _, op := range kept {
		img = applyHostOp(img, op)
	}
	return img
}

func applyHostOp(b []byte, op hostOp) []byte {
	if op.zero {
		if end := op.off + op.length; end > int64(len(b)) {
			b = append(b, make([]byte, end-int64(len(b)))...)
		}
		clear(b[op.off : op.off+op.length])
		return b
	}
	if op.punch {
		if end := min(op.off+op.length, int64(len(b))); op.off < end {
			clear(b[op.off:end])
		}
		return b
	}
	if end := op.off + int64(len(op.data)); end > int64(len(b)) {
		b = append(b, make([]byte, end-int64(len(b)))...)
	}
	copy(b[op.off:], op.data)
	return b
}

// TestPowerCut cuts power at random points of a random workload: every
// crash image must open (repairing a dirty one), show no corruption, and
// hold every byte acknowledged before the last completed Flush that was
// not written again since.
func TestPowerCut(t *testing.T) {
	total := 0
	for _, c := range []struct {
		cs   int
		lazy bool
	}{{4096, false}, {65536, false}, {65536, true}, {512, false}} {
		t.Run(fmt.Sprintf("cluster=%d,lazy=%v", c.cs, c.lazy), func(t *testing.T) {
			total += runPowerCuts(t, c.cs, c.lazy, scaledOps(400))
		})
	}
	t.Logf("%d cut points verified", total)
}

// powerCutRun is the state of one power-cut workload.
type powerCutRun struct {
	t       *testing.T
	rng     *rand.Rand
	img     *qcow2.Image
	cs      int64
	model   []byte // what reads must return now
	flushed []byte // the model at the last completed Flush
	touched []bool // per byte: written, zeroed or discarded since then
}

func runPowerCuts(t *testing.T, cs int, lazy bool, ops int) int {
	const size = 4 << 20
	cf := newCrashFile()
	img, err := qcow2.CreateFile(cf, qcow2.CreateOptions{Size: size, ClusterSize: cs, LazyRefcounts: lazy})
	if err != nil {
		t.Fatalf("CreateFile: %v", err)
	}
	defer img.Close()
	r := &powerCutRun{t: t, rng: newRand(t), img: img, cs: int64(cs),
		model: make([]byte, size), flushed: make([]byte, size), touched: make([]bool, size)}
	// Crash images taken inside an operation are checked against the state
	// before it: that operation's own writes are unacknowledged.
	var inside [][]byte
	cf.onSync = func() {
		if r.rng.IntN(3) == 0 {
			inside = append(inside, cf.crashImage(r.rng))
		}
	}
	cuts := 0
	for op := range ops {
		prevFlushed, prevTouched := bytes.Clone(r.flushed), slices.Clone(r.touched)
		r.step(op)
		for _, crash := range inside {
			r.verifyCrashAgainst(op, crash, prevFlushed, prevTouched)
		}
		cuts += len(inside)
		inside = inside[:0]
		if r.rng.IntN(2) == 0 {
			r.verifyCrashAgainst(op, cf.crashImage(r.rng), r.flushed, r.touched)
			cuts++
		}
	}
	cf.onSync = nil
	return cuts
}

func (r *powerCutRun) step(op int) {
	size := int64(len(r.model))
	n := 1 + r.rng.Int64N(3*r.cs)
	off := r.rng.Int64N(size - n + 1)
	var err error
	switch k := r.rng.IntN(10); {
	case k < 6:
		p := fill(r.rng, n)
		_, err = r.img.WriteAt(p, off)
		copy(r.model[off:], p)
	case k == 6:
		err = r.img.WriteZeroes(off, n, r.rng.IntN(2) == 0)
		clear(r.model[off : off+n])
	case k == 7:
		err = r.img.Discard(off, n)
		start, end := (off+r.cs-1)/r.cs*r.cs, (off+n)/r.cs*r.cs
		if start < end {
			clear(r.model[start:end])
		}
	default:
		err = r.img.Flush()
		copy(r.flushed, r.model)
		clear(r.touched)
		return
	}
	if err != nil {
		r.t.Fatalf("op %d: %v", op, err)
	}
	for i := off; i < off+n; i++ {
		r.touched[i] = true
	}
}

// verifyCrashAgainst opens a crash image: it must open (repairing a dirty
// one), check free of corruption, and hold every flushed byte not touched
// since.
func (r *powerCutRun) verifyCrashAgainst(op int, crash, flushed []byte, touched []bool) {
	t := r.t
	img, err := qcow2.OpenFile(newMemFile(crash), qcow2.OpenOptions{})
	if err != nil {
		t.Fatalf("after op %d: crash image does not open: %v", op, err)
	}
	defer img.Close()
	res, err := img.Check(qcow2.CheckOptions{})
	if err != nil || res.Corruptions != 0 || res.CheckErrors != 0 {
		t.Fatalf("after op %d: crash image is corrupt: %+v err=%v", op, res, err)
	}
	got := readAll(t, img)
	for i := range got {
		if !touched[i] && got[i] != flushed[i] {
			t.Fatalf("after op %d: flushed byte %#x lost: got %#x want %#x", op, i, got[i], flushed[i])
		}
	}
}
