package imagecli

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// TestInteropExtents: extents --output=json prints qemu-img map
// --output=json's text exactly, on images qemu-io filled with data,
// compressed, zero and unallocated clusters over a backing file, whole and
// in a window.
func TestInteropExtents(t *testing.T) {
	qemuTool(t, "qemu-img")
	qemuTool(t, "qemu-io")
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	mustQemu(t, "qemu-img", "create", "-f", "qcow2", "-o", "compression_type=zstd", base, "4M")
	mustQemu(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 128k", "-c", "write -c -P 2 1M 128k",
		"-c", "write -z 2M 64k", base)
	mustQemu(t, "qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", base, "-F", "qcow2", top, "5M")
	mustQemu(t, "qemu-io", "-f", "qcow2", "-c", "write -P 3 64k 8k", "-c", "write -z 0 4k",
		"-c", "write -c -P 4 3M 4k", "-c", "write -P 5 4M 4k", top)
	for _, tt := range []struct {
		name string
		args []string
	}{
		{"base", []string{base}},
		{"top", []string{top}},
		{"window", []string{"-s", "70000", "-l", "3M", top}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			want := mustQemu(t, "qemu-img", append([]string{"map", "--output=json"}, tt.args...)...)
			r := runCLI(t, append([]string{"extents", "--output=json"}, tt.args...)...)
			r.expect(t, 0, "", "")
			if r.stdout != want {
				t.Errorf("ours:\n%s\nqemu-img map:\n%s", r.stdout, want)
			}
		})
	}
}

func TestExtentsHuman(t *testing.T) {
	path := tempPath(t, "x.qcow2")
	newQcow2(t, path, qcow2.CreateOptions{Size: 1 << 20, ClusterSize: 65536}, map[int64][]byte{65536: pattern(100, 1)})
	r := runCLI(t, "extents", path)
	r.expect(t, 0, "", "")
	want := "" +
		"Offset          Length          Mapped to       Depth  State\n" +
		"0x0             0x10000         -               0      unallocated\n" +
		"0x10000         0x10000         0x50000         0      data\n" +
		"0x20000         0xe0000         -               0      unallocated\n"
	if r.stdout != want {
		t.Fatalf("got\n%s\nwant\n%s", r.stdout, want)
	}
}

func TestExtentsSnapshot(t *testing.T) {
	path := tempPath(t, "s.qcow2")
	newQcow2(t, path, qcow2.CreateOptions{Size: 1 << 20, ClusterSize: 65536}, map[int64][]byte{0: pattern(10, 1)})
	runCLI(t, "snapshot", "-c", "s1", path).expect(t, 0, "", "")
	img, err := qcow2.Open(path, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(pattern(10, 2), 512<<10); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	snap := runCLI(t, "extents", "--output=json", "--snapshot", "s1", path)
	snap.expect(t, 0, "", "")
	active := runCLI(t, "extents", "--output=json", path)
	if snap.stdout == active.stdout {
		t.Fatalf("snapshot and active disk list the same extents:\n%s", snap.stdout)
	}
	want := `[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},` + "\n" +
		`{ "start": 65536, "length": 983040, "depth": 0, "present": false, "zero": true, "data": false}]` + "\n"
	if snap.stdout != want {
		t.Fatalf("snapshot extents\n%s\nwant\n%s", snap.stdout, want)
	}
}

func TestExtentsErrors(t *testing.T) {
	dir := t.TempDir()
	q, raw := filepath.Join(dir, "x.qcow2"), filepath.Join(dir, "x.raw")
	newQcow2(t, q, qcow2.CreateOptions{Size: 1 << 20}, nil)
	if err := os.WriteFile(raw, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name      string
		args      []string
		stderrHas string
	}{
		{"no file", nil, "expected FILE"},
		{"two files", []string{q, q}, "expected FILE"},
		{"raw", []string{raw}, "extents lists qcow2 images"},
		{"bad output", []string{"--output=xml", q}, "--output must be human or json"},
		{"bad start", []string{"-s", "x", q}, "--start-offset"},
		{"bad length", []string{"-l", "x", q}, "--max-length"},
		{"missing snapshot", []string{"--snapshot", "nope", q}, "could not open snapshot 'nope'"},
		{"missing file", []string{filepath.Join(dir, "none.qcow2")}, "none.qcow2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, append([]string{"extents"}, tt.args...)...)
			if r.code == 0 {
				t.Fatalf("exit 0, stdout %q", r.stdout)
			}
			r.expect(t, r.code, "", tt.stderrHas)
		})
	}
}
