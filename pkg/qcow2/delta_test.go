package qcow2_test

import (
	"bytes"
	"errors"
	"math"
	"path/filepath"
	"slices"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

const cs4k = 4096

type deltaOp func(t *testing.T, img *qcow2.Image)

func TestSnapshotDelta(t *testing.T) {
	write := func(off, n int64) deltaOp {
		return func(t *testing.T, img *qcow2.Image) {
			if _, err := img.WriteAt(bytes.Repeat([]byte{0xd1}, int(n)), off); err != nil {
				t.Fatal(err)
			}
		}
	}
	zero := func(off, n int64, unmap bool) deltaOp {
		return func(t *testing.T, img *qcow2.Image) {
			if err := img.WriteZeroes(off, n, unmap); err != nil {
				t.Fatal(err)
			}
		}
	}
	discard := func(off, n int64) deltaOp {
		return func(t *testing.T, img *qcow2.Image) {
			if err := img.Discard(off, n); err != nil {
				t.Fatal(err)
			}
		}
	}
	all := int64(math.MaxInt64)
	// Before base: data in clusters 0-3 and 600 (past the first L2 table's
	// 2 MiB with 4 KiB clusters).
	tests := []struct {
		name     string
		after    []deltaOp // between base and target
		off, len int64
		want     []qcow2.Change
	}{
		{"no writes", nil, 0, all, nil},
		{"one byte rounds to its cluster", []deltaOp{write(5*cs4k+7, 1)}, 0, all,
			[]qcow2.Change{{Start: 5 * cs4k, Length: cs4k}}},
		{"adjacent clusters merge", []deltaOp{write(cs4k-1, 2*cs4k)}, 0, all,
			[]qcow2.Change{{Start: 0, Length: 3 * cs4k}}},
		{"window clips", []deltaOp{write(cs4k-1, 2*cs4k)}, cs4k + 100, cs4k,
			[]qcow2.Change{{Start: cs4k + 100, Length: cs4k}}},
		{"window past the end", []deltaOp{write(0, 1)}, 8 << 20, all, nil},
		{"second L2 table", []deltaOp{write(700*cs4k, cs4k)}, 0, all,
			[]qcow2.Change{{Start: 700 * cs4k, Length: cs4k}}},
		{"zeroes are reported as such", []deltaOp{zero(cs4k, 2*cs4k, false), write(10*cs4k, 1)}, 0, all,
			[]qcow2.Change{{Start: cs4k, Length: 2 * cs4k, Zero: true}, {Start: 10 * cs4k, Length: cs4k}}},
		{"discarded data is a zero change", []deltaOp{discard(2*cs4k, cs4k)}, 0, all,
			[]qcow2.Change{{Start: 2 * cs4k, Length: cs4k, Zero: true}}},
		{"discarding nothing changes nothing", []deltaOp{discard(100*cs4k, cs4k)}, 0, all, nil},
		{"zeroing an unallocated cluster allocates a zero cluster", []deltaOp{zero(50*cs4k, cs4k, false)}, 0, all,
			[]qcow2.Change{{Start: 50 * cs4k, Length: cs4k, Zero: true}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			img := deltaImage(t, tc.after)
			got, err := img.SnapshotDelta("base", "target", tc.off, tc.len)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("SnapshotDelta = %+v, want %+v", got, tc.want)
			}
			// The reverse delta covers the same clusters.
			rev, err := img.SnapshotDelta("target", "base", tc.off, tc.len)
			if err != nil {
				t.Fatal(err)
			}
			if clustersOf(rev, 1) != clustersOf(got, 1) {
				t.Errorf("reverse delta %+v covers other bytes than %+v", rev, got)
			}
		})
	}
}

// deltaImage is an 8 MiB image of 4 KiB clusters with snapshot "base" of
// data at clusters 0-3 and 600, the ops applied, then snapshot "target",
// then more writes to the active layer (which no delta may see).
func deltaImage(t *testing.T, ops []deltaOp) *qcow2.Image {
	t.Helper()
	img := mustCreate(t, filepath.Join(t.TempDir(), "d.qcow2"), qcow2.CreateOptions{Size: 8 << 20, ClusterSize: cs4k})
	t.Cleanup(func() { img.Close() })
	mustWrite(t, img, bytes.Repeat([]byte{1}, 4*cs4k), 0)
	mustWrite(t, img, bytes.Repeat([]byte{2}, cs4k), 600*cs4k)
	if _, err := img.CreateSnapshot("base"); err != nil {
		t.Fatal(err)
	}
	for _, op := range ops {
		op(t, img)
	}
	if _, err := img.CreateSnapshot("target"); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, img, bytes.Repeat([]byte{3}, 64*cs4k), 0)
	return img
}

func mustWrite(t testing.TB, img *qcow2.Image, p []byte, off int64) {
	t.Helper()
	if _, err := img.WriteAt(p, off); err != nil {
		t.Fatalf("WriteAt(%d bytes at %d): %v", len(p), off, err)
	}
}

// clustersOf is the number of clusters of size cs the changes touch.
func clustersOf(ch []qcow2.Change, cs int64) int64 {
	var n int64
	for _, c := range ch {
		n += (c.Start+c.Length+cs-1)/cs - c.Start/cs
	}
	return n
}

