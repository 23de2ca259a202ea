package qcow2_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Snapshot tests: our snapshots against a model of every snapshot's
// contents, against our checker and against QEMU's tools.

func mustSnapshot(t testing.TB, img *qcow2.Image, name string) qcow2.SnapshotInfo {
	t.Helper()
	info, err := img.CreateSnapshot(name)
	if err != nil {
		t.Fatalf("CreateSnapshot(%q): %v", name, err)
	}
	return info
}

// viewBytes reads a whole snapshot through a view.
func viewBytes(t testing.TB, img *qcow2.Image, idOrName string) []byte {
	t.Helper()
	v, err := img.OpenSnapshot(idOrName)
	if err != nil {
		t.Fatalf("OpenSnapshot(%q): %v", idOrName, err)
	}
	defer v.Close()
	p := make([]byte, v.Size())
	if n, err := v.ReadAt(p, 0); n != len(p) || (err != nil && err != io.EOF) {
		t.Fatalf("view %q: ReadAt(%d bytes): n=%d err=%v", idOrName, len(p), n, err)
	}
	return p
}

func requireCheckClean(t testing.TB, what string, img *qcow2.Image) *qcow2.CheckResult {
	t.Helper()
	r, err := img.Check(qcow2.CheckOptions{})
	requireClean(t, what, r, err)
	return r
}

func snapshotNames(infos []qcow2.SnapshotInfo) []string {
	var names []string
	for _, s := range infos {
		names = append(names, s.ID+":"+s.Name)
	}
	return names
}

func TestSnapshotAPI(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "a.qcow2")
	img := mustCreate(t, path, qcow2.CreateOptions{Size: 4 << 20, ClusterSize: 4096})
	defer img.Close()
	rng := newRand(t)
	h := newHarness(t, rng, img, path, make([]byte, 4<<20))
	h.write(0, fill(rng, 1<<20))
	s1 := slices.Clone(h.m)
	a := mustSnapshot(t, img, "a")
	if a.ID != "1" || a.Name != "a" || a.VirtualSize != 4<<20 || a.Date.IsZero() {
		t.Errorf("CreateSnapshot(a) = %+v, want id 1, size 4 MiB, a date", a)
	}
	for _, c := range []struct {
		name string
		want error
	}{
		{"", qcow2.ErrInvalid},
		{strings.Repeat("x", 65536), qcow2.ErrInvalid},
		{"a", qcow2.ErrSnapshotExists},
	} {
		if _, err := img.CreateSnapshot(c.name); !errors.Is(err, c.want) {
			t.Errorf("CreateSnapshot(%.10q...): err=%v, want %v", c.name, err, c.want)
		}
	}
	for name, f := range map[string]func(string) error{
		"DeleteSnapshot": img.DeleteSnapshot, "RevertSnapshot": img.RevertSnapshot,
		"OpenSnapshot": func(s string) error { _, err := img.OpenSnapshot(s); return err },
	} {
		if err := f("nope"); !errors.Is(err, qcow2.ErrSnapshotNotFound) {
			t.Errorf("%s(nope): err=%v, want ErrSnapshotNotFound", name, err)
		}
	}
	h.write(512<<10, fill(rng, 1<<20))
	s2 := slices.Clone(h.m)
	mustSnapshot(t, img, "b")
	c := mustSnapshot(t, img, strings.Repeat("c", 65535)) // the longest name
	if err := img.DeleteSnapshot(c.ID); err != nil {
		t.Fatalf("DeleteSnapshot(%s): %v", c.ID, err)
	}
	// Ids are one more than the largest; "2" is b's id, found before names.
	if d := mustSnapshot(t, img, "2"); d.ID != "3" {
		t.Errorf("after deleting id 3, the next id is %s, want 3", d.ID)
	}
	if got := snapshotNames(img.Snapshots()); !slices.Equal(got, []string{"1:a", "2:b", "3:2"}) {
		t.Errorf("Snapshots() = %q", got)
	}
	if got := viewBytes(t, img, "2"); !bytes.Equal(got, s2) {
		t.Errorf("snapshot with id 2 (b): %s", firstDiff(got, s2))
	}

	// An open view pins its snapshot, and reads it while the image changes.
	v, err := img.OpenSnapshot("a")
	if err != nil {
		t.Fatal(err)
	}
	h.write(0, fill(rng, 2<<20))
	if err := img.DeleteSnapshot("a"); !errors.Is(err, qcow2.ErrSnapshotInUse) {
		t.Errorf("DeleteSnapshot of a viewed snapshot: err=%v, want ErrSnapshotInUse", err)
	}
	if err := img.DeleteSnapshot("b"); err != nil {
		t.Fatalf("DeleteSnapshot(b) while a is viewed: %v", err)
	}
	got := make([]byte, v.Size()+10)
	if n, err := v.ReadAt(got, 0); n != len(s1) || err != io.EOF || !bytes.Equal(got[:n], s1) {
		t.Errorf("view of a after writes: n=%d err=%v %s", n, err, firstDiff(got[:n], s1))
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := v.ReadAt(got, 0); !errors.Is(err, qcow2.ErrClosed) {
		t.Errorf("ReadAt on a closed view: err=%v, want ErrClosed", err)
	}
	requireCheckClean(t, "before revert", img)
	if err := img.RevertSnapshot("a"); err != nil {
		t.Fatalf("RevertSnapshot(a): %v", err)
	}
	h.m = slices.Clone(s1)
	h.verifyAll()
	requireCheckClean(t, "after revert", img)
	if err := img.DeleteSnapshot("a"); err != nil {
		t.Fatalf("DeleteSnapshot(a) after its view closed: %v", err)
	}
	h.verifyAll()
	requireCheckClean(t, "after deleting a", img)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}

	ro := mustOpen(t, path, qcow2.OpenOptions{ReadOnly: true})
	defer ro.Close()
	if _, err := ro.CreateSnapshot("x"); !errors.Is(err, qcow2.ErrReadOnly) {
		t.Errorf("CreateSnapshot on a read-only image: err=%v, want ErrReadOnly", err)
	}
	if got := snapshotNames(ro.Snapshots()); !slices.Equal(got, []string{"3:2"}) {
		t.Errorf("Snapshots() after reopening = %q", got)
	}
	v, err = ro.OpenSnapshot("2")
	if err != nil {
		t.Fatalf("OpenSnapshot on a read-only image: %v", err)
	}
	ro.Close()
	if _, err := v.ReadAt(got, 0); !errors.Is(err, qcow2.ErrClosed) {
		t.Errorf("view ReadAt after the image closed: err=%v, want ErrClosed", err)
	}
}

