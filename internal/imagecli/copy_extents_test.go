package imagecli

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/internal/sparsecopy"
	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// readSpy records the ranges copySparse reads, keeping the image's
// Extents.
type readSpy struct {
	*qcow2.Image
	reads [][2]int64
}

func (s *readSpy) ReadAt(p []byte, off int64) (int, error) {
	s.reads = append(s.reads, [2]int64{off, int64(len(p))})
	return s.Image.ReadAt(p, off)
}

// TestCopySparseSkipsUnreadableZeros: convert's copy does not read what no
// layer of a qcow2 chain allocates, nor zero clusters (even over backing
// data), yet reads backing data, and the copy is exact.
func TestCopySparseSkipsUnreadableZeros(t *testing.T) {
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	const cs = 65536
	const size = 16 << 20
	newQcow2(t, base, qcow2.CreateOptions{Size: size, ClusterSize: cs},
		map[int64][]byte{0: pattern(cs, 1), 8 << 20: pattern(100, 2)})
	newQcow2(t, top, qcow2.CreateOptions{Size: size, ClusterSize: cs, BackingFile: base, BackingFormat: "qcow2"},
		map[int64][]byte{4 << 20: pattern(cs, 3)})
	img, err := qcow2.Open(top, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.WriteZeroes(0, cs, true); err != nil { // hides base's data
		t.Fatal(err)
	}
	want := make([]byte, size)
	if _, err := img.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	spy := &readSpy{Image: img}
	dst := filepath.Join(dir, "out.raw")
	f, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if err := copySparse(context.Background(), spy, f, rawBlock); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(dst)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("copy differs from the source (%v)", err)
	}
	var read int64
	for _, r := range spy.reads {
		if r[0] < cs {
			t.Errorf("read %d bytes at %d: the zero cluster was read", r[1], r[0])
		}
		read += r[1]
	}
	if read == 0 || read > 2*sparsecopy.Chunk {
		t.Errorf("read %d bytes in %v; want only the chunks holding data (4M and 8M)", read, spy.reads)
	}
}
