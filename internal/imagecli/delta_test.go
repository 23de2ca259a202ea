package imagecli

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func TestSnapshotDelta(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.qcow2")
	newQcow2(t, path, qcow2.CreateOptions{Size: 4 << 20}, map[int64][]byte{0: pattern(300<<10, 1)})
	runCLI(t, "snapshot", "-c", "base", path).expect(t, 0, "", "")
	writeQcow2(t, path, pattern(100, 7), 64<<10+5) // one cluster
	img, err := qcow2.Open(path, qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.WriteZeroes(1<<20, 128<<10, false); err != nil { // two clusters
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	runCLI(t, "snapshot", "-c", "target", path).expect(t, 0, "", "")

	type change struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Zero   bool  `json:"zero"`
	}
	want := []change{{64 << 10, 64 << 10, false}, {1 << 20, 128 << 10, true}}
	r := runCLI(t, "snapshot", "--delta", "base", "target", path, "--output=json")
	r.expect(t, 0, `{ "start": 65536, "length": 65536, "zero": false},`, "")
	var got []change
	if err := json.Unmarshal([]byte(r.stdout), &got); err != nil || !slices.Equal(got, want) {
		t.Errorf("--output=json: %v %+v, want %+v\n%s", err, got, want, r.stdout)
	}
	r = runCLI(t, "snapshot", "--delta", "1", "2", path) // by id
	r.expect(t, 0, "0x100000        0x20000         zero\n", "")
	r.expect(t, 0, "0x10000         0x10000         data\n0x100000", "")
	r.expect(t, 0, "\n196608 bytes changed in 2 ranges\n", "")
	runCLI(t, "snapshot", "--delta", "base", "base", path, "--output=json").expect(t, 0, "[]\n", "")
	runCLI(t, "snapshot", "--delta", "target", "target", path).expect(t, 0, "0 bytes changed in 0 ranges", "")

	runCLI(t, "snapshot", "--delta", "base", "nope", path).expect(t, 1, "", "could not compare snapshot 'nope' with 'base'")
	runCLI(t, "snapshot", "--delta", "nope", "target", path).expect(t, 1, "", "snapshot not found")
	runCLI(t, "snapshot", "--delta", "base", path).expect(t, 1, "", "--delta BASE takes TARGET FILE, got 1 arguments")
	runCLI(t, "snapshot", "--delta", "base", "target", path, "--output=xml").expect(t, 1, "", "--output must be human or json")
	runCLI(t, "snapshot", "--delta", "base", "-c", "x", "target", path).expect(t, 1, "", "exactly one of -c, -l, -d, -a and --delta")
	runCLI(t, "snapshot", "-l", "--output=json", path).expect(t, 1, "", "--output goes with --delta")
	runCLI(t, "snapshot", "--delta", "base", "target", filepath.Join(dir, "missing.qcow2")).expect(t, 1, "", "missing.qcow2")
	runCLI(t, "snapshot", "--help").expect(t, 0, "--delta is csi-qcow2's own; qemu-img has no such option", "")
	if _, err := exec.LookPath("qemu-img"); err == nil {
		mustQemu(t, "qemu-img", "check", path) // --delta opened it read-only
	}
}