// TestSnapshotRefcountOverflow: with 1-bit refcounts no allocated cluster
// can be shared, so a snapshot fails cleanly and leaves the image as it was.
func TestSnapshotRefcountOverflow(t *testing.T) {
	path := filepath.Join(t.TempDir(), "r1.qcow2")
	img := mustCreate(t, path, qcow2.CreateOptions{Size: 1 << 20, ClusterSize: 512, RefcountBits: 1})
	defer img.Close()
	h := newHarness(t, newRand(t), img, path, make([]byte, 1<<20))
	h.write(1000, fill(h.rng, 100<<10))
	if _, err := img.CreateSnapshot("s"); !errors.Is(err, qcow2.ErrInvalid) {
		t.Fatalf("CreateSnapshot with 1-bit refcounts: err=%v, want ErrInvalid", err)
	}
	if n := len(img.Snapshots()); n != 0 {
		t.Fatalf("%d snapshots after a failed create", n)
	}
	requireCheckClean(t, "after a failed create", img)
	h.write(0, fill(h.rng, 4096)) // COPIED flags restored: in place again
	h.verifyAll()
	requireCheckClean(t, "after writing", img)
}

// TestSnapshotTooMany: an image with QEMU's maximum of 65536 snapshots
// takes no more.
func TestSnapshotTooMany(t *testing.T) {
	path := filepath.Join(t.TempDir(), "many.qcow2")
	img := mustCreate(t, path, qcow2.CreateOptions{Size: 1 << 20})
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	r := loadRaw(t, path)
	off := (int64(len(r.b)) + r.cs() - 1) / r.cs() * r.cs()
	var table []byte
	for i := range 65536 {
		id, name := fmt.Sprint(i+1), fmt.Sprintf("s%d", i)
		e := make([]byte, 40+24)
		be.PutUint16(e[12:], uint16(len(id)))
		be.PutUint16(e[14:], uint16(len(name)))
		be.PutUint32(e[36:], 24)
		be.PutUint64(e[48:], 1<<20)
		e = append(append(e, id...), name...)
		for len(e)%8 != 0 {
			e = append(e, 0)
		}
		table = append(table, e...)
	}
	r.b = append(r.b[:len(r.b):len(r.b)], make([]byte, off-int64(len(r.b)))...)
	r.b = append(r.b, table...)
	be.PutUint32(r.b[60:], 65536)
	be.PutUint64(r.b[64:], uint64(off))
	r.save()
	img = mustOpen(t, path, qcow2.OpenOptions{})
	defer img.Close()
	if n := len(img.Snapshots()); n != 65536 {
		t.Fatalf("%d snapshots listed, want 65536", n)
	}
	if _, err := img.CreateSnapshot("one-more"); !errors.Is(err, qcow2.ErrInvalid) {
		t.Fatalf("CreateSnapshot beyond 65536: err=%v, want ErrInvalid", err)
	}
}

