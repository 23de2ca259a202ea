package qcow2_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Interop tests: QEMU is the oracle. Images we write must pass qemu-img
// check and read identically in QEMU; images QEMU writes must read
// identically in ours and stay valid after we write to them.

// requireSameCheck fails unless our check report agrees with qemu-img's on
// every count both produce.
func requireSameCheck(t testing.TB, what string, ours *qcow2.CheckResult, q qemuCheckResult) {
	t.Helper()
	fields := []struct {
		name       string
		ours, qemu int64
	}{
		{"corruptions", ours.Corruptions, q.Corruptions},
		{"leaks", ours.Leaks, q.Leaks},
		{"check-errors", ours.CheckErrors, q.CheckErrors},
		{"corruptions-fixed", ours.CorruptionsFixed, q.CorruptionsFixed},
		{"leaks-fixed", ours.LeaksFixed, q.LeaksFixed},
		{"image-end-offset", ours.ImageEndOffset, q.ImageEndOffset},
		{"total-clusters", ours.TotalClusters, q.TotalClusters},
		{"allocated-clusters", ours.AllocatedClusters, q.AllocatedClusters},
		{"fragmented-clusters", ours.FragmentedClusters, q.FragmentedClusters},
		{"compressed-clusters", ours.CompressedClusters, q.CompressedClusters},
	}
	for _, f := range fields {
		if f.ours != f.qemu {
			t.Errorf("%s: our check says %s=%d, qemu-img check says %d (our problems: %q)",
				what, f.name, f.ours, f.qemu, firstN(ours.Problems, 10))
		}
	}
}

// requireInfoMatches compares our Info with qemu-img info.
func requireInfoMatches(t testing.TB, path string, info qcow2.Info) {
	t.Helper()
	q := qemuImgInfo(t, path)
	d := q.FormatSpecific.Data
	if info.VirtualSize != q.VirtualSize || info.ClusterSize != q.ClusterSize || info.RefcountBits != d.RefcountBits ||
		info.Compat != d.Compat || info.LazyRefcounts != d.LazyRefcounts {
		t.Errorf("Info() = {size %d cluster %d refcount bits %d compat %q lazy %v}, qemu-img info = %+v",
			info.VirtualSize, info.ClusterSize, info.RefcountBits, info.Compat, info.LazyRefcounts, q)
	}
}

type ourConfig struct {
	clusterSize, refcountBits int
	lazy                      bool
	size                      int64
}

func (c ourConfig) String() string {
	return fmt.Sprintf("cluster=%d/refcount=%d/lazy=%v", c.clusterSize, c.refcountBits, c.lazy)
}

func TestInteropOurImagesPassQemuCheck(t *testing.T) {
	requireTool(t, "qemu-img")
	configs := []ourConfig{
		{clusterSize: 512, refcountBits: 1, size: 3<<20 + 1536},
		{clusterSize: 512, refcountBits: 16, lazy: true, size: 3<<20 + 512},
		{clusterSize: 512, refcountBits: 64, size: 2 << 20},
		{clusterSize: 4096, refcountBits: 64, size: 8<<20 + 1024},
		{clusterSize: 65536, refcountBits: 16, size: 16<<20 + 1536},
		{clusterSize: 65536, refcountBits: 1, lazy: true, size: 16 << 20},
		{clusterSize: 2 << 20, refcountBits: 16, size: 16<<20 + 1536},
		{clusterSize: 2 << 20, refcountBits: 64, lazy: true, size: 12 << 20},
	}
	for _, c := range configs {
		t.Run(c.String(), func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), "ours.qcow2")
			img := mustCreate(t, path, qcow2.CreateOptions{Size: c.size, ClusterSize: c.clusterSize,
				RefcountBits: c.refcountBits, LazyRefcounts: c.lazy})
			h := newHarness(t, newRand(t), img, path, make([]byte, c.size))
			scriptedOps(t, h)
			for range 300 {
				h.step(defaultMix)
			}
			h.verifyAll()
			if err := h.img.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			q := requireQemuClean(t, path)
			ours, err := qcow2.CheckFile(path, qcow2.CheckOptions{})
			requireClean(t, "CheckFile", ours, err)
			requireSameCheck(t, "after writing", ours, q)
			qi := qemuImgInfo(t, path)
			d := qi.FormatSpecific.Data
			if qi.VirtualSize != h.size() || qi.ClusterSize != c.clusterSize || d.RefcountBits != c.refcountBits ||
				d.Compat != "1.1" || d.LazyRefcounts != c.lazy || qi.DirtyFlag || d.Corrupt {
				t.Errorf("qemu-img info = %+v, want size %d cluster %d refcount bits %d compat 1.1 lazy %v, clean",
					qi, h.size(), c.clusterSize, c.refcountBits, c.lazy)
			}
			qemuCompare(t, path, h.m)
		})
	}
}

