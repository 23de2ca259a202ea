package qcow2_test

import (
	"bytes"
	"slices"
	"syscall"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// TestWriteBackSurvivesKill runs the power-cut workload with WriteBack
// after every operation. After each one, the file as a killed process
// leaves it (every write it issued, synced or not) must open, check free
// of corruption and read back exactly what was written; power cuts at any
// point, inside WriteBack's syncs too, must still leave no corruption, lose
// no flushed byte and show no stale data (see TestPowerCut).
func TestWriteBackSurvivesKill(t *testing.T) {
	kills := 0
	for _, c := range powerCutConfigs {
		t.Run(c.String(), func(t *testing.T) {
			kills += runWriteBackKills(t, c, scaledOps(200))
		})
	}
	t.Logf("%d kill points verified", kills)
}

func runWriteBackKills(t *testing.T, c powerCutConfig, ops int) int {
	cf := newCrashFile()
	r := newPowerCutRun(t, cf, c, 0)
	defer r.img.Close()
	// Crash images taken inside an operation are checked against the
	// state before it, those taken inside the WriteBack after it against
	// the state after it: the operation completed.
	var inside [][]byte
	cf.onSync = func() {
		if r.rng.IntN(3) == 0 {
			inside = append(inside, cf.crashImage(r.rng))
		}
	}
	for op := range ops {
		prevFlushed, prevSince := r.flushed, r.since
		r.step(op)
		for _, crash := range inside {
			r.verifyCrashAgainst(op, crash, prevFlushed, append(slices.Clip(prevSince), r.cur...))
		}
		inside = inside[:0]
		if err := r.img.WriteBack(); err != nil {
			t.Fatalf("op %d: WriteBack: %v", op, err)
		}
		for _, crash := range inside {
			r.verifyCrashAgainst(op, crash, r.flushed, r.since)
		}
		inside = inside[:0]
		r.verifyKill(op, cf.memFile.bytes())
		if r.rng.IntN(2) == 0 {
			r.verifyCrashAgainst(op, cf.crashImage(r.rng), r.flushed, r.since)
		}
	}
	cf.onSync = nil
	return ops
}

// verifyKill opens the file a killed process left: it must check free of
// corruption (leaks allowed) and hold every completed write.
func (r *powerCutRun) verifyKill(op int, killed []byte) {
	t := r.t
	img, err := qcow2.OpenFile(newMemFile(killed), qcow2.OpenOptions{})
	if err != nil {
		t.Fatalf("after op %d: the killed process's image does not open: %v", op, err)
	}
	defer img.Close()
	res, err := img.Check(qcow2.CheckOptions{})
	if err != nil || res.Corruptions != 0 || res.CheckErrors != 0 {
		t.Fatalf("after op %d: the killed process's image is corrupt: %+v err=%v", op, res, err)
	}
	if got := readAll(t, img); !bytes.Equal(got, r.model) {
		t.Fatalf("after op %d: a completed write is missing from the killed process's image: %s", op, firstDiff(got, r.model))
	}
}

// punchOptionalFile counts fdatasyncs; noPunch makes hole punching fail,
// as on a filesystem without it.
type punchOptionalFile struct {
	syncCountingFile
	noPunch bool
}

func (f *punchOptionalFile) PunchHole(off, length int64) error {
	if f.noPunch {
		return syscall.EOPNOTSUPP
	}
	return f.memFile.PunchHole(off, length)
}

func (f *punchOptionalFile) syncCount() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return int64(f.syncs)
}

// TestWriteBackSyncs counts the fdatasyncs that 64 allocating writes, each
// followed by WriteBack, cost: on an image with lazy refcounts, writes
// over unallocated clusters need none but the occasional one that extends
// the file, and so do writes into clusters freed, punched and synced
// before; copy on write, reuse where the punch failed, and every
// allocating write without lazy refcounts take one each.
func TestWriteBackSyncs(t *testing.T) {
	const cs, n = 65536, 64
	for _, c := range []struct {
		name    string
		lazy    bool
		noPunch bool
		prepare func(t *testing.T, img *qcow2.Image)
		least   int64 // syncs the n writes must cost
		most    int64 // and may
	}{
		{name: "lazy, unallocated", lazy: true, most: 4},
		{name: "strict, unallocated", least: n, most: n + 2},
		{name: "lazy, zero clusters", lazy: true, prepare: zeroFirst, most: 4},
		// One more: a new L2 table replaces the shared one.
		{name: "lazy, copy on write", lazy: true, prepare: snapshotFirst, least: n, most: n + 2},
		// The first reuse syncs the punches the Flush before issued.
		{name: "lazy, reused clusters", lazy: true, prepare: discardFirst, most: 2},
		{name: "lazy, reused, punch unsupported", lazy: true, noPunch: true, prepare: discardFirst, least: n, most: n + 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := &punchOptionalFile{syncCountingFile: syncCountingFile{memFile: newMemFile(nil)}, noPunch: c.noPunch}
			img, err := qcow2.CreateFile(f, qcow2.CreateOptions{Size: 64 << 20, ClusterSize: cs, LazyRefcounts: c.lazy})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			// The L2 table exists before counting starts: a new one syncs.
			writeAndWriteBack(t, img, 32<<20, cs)
			if c.prepare != nil {
				c.prepare(t, img)
			}
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
			before := f.syncCount()
			want := make([]byte, n*cs)
			for i := range int64(n) {
				// Every other cluster, so no write runs into the next.
				p := writeAndWriteBack(t, img, 2*i*cs+cs/4, cs/2)
				copy(want[i*cs:], p)
			}
			syncs := f.syncCount() - before
			t.Logf("%d fdatasyncs for %d allocating writes", syncs, n)
			if syncs < c.least || syncs > c.most {
				t.Errorf("%d fdatasyncs for %d allocating writes, want %d to %d", syncs, n, c.least, c.most)
			}
			for i := range int64(n) {
				got := make([]byte, cs/2)
				if _, err := img.ReadAt(got, 2*i*cs+cs/4); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want[i*cs:i*cs+cs/2]) {
					t.Fatalf("write %d reads back wrong", i)
				}
			}
		})
	}
}

func writeAndWriteBack(t *testing.T, img *qcow2.Image, off, n int64) []byte {
	t.Helper()
	p := bytes.Repeat([]byte{byte(off>>16) | 1}, int(n))
	if _, err := img.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
	if err := img.WriteBack(); err != nil {
		t.Fatal(err)
	}
	return p
}

// zeroFirst makes the clusters the counted writes go to zero clusters.
func zeroFirst(t *testing.T, img *qcow2.Image) {
	if err := img.WriteZeroes(0, 16<<20, true); err != nil {
		t.Fatal(err)
	}
}

// snapshotFirst allocates the clusters the counted writes go to and shares
// them with a snapshot.
func snapshotFirst(t *testing.T, img *qcow2.Image) {
	for off := int64(0); off < 16<<20; off += 1 << 20 {
		writeAndWriteBack(t, img, off, 1<<20)
	}
	if _, err := img.CreateSnapshot("s"); err != nil {
		t.Fatal(err)
	}
}

// discardFirst allocates 16 MiB elsewhere and discards it; the Flush after
// frees and punches its clusters, which the counted writes reuse.
func discardFirst(t *testing.T, img *qcow2.Image) {
	for off := int64(16 << 20); off < 32<<20; off += 1 << 20 {
		writeAndWriteBack(t, img, off, 1<<20)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := img.Discard(16<<20, 16<<20); err != nil {
		t.Fatal(err)
	}
}
