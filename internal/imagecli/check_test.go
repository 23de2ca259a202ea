package imagecli

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// checkImage makes a 64 MiB qcow2 image with data at 0 and 10 MiB.
func checkImage(t *testing.T, dir, name string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	newQcow2(t, path, qcow2.CreateOptions{Size: 64 << 20}, map[int64][]byte{
		0:        pattern(1<<20, 3),
		10 << 20: pattern(64<<10, 9),
	})
	return path
}

func TestCheckClean(t *testing.T) {
	path := checkImage(t, t.TempDir(), "a.qcow2")
	r := runCLI(t, "check", path)
	r.expect(t, 0, "", "")
	lines := strings.Split(r.stdout, "\n")
	if lines[0] != "No errors were found on the image." ||
		!strings.HasPrefix(lines[1], "17/1024 = 1.66% allocated, 0.00% fragmented, 0.00% compressed clusters") ||
		!strings.HasPrefix(lines[2], "Image end offset: ") {
		t.Fatalf("stdout:\n%s", r.stdout)
	}

	r = runCLI(t, "check", "--output=json", path)
	r.expect(t, 0, "", "")
	got := decodeCheck(t, r.stdout)
	if got.TotalClusters != 1024 || got.AllocatedClusters != 17 || got.CheckErrors != 0 || got.Leaks != 0 ||
		got.Corruptions != 0 || got.ImageEndOffset == 0 || got.Filename != path || got.Format != "qcow2" {
		t.Fatalf("json: %s", r.stdout)
	}
	for _, absent := range []string{"leaks", "corruptions", "leaks-fixed", "corruptions-fixed", "fragmented-clusters", "compressed-clusters"} {
		if strings.Contains(r.stdout, `"`+absent+`"`) {
			t.Errorf("json has zero %q, qemu-img omits it: %s", absent, r.stdout)
		}
	}

	r = runCLI(t, "check", "-q", path)
	r.expect(t, 0, "", "")
	if r.stdout != "" {
		t.Fatalf("-q printed %q", r.stdout)
	}
}

func TestCheckEmptyImage(t *testing.T) {
	path := tempPath(t, "e.qcow2")
	newQcow2(t, path, qcow2.CreateOptions{Size: 1 << 30}, nil)
	r := runCLI(t, "check", path)
	r.expect(t, 0, "No errors were found on the image.\nImage end offset: ", "")
	if strings.Contains(r.stdout, "allocated") {
		t.Fatalf("no allocation line expected for an empty image:\n%s", r.stdout)
	}
}

func TestCheckLeaks(t *testing.T) {
	dir := t.TempDir()
	path := checkImage(t, dir, "leak.qcow2")
	addLeakedCluster(t, path)

	r := runCLI(t, "check", path)
	r.expect(t, 3, "\n1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n", "Leaked cluster")
	if strings.Contains(r.stdout, "No errors") {
		t.Fatalf("stdout:\n%s", r.stdout)
	}
	r = runCLI(t, "check", "--output=json", path)
	r.expect(t, 3, `"leaks": 1,`, "")

	r = runCLI(t, "check", "-r", "leaks", path)
	r.expect(t, 0, "The following inconsistencies were found and repaired:\n\n    1 leaked clusters\n    0 corruptions\n\n"+
		"Double checking the fixed image now...\nNo errors were found on the image.\n", "")

	r = runCLI(t, "check", "--output=json", path)
	r.expect(t, 0, `"check-errors": 0`, "")

	// JSON after a repair carries the fixed count, not the human banner.
	path2 := checkImage(t, dir, "leak2.qcow2")
	addLeakedCluster(t, path2)
	r = runCLI(t, "check", "-r", "all", "--output=json", path2)
	r.expect(t, 0, "", "")
	if got := decodeCheck(t, r.stdout); got.LeaksFixed != 1 || got.Leaks != 0 || strings.Contains(r.stdout, "repaired") {
		t.Fatalf("json: %s", r.stdout)
	}
}