// scriptedOps covers the cases random ranges hit rarely: both image ends,
// every zeroing mode, growing, refusing to shrink over data, and shrinking
// once the data beyond the new end is discarded.
func scriptedOps(t *testing.T, h *harness) {
	t.Helper()
	cs, size := h.cs, h.size()
	h.write(0, fill(h.rng, 3*cs/2))
	h.write(size-700, fill(h.rng, 700))
	h.write(cs-100, fill(h.rng, 200))
	h.writeZeroes(0, cs/2, false)
	h.writeZeroes(cs/2, cs, true)
	h.write(2*cs, fill(h.rng, 2*cs))
	h.discard(2*cs+1, 2*cs) // partial clusters: untouched
	h.discard(2*cs, 2*cs)
	h.writeZeroes(size-cs/2, cs/2, true)
	h.read(0, 4*cs)

	aligned := (size + cs - 1) / cs * cs
	h.resize(aligned + 3*cs)
	h.read(size-cs, 4*cs+cs/2)
	h.write(aligned+cs, fill(h.rng, cs+1))
	if err := h.img.Resize(aligned); !errors.Is(err, qcow2.ErrShrink) {
		t.Fatalf("Resize(%d) over allocated data: err=%v, want ErrShrink", aligned, err)
	}
	if got := h.img.Size(); got != aligned+3*cs {
		t.Fatalf("Size() after a refused shrink = %d, want %d", got, aligned+3*cs)
	}
	h.discard(aligned, 3*cs)
	h.resize(aligned)
	h.verifyAll()
}

// qemuImage describes an image made by qemu-img create and written by qemu-io.
type qemuImage struct {
	name   string
	opts   string
	size   string
	qemuIO []string
}

// qemuWrites exercises data, zero (with and without unmap) and discard
// writes, unaligned ranges and the last cluster of a 16 MiB + 1.5 KiB image.
var qemuWrites = []string{
	"write -P 0xab 0 1M",
	"write -P 0xcd 1000 5000",
	"write -z 4M 1M",
	"write -P 0x11 6M 1M",
	"write -z -u 6M 64k",
	"discard 8M 64k",
	"write -P 0x22 9M 300k",
	"discard 9M 2M",
	"write -P 0x33 12M 2M",
	"write -z 13M 4096",
	"write -P 0x44 16777216 1536",
}

var qemuImages = []qemuImage{
	{name: "cluster512-refcount1", opts: "cluster_size=512,refcount_bits=1"},
	{name: "cluster2M", opts: "cluster_size=2M"},
	{name: "cluster2M-refcount64-lazy", opts: "cluster_size=2M,refcount_bits=64,lazy_refcounts=on"},
	{name: "compat010", opts: "compat=0.10"},
	{name: "compat010-cluster4k", opts: "compat=0.10,cluster_size=4096"},
	{name: "lazy", opts: "lazy_refcounts=on"},
	{name: "prealloc-metadata", opts: "preallocation=metadata"},
	{name: "prealloc-metadata-cluster4k-refcount64", opts: "preallocation=metadata,cluster_size=4096,refcount_bits=64"},
	{name: "prealloc-full-cluster512", opts: "preallocation=full,cluster_size=512,refcount_bits=8"},
	{name: "empty-cluster512-refcount2", opts: "cluster_size=512,refcount_bits=2", qemuIO: []string{}},
	// Compressed clusters (zlib) are read and overwritten, not written.
	{name: "compressed-zlib", opts: "cluster_size=65536", qemuIO: []string{
		"write -c -P 0x55 0 1M", "write -c -P 0x66 2M 64k", "write -P 0x77 4M 64k", "write -c -z 5M 64k"}},
	{name: "compressed-zlib-cluster4k", opts: "cluster_size=4096,refcount_bits=4", qemuIO: []string{
		"write -c -P 0x55 0 256k", "write -c -P 0x66 1M 4k", "discard 64k 8k"}},
}