// qemuSnapshotList is `qemu-img info --output=json`'s snapshot list.
type qemuSnapshot struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	VMStateSize int64  `json:"vm-state-size"`
	DateSec     int64  `json:"date-sec"`
}

func qemuSnapshots(t testing.TB, path string) []string {
	t.Helper()
	out := run(t, filepath.Dir(path), "qemu-img", "info", "-U", "-f", "qcow2", "--output=json", path)
	var info struct {
		Snapshots []qemuSnapshot `json:"snapshots"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("qemu-img info %s: %v\n%s", path, err, out)
	}
	var names []string
	for _, s := range info.Snapshots {
		names = append(names, s.ID+":"+s.Name)
	}
	return names
}

// requireQemuSnapshotReads compares qemu-img convert -l snapshot.name=NAME
// with the model. QEMU converts a snapshot at the active disk's size, so
// past the snapshot's own size it must read zeros.
func requireQemuSnapshotReads(t testing.TB, path, name string, want []byte) {
	t.Helper()
	got := qemuConvertRaw(t, path, "-l", "snapshot.name="+name)
	n := min(len(got), len(want))
	if !bytes.Equal(got[:n], want[:n]) || !allZero(got[n:]) {
		t.Errorf("qemu-img reads snapshot %s differently: %s", name, firstDiff(got[:n], want[:n]))
	}
}

// TestInteropOurSnapshots: snapshots we take are listed by QEMU, read by it
// as our model says, can be applied by it, and deleting them leaves
// qemu-img check clean.
func TestInteropOurSnapshots(t *testing.T) {
	requireTool(t, "qemu-img")
	for _, c := range []qcow2.CreateOptions{
		{Size: 4 << 20},
		{Size: 3<<20 + 512, ClusterSize: 512, RefcountBits: 4},
		{Size: 4 << 20, ClusterSize: 4096, RefcountBits: 64, LazyRefcounts: true},
	} {
		t.Run(fmt.Sprintf("cluster=%d/refcount=%d", c.ClusterSize, c.RefcountBits), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := filepath.Join(dir, "ours.qcow2")
			img := mustCreate(t, path, c)
			h := newHarness(t, newRand(t), img, path, make([]byte, c.Size))
			models := map[string][]byte{}
			for i, name := range []string{"s1", "s2", "s3"} {
				for range 30 {
					h.step(defaultMix)
				}
				if i == 1 {
					h.resize(h.size() + 3*h.cs)
				}
				mustSnapshot(t, h.img, name)
				models[name] = slices.Clone(h.m)
			}
			for range 30 {
				h.step(defaultMix)
			}
			if err := h.img.Close(); err != nil {
				t.Fatal(err)
			}
			if got := qemuSnapshots(t, path); !slices.Equal(got, []string{"1:s1", "2:s2", "3:s3"}) {
				t.Errorf("qemu-img lists %q", got)
			}
			requireSameCheck(t, "with snapshots", checkFile(t, path), requireQemuClean(t, path))
			for name, m := range models {
				requireQemuSnapshotReads(t, path, name, m)
			}
			qemuCompare(t, path, h.m)

			h.img = mustOpen(t, path, qcow2.OpenOptions{})
			if err := h.img.DeleteSnapshot("s2"); err != nil {
				t.Fatal(err)
			}
			if err := h.img.Close(); err != nil {
				t.Fatal(err)
			}
			if got := qemuSnapshots(t, path); !slices.Equal(got, []string{"1:s1", "3:s3"}) {
				t.Errorf("qemu-img lists %q after deleting s2", got)
			}
			requireQemuClean(t, path)
			requireQemuSnapshotReads(t, path, "s1", models["s1"])
			run(t, dir, "qemu-img", "snapshot", "-a", "s1", path)
			qemuCompare(t, path, models["s1"])
			requireQemuClean(t, path)

			h.img = mustOpen(t, path, qcow2.OpenOptions{})
			for _, name := range []string{"s3", "s1"} {
				if err := h.img.DeleteSnapshot(name); err != nil {
					t.Fatal(err)
				}
			}
			if err := h.img.Close(); err != nil {
				t.Fatal(err)
			}
			q := requireQemuClean(t, path)
			requireSameCheck(t, "all deleted", checkFile(t, path), q)
			qemuCompare(t, path, models["s1"])
		})
	}
}

func checkFile(t testing.TB, path string) *qcow2.CheckResult {
	t.Helper()
	r, err := qcow2.CheckFile(path, qcow2.CheckOptions{})
	requireClean(t, "CheckFile", r, err)
	return r
}

// TestInteropQemuSnapshotsListReadRevert: snapshots QEMU takes (across a
// resize) are listed, read and reverted by us, and deleting them leaves
// qemu-img check clean.
func TestInteropQemuSnapshotsListReadRevert(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	// QEMU cannot resize v2 images with snapshots; with small refcounts its
	// packed compressed clusters leave no room for a snapshot's reference.
	for _, opts := range []string{"cluster_size=65536", "cluster_size=512,refcount_bits=8", "compat=0.10,cluster_size=4096"} {
		t.Run(opts, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := makeQemuImage(t, dir, qemuImage{name: "q", opts: opts, size: "2M", qemuIO: []string{
				"write -P 0xa1 0 1M", "write -c -P 0xa2 1M 128k"}})
			run(t, dir, "qemu-img", "snapshot", "-c", "one", path)
			run(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 0xb1 512k 1M", "-c", "discard 0 64k", path)
			size := "2M"
			if !strings.Contains(opts, "compat=0.10") {
				size = "3M"
				run(t, dir, "qemu-img", "resize", "-q", path, size)
			}
			run(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 0xb2 1792k 256k", path)
			run(t, dir, "qemu-img", "snapshot", "-c", "two", path)
			run(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -z 0 1M", "-c", "write -P 0xc1 1M 4k", path)
			want := map[string][]byte{}
			for _, name := range []string{"one", "two"} {
				want[name] = qemuConvertRaw(t, path, "-l", "snapshot.name="+name)
			}
			want["one"] = want["one"][:2<<20] // QEMU pads it to the active size
			active := qemuConvertRaw(t, path)

			img := mustOpen(t, path, qcow2.OpenOptions{})
			if got, q := snapshotNames(img.Snapshots()), qemuSnapshots(t, path); !slices.Equal(got, q) {
				t.Errorf("Snapshots() = %q, qemu-img lists %q", got, q)
			}
			for name, w := range want {
				if got := viewBytes(t, img, name); !bytes.Equal(got, w) {
					t.Errorf("view of QEMU's snapshot %s: %s", name, firstDiff(got, w))
				}
			}
			for _, name := range []string{"one", "two", "one"} {
				if err := img.RevertSnapshot(name); err != nil {
					t.Fatalf("RevertSnapshot(%s): %v", name, err)
				}
				if got := readAll(t, img); !bytes.Equal(got, want[name]) {
					t.Fatalf("after reverting to %s: %s", name, firstDiff(got, want[name]))
				}
				requireCheckClean(t, "after revert to "+name, img)
			}
			h := newHarness(t, newRand(t), img, path, slices.Clone(want["one"]))
			mix := defaultMix
			if strings.Contains(opts, "compat=0.10") {
				mix.resize = 0 // QEMU cannot apply a snapshot of another size on v2
			}
			for range 60 {
				h.step(mix)
			}
			if err := h.img.DeleteSnapshot("two"); err != nil {
				t.Fatal(err)
			}
			requireCheckClean(t, "after deleting two", h.img)
			if err := h.img.Close(); err != nil {
				t.Fatal(err)
			}
			requireQemuClean(t, path)
			qemuCompare(t, path, h.m)
			requireQemuSnapshotReads(t, path, "one", want["one"])
			run(t, dir, "qemu-img", "snapshot", "-a", "one", path)
			qemuCompare(t, path, want["one"])
			_, _ = active, size
		})
	}
}

// TestSnapshotShuffled takes 44 snapshots between random writes, resizes and
// reverts, deletes them in random order with more writes in between, and
// checks every snapshot's contents, our check and qemu-img check throughout.
func TestSnapshotShuffled(t *testing.T) {
	for _, c := range []qcow2.CreateOptions{
		{Size: 2 << 20, ClusterSize: 4096},
		{Size: 2<<20 + 1536, ClusterSize: 512, RefcountBits: 8},
	} {
		t.Run(fmt.Sprintf("cluster=%d", c.ClusterSize), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := filepath.Join(dir, "shuffle.qcow2")
			img := mustCreate(t, path, c)
			rng := newRand(t)
			h := newHarness(t, rng, img, path, make([]byte, c.Size))
			h.maxSize = 3 << 20
			models := map[string][]byte{}
			var names []string
			mix := defaultMix
			mix.reopen, mix.check = 2, 0
			for i := range 44 {
				for range 6 {
					h.step(mix)
				}
				name := fmt.Sprintf("snap-%d", i)
				mustSnapshot(t, h.img, name)
				models[name] = slices.Clone(h.m)
				names = append(names, name)
				if rng.IntN(6) == 0 {
					back := names[rng.IntN(len(names))]
					if err := h.img.RevertSnapshot(back); err != nil {
						t.Fatalf("RevertSnapshot(%s): %v", back, err)
					}
					h.m = slices.Clone(models[back])
					h.verifyAll()
				}
				if i%11 == 10 {
					requireCheckClean(t, fmt.Sprintf("after %d snapshots", i+1), h.img)
				}
			}
			for _, name := range names {
				if got := viewBytes(t, h.img, name); !bytes.Equal(got, models[name]) {
					t.Fatalf("snapshot %s: %s", name, firstDiff(got, models[name]))
				}
			}
			if err := h.img.Close(); err != nil {
				t.Fatal(err)
			}
			requireSameCheck(t, "44 snapshots", checkFile(t, path), requireQemuClean(t, path))
			requireQemuSnapshotReads(t, path, names[17], models[names[17]])
			h.img = mustOpen(t, path, qcow2.OpenOptions{})

			rng.Shuffle(len(names), func(i, j int) { names[i], names[j] = names[j], names[i] })
			for i, name := range names {
				if err := h.img.DeleteSnapshot(name); err != nil {
					t.Fatalf("DeleteSnapshot(%s): %v", name, err)
				}
				for range 3 {
					h.step(mix)
				}
				if i%8 == 7 && i+1 < len(names) {
					left := names[i+1+rng.IntN(len(names)-i-1)]
					if got := viewBytes(t, h.img, left); !bytes.Equal(got, models[left]) {
						t.Fatalf("snapshot %s after deleting %d others: %s", left, i+1, firstDiff(got, models[left]))
					}
					requireCheckClean(t, fmt.Sprintf("after deleting %d", i+1), h.img)
				}
			}
			h.verifyAll()
			if err := h.img.Close(); err != nil {
				t.Fatal(err)
			}
			q := requireQemuClean(t, path)
			requireSameCheck(t, "all deleted", checkFile(t, path), q)
			qemuCompare(t, path, h.m)
		})
	}
}

// TestSnapshotViewConcurrent reads a view while other goroutines write the
// active disk and take and delete other snapshots (run with -race).
func TestSnapshotViewConcurrent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "conc.qcow2")
	const size = 2 << 20
	img := mustCreate(t, path, qcow2.CreateOptions{Size: size, ClusterSize: 4096})
	defer img.Close()
	rng := newRand(t)
	want := fill(rng, size)
	if _, err := img.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	mustSnapshot(t, img, "base")
	v, err := img.OpenSnapshot("base")
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	stop := make(chan struct{})
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := bytes.Repeat([]byte{byte(w + 1)}, 6000)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				off := int64((i*7919 + w*104729) % (size - len(p)))
				if _, err := img.WriteAt(p, off); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 10; i++ {
			name := fmt.Sprint("t", i)
			if _, err := img.CreateSnapshot(name); err != nil {
				errs <- err
				return
			}
			if i%2 == 0 {
				if err := img.DeleteSnapshot(name); err != nil {
					errs <- err
					return
				}
			}
		}
	}()
	p := make([]byte, 20000)
	for i := range 150 {
		off := int64(i*12347) % (size - int64(len(p)))
		if _, err := v.ReadAt(p, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, want[off:off+int64(len(p))]) {
			t.Fatalf("view read at %d while writing: %s", off, firstDiff(p, want[off:off+int64(len(p))]))
		}
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	requireCheckClean(t, "after concurrent use", img)
	if got := viewBytes(t, img, "base"); !bytes.Equal(got, want) {
		t.Fatalf("snapshot base: %s", firstDiff(got, want))
	}
	_ = os.Remove
}
