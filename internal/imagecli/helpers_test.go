package imagecli

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// newQcow2 creates a qcow2 image with the library and writes chunks into it.
func newQcow2(t *testing.T, path string, opts qcow2.CreateOptions, writes map[int64][]byte) {
	t.Helper()
	img, err := qcow2.Create(path, opts)
	if err != nil {
		t.Fatalf("create %s: %v", path, err)
	}
	// In offset order: the host layout (and so check's fragmentation
	// count) must not depend on map iteration order.
	for _, off := range slices.Sorted(maps.Keys(writes)) {
		p := writes[off]
		if _, err := img.WriteAt(p, off); err != nil {
			t.Fatalf("write %s at %d: %v", path, off, err)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatalf("close %s: %v", path, err)
	}
}

// readImage returns the whole virtual disk of a qcow2 or raw image.
func readImage(t *testing.T, path string) []byte {
	t.Helper()
	d, _, err := openDisk(path, "", false)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	buf := make([]byte, d.Size())
	if _, err := d.ReadAt(buf, 0); err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return buf
}

// readAt reads n bytes at off of a qcow2 or raw image.
func readAt(t *testing.T, path string, off int64, n int) []byte {
	t.Helper()
	d, _, err := openDisk(path, "", false)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	buf := make([]byte, n)
	if _, err := d.ReadAt(buf, off); err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return buf
}

func imageInfoOf(t *testing.T, path string) qcow2.Info {
	t.Helper()
	img, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	return img.Info()
}

// pattern is n bytes of a repeating non-zero byte sequence starting at seed.
func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = seed + byte(i%251) | 1
	}
	return p
}

func fileExists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

func mustWrite(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func tempPath(t *testing.T, name string) string {
	return filepath.Join(t.TempDir(), name)
}

// header reads big-endian header fields of a qcow2 file.
type header []byte

func readHeader(t *testing.T, path string) header {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b, qcow2Magic) || len(b) < 104 {
		t.Fatalf("%s is not a v3 qcow2 image", path)
	}
	return header(b[:104])
}

func (h header) u32(off int) uint32 { return binary.BigEndian.Uint32(h[off:]) }
func (h header) u64(off int) uint64 { return binary.BigEndian.Uint64(h[off:]) }
func (h header) clusterSize() int64 { return 1 << h.u32(20) }
func (h header) l1Offset() int64    { return int64(h.u64(40)) }
func (h header) refTable() int64    { return int64(h.u64(48)) }

// setRefcount overwrites the refcount of host cluster n (which must be
// covered by the first refcount block, with 16-bit refcounts) behind the
// library's back, to make leaks and corruptions for check to find.
func setRefcount(t *testing.T, path string, cluster int64, refcount uint16) {
	t.Helper()
	h := readHeader(t, path)
	if order := h.u32(96); order != 4 {
		t.Fatalf("refcount order %d, want 4", order)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var entry [8]byte
	if _, err := f.ReadAt(entry[:], h.refTable()); err != nil {
		t.Fatal(err)
	}
	block := int64(binary.BigEndian.Uint64(entry[:]))
	var rc [2]byte
	binary.BigEndian.PutUint16(rc[:], refcount)
	if _, err := f.WriteAt(rc[:], block+2*cluster); err != nil {
		t.Fatal(err)
	}
}

// addLeakedCluster grows the file by one cluster and gives it refcount 1
// with nothing referring to it: one leaked cluster.
func addLeakedCluster(t *testing.T, path string) {
	t.Helper()
	h := readHeader(t, path)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	cs := h.clusterSize()
	end := (fi.Size() + cs - 1) / cs * cs
	if err := os.Truncate(path, end+cs); err != nil {
		t.Fatal(err)
	}
	setRefcount(t, path, end/cs, 1)
}

// corruptL1Refcount sets the L1 table's refcount to 0 while it is in use:
// a corruption (refcount=0 reference=1).
func corruptL1Refcount(t *testing.T, path string) {
	t.Helper()
	h := readHeader(t, path)
	setRefcount(t, path, h.l1Offset()/h.clusterSize(), 0)
}

func sprintf(format string, args ...any) string { return fmt.Sprintf(format, args...) }

// dirtyImage leaves at path a lazy-refcounts image with data that was
// never closed: a copy taken after Flush and before Close, dirty bit set.
func dirtyImage(t *testing.T, path string) {
	t.Helper()
	live := path + ".live"
	img, err := qcow2.Create(live, qcow2.CreateOptions{Size: 64 << 20, LazyRefcounts: true})
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(live)
	defer img.Close()
	if _, err := img.WriteAt(pattern(1<<20, 1), 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(live)
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, path, b)
}
