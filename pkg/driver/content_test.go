package driver

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// TestTrimClone covers the reflink path's second half on a plain copy of
// the file (what FICLONE yields, without a filesystem that supports it):
// the copy reverts to the snapshot, keeps no snapshots, and grows.
func TestTrimClone(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.qcow2")
	img, err := qcow2.Create(src, qcow2.CreateOptions{Size: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	img.WriteAt([]byte("old"), 4096)
	if _, err := img.CreateSnapshot("s1"); err != nil {
		t.Fatal(err)
	}
	img.WriteAt([]byte("new"), 4096)
	img.CreateSnapshot("s2")
	img.Close()

	for _, tt := range []struct{ snap, want string }{{"s1", "old"}, {"", "new"}} {
		dst := filepath.Join(dir, "dst"+tt.snap)
		copyFile(t, src, dst)
		c, err := qcow2.Open(dst, qcow2.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := trimClone(c, tt.snap, 4<<20); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 3)
		c.ReadAt(b, 4096)
		if string(b) != tt.want || len(c.Snapshots()) != 0 || c.Size() != 4<<20 {
			t.Fatalf("clone of %q: reads %q, %d snapshots, size %d", tt.snap, b, len(c.Snapshots()), c.Size())
		}
		c.Close()
		if r, err := qcow2.CheckFile(dst, qcow2.CheckOptions{}); err != nil || !r.Clean() {
			t.Fatalf("check: %v %+v", err, r)
		}
	}
}

func TestCopySparse(t *testing.T) {
	dir := t.TempDir()
	src, _ := qcow2.Create(filepath.Join(dir, "a"), qcow2.CreateOptions{Size: 8 << 20})
	defer src.Close()
	src.WriteAt(bytes.Repeat([]byte{7}, 100), 5<<20+10)
	dst, _ := qcow2.Create(filepath.Join(dir, "b"), qcow2.CreateOptions{Size: 8 << 20})
	if err := copySparse(t.Context(), dst, src, src.Size()); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 8<<20)
	dst.ReadAt(b, 0)
	dst.Close()
	if !bytes.Equal(b[5<<20+10:5<<20+110], bytes.Repeat([]byte{7}, 100)) || bytes.Count(b, []byte{7}) != 100 {
		t.Fatal("content differs")
	}
	fi, _ := os.Stat(filepath.Join(dir, "b"))
	if fi.Size() > 1<<20 {
		t.Fatalf("copy is not sparse: %d bytes", fi.Size())
	}
}

// extentSpy is a snapshot view that records the bytes read from it.
type extentSpy struct {
	*qcow2.SnapshotView
	read int64
}

func (s *extentSpy) ReadAt(p []byte, off int64) (int, error) {
	s.read += int64(len(p))
	return s.SnapshotView.ReadAt(p, off)
}

// TestCopySparseReadsOnlyAllocated: a restore from a snapshot of a mostly
// empty 1 GiB volume reads the chunks with data, not the rest.
func TestCopySparseReadsOnlyAllocated(t *testing.T) {
	dir := t.TempDir()
	src, err := qcow2.Create(filepath.Join(dir, "a"), qcow2.CreateOptions{Size: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	want := bytes.Repeat([]byte{9}, 3000)
	src.WriteAt(want, 700<<20+5)
	if _, err := src.CreateSnapshot("s"); err != nil {
		t.Fatal(err)
	}
	src.WriteAt(bytes.Repeat([]byte{1}, 100), 0) // after the snapshot: not copied
	v, err := src.OpenSnapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	spy := &extentSpy{SnapshotView: v}
	dst, err := qcow2.Create(filepath.Join(dir, "b"), qcow2.CreateOptions{Size: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	if err := copySparse(t.Context(), dst, spy, v.Size()); err != nil {
		t.Fatal(err)
	}
	if spy.read == 0 || spy.read > 4<<20 {
		t.Errorf("read %d bytes of the snapshot; want only the chunk with data (at most 4 MiB)", spy.read)
	}
	got := make([]byte, len(want)+2)
	dst.ReadAt(got, 700<<20+4)
	if !bytes.Equal(got[1:len(want)+1], want) || got[0] != 0 || got[len(got)-1] != 0 {
		t.Fatal("copied data differs")
	}
	head := make([]byte, 100)
	dst.ReadAt(head, 0)
	if !bytes.Equal(head, make([]byte, 100)) {
		t.Fatal("the copy has a write made after the snapshot")
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(to)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	out.Close()
}
