package qcow2_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// hostOp is one mutation of the host file, as the engine issued it.
type hostOp struct {
	punch    bool
	zero     bool // ZeroRange: like a punch, but it extends the file
	truncate bool // the file's new length is length
	off      int64
	data     []byte // write
	length   int64  // punch, zero, truncate
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

func (c *crashFile) Truncate(size int64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pending = append(c.pending, hostOp{truncate: true, length: size})
	return c.memFile.Truncate(size)
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
	if op.truncate {
		if op.length <= int64(len(b)) {
			return b[:op.length]
		}
		return append(b, make([]byte, op.length-int64(len(b)))...)
	}
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
// crash image must open (repairing a dirty one), show no corruption, hold
// every byte acknowledged before the last completed Flush that was not
// written again since, and read every byte written since either as it was
// at that Flush or as one of the writes since left it: never as data from
// elsewhere (a reused cluster's old contents, metadata).
//
// The workload writes whole and partial clusters (over data, zeros and
// unallocated clusters), writes zeros, discards (whose clusters are reused
// after the next Flush), takes and deletes snapshots (so that writes copy
// on write) and flushes. Small clusters with 64-bit refcounts make it add
// refcount blocks and move the refcount table.
func TestPowerCut(t *testing.T) {
	total := 0
	for _, c := range powerCutConfigs {
		t.Run(c.String(), func(t *testing.T) {
			total += runPowerCuts(t, c, scaledOps(400))
		})
	}
	t.Logf("%d cut points verified", total)
}

// powerCutConfig is the image a power-cut workload runs on.
type powerCutConfig struct {
	cs           int
	refcountBits int // 0: the default, 16
	lazy         bool
}

func (c powerCutConfig) String() string {
	return fmt.Sprintf("cluster=%d,refcount=%d,lazy=%v", c.cs, max(c.refcountBits, 16), c.lazy)
}

var powerCutConfigs = []powerCutConfig{
	{cs: 4096}, {cs: 65536}, {cs: 512},
	{cs: 65536, lazy: true}, {cs: 4096, lazy: true}, {cs: 512, refcountBits: 64, lazy: true},
}

// modelWrite is one change to the guest view since the last Flush: data,
// or zeros when data is nil.
type modelWrite struct {
	off, n int64
	data   []byte
}

func (w modelWrite) at(i int64) byte {
	if w.data == nil {
		return 0
	}
	return w.data[i-w.off]
}

// powerCutRun is the state of one power-cut workload.
type powerCutRun struct {
	t       *testing.T
	rng     *rand.Rand
	img     *qcow2.Image
	cs      int64
	model   []byte       // what reads must return now
	flushed []byte       // the model at the last completed Flush
	since   []modelWrite // every change since then, in order
	cur     []modelWrite // the change the operation under way makes
	snaps   []string     // internal snapshots, oldest first
}

// newPowerCutRun creates the image; a cacheSize other than 0 reopens it
// with that metadata cache size.
func newPowerCutRun(t *testing.T, cf *crashFile, c powerCutConfig, cacheSize int64) *powerCutRun {
	const size = 4 << 20
	img, err := qcow2.CreateFile(cf, qcow2.CreateOptions{Size: size, ClusterSize: c.cs,
		RefcountBits: c.refcountBits, LazyRefcounts: c.lazy})
	if err != nil {
		t.Fatalf("CreateFile: %v", err)
	}
	if cacheSize != 0 {
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
		if img, err = qcow2.OpenFile(cf, qcow2.OpenOptions{CacheSize: cacheSize}); err != nil {
			t.Fatal(err)
		}
	}
	return &powerCutRun{t: t, rng: newRand(t), img: img, cs: int64(c.cs),
		model: make([]byte, size), flushed: make([]byte, size)}
}

func runPowerCuts(t *testing.T, c powerCutConfig, ops int) int {
	cf := newCrashFile()
	// The smallest cache evicts dirty L2 slices (with 512-byte clusters),
	// which must keep the crash order as WriteBack does.
	r := newPowerCutRun(t, cf, c, 1)
	defer r.img.Close()
	// Crash images taken inside an operation are checked against the state
	// before it: that operation's own writes are unacknowledged, so they
	// may or may not show.
	var inside [][]byte
	cf.onSync = func() {
		if r.rng.IntN(3) == 0 {
			inside = append(inside, cf.crashImage(r.rng))
		}
	}
	cuts := 0
	for op := range ops {
		prevFlushed, prevSince := r.flushed, r.since
		r.step(op)
		for _, crash := range inside {
			r.verifyCrashAgainst(op, crash, prevFlushed, append(slices.Clip(prevSince), r.cur...))
		}
		cuts += len(inside)
		inside = inside[:0]
		if r.rng.IntN(2) == 0 {
			r.verifyCrashAgainst(op, cf.crashImage(r.rng), r.flushed, r.since)
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
	r.cur = nil
	var err error
	k := r.rng.IntN(11)
	if (k == 6 || k == 7) && r.rng.IntN(2) == 0 {
		// Zero or discard up to an eighth of the disk: the clusters freed
		// come back for reuse after the next Flush.
		n = 1 + r.rng.Int64N(size/8)
		off = r.rng.Int64N(size - n + 1)
	}
	switch {
	case k < 6:
		p := fill(r.rng, n)
		r.change(modelWrite{off: off, n: n, data: p})
		_, err = r.img.WriteAt(p, off)
	case k == 6:
		r.change(modelWrite{off: off, n: n})
		err = r.img.WriteZeroes(off, n, r.rng.IntN(2) == 0)
	case k == 7:
		start, end := (off+r.cs-1)/r.cs*r.cs, (off+n)/r.cs*r.cs
		if start < end {
			r.change(modelWrite{off: start, n: end - start})
		}
		err = r.img.Discard(off, n)
	case k == 8:
		err = r.snapshotStep(op)
	default:
		err = r.img.Flush()
		r.flushed, r.since = bytes.Clone(r.model), nil
	}
	if err != nil {
		r.t.Fatalf("op %d: %v", op, err)
	}
}

// change applies w to the model, as the operation about to run will.
func (r *powerCutRun) change(w modelWrite) {
	if w.data == nil {
		clear(r.model[w.off : w.off+w.n])
	} else {
		copy(r.model[w.off:], w.data)
	}
	r.cur = []modelWrite{w}
	r.since = append(r.since, w)
}

// snapshotStep takes a snapshot, or deletes the oldest once there are
// three: the guest view does not change, but every cluster allocated so far
// is shared (the next write to it copies on write) or freed again.
func (r *powerCutRun) snapshotStep(op int) error {
	if len(r.snaps) < 3 {
		name := fmt.Sprintf("s%d", op)
		r.snaps = append(r.snaps, name)
		_, err := r.img.CreateSnapshot(name)
		return err
	}
	name := r.snaps[0]
	r.snaps = r.snaps[1:]
	return r.img.DeleteSnapshot(name)
}

// verifyCrashAgainst opens a crash image: it must open (repairing a dirty
// one), check free of corruption once leaks are repaired, and read every
// byte as flushed, or as one of the writes since left it.
//
// A cut inside CreateSnapshot on an image without lazy refcounts (which
// nothing repairs at open) leaves its added references, durable before the
// snapshot table is, leaked; flags COPIED may already be cleared. Leaks are
// repaired first, and a COPIED flag missing on a cluster with refcount 1
// is accepted: the next write copies a cluster it could have written in
// place. A flag set on a shared cluster would not be.
func (r *powerCutRun) verifyCrashAgainst(op int, crash, flushed []byte, since []modelWrite) {
	t := r.t
	img, err := qcow2.OpenFile(newMemFile(crash), qcow2.OpenOptions{})
	if err != nil {
		t.Fatalf("after op %d: crash image does not open: %v", op, err)
	}
	defer img.Close()
	res, err := img.Check(qcow2.CheckOptions{Repair: qcow2.RepairLeaks})
	if err != nil || !onlyMissingCopied(res) || res.CheckErrors != 0 {
		t.Fatalf("after op %d: crash image is corrupt: %+v err=%v", op, res, err)
	}
	if i, ok := firstUnexplained(readAll(t, img), flushed, since); !ok {
		t.Fatalf("after op %d: %s", op, i)
	}
}

// firstUnexplained finds the first byte of got that is neither as flushed
// nor as any write in since left it, and describes it.
func firstUnexplained(got, flushed []byte, since []modelWrite) (string, bool) {
	ok := make([]bool, len(got))
	for i := range got {
		ok[i] = got[i] == flushed[i]
	}
	touched := make([]bool, len(got))
	for _, w := range since {
		for i := w.off; i < w.off+w.n; i++ {
			touched[i] = true
			ok[i] = ok[i] || got[i] == w.at(i)
		}
	}
	for i := range got {
		if ok[i] {
			continue
		}
		j := i
		for j < len(got) && !ok[j] {
			j++
		}
		if !touched[i] {
			return fmt.Sprintf("flushed byte %#x lost (%d bytes from there): got %#x want %#x", i, j-i, got[i], flushed[i]), false
		}
		return fmt.Sprintf("byte %#x written since the last flush reads neither as flushed (%#x) nor as any write since "+
			"left it (%d bytes from there, got %#x)", i, flushed[i], j-i, got[i]), false
	}
	return "", true
}

// onlyMissingCopied reports whether every corruption a check found is a
// COPIED flag missing where the refcount is 1.
func onlyMissingCopied(res *qcow2.CheckResult) bool {
	var n int64
	for _, p := range res.Problems {
		if strings.HasPrefix(p, "ERROR OFLAG_COPIED ") && strings.HasSuffix(p, " refcount=1") && !copiedSet(p) {
			n++
		}
	}
	return n == res.Corruptions
}

// copiedSet reads the COPIED bit of the entry an OFLAG_COPIED problem names.
func copiedSet(problem string) bool {
	for _, f := range strings.Fields(problem) {
		k, v, ok := strings.Cut(f, "=")
		if ok && (k == "l1_entry" || k == "l2_entry") {
			e, err := strconv.ParseUint(v, 16, 64)
			return err != nil || e&(1<<63) != 0
		}
	}
	return true
}
