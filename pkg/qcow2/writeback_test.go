package qcow2_test

import (
	"bytes"
	"slices"
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
	r := newPowerCutRun(t, cf, c)
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
