package qcow2_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// TestLazyLinkCrashes scripts the cases lazy links must get right
// (lazylink.go) and checks every file a power cut could leave after the
// last write and its WriteBack: each subset of the host writes since the
// last sync, in issue order and reversed (or 4096 random ones when there
// are too many). Each must open, check free of corruption and read every
// byte as flushed or as a write since left it. Removing any of the rules
// in lazylink.go fails a case: the one over data (copy on write), the one
// against reusing a cluster whose punch is not yet durable, or the durable
// extension of the file.
func TestLazyLinkCrashes(t *testing.T) {
	type script func(r *powerCutRun, cs int64)
	const g1, g2 = 0, 1 << 20 // guest offsets
	scripts := []struct {
		name string
		run  script
	}{
		{"partial write over unallocated", func(r *powerCutRun, cs int64) {
			r.write(g2+100, cs/2)
		}},
		{"whole cluster over unallocated", func(r *powerCutRun, cs int64) {
			r.write(g2, cs)
		}},
		{"over a zero cluster", func(r *powerCutRun, cs int64) {
			r.write(g1, cs)
			r.flush()
			r.zero(g1, cs)
			r.write(g1+100, cs/2)
		}},
		{"reusing a discarded cluster", func(r *powerCutRun, cs int64) {
			r.write(g1, cs)
			r.flush()
			r.discard(g1, cs)
			r.flush() // frees and punches the cluster, not yet durably
			r.write(g2+100, cs/2)
		}},
		{"reusing a cluster a deleted snapshot freed", func(r *powerCutRun, cs int64) {
			r.write(g1, cs)
			r.snapshot("s")
			r.write(g1, cs)
			r.flush()
			r.deleteSnapshot("s") // punches and syncs
			r.write(g2+100, cs/2)
		}},
		{"copy on write after a snapshot", func(r *powerCutRun, cs int64) {
			r.write(g1, 2*cs)
			r.flush()
			r.snapshot("s")
			r.write(g1+100, cs/2)
			r.write(g1+cs, cs)
		}},
		{"many clusters, new refcount blocks", func(r *powerCutRun, cs int64) {
			r.write(g2+100, min(96*cs, 2<<20))
		}},
	}
	for _, c := range []powerCutConfig{
		{cs: 65536, lazy: true}, {cs: 4096, lazy: true}, {cs: 512, refcountBits: 64, lazy: true},
	} {
		for _, s := range scripts {
			t.Run(c.String()+"/"+s.name, func(t *testing.T) {
				cf := newCrashFile()
				r := newPowerCutRun(t, cf, c, 0)
				defer r.img.Close()
				// The L2 tables exist and are durable: a new one syncs.
				r.write(g1+min(48*r.cs, 2<<20), 1)
				r.write(g2+min(48*r.cs, 2<<20), 1)
				r.flush()
				s.run(r, r.cs)
				n := cf.eachCrashImage(r.rng, func(crash []byte) {
					r.verifyCrashAgainst(0, crash, r.flushed, r.since)
				})
				t.Logf("%d crash images", n)
			})
		}
	}
}

// eachCrashImage calls fn with every file a power cut could leave now (see
// TestLazyLinkCrashes) and returns how many.
func (c *crashFile) eachCrashImage(rng *rand.Rand, fn func([]byte)) int {
	c.mu.Lock()
	durable, pending := c.durable, c.pending
	c.mu.Unlock()
	if len(pending) > 11 {
		for range 4096 {
			fn(c.crashImage(rng))
		}
		return 4096
	}
	n := 0
	for mask := range 1 << len(pending) {
		for _, reverse := range []bool{false, true} {
			img := append([]byte(nil), durable...)
			for i := range pending {
				j := i
				if reverse {
					j = len(pending) - 1 - i
				}
				if mask&(1<<j) != 0 {
					img = applyHostOp(img, pending[j])
				}
			}
			fn(img)
			n++
		}
	}
	return n
}

// Scripted operations on a powerCutRun, each followed by WriteBack as the
// driver's write path does.

func (r *powerCutRun) write(off, n int64) {
	p := fill(r.rng, n)
	r.change(modelWrite{off: off, n: n, data: p})
	if _, err := r.img.WriteAt(p, off); err != nil {
		r.t.Fatal(err)
	}
	r.writeBack()
}

func (r *powerCutRun) zero(off, n int64) {
	r.change(modelWrite{off: off, n: n})
	if err := r.img.WriteZeroes(off, n, true); err != nil {
		r.t.Fatal(err)
	}
	r.writeBack()
}