// makeQemuImage creates the image with QEMU's tools and returns its path.
func makeQemuImage(t testing.TB, dir string, q qemuImage) string {
	t.Helper()
	path := filepath.Join(dir, q.name+".qcow2")
	size := q.size
	if size == "" {
		size = fmt.Sprint(16<<20 + 1536)
	}
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", q.opts, path, size)
	cmds := q.qemuIO
	if cmds == nil {
		cmds = qemuWrites
	}
	if len(cmds) > 0 {
		args := []string{"-f", "qcow2"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		run(t, dir, "qemu-io", append(args, path)...)
	}
	return path
}

func TestInteropQemuImagesReadIdentically(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	for _, q := range qemuImages {
		t.Run(q.name, func(t *testing.T) {
			t.Parallel()
			path := makeQemuImage(t, t.TempDir(), q)
			want := qemuConvertRaw(t, path)
			before, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}

			ro := mustOpen(t, path, qcow2.OpenOptions{ReadOnly: true})
			requireInfoMatches(t, path, ro.Info())
			if got := readAll(t, ro); !bytes.Equal(got, want) {
				t.Fatalf("our read differs from qemu-img convert: %s", firstDiff(got, want))
			}
			ours, err := ro.Check(qcow2.CheckOptions{})
			requireClean(t, "Check", ours, err)
			requireSameCheck(t, "qemu's image", ours, qemuCheck(t, path))
			if _, err := ro.WriteAt([]byte{1}, 0); !errors.Is(err, qcow2.ErrReadOnly) {
				t.Errorf("WriteAt on a read-only image: err=%v, want ErrReadOnly", err)
			}
			if err := ro.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
				t.Fatalf("a read-only open changed the file: %s", firstDiff(after, before))
			}

			img := mustOpen(t, path, qcow2.OpenOptions{})
			h := newHarness(t, newRand(t), img, path, want)
			for range 250 {
				h.step(defaultMix)
			}
			h.verifyAll()
			if err := h.img.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			requireQemuClean(t, path)
			qemuCompare(t, path, h.m)
			qb, qa := qemuInfoOf(t, before), qemuImgInfo(t, path)
			if qa.FormatSpecific.Data != qb.FormatSpecific.Data || qa.ClusterSize != qb.ClusterSize || qa.DirtyFlag {
				t.Errorf("format changed by our writes: before %+v, after %+v", qb, qa)
			}
		})
	}
}

// qemuInfoOf runs qemu-img info on a copy of an image's bytes.
func qemuInfoOf(t testing.TB, b []byte) qemuInfo {
	t.Helper()
	p := filepath.Join(t.TempDir(), "copy.qcow2")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return qemuImgInfo(t, p)
}

