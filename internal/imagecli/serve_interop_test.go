package imagecli

// Interop tests of `image serve` on qcow2 images, with real NBD clients
// (libnbd's nbdinfo and nbdcopy, qemu-io, fio's nbd engine) and qemu-img as
// the judge of the file afterwards. They skip when a tool is missing,
// except under CI=true, where they fail: CI must install libnbd-bin, fio
// and qemu-utils.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func requireTool(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is required under CI=true: %v", name, err)
		}
		t.Skipf("%s not installed: %v", name, err)
	}
	return path
}

// runTool runs a tool in a temporary directory (fio leaves state files in
// its working directory) with a deadline, and fails the test with its
// output if it fails.
func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := tryTool(t, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func tryTool(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, requireTool(t, name), args...)
	cmd.Dir = t.TempDir()
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// serveImage serves a qcow2 image on a unix socket with `image serve`.
func serveImage(t *testing.T, img string, args ...string) *running {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	return start(t, append(append([]string{"serve", "-k", sock}, args...), img)...)
}

// stopClean stops serve and checks that it exited 0 and left the image
// consistent by qemu-img's judgement: no corruption, no leak.
func stopClean(t *testing.T, r *running, img string) {
	t.Helper()
	r.stop(t).expect(t, 0, "", "")
	if out := mustQemu(t, "qemu-img", "check", img); !strings.Contains(out, "No errors were found") {
		t.Errorf("qemu-img check after serve:\n%s", out)
	}
}

func diskBlocks(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}

type nbdExport struct {
	Name         string `json:"export-name"`
	Description  string `json:"description"`
	Size         int64  `json:"export-size"`
	ReadOnly     bool   `json:"is_read_only"`
	CanFlush     bool   `json:"can_flush"`
	CanFUA       bool   `json:"can_fua"`
	CanTrim      bool   `json:"can_trim"`
	CanZero      bool   `json:"can_zero"`
	CanMultiConn bool   `json:"can_multi_conn"`
}

func TestServeInteropNbdinfo(t *testing.T) {
	requireTool(t, "nbdinfo")
	for _, tt := range []struct {
		name string
		args []string
		want nbdExport
	}{
		{"writable", []string{"-e", "4"}, nbdExport{CanFlush: true, CanFUA: true, CanTrim: true, CanZero: true, CanMultiConn: true}},
		{"read-only", []string{"-e", "4", "-r"}, nbdExport{ReadOnly: true, CanFlush: true, CanMultiConn: true}},
		{"one client", []string{"-e", "1"}, nbdExport{CanFlush: true, CanFUA: true, CanTrim: true, CanZero: true}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			img := lazyImage(t, 64<<20)
			r := serveImage(t, img, append(tt.args, "-x", "vol", "-D", "a volume")...)
			var info struct{ Exports []nbdExport }
			out := runTool(t, "nbdinfo", "--json", r.line)
			if err := json.Unmarshal([]byte(out), &info); err != nil || len(info.Exports) != 1 {
				t.Fatalf("nbdinfo: %v\n%s", err, out)
			}
			want := tt.want
			want.Name, want.Description, want.Size = "vol", "a volume", 64<<20
			if info.Exports[0] != want {
				t.Errorf("nbdinfo shows %+v\nwant %+v", info.Exports[0], want)
			}
			stopClean(t, r, img)
		})
	}
}

// TestServeInteropFio: fio's nbd engine writes at queue depth 32 and
// verifies, then a second pass only reads and verifies; afterwards the
// image is consistent.
func TestServeInteropFio(t *testing.T) {
	requireTool(t, "fio")
	requireTool(t, "qemu-img")
	img := lazyImage(t, 64<<20)
	r := serveImage(t, img)
	args := []string{
		"--name=verify", "--ioengine=nbd", "--uri=" + r.line,
		"--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=32m",
		"--verify=crc32c", "--randseed=42", "--output-format=terse",
	}
	runTool(t, "fio", args...)
	runTool(t, "fio", append(args, "--verify_only")...)
	stopClean(t, r, img)

	// The data survived the close: serve again and verify once more.
	r = serveImage(t, img)
	args[2] = "--uri=" + r.line
	runTool(t, "fio", append(args, "--verify_only")...)
	// A verify pass over zeroed data must fail, or the passes above proved
	// nothing.
	runTool(t, "qemu-io", "-f", "raw", r.line, "-c", "write -z 0 32M")
	if out, err := tryTool(t, "fio", append(args, "--verify_only")...); err == nil {
		t.Fatalf("fio --verify_only passed over zeroed data:\n%s", out)
	}
	stopClean(t, r, img)
}