func (r *powerCutRun) discard(off, n int64) {
	r.change(modelWrite{off: off, n: n})
	if err := r.img.Discard(off, n); err != nil {
		r.t.Fatal(err)
	}
	r.writeBack()
}

func (r *powerCutRun) flush() {
	if err := r.img.Flush(); err != nil {
		r.t.Fatal(err)
	}
	r.flushed, r.since = append([]byte(nil), r.model...), nil
}

func (r *powerCutRun) snapshot(name string) {
	if _, err := r.img.CreateSnapshot(name); err != nil {
		r.t.Fatal(err)
	}
}

func (r *powerCutRun) deleteSnapshot(name string) {
	if err := r.img.DeleteSnapshot(name); err != nil {
		r.t.Fatal(err)
	}
}

func (r *powerCutRun) writeBack() {
	if err := r.img.WriteBack(); err != nil {
		r.t.Fatal(fmt.Errorf("WriteBack: %w", err))
	}
}

// TestExtensionSyncFailureIsSticky: the fdatasync that makes a lazy
// extension of the file durable runs outside the metadata lock, and its
// failure is as sticky as any. A write whose clusters lie past the durable
// length until then links strictly, so WriteBack fails with ErrSyncFailed,
// and so does every Flush, even once the fault clears.
func TestExtensionSyncFailureIsSticky(t *testing.T) {
	const cs = 65536
	f := &syncFaultFile{memFile: newMemFile(nil)}
	img, err := qcow2.CreateFile(f, qcow2.CreateOptions{Size: 64 << 20, ClusterSize: cs, LazyRefcounts: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	// The L2 table exists, the file was extended by 1 MiB past its end.
	if _, err := img.WriteAt([]byte{1}, 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	f.setFailing(true)
	syncs := f.syncCount()
	if _, err := img.WriteAt(make([]byte, 2<<20), 4<<20); err != nil { // 2 MiB of new clusters
		t.Fatalf("WriteAt: %v", err)
	}
	if f.syncCount() == syncs {
		t.Fatal("2 MiB of new clusters did not extend the file")
	}
	f.setFailing(false)
	if err := img.WriteBack(); !errors.Is(err, qcow2.ErrSyncFailed) {
		t.Fatalf("WriteBack after the extension's fdatasync failed: %v, want ErrSyncFailed", err)
	}
	if err := img.Flush(); !errors.Is(err, qcow2.ErrSyncFailed) {
		t.Fatalf("Flush after the extension's fdatasync failed: %v, want ErrSyncFailed", err)
	}
}

// TestReopenTrimsExtensionAfterCrash: a file extended ahead of lazy links
// and never closed (a killed driver) keeps its free tail only until the
// next writable open, which trims it after the dirty image's repair; the
// data and both checkers stay as they were.
func TestReopenTrimsExtensionAfterCrash(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "live.qcow2")
	img := mustCreate(t, path, qcow2.CreateOptions{Size: 1 << 30, LazyRefcounts: true})
	defer img.Close()
	rng := newRand(t)
	data := fill(rng, 3<<20)
	if _, err := img.WriteAt(data, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	// The file as a power cut now would leave it: everything is durable.
	crashed, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	crash := filepath.Join(dir, "crash.qcow2")
	if err := os.WriteFile(crash, crashed, 0o600); err != nil {
		t.Fatal(err)
	}
	used := allocatedEnd(t, crash)
	if int64(len(crashed)) <= used {
		t.Fatalf("the crashed file (%d bytes) is not extended past its last used cluster (%d): the test proves nothing", len(crashed), used)
	}

	again := mustOpen(t, crash, qcow2.OpenOptions{})
	got := make([]byte, len(data))
	if _, err := again.ReadAt(got, 1<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("data after reopen: %s", firstDiff(got, data))
	}
	st, err := os.Stat(crash)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != used {
		t.Errorf("after a writable reopen the file is %d bytes, want %d (its last used cluster's end; %d before)", st.Size(), used, len(crashed))
	}
	r, err := again.Check(qcow2.CheckOptions{})
	requireClean(t, "our check after the trim", r, err)
	if err := again.Close(); err != nil {
		t.Fatal(err)
	}
	if haveQemu(t) {
		requireQemuClean(t, crash)
	}
}

// allocatedEnd is the end of the last cluster with a nonzero refcount, as
// qemu-img check's "Image end offset" would report it, computed by our
// read-only checker.
func allocatedEnd(t *testing.T, path string) int64 {
	t.Helper()
	img := mustOpen(t, path, qcow2.OpenOptions{ReadOnly: true})
	defer img.Close()
	r, err := img.Check(qcow2.CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return r.ImageEndOffset
}
