package imagecli

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func TestInfoQcow2(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "a.qcow2")
	newQcow2(t, path, qcow2.CreateOptions{Size: 1 << 30, ClusterSize: 4096, RefcountBits: 8, LazyRefcounts: true},
		map[int64][]byte{0: pattern(8192, 1)})
	used, _ := diskUsage(path)

	r := runCLI(t, "info", path)
	r.expect(t, 0, "", "")
	want := "image: " + path + "\n" +
		"file format: qcow2\n" +
		"virtual size: 1 GiB (1073741824 bytes)\n" +
		"disk size: " + formatSize(used) + "\n" +
		"cluster_size: 4096\n" +
		"Format specific information:\n" +
		"    compat: 1.1\n" +
		"    compression type: zlib\n" +
		"    lazy refcounts: true\n" +
		"    refcount bits: 8\n" +
		"    corrupt: false\n" +
		"    extended l2: false\n"
	if r.stdout != want {
		t.Fatalf("human info:\n%s\nwant:\n%s", r.stdout, want)
	}

	r = runCLI(t, "info", "--output=json", path)
	r.expect(t, 0, "", "")
	wantJSON := `{
    "virtual-size": 1073741824,
    "filename": "` + path + `",
    "cluster-size": 4096,
    "format": "qcow2",
    "actual-size": ` + sprintf("%d", used) + `,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": true,
            "refcount-bits": 8,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "dirty-flag": false
}
`
	if r.stdout != wantJSON {
		t.Fatalf("json info:\n%s\nwant:\n%s", r.stdout, wantJSON)
	}
}

func TestInfoBacking(t *testing.T) {
	dir := t.TempDir()
	newQcow2(t, filepath.Join(dir, "base.qcow2"), qcow2.CreateOptions{Size: 1 << 20}, nil)
	over := filepath.Join(dir, "over.qcow2")
	newQcow2(t, over, qcow2.CreateOptions{Size: 1 << 20, BackingFile: "base.qcow2", BackingFormat: "qcow2"}, nil)

	r := runCLI(t, "info", over)
	r.expect(t, 0, "cluster_size: 65536\nbacking file: base.qcow2 (actual path: "+filepath.Join(dir, "base.qcow2")+")\nbacking file format: qcow2\nFormat specific information:\n", "")

	r = runCLI(t, "info", "--output", "json", over)
	r.expect(t, 0, "", "")
	var got map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &got); err != nil {
		t.Fatal(err)
	}
	if got["backing-filename"] != "base.qcow2" || got["backing-filename-format"] != "qcow2" ||
		got["full-backing-filename"] != filepath.Join(dir, "base.qcow2") {
		t.Fatalf("json: %s", r.stdout)
	}
}

func TestInfoDirty(t *testing.T) {
	path := tempPath(t, "dirty.qcow2")
	dirtyImage(t, path)
	runCLI(t, "info", path).expect(t, 0, "cluster_size: 65536\ncleanly shut down: no\nFormat specific information:\n", "")
	runCLI(t, "info", "--output=json", path).expect(t, 0, `"dirty-flag": true`, "")
	runCLI(t, "check", path).expect(t, 0, "No errors were found on the image.", "")
	if !imageInfoOf(t, path).Dirty {
		t.Fatal("info or check cleared the dirty flag")
	}
}

func TestInfoRaw(t *testing.T) {
	path := tempPath(t, "r.img")
	mustWrite(t, path, pattern(1<<20, 7))
	used, _ := diskUsage(path)
	for _, args := range [][]string{{"info", path}, {"info", "-f", "raw", path}} {
		r := runCLI(t, args...)
		want := "image: " + path + "\nfile format: raw\nvirtual size: 1 MiB (1048576 bytes)\ndisk size: " + formatSize(used) + "\n"
		if r.code != 0 || r.stdout != want {
			t.Fatalf("%v: exit %d\n%s\nwant\n%s\nstderr %s", args, r.code, r.stdout, want, r.stderr)
		}
	}
	r := runCLI(t, "info", "--output=json", path)
	want := "{\n    \"virtual-size\": 1048576,\n    \"filename\": \"" + path + "\",\n    \"format\": \"raw\",\n    \"actual-size\": " +
		sprintf("%d", used) + ",\n    \"dirty-flag\": false\n}\n"
	if r.code != 0 || r.stdout != want {
		t.Fatalf("exit %d\n%s\nwant\n%s", r.code, r.stdout, want)
	}
}

func TestInfoErrors(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "r.img")
	mustWrite(t, raw, make([]byte, 4096))
	bad := filepath.Join(dir, "bad.qcow2")
	mustWrite(t, bad, append(append([]byte{}, qcow2Magic...), make([]byte, 100)...))
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"missing", []string{filepath.Join(dir, "nope")}, "could not open '" + filepath.Join(dir, "nope") + "'"},
		{"raw as qcow2", []string{"-f", "qcow2", raw}, "qcow2: not a qcow2 image"},
		{"bad header", []string{bad}, "could not open '" + bad + "': "},
		{"bad format", []string{"-f", "vmdk", raw}, "unknown file format"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, append([]string{"info"}, tt.args...)...)
			r.expect(t, 1, "", "csi-qcow2 image: ")
			r.expect(t, 1, "", tt.want)
			if r.stdout != "" || strings.Count(r.stderr, "\n") != 1 {
				t.Fatalf("want a one-line error, got stdout %q stderr %q", r.stdout, r.stderr)
			}
		})
	}
}

func TestSnapshotTable(t *testing.T) {
	date := time.Date(2026, 11, 21, 22, 50, 10, 898247000, time.Local)
	snaps := []snapshotInfo{
		{ID: "1", Name: "snap1", date: date},
		{ID: "2", Name: "before-upgrade", VMStateSize: 3 << 20, date: date, vmClock: 3723*time.Second + 45*time.Millisecond},
	}
	var b strings.Builder
	writeSnapshotTable(&b, snaps)
	want := "Snapshot list:\n" +
		"ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\n" +
		"1         snap1                 0 B 2026-11-21 22:50:10 00:00:00.000           \n" +
		"2         before-upgrade      3 MiB 2026-11-21 22:50:10 01:02:03.045           \n"
	if b.String() != want {
		t.Fatalf("got\n%q\nwant\n%q", b.String(), want)
	}
}

func TestFullBackingName(t *testing.T) {
	tests := []struct{ image, backing, want string }{
		{"c.qcow2", "a.qcow2", "a.qcow2"},
		{"./c.qcow2", "a.qcow2", "./a.qcow2"},
		{"/v/c.qcow2", "a.qcow2", "/v/a.qcow2"},
		{"/v/c.qcow2", "../b/a.qcow2", "/v/../b/a.qcow2"},
		{"/v/c.qcow2", "/abs/a.qcow2", "/abs/a.qcow2"},
	}
	for _, tt := range tests {
		if got := fullBackingName(tt.image, tt.backing); got != tt.want {
			t.Errorf("fullBackingName(%q, %q) = %q, want %q", tt.image, tt.backing, got, tt.want)
		}
	}
}