// TestServeInteropNbdcopy: nbdcopy with four connections copies data in
// and out; the image then equals the source by qemu-img compare.
func TestServeInteropNbdcopy(t *testing.T) {
	requireTool(t, "nbdcopy")
	requireTool(t, "qemu-img")
	const size = 32 << 20
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	data := make([]byte, size)
	rand.Read(data[:size/2])
	rand.Read(data[size/2+4<<20:]) // 4 MiB of zeros between, for WRITE_ZEROES
	mustWrite(t, src, data)
	img := filepath.Join(dir, "disk.qcow2")
	newQcow2(t, img, qcow2.CreateOptions{Size: size}, nil)

	r := serveImage(t, img, "-e", "4")
	runTool(t, "nbdcopy", "--connections=4", "--threads=4", "--flush", src, r.line)
	dst := filepath.Join(dir, "dst.raw")
	runTool(t, "nbdcopy", "--connections=4", "--threads=4", r.line, dst)
	if got, err := os.ReadFile(dst); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("nbdcopy round trip differs (%v)", err)
	}
	stopClean(t, r, img)
	if out := mustQemu(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, img); !strings.Contains(out, "Images are identical") {
		t.Errorf("qemu-img compare: %s", out)
	}
}

// TestServeInteropQemuIO: every kind of write qemu-io can send, then
// qemu-img check and compare against the expected disk.
func TestServeInteropQemuIO(t *testing.T) {
	requireTool(t, "qemu-io")
	requireTool(t, "qemu-img")
	const size = 8 << 20
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.qcow2")
	newQcow2(t, img, qcow2.CreateOptions{Size: size}, nil)
	r := serveImage(t, img)
	out := runTool(t, "qemu-io", "-f", "raw", r.line,
		"-c", "write -P 0xab 0 512k",
		"-c", "write -f -P 0xcd 1M 4k", // FUA
		"-c", "discard 0 64k", // a whole cluster
		"-c", "write -z 64k 64k", // NO_HOLE
		"-c", "write -z -u 128k 64k", // may unmap
		"-c", "write -z 200k 8k", // inside a cluster
		"-c", "write -P 0x11 3000k 100k", // across clusters
		"-c", "discard 3M 192k", // whole clusters in a partly discarded range
		"-c", "flush",
		"-c", "read -P 0 0 192k",
		"-c", "read -P 0xab 192k 8k",
		"-c", "read -P 0 200k 8k",
		"-c", "read -P 0xab 208k 304k",
		"-c", "read -P 0x11 3000k 72k",
		"-c", "read -P 0 3M 192k",
		"-c", "read -P 0xcd 1M 4k",
	)
	if strings.Contains(out, "failed") || strings.Contains(out, "Pattern verification") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	stopClean(t, r, img)

	want := make([]byte, size)
	fill := func(off, n int, b byte) {
		for i := range n {
			want[off+i] = b
		}
	}
	fill(0, 512<<10, 0xab)
	fill(1<<20, 4<<10, 0xcd)
	fill(0, 192<<10, 0)          // discard, write -z, write -z -u: three whole clusters
	fill(200<<10, 8<<10, 0)      // write -z inside a cluster
	fill(3000<<10, 72<<10, 0x11) // up to 3M; the discard drops 3M..3M+192k
	expected := filepath.Join(dir, "expected.raw")
	mustWrite(t, expected, want)
	if r := qemu(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", expected, img); r.code != 0 {
		t.Errorf("qemu-img compare: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}

// TestServeInteropTrimShrinksFile: TRIM frees clusters and, once flushed,
// the file takes less space on the host.
func TestServeInteropTrimShrinksFile(t *testing.T) {
	requireTool(t, "qemu-io")
	requireTool(t, "qemu-img")
	img := lazyImage(t, 64<<20)
	r := serveImage(t, img)
	runTool(t, "qemu-io", "-f", "raw", r.line, "-c", "write -P 0x5a 0 16M", "-c", "flush")
	full := diskBlocks(t, img)
	runTool(t, "qemu-io", "-f", "raw", r.line, "-c", "discard 0 16M", "-c", "flush")
	trimmed := diskBlocks(t, img)
	t.Logf("disk usage: %d KiB with 16 MiB written, %d KiB after TRIM and FLUSH", full>>10, trimmed>>10)
	if full < 16<<20 || trimmed > full-15<<20 {
		t.Errorf("disk usage %d bytes with 16 MiB written, %d after TRIM and FLUSH", full, trimmed)
	}
	stopClean(t, r, img)
	if after := diskBlocks(t, img); after > trimmed+1<<20 {
		t.Errorf("disk usage grew from %d to %d bytes on close", trimmed, after)
	}
	if out := runTool(t, "qemu-io", "-f", "qcow2", "-r", img, "-c", "read -P 0 0 16M"); strings.Contains(out, "failed") || strings.Contains(out, "verification") {
		t.Errorf("trimmed range does not read as zeros:\n%s", out)
	}
}