// TestInteropQemuSnapshots opens images with internal snapshots: they must
// check clean, read as QEMU reads them, and our writes must copy shared
// clusters instead of changing the snapshots' data.
func TestInteropQemuSnapshots(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	for _, opts := range []string{"cluster_size=65536", "cluster_size=512,refcount_bits=4", "compat=0.10,cluster_size=4096"} {
		t.Run(opts, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := makeQemuImage(t, dir, qemuImage{name: "snap", opts: opts, size: "4M", qemuIO: []string{
				"write -P 0xa1 0 1M", "write -P 0xa2 2M 512k"}})
			run(t, dir, "qemu-img", "snapshot", "-c", "s1", path)
			run(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 0xb1 512k 1M", "-c", "discard 2M 64k", path)
			run(t, dir, "qemu-img", "snapshot", "-c", "s2", path)
			run(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -z 0 64k", "-c", "write -P 0xc1 3M 4k", path)
			s1 := qemuConvertRaw(t, path, "-l", "snapshot.name=s1")
			s2 := qemuConvertRaw(t, path, "-l", "snapshot.name=s2")
			want := qemuConvertRaw(t, path)

			img := mustOpen(t, path, qcow2.OpenOptions{})
			ours, err := img.Check(qcow2.CheckOptions{})
			requireClean(t, "Check", ours, err)
			requireSameCheck(t, "image with snapshots", ours, qemuCheck(t, path))
			var names []string
			for _, s := range img.Info().Snapshots {
				names = append(names, s.Name)
			}
			if !slices.Equal(names, []string{"s1", "s2"}) {
				t.Errorf("Info().Snapshots names = %q, want [s1 s2]", names)
			}
			h := newHarness(t, newRand(t), img, path, want)
			h.write(0, fill(h.rng, 2<<20)) // every cluster shared with s1 or s2
			h.writeZeroes(2<<20, 1<<20, true)
			h.discard(512<<10, 256<<10)
			for range 200 {
				h.step(defaultMix)
			}
			if err := h.img.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			requireQemuClean(t, path)
			qemuCompare(t, path, h.m)
			for name, data := range map[string][]byte{"s1": s1, "s2": s2} {
				// qemu-img converts a snapshot at the active layer's size (we
				// may have grown it); past the snapshot's own size it reads zeros.
				got := qemuConvertRaw(t, path, "-l", "snapshot.name="+name)
				if len(got) < len(data) || !bytes.Equal(got[:len(data)], data) || !allZero(got[len(data):]) {
					t.Errorf("snapshot %s changed by writes to the active layer: %s", name, firstDiff(got, data))
				}
			}
		})
	}
}

// TestInteropDirtyImageRepairedOnOpen: an image with lazy refcounts that was
// not closed carries the dirty bit and stale refcounts; Open must rebuild
// them so that after Close qemu-img check is clean and the data is intact.
func TestInteropDirtyImageRepairedOnOpen(t *testing.T) {
	requireTool(t, "qemu-img")
	t.Run("ours", func(t *testing.T) {
		dir := t.TempDir()
		path := filepath.Join(dir, "ours.qcow2")
		img := mustCreate(t, path, qcow2.CreateOptions{Size: 8 << 20, ClusterSize: 4096, LazyRefcounts: true})
		h := newHarness(t, newRand(t), img, path, make([]byte, 8<<20))
		for range 200 {
			h.step(opMix{write: 10, zero: 2, zeroUnmap: 2, discard: 2})
		}
		h.flush()
		crashed := filepath.Join(dir, "crashed.qcow2")
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(crashed, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := img.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		if !qemuImgInfo(t, crashed).DirtyFlag {
			t.Fatalf("an image with lazy refcounts open for writing after Flush is not marked dirty")
		}
		// Before repair both checkers must see the same stale refcounts.
		ours, err := qcow2.CheckFile(crashed, qcow2.CheckOptions{})
		if err != nil {
			t.Fatalf("CheckFile on the dirty image: %v", err)
		}
		requireSameCheck(t, "dirty image", ours, qemuCheck(t, crashed))
		repairedOnOpen(t, crashed, h.m)
	})
	t.Run("qemu-io-abort", func(t *testing.T) {
		requireTool(t, "qemu-io")
		dir := t.TempDir()
		path := filepath.Join(dir, "qemu.qcow2")
		run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", path, "8M")
		out, code := runCode(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 3000 70000",
			"-c", "write -z 2M 8k", "-c", "write -P 0xef 8384512 4096", "-c", "flush", "-c", "abort", path)
		if code == 0 {
			t.Fatalf("qemu-io abort exited 0:\n%s", out)
		}
		want := make([]byte, 8<<20)
		copy(want, bytes.Repeat([]byte{0xab}, 1<<20))
		copy(want[3000:], bytes.Repeat([]byte{0xcd}, 70000))
		copy(want[8384512:], bytes.Repeat([]byte{0xef}, 4096))
		if !qemuImgInfo(t, path).DirtyFlag {
			t.Fatalf("qemu-io abort left a clean image; the test needs a dirty one")
		}
		repairedOnOpen(t, path, want)
	})
	t.Run("stale-refcounts", func(t *testing.T) {
		// What a crash with lazy refcounts can leave: L2 entries whose
		// clusters' refcounts never reached the disk, and refcounts of
		// clusters whose L2 entries never did.
		requireTool(t, "qemu-io")
		dir := t.TempDir()
		path := makeQemuImage(t, dir, qemuImage{name: "stale", opts: "lazy_refcounts=on,cluster_size=4096", size: "8M",
			qemuIO: []string{"write -P 0xab 0 1M", "write -P 0xcd 5M 100k"}})
		want := qemuConvertRaw(t, path)
		r := loadRaw(t, path)
		r.b[79] |= 1 // incompatible features: dirty
		for g := int64(0); g < 8; g++ {
			r.setRefcount(r.dataCluster(g), 0)
		}
		r.leakClusters(3)
		r.save()
		if q := qemuCheck(t, path); q.Corruptions == 0 || q.Leaks == 0 {
			t.Fatalf("injected stale refcounts not seen by qemu-img check: %+v", q)
		}
		repairedOnOpen(t, path, want)
	})
}

func repairedOnOpen(t *testing.T, path string, want []byte) {
	t.Helper()
	img := mustOpen(t, path, qcow2.OpenOptions{})
	if got := readAll(t, img); !bytes.Equal(got, want) {
		t.Errorf("dirty image reads differently after repair: %s", firstDiff(got, want))
	}
	r, err := img.Check(qcow2.CheckOptions{})
	requireClean(t, "Check after the repair on open", r, err)
	if err := img.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	requireQemuClean(t, path)
	if qemuImgInfo(t, path).DirtyFlag {
		t.Errorf("dirty flag still set after Open and Close")
	}
	qemuCompare(t, path, want)
}

// TestInteropCheckAgreesOnInjectedDamage edits refcounts and L2 entries of a
// qemu-made image and requires our checker to count what qemu-img check
// counts, and our repair to leave an image qemu-img check finds clean with
// the guest data unchanged.
func TestInteropCheckAgreesOnInjectedDamage(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	leak := func(n int) func(r *rawImage) {
		return func(r *rawImage) { r.leakClusters(n) }
	}
	cases := []damage{
		{name: "one-leak", opts: "cluster_size=65536", inject: leak(1), repair: qcow2.RepairLeaks},
		{name: "leaks-refcount1", opts: "cluster_size=512,refcount_bits=1", inject: leak(5), repair: qcow2.RepairLeaks},
		{name: "leaks-refcount64", opts: "cluster_size=4096,refcount_bits=64", inject: leak(3), repair: qcow2.RepairLeaks},
		{name: "leaks-v2", opts: "compat=0.10", inject: leak(2), repair: qcow2.RepairLeaks},
		{name: "refcount-too-high", opts: "cluster_size=4096", repair: qcow2.RepairAll, inject: func(r *rawImage) {
			k := r.dataCluster(0)
			r.setRefcount(k, r.refcount(k)+1)
		}},
		{name: "refcount-zero", opts: "cluster_size=4096", repair: qcow2.RepairAll, inject: func(r *rawImage) {
			r.setRefcount(r.dataCluster(1), 0)
		}},
		{name: "l1-table-refcount-zero", opts: "cluster_size=512,refcount_bits=16", repair: qcow2.RepairAll, inject: func(r *rawImage) {
			r.setRefcount(r.l1Offset()>>r.clusterBits(), 0)
		}},
		{name: "cluster-referenced-twice", opts: "cluster_size=4096", repair: qcow2.RepairAll, inject: func(r *rawImage) {
			// Guest cluster 3 (all 0xab) now shares guest cluster 2's host cluster
			// (also all 0xab), leaking its own.
			r.putU64(r.l2EntryOff(3), r.u64(r.l2EntryOff(2)))
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			checkInjectedDamage(t, c)
		})
	}
}

// damage is an edit to a qemu-made image and the repair mode that fixes it.
type damage struct {
	name   string
	opts   string
	inject func(r *rawImage)
	repair qcow2.Repair
}

func checkInjectedDamage(t *testing.T, c damage) {
	dir := t.TempDir()
	path := makeQemuImage(t, dir, qemuImage{name: "damaged", opts: c.opts, size: "8M", qemuIO: []string{
		"write -P 0xab 0 1M", "write -P 0xcd 3M 100k", "write -z 5M 64k"}})
	want := qemuConvertRaw(t, path)
	r := loadRaw(t, path)
	c.inject(r)
	r.save()

	q := qemuCheck(t, path)
	if q.clean() {
		t.Fatalf("injected damage not seen by qemu-img check: %+v", q)
	}
	ours, err := qcow2.CheckFile(path, qcow2.CheckOptions{})
	if err != nil {
		t.Fatalf("CheckFile: %v", err)
	}
	requireSameCheck(t, "damaged image", ours, q)

	// qemu-img repairs a copy, so that both repairs can be compared.
	copyPath := filepath.Join(dir, "qemu-repaired.qcow2")
	b, _ := os.ReadFile(path)
	if err := os.WriteFile(copyPath, b, 0o600); err != nil {
		t.Fatal(err)
	}
	qemuMode := map[qcow2.Repair]string{qcow2.RepairLeaks: "leaks", qcow2.RepairAll: "all"}[c.repair]
	qr := qemuCheck(t, copyPath, qemuMode)

	fixed, err := qcow2.CheckFile(path, qcow2.CheckOptions{Repair: c.repair})
	if err != nil {
		t.Fatalf("CheckFile(Repair: %v): %v", c.repair, err)
	}
	if fixed.LeaksFixed != qr.LeaksFixed || fixed.CorruptionsFixed != qr.CorruptionsFixed {
		t.Errorf("repair fixed leaks=%d corruptions=%d, qemu-img check -r %s fixed leaks=%d corruptions=%d",
			fixed.LeaksFixed, fixed.CorruptionsFixed, qemuMode, qr.LeaksFixed, qr.CorruptionsFixed)
	}
	requireQemuClean(t, path)
	after, err := qcow2.CheckFile(path, qcow2.CheckOptions{})
	requireClean(t, "CheckFile after repair", after, err)
	qemuCompare(t, path, want)
}

// TestInteropCreateMatchesQemuCreate compares the metadata layout choices
// that tools observe: a fresh image of ours and one of qemu-img's with the
// same options report the same info, and both check clean.
func TestInteropCreateMatchesQemuCreate(t *testing.T) {
	requireTool(t, "qemu-img")
	for _, c := range []ourConfig{
		{clusterSize: 512, refcountBits: 1, size: 1 << 20},
		{clusterSize: 65536, refcountBits: 16, size: 1 << 30},
		{clusterSize: 2 << 20, refcountBits: 64, lazy: true, size: 1 << 40},
		{clusterSize: 4096, refcountBits: 8, size: 100<<20 + 512},
	} {
		t.Run(c.String(), func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "ours.qcow2")
			img := mustCreate(t, path, qcow2.CreateOptions{Size: c.size, ClusterSize: c.clusterSize,
				RefcountBits: c.refcountBits, LazyRefcounts: c.lazy})
			info := img.Info()
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			lazy := "off"
			if c.lazy {
				lazy = "on"
			}
			qpath := filepath.Join(dir, "qemu.qcow2")
			run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o",
				fmt.Sprintf("cluster_size=%d,refcount_bits=%d,lazy_refcounts=%s", c.clusterSize, c.refcountBits, lazy),
				qpath, fmt.Sprint(c.size))
			requireInfoMatches(t, qpath, info)
			q, ours := qemuImgInfo(t, qpath), qemuImgInfo(t, path)
			if q != ours {
				t.Errorf("qemu-img info of our image %+v, of qemu's %+v", ours, q)
			}
			requireQemuClean(t, path)
		})
	}
}

// TestInteropCloseReleasesImage makes sure Close leaves nothing behind that
// makes QEMU refuse the image (a lock, a dirty bit), and that we read what
// QEMU then writes.
func TestInteropCloseReleasesImage(t *testing.T) {
	requireTool(t, "qemu-io")
	dir := t.TempDir()
	path := filepath.Join(dir, "ours.qcow2")
	img := mustCreate(t, path, qcow2.CreateOptions{Size: 1 << 20, LazyRefcounts: true})
	if _, err := img.WriteAt(bytes.Repeat([]byte{0x5a}, 4096), 8192); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	out := run(t, dir, "qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 8192 4096", "-c", "write -P 0x6b 0 512", path)
	if strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io read back something else:\n%s", out)
	}
	img = mustOpen(t, path, qcow2.OpenOptions{})
	defer img.Close()
	p := make([]byte, 512)
	if _, err := img.ReadAt(p, 0); err != nil || !bytes.Equal(p, bytes.Repeat([]byte{0x6b}, 512)) {
		t.Fatalf("after qemu-io wrote 0x6b at 0 we read %x..., err=%v", p[:8], err)
	}
}