func TestCheckCorruption(t *testing.T) {
	path := checkImage(t, t.TempDir(), "bad.qcow2")
	corruptL1Refcount(t, path)

	r := runCLI(t, "check", path)
	r.expect(t, 2, " errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n", "ERROR")
	r = runCLI(t, "check", "--output=json", path)
	r.expect(t, 2, `"corruptions": `, "")

	r = runCLI(t, "check", "-r", "leaks", path)
	if r.code != 2 && r.code != 1 {
		t.Fatalf("-r leaks on a corrupt image: exit %d, want 2 (or 1 as qemu-img)\n%s%s", r.code, r.stdout, r.stderr)
	}

	r = runCLI(t, "check", "-r", "all", path)
	r.expect(t, 0, "The following inconsistencies were found and repaired:", "")
	r.expect(t, 0, "Double checking the fixed image now...\nNo errors were found on the image.\n", "")
	runCLI(t, "check", path).expect(t, 0, "No errors", "")
}

func TestCheckCannotCheck(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "r.img")
	mustWrite(t, raw, make([]byte, 8192))
	bad := filepath.Join(dir, "bad.qcow2")
	mustWrite(t, bad, append(append([]byte{}, qcow2Magic...), make([]byte, 100)...))
	tests := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"raw", []string{raw}, exitUnsupported, "does not support checks"},
		{"raw forced", []string{"-f", "raw", raw}, exitUnsupported, "does not support checks"},
		{"raw as qcow2", []string{"-f", "qcow2", raw}, 1, "qcow2: not a qcow2 image"},
		{"missing", []string{filepath.Join(dir, "nope")}, 1, "could not open"},
		{"bad header", []string{bad}, 1, "check of '" + bad + "' failed: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, append([]string{"check"}, tt.args...)...)
			r.expect(t, tt.code, "", "csi-qcow2 image: ")
			r.expect(t, tt.code, "", tt.want)
		})
	}
}

func TestHumanCheck(t *testing.T) {
	tests := []struct {
		name string
		res  qcow2.CheckResult
		want string
	}{
		{"clean", qcow2.CheckResult{ImageEndOffset: 262144, TotalClusters: 16384},
			"No errors were found on the image.\nImage end offset: 262144\n"},
		{"everything", qcow2.CheckResult{Corruptions: 2, Leaks: 3, CheckErrors: 1, ImageEndOffset: 1703936,
			TotalClusters: 1024, AllocatedClusters: 17, FragmentedClusters: 1, CompressedClusters: 0},
			"\n2 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n" +
				"\n3 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n" +
				"\n1 internal errors have occurred during the check.\n" +
				"17/1024 = 1.66% allocated, 5.88% fragmented, 0.00% compressed clusters\n" +
				"Image end offset: 1703936\n"},
	}
	for _, tt := range tests {
		if got := humanCheck(&tt.res); got != tt.want {
			t.Errorf("%s:\n%q\nwant\n%q", tt.name, got, tt.want)
		}
	}
}

func TestCheckStatus(t *testing.T) {
	tests := []struct {
		res  qcow2.CheckResult
		code int
	}{
		{qcow2.CheckResult{}, 0},
		{qcow2.CheckResult{LeaksFixed: 3}, 0},
		{qcow2.CheckResult{Leaks: 1}, 3},
		{qcow2.CheckResult{Leaks: 1, Corruptions: 1}, 2},
		{qcow2.CheckResult{Corruptions: 1, CheckErrors: 1}, 1},
	}
	for _, tt := range tests {
		code := report(streams{stdout: &strings.Builder{}, stderr: &strings.Builder{}}, checkSpec(), newFlagSet("check"), checkStatus(&tt.res))
		if code != tt.code {
			t.Errorf("%+v: exit %d, want %d", tt.res, code, tt.code)
		}
	}
}

func decodeCheck(t *testing.T, s string) imageCheck {
	t.Helper()
	var c imageCheck
	if err := json.Unmarshal([]byte(s), &c); err != nil {
		t.Fatalf("%v: %s", err, s)
	}
	return c
}
