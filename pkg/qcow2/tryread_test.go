package qcow2_test

import (
	"bytes"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// tryRead calls TryReadAt and, when it succeeds, checks the bytes against
// ReadAt's.
func tryRead(t *testing.T, img *qcow2.Image, off, n int64) bool {
	t.Helper()
	got := bytes.Repeat([]byte{0xEE}, int(n))
	if !img.TryReadAt(got, off) {
		return false
	}
	want := make([]byte, n)
	if _, err := img.ReadAt(want, off); err != nil {
		t.Fatalf("ReadAt %#x+%#x: %v", off, n, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("TryReadAt %#x+%#x differs from ReadAt: %s", off, n, firstDiff(got, want))
	}
	return true
}

// dropPageCache asks the kernel to drop the file's clean cached pages.
func dropPageCache(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
}

// TestTryReadAt: reads served from cached metadata and the page cache
// match ReadAt; anything that would wait or is unusual reports false.
func TestTryReadAt(t *testing.T) {
	const cs = 65536
	path := filepath.Join(t.TempDir(), "a.qcow2")
	img := mustCreate(t, path, qcow2.CreateOptions{Size: 64 * cs, ClusterSize: cs})
	defer img.Close()
	data := bytes.Repeat([]byte("0123456789abcdef"), 4*cs/16)
	if _, err := img.WriteAt(data, 0); err != nil { // clusters 0-3
		t.Fatal(err)
	}
	if err := img.WriteZeroes(8*cs, cs, false); err != nil { // cluster 8 zero
		t.Fatal(err)
	}
	if _, err := img.WriteAt(data[:cs], 10*cs); err != nil { // cluster 10
		t.Fatal(err)
	}
	if err := img.WriteCompressed(data[:cs], 12*cs); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}

	for _, r := range []struct{ off, n int64 }{
		{0, 4096}, {cs - 2048, 4096}, {0, 4 * cs}, // data, within and across clusters
		{8 * cs, 4096}, {20 * cs, 4096}, // a zero cluster, an unallocated one
		{3 * cs, 2 * cs}, // data then unallocated
	} {
		if !tryRead(t, img, r.off, r.n) {
			t.Errorf("TryReadAt %#x+%#x of warm data reported false", r.off, r.n)
		}
	}
	for _, r := range []struct {
		what   string
		off, n int64
	}{
		{"a compressed cluster", 12 * cs, 4096},
		{"past the end", 64*cs - 2048, 4096},
		{"more runs than fit", 0, 11 * cs}, // data, unallocated, zero, unallocated, data
	} {
		if tryRead(t, img, r.off, r.n) {
			t.Errorf("TryReadAt of %s reported true", r.what)
		}
	}
	if !tryRead(t, img, 0, 10*cs) {
		t.Error("TryReadAt of data, unallocated, zero, unallocated (4 runs) reported false")
	}

	// Data not in the page cache: false, until ReadAt brought it in.
	dropPageCache(t, path)
	if tryRead(t, img, 2*cs, 4096) {
		t.Skip("the kernel kept the pages after FADV_DONTNEED; cannot test a page cache miss here")
	}
	if _, err := img.ReadAt(make([]byte, 4096), 2*cs); err != nil {
		t.Fatal(err)
	}
	if !tryRead(t, img, 2*cs, 4096) {
		t.Error("TryReadAt after ReadAt warmed the pages reported false")
	}
}

// TestTryReadAtColdMetadata: an image opened afresh has no L2 slice cached,
// so TryReadAt reports false until an ordinary read loaded the slice.
func TestTryReadAtColdMetadata(t *testing.T) {
	const cs = 65536
	path := filepath.Join(t.TempDir(), "a.qcow2")
	img := mustCreate(t, path, qcow2.CreateOptions{Size: 64 * cs, ClusterSize: cs})
	if _, err := img.WriteAt(bytes.Repeat([]byte{7}, cs), 5*cs); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	img = mustOpen(t, path, qcow2.OpenOptions{})
	defer img.Close()
	if tryRead(t, img, 5*cs, 4096) {
		t.Fatal("TryReadAt with the L2 slice not cached reported true")
	}
	if _, err := img.ReadAt(make([]byte, 4096), 5*cs); err != nil {
		t.Fatal(err)
	}
	if !tryRead(t, img, 5*cs, 4096) {
		t.Fatal("TryReadAt after the slice was loaded reported false")
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if img.TryReadAt(make([]byte, 4096), 5*cs) {
		t.Fatal("TryReadAt on a closed image reported true")
	}
}

// TestTryReadAtSeesCompletedWrites: concurrent writers and try-readers; a
// TryReadAt that succeeds after a write completed returns that write.
func TestTryReadAtSeesCompletedWrites(t *testing.T) {
	const cs, workers, rounds = 4096, 4, 300
	path := filepath.Join(t.TempDir(), "a.qcow2")
	img := mustCreate(t, path, qcow2.CreateOptions{Size: workers * 16 * cs, ClusterSize: cs})
	defer img.Close()
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			base := int64(w) * 16 * cs
			for i := range rounds {
				off := base + int64(i%16)*cs
				p := bytes.Repeat([]byte{byte(i)}, 512)
				if _, err := img.WriteAt(p, off+1024); err != nil {
					t.Error(err)
					return
				}
				got := make([]byte, 512)
				if img.TryReadAt(got, off+1024) && !bytes.Equal(got, p) {
					t.Errorf("worker %d round %d: TryReadAt after the write returned %x..., want %x...", w, i, got[:4], p[:4])
					return
				}
			}
		})
	}
	wg.Wait()
}
