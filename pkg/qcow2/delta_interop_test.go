package qcow2_test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// TestInteropSnapshotDelta judges SnapshotDelta against QEMU: random writes
// between two snapshots, made by qemu-io and qemu-img snapshot or by our
// engine. The delta must cover every byte in which qemu-img's exports of
// the two snapshots differ (base's export patched with target's bytes over
// the delta must compare identical to target's with qemu-img compare), and
// hold nothing qemu-img map shows unchanged: with each snapshot applied to
// a copy of the file (applying keeps host offsets), a cluster in the delta
// must map differently in the two copies.
func TestInteropSnapshotDelta(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	for _, maker := range []string{"qemu", "ours"} {
		t.Run(maker, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			rng := newRand(t)
			path := filepath.Join(dir, "d.qcow2")
			const size = 24<<20 + 3*cs4k // 12 L2 tables and a bit
			if maker == "qemu" {
				run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, fmt.Sprint(size))
				qemuIO(t, path, randomQemuIO(rng, size, 40))
				run(t, dir, "qemu-img", "snapshot", "-c", "base", path)
				qemuIO(t, path, randomQemuIO(rng, size, 150))
				run(t, dir, "qemu-img", "snapshot", "-c", "target", path)
				qemuIO(t, path, randomQemuIO(rng, size, 20))
			} else {
				img := mustCreate(t, path, qcow2.CreateOptions{Size: size, ClusterSize: cs4k})
				randomOurIO(t, rng, img, size, 40)
				mustSnapshot(t, img, "base")
				randomOurIO(t, rng, img, size, 150)
				mustSnapshot(t, img, "target")
				randomOurIO(t, rng, img, size, 20)
				if err := img.Close(); err != nil {
					t.Fatal(err)
				}
			}
			img := mustOpen(t, path, qcow2.OpenOptions{ReadOnly: true})
			delta, err := img.SnapshotDelta("base", "target", 0, size)
			img.Close()
			if err != nil {
				t.Fatal(err)
			}
			if len(delta) == 0 {
				t.Fatal("empty delta after random writes")
			}

			// Coverage, judged by qemu-img compare.
			base := qemuConvertRaw(t, path, "-l", "snapshot.name=base")
			target := qemuConvertRaw(t, path, "-l", "snapshot.name=target")
			for _, c := range delta {
				copy(base[c.Start:c.Start+c.Length], target[c.Start:c.Start+c.Length])
			}
			patched := filepath.Join(dir, "patched.raw")
			if err := os.WriteFile(patched, base, 0o600); err != nil {
				t.Fatal(err)
			}
			tpath := filepath.Join(dir, "target.raw")
			if err := os.WriteFile(tpath, target, 0o600); err != nil {
				t.Fatal(err)
			}
			if out, code := runCode(t, dir, "qemu-img", "compare", "-f", "raw", "-F", "raw", patched, tpath); code != 0 {
				t.Errorf("base patched with target over the delta differs from target: %s", out)
			}

			// Minimality, judged by qemu-img map of each snapshot applied.
			mb, mt := appliedMap(t, path, "base"), appliedMap(t, path, "target")
			changed := 0
			for k := int64(0); k*cs4k < size; k++ {
				a, b := mb.at(k*cs4k), mt.at(k*cs4k)
				inDelta := covered(delta, k*cs4k)
				if inDelta && a == b {
					t.Errorf("cluster %d is in the delta, but qemu-img map shows it unchanged (%+v)", k, a)
				}
				if !inDelta && a != b {
					t.Errorf("cluster %d maps %+v at base and %+v at target, but is not in the delta", k, a, b)
				}
				if a != b {
					changed++
				}
			}
			t.Logf("%d changes, %d of %d clusters", len(delta), changed, size/cs4k)
		})
	}
}

func qemuIO(t testing.TB, path string, cmds []string) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	run(t, filepath.Dir(path), "qemu-io", append(args, path)...)
}

// randomIO draws n operations on a disk of size bytes: kind 0 zeroes, 1
// discards, else writes, at 512-byte-aligned offsets (qemu-io's unit).
func randomIO(rng *rand.Rand, size int64, n int, op func(kind int, off, length int64)) {
	for range n {
		off := rng.Int64N(size/512) * 512
		length := min(size-off, 512*(1+rng.Int64N(40)))
		op(rng.IntN(6), off, length)
	}
}

func randomQemuIO(rng *rand.Rand, size int64, n int) []string {
	var cmds []string
	randomIO(rng, size, n, func(kind int, off, length int64) {
		switch kind {
		case 0:
			cmds = append(cmds, fmt.Sprintf("write -z %d %d", off, length))
		case 1:
			cmds = append(cmds, fmt.Sprintf("discard %d %d", off, length))
		default:
			cmds = append(cmds, fmt.Sprintf("write -P %d %d %d", 1+rng.IntN(255), off, length))
		}
	})
	return cmds
}

func randomOurIO(t testing.TB, rng *rand.Rand, img *qcow2.Image, size int64, n int) {
	t.Helper()
	randomIO(rng, size, n, func(kind int, off, length int64) {
		var err error
		switch kind {
		case 0:
			err = img.WriteZeroes(off, length, rng.IntN(2) == 0)
		case 1:
			err = img.Discard(off, length)
		default:
			_, err = img.WriteAt(fill(rng, length), off)
		}
		if err != nil {
			t.Fatalf("op %d at %d+%d: %v", kind, off, length, err)
		}
	})
}

func covered(delta []qcow2.Change, off int64) bool {
	for _, c := range delta {
		if off >= c.Start && off < c.Start+c.Length {
			return true
		}
	}
	return false
}

// mapCluster is what qemu-img map says of one cluster: two clusters read
// the same bytes if they agree (an offset only counts for data, so two
// zero clusters agree whatever their preallocation).
type mapCluster struct {
	Present, Zero, Data bool
	Offset              int64
}

// clusterMap is qemu-img map's entries.
type clusterMap []mapEntry

func (m clusterMap) at(off int64) mapCluster {
	for _, e := range m {
		if off >= e.Start && off < e.Start+e.Length {
			c := mapCluster{Present: e.Present, Zero: e.Zero, Data: e.Data}
			if e.Data && e.Offset != nil {
				c.Offset = *e.Offset + off - e.Start
			}
			return c
		}
	}
	return mapCluster{}
}

// appliedMap is qemu-img map of a copy of the image reverted to snapshot.
func appliedMap(t testing.TB, path, snapshot string) clusterMap {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cp := path + "." + snapshot + ".qcow2"
	if err := os.WriteFile(cp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(cp)
	run(t, filepath.Dir(cp), "qemu-img", "snapshot", "-a", snapshot, cp)
	return qemuMap(t, cp)
}
