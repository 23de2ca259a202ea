package imagecli

import (
	"bytes"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func writeQcow2(t *testing.T, path string, p []byte, off int64) {
	t.Helper()
	img, err := qcow2.Open(path, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestSnapshotCommand(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.qcow2")
	newQcow2(t, path, qcow2.CreateOptions{Size: 4 << 20}, map[int64][]byte{0: pattern(300<<10, 1)})
	before := readImage(t, path)

	runCLI(t, "snapshot", "-c", "s1", path).expect(t, 0, "", "")
	runCLI(t, "snapshot", "-c", "s1", path).expect(t, 1, "", "could not create snapshot 's1'")
	writeQcow2(t, path, pattern(100<<10, 7), 64<<10)
	runCLI(t, "resize", path, "6M").expect(t, 0, "Image resized.", "")
	runCLI(t, "snapshot", "-c", "s2", path).expect(t, 0, "", "")
	r := runCLI(t, "snapshot", "-l", path)
	r.expect(t, 0, "Snapshot list:", "")
	if !strings.Contains(r.stdout, "\n1         s1 ") || !strings.Contains(r.stdout, "\n2         s2 ") {
		t.Errorf("snapshot -l:\n%s", r.stdout)
	}
	runCLI(t, "info", path).expect(t, 0, "s2", "")

	raw := filepath.Join(dir, "s1.raw")
	runCLI(t, "convert", "-l", "snapshot.name=s1", "-O", "raw", path, raw).expect(t, 0, "", "")
	if got := readImage(t, raw); !bytes.Equal(got, before) {
		t.Errorf("convert -l snapshot.name=s1 differs from the disk at s1")
	}
	runCLI(t, "convert", "-l", "snapshot.id=9", path, filepath.Join(dir, "x.raw")).expect(t, 1, "", "snapshot not found")
	runCLI(t, "convert", "-l", "snapshot.size=1", path, filepath.Join(dir, "y.raw")).expect(t, 1, "", "unknown snapshot parameter")

	runCLI(t, "snapshot", "-a", "s1", path).expect(t, 0, "", "")
	if got := readImage(t, path); !bytes.Equal(got, before) {
		t.Errorf("after snapshot -a s1 the disk differs from s1 (size %d, want %d)", len(got), len(before))
	}
	runCLI(t, "snapshot", "-d", "1", path).expect(t, 0, "", "")
	runCLI(t, "snapshot", "-d", "s1", path).expect(t, 1, "", "snapshot not found")
	r = runCLI(t, "snapshot", "-l", path)
	if strings.Contains(r.stdout, " s1 ") || !strings.Contains(r.stdout, " s2 ") {
		t.Errorf("snapshot -l after deleting s1:\n%s", r.stdout)
	}
	runCLI(t, "check", path).expect(t, 0, "No errors were found", "")

	runCLI(t, "snapshot", path).expect(t, 1, "", "exactly one of -c, -l, -d, -a and --delta")
	runCLI(t, "snapshot", "-c", "a", "-d", "b", path).expect(t, 1, "", "exactly one of")
	runCLI(t, "snapshot", "-l").expect(t, 1, "", "expected FILE")
	if _, err := exec.LookPath("qemu-img"); err == nil {
		if out := mustQemu(t, "qemu-img", "snapshot", "-l", path); !strings.Contains(out, " s2 ") {
			t.Errorf("qemu-img snapshot -l:\n%s", out)
		}
		mustQemu(t, "qemu-img", "check", path)
	}
}

func TestConvertCompressed(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	want := make([]byte, 5<<20+512)
	copy(want, bytes.Repeat([]byte("compressible "), 200000))
	copy(want[4<<20:], pattern(1<<20, 3))
	mustWrite(t, src, want)
	dst := filepath.Join(dir, "c.qcow2")
	runCLI(t, "convert", "-c", "-O", "qcow2", src, dst).expect(t, 0, "", "")
	if got := readImage(t, dst); !bytes.Equal(got, want) {
		t.Fatal("convert -c output reads differently")
	}
	res, err := qcow2.CheckFile(dst, qcow2.CheckOptions{})
	if err != nil || !res.Clean() || res.CompressedClusters == 0 {
		t.Fatalf("check of convert -c output: %+v %v", res, err)
	}
	runCLI(t, "convert", "-c", "-O", "raw", src, filepath.Join(dir, "c.raw")).expect(t, 1, "", "-c needs -O qcow2")
	if _, err := exec.LookPath("qemu-img"); err == nil {
		mustQemu(t, "qemu-img", "check", dst)
		mustQemu(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", dst, src)
	}
}