func TestSnapshotAllocated(t *testing.T) {
	img := deltaImage(t, nil)
	if err := img.WriteZeroes(100*cs4k, cs4k, false); err != nil {
		t.Fatal(err)
	}
	if _, err := img.CreateSnapshot("z"); err != nil {
		t.Fatal(err)
	}
	got, err := img.SnapshotAllocated("z", 0, math.MaxInt64)
	if err != nil {
		t.Fatal(err)
	}
	// The active writes of deltaImage (64 clusters of 3s) are in z.
	want := []qcow2.Change{{Start: 0, Length: 64 * cs4k}, {Start: 100 * cs4k, Length: cs4k, Zero: true}, {Start: 600 * cs4k, Length: cs4k}}
	if !slices.Equal(got, want) {
		t.Errorf("SnapshotAllocated(z) = %+v, want %+v", got, want)
	}
	got, err = img.SnapshotAllocated("base", 2*cs4k, 599*cs4k)
	if err != nil {
		t.Fatal(err)
	}
	want = []qcow2.Change{{Start: 2 * cs4k, Length: 2 * cs4k}, {Start: 600 * cs4k, Length: cs4k}}
	if !slices.Equal(got, want) {
		t.Errorf("SnapshotAllocated(base, window) = %+v, want %+v", got, want)
	}
}

func TestSnapshotDeltaErrors(t *testing.T) {
	img := deltaImage(t, nil)
	for _, tc := range []struct {
		name         string
		base, target string
		off, len     int64
		want         error
	}{
		{"unknown base", "nope", "target", 0, 1, qcow2.ErrSnapshotNotFound},
		{"unknown target", "base", "nope", 0, 1, qcow2.ErrSnapshotNotFound},
		{"negative offset", "base", "target", -1, 1, qcow2.ErrInvalid},
		{"negative length", "base", "target", 0, -1, qcow2.ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := img.SnapshotDelta(tc.base, tc.target, tc.off, tc.len); !errors.Is(err, tc.want) {
				t.Errorf("SnapshotDelta: %v, want %v", err, tc.want)
			}
		})
	}
	if _, err := img.SnapshotAllocated("nope", 0, 1); !errors.Is(err, qcow2.ErrSnapshotNotFound) {
		t.Errorf("SnapshotAllocated(nope): %v", err)
	}
	// The walk's views are closed: the snapshots can be deleted.
	if err := img.DeleteSnapshot("base"); err != nil {
		t.Errorf("DeleteSnapshot after SnapshotDelta: %v", err)
	}
}

// TestSnapshotDeltaRandom: random writes, zeroes and discards between two
// snapshots; every cluster whose bytes differ is in the delta, and every
// cluster in it was touched after base.
func TestSnapshotDeltaRandom(t *testing.T) {
	rng := newRand(t)
	for round := range 4 {
		cs := int64(512) << (2 * round) // 512 B to 32 KiB
		size := 3<<20 + cs*int64(rng.IntN(7))
		img := mustCreate(t, filepath.Join(t.TempDir(), "r.qcow2"), qcow2.CreateOptions{Size: size, ClusterSize: int(cs)})
		mustWrite(t, img, fill(rng, size/2), size/4)
		mustSnapshot(t, img, "base")
		touched := map[int64]bool{}
		for range 60 {
			off := rng.Int64N(size)
			n := min(size-off, 1+rng.Int64N(4*cs))
			var err error
			switch rng.IntN(4) {
			case 0:
				err = img.WriteZeroes(off, n, rng.IntN(2) == 0)
			case 1:
				err = img.Discard(off, n)
			default:
				_, err = img.WriteAt(fill(rng, n), off)
			}
			if err != nil {
				t.Fatal(err)
			}
			for c := off / cs; c*cs < off+n; c++ {
				touched[c] = true
			}
		}
		if _, err := img.CreateSnapshot("target"); err != nil {
			t.Fatal(err)
		}
		delta, err := img.SnapshotDelta("base", "target", 0, size)
		if err != nil {
			t.Fatal(err)
		}
		in := map[int64]bool{}
		for _, c := range delta {
			for k := c.Start / cs; k*cs < c.Start+c.Length; k++ {
				in[k] = true
				if !touched[k] {
					t.Errorf("cs %d: cluster %d is in the delta but was not written after base", cs, k)
				}
			}
		}
		b, tg := viewBytes(t, img, "base"), viewBytes(t, img, "target")
		for k := int64(0); k*cs < size; k++ {
			hi := min(size, (k+1)*cs)
			if !bytes.Equal(b[k*cs:hi], tg[k*cs:hi]) && !in[k] {
				t.Errorf("cs %d: cluster %d differs but is not in the delta", cs, k)
			}
		}
		for _, c := range delta {
			if c.Zero && !allZero(tg[c.Start:c.Start+c.Length]) {
				t.Errorf("cs %d: change %+v is marked zero but the target has data there", cs, c)
			}
		}
		img.Close()
	}
}

// TestSnapshotDeltaWhileWriting: writes to the active layer (which copy
// the tables the snapshots share) do not change a delta computed at the
// same time.
func TestSnapshotDeltaWhileWriting(t *testing.T) {
	img := deltaImage(t, []deltaOp{func(t *testing.T, img *qcow2.Image) { mustWrite(t, img, []byte{9}, 700*cs4k) }})
	want, err := img.SnapshotDelta("base", "target", 0, math.MaxInt64)
	if err != nil {
		t.Fatal(err)
	}
	rng := newRand(t)
	done := make(chan error)
	go func() {
		var err error
		for i := 0; i < 300 && err == nil; i++ {
			_, err = img.WriteAt(fill(rng, cs4k), rng.Int64N(img.Size()/cs4k)*cs4k)
		}
		done <- err
	}()
	for range 50 {
		got, err := img.SnapshotDelta("base", "target", 0, math.MaxInt64)
		if err != nil || !slices.Equal(got, want) {
			t.Fatalf("SnapshotDelta during writes = %+v, %v; want %+v", got, err, want)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
