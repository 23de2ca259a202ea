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

// sparseRaw writes a 16 MiB raw image, mostly holes, with data at a few
// offsets, some unaligned and one straddling a cluster boundary.
func sparseRaw(t *testing.T, path string) []byte {
	t.Helper()
	want := make([]byte, 16<<20)
	for _, off := range []int{0, 100, 3 << 20, 5<<20 + 65536 - 10, 15<<20 + 4095} {
		copy(want[off:], pattern(1000, byte(off)))
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(len(want))); err != nil {
		t.Fatal(err)
	}
	if err := sparsecopy.Copy(context.Background(), bytes.NewReader(want), int64(len(want)), f, 4096); err != nil {
		t.Fatal(err)
	}
	return want
}

func TestConvertRoundTrip(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	want := sparseRaw(t, src)
	q := filepath.Join(dir, "mid.qcow2")
	back := filepath.Join(dir, "back.raw")

	runCLI(t, "convert", "-f", "raw", "-O", "qcow2", src, q).expect(t, 0, "", "")
	runCLI(t, "convert", "-O", "raw", q, back).expect(t, 0, "", "")
	if r := runCLI(t, "convert", q, filepath.Join(dir, "default.raw")); r.code != 0 || r.stdout != "" || r.stderr != "" {
		t.Fatalf("convert with defaults: %+v", r)
	}

	for _, p := range []string{q, back, filepath.Join(dir, "default.raw")} {
		if got := readImage(t, p); !bytes.Equal(got, want) {
			t.Fatalf("%s differs from the source", p)
		}
	}
	if f, _ := probeFormat(back); f != "raw" {
		t.Fatalf("default output format %s, want raw", f)
	}
	if used, _ := diskUsage(back); used > 1<<20 {
		t.Errorf("raw output not sparse: %d bytes used", used)
	}
	// 5 data runs touch 6 clusters of 64 KiB; metadata adds a few more.
	if fi, _ := os.Stat(q); fi.Size() > 1<<20 {
		t.Errorf("qcow2 output is %d bytes: zero clusters were allocated", fi.Size())
	}
	runCLI(t, "check", q).expect(t, 0, "No errors were found", "")
}

func TestConvertOptions(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	want := sparseRaw(t, src)
	dst := filepath.Join(dir, "dst.qcow2")
	runCLI(t, "convert", "-O", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on", src, dst).expect(t, 0, "", "")
	info := imageInfoOf(t, dst)
	if info.ClusterSize != 4096 || !info.LazyRefcounts || info.VirtualSize != int64(len(want)) {
		t.Fatalf("info %+v", info)
	}
	if !bytes.Equal(readImage(t, dst), want) {
		t.Fatal("data differs")
	}
}

func TestConvertFlattensBacking(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	mustWrite(t, base, pattern(2<<20, 1))
	over := filepath.Join(dir, "over.qcow2")
	newQcow2(t, over, qcow2.CreateOptions{Size: 2 << 20, BackingFile: "base.raw", BackingFormat: "raw"},
		map[int64][]byte{1 << 20: make([]byte, 4096), 1<<20 + 8192: pattern(100, 77)})
	want := pattern(2<<20, 1)
	copy(want[1<<20:], make([]byte, 4096))
	copy(want[1<<20+8192:], pattern(100, 77))

	for _, format := range []string{"raw", "qcow2"} {
		dst := filepath.Join(dir, "flat."+format)
		runCLI(t, "convert", "-O", format, over, dst).expect(t, 0, "", "")
		if !bytes.Equal(readImage(t, dst), want) {
			t.Fatalf("%s: flattened data differs", format)
		}
		if format == "qcow2" && imageInfoOf(t, dst).BackingFile != "" {
			t.Fatal("qcow2 output has a backing file")
		}
	}
}

func TestConvertErrors(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	sparseRaw(t, src)
	existing := filepath.Join(dir, "existing.img")
	mustWrite(t, existing, []byte("keep me"))
	dst := filepath.Join(dir, "dst.img")
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"existing dst", []string{src, existing}, "file already exists"},
		{"missing src", []string{filepath.Join(dir, "nope"), dst}, "could not open"},
		{"src not qcow2", []string{"-f", "qcow2", src, dst}, "qcow2: not a qcow2 image"},
		{"bad output format", []string{"-O", "vmdk", src, dst}, "unknown file format 'vmdk'"},
		{"bad input format", []string{"-f", "vhd", src, dst}, "unknown file format 'vhd'"},
		{"bad option", []string{"-O", "qcow2", "-o", "cluster_size=3000", src, dst}, "qcow2: invalid argument"},
		{"size option", []string{"-O", "qcow2", "-o", "size=1G", src, dst}, "takes the size from SRC"},
		{"backing option", []string{"-O", "qcow2", "-o", "backing_file=x,backing_fmt=raw", src, dst}, "no backing file"},
		{"missing dst dir", []string{src, filepath.Join(dir, "no", "dst.img")}, "no such file or directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, append([]string{"convert"}, tt.args...)...)
			r.expect(t, 1, "", "csi-qcow2 image: ")
			r.expect(t, 1, "", tt.want)
			if fileExists(dst) {
				t.Fatal("partial DST left behind")
			}
		})
	}
	if b, _ := os.ReadFile(existing); string(b) != "keep me" {
		t.Fatalf("existing DST changed: %q", b)
	}
}

func TestConvertCanceledRemovesDst(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	sparseRaw(t, src)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for _, format := range []string{"raw", "qcow2"} {
		dst := filepath.Join(dir, "dst."+format)
		r := runCLIContext(t, ctx, "convert", "-O", format, src, dst)
		r.expect(t, 1, "", "interrupted: context canceled")
		if fileExists(dst) {
			t.Fatalf("%s: partial DST left behind", format)
		}
	}
}

func TestRawAllocated(t *testing.T) {
	path := tempPath(t, "s.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(4 << 20); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(pattern(1<<20, 1), 1<<20); err != nil {
		t.Fatal(err)
	}
	d := &rawDisk{File: f, size: 4 << 20}
	alloc, n, err := d.Allocated(0, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	// Filesystems without SEEK_HOLE report everything as data; that is
	// correct, only slower.
	if alloc && n == 4<<20 {
		t.Skip("filesystem reports no holes")
	}
	if alloc || n != 1<<20 {
		t.Fatalf("at 0: allocated=%v n=%d, want a 1 MiB hole", alloc, n)
	}
	if alloc, n, _ = d.Allocated(1<<20, 3<<20); !alloc || n != 1<<20 {
		t.Fatalf("at 1M: allocated=%v n=%d, want 1 MiB of data", alloc, n)
	}
	if alloc, n, _ = d.Allocated(2<<20, 2<<20); alloc || n != 2<<20 {
		t.Fatalf("at 2M: allocated=%v n=%d, want a hole to the end", alloc, n)
	}
}
