package driver

import (
	"bytes"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func TestDirectOK(t *testing.T) {
	b := alignedBuffer(3 * directAlign)
	for _, tc := range []struct {
		name string
		p    []byte
		off  int64
		want bool
	}{
		{"aligned", b, 2 * directAlign, true},
		{"one page", b[directAlign : 2*directAlign], 0, true},
		{"empty", b[:0], 0, false},
		{"offset", b, 512, false},
		{"length", b[:directAlign+512], 0, false},
		{"address", b[512 : directAlign+512], 0, false},
	} {
		if got := directOK(tc.p, tc.off); got != tc.want {
			t.Errorf("%s: directOK = %v; want %v", tc.name, got, tc.want)
		}
	}
	for _, n := range []int{1, directAlign, 4 << 20} {
		if b := alignedBuffer(n); len(b) != n || cap(b) != n || !directOK(alignedBuffer(n+directAlign-n%directAlign), 0) {
			t.Errorf("alignedBuffer(%d): len %d, cap %d, or not aligned", n, len(b), cap(b))
		}
	}
}

// TestSnapshotReaderMatchesView: what the peer service sends of a snapshot
// read through O_DIRECT is what the view reads, for data clusters, zero
// clusters, compressed clusters, clusters of a backing file, clusters the
// active layer rewrote after the snapshot, and clusters of 512 bytes
// (read directly only where a run happens to be aligned); data clusters
// of 64 KiB are read directly.
func TestSnapshotReaderMatchesView(t *testing.T) {
	for _, tc := range []struct {
		name       string
		cluster    int
		wantDirect bool // some bytes must be read with O_DIRECT
	}{{"64K clusters", 64 << 10, true}, {"512 B clusters", 512, false}} {
		t.Run(tc.name, func(t *testing.T) {
			const size = 8 << 20
			dir := t.TempDir()
			rng := rand.New(rand.NewPCG(3, 4))
			random := func(n int) []byte {
				b := make([]byte, n)
				for i := range b {
					b[i] = byte(rng.Uint32())
				}
				return b
			}
			base, err := qcow2.Create(filepath.Join(dir, "base.qcow2"), qcow2.CreateOptions{Size: size, ClusterSize: tc.cluster})
			if err != nil {
				t.Fatal(err)
			}
			mustWrite(t, base, random(1<<20), 6<<20)
			if err := base.Close(); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, "img.qcow2")
			img, err := qcow2.Create(path, qcow2.CreateOptions{Size: size, ClusterSize: tc.cluster,
				BackingFile: "base.qcow2", BackingFormat: "qcow2"})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			mustWrite(t, img, random(3<<20), 0)
			mustWrite(t, img, random(5000), 3<<20+777)
			if err := img.WriteZeroes(4<<20, 256<<10, false); err != nil {
				t.Fatal(err)
			}
			if err := img.WriteCompressed(random(tc.cluster), 5<<20); err != nil {
				t.Fatal(err)
			}
			if _, err := img.CreateSnapshot("s"); err != nil {
				t.Fatal(err)
			}
			mustWrite(t, img, random(2<<20), 1<<20) // copied on write: the snapshot keeps its clusters
			v, err := img.OpenSnapshot("s")
			if err != nil {
				t.Fatal(err)
			}
			defer v.Close()
			want := make([]byte, size)
			if _, err := v.ReadAt(want, 0); err != nil {
				t.Fatal(err)
			}
			r := newSnapshotReader(v, path)
			defer r.Close()
			got := make([]byte, size)
			ext, err := v.Extents(0, size)
			if err != nil {
				t.Fatal(err)
			}
			chunk := alignedBuffer(3 << 20)
			for _, e := range ext {
				for off := e.Start; off < e.Start+e.Length; {
					n := min(e.Start+e.Length-off, int64(len(chunk)))
					if err := r.readExtent(chunk[:n], e, off); err != nil {
						t.Fatalf("readExtent at %d: %v", off, err)
					}
					copy(got[off:], chunk[:n])
					off += n
				}
			}
			if !bytes.Equal(got, want) {
				t.Fatal("the snapshot read through snapshotReader differs from the view")
			}
			if r.direct == nil {
				t.Logf("O_DIRECT is refused in %s: everything was read through the view", dir)
			} else if tc.wantDirect && r.directBytes == 0 {
				t.Error("nothing was read with O_DIRECT")
			}
		})
	}
}

func mustWrite(t *testing.T, img *qcow2.Image, p []byte, off int64) {
	t.Helper()
	if _, err := img.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
}

// TestDirectFileImage: an image written through directFile, with writes
// that go direct (large and aligned) and ones that do not (small,
// unaligned, partial clusters), reads back as written and checks clean.
func TestDirectFileImage(t *testing.T) {
	const size = 16 << 20
	path := filepath.Join(t.TempDir(), "new.qcow2")
	f, direct, err := createDirectFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !direct {
		t.Logf("O_DIRECT is refused in %s: the image is written through the page cache", filepath.Dir(path))
	}
	img, err := qcow2.CreateFile(f, qcow2.CreateOptions{Size: size})
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	write := func(p []byte, off int64) {
		mustWrite(t, img, p, off)
		copy(want[off:], p)
	}
	big := alignedBuffer(4 << 20)
	for i := range big {
		big[i] = byte(i/4096) | 1
	}
	write(big, 0)
	write(big[:1<<20], 8<<20+512)     // unaligned: partial clusters through the cache
	write(big[4096:4096+100], 12<<20) // small
	write(big[:64<<10], 4<<20)        // one cluster, direct
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := createDirectFile(path); err == nil {
		t.Error("createDirectFile over an existing image succeeded")
	}
	img, err = qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	res, err := img.Check(qcow2.CheckOptions{})
	if err != nil || res.Corruptions+res.Leaks+res.CheckErrors != 0 {
		t.Fatalf("check: %v, %+v", err, res)
	}
	got := make([]byte, size)
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Error("the image read back differs from what was written")
	}
}
