package imagecli

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func TestResizeQcow2(t *testing.T) {
	tests := []struct {
		name  string
		args  []string // after FILE
		want  int64
		warns bool
	}{
		{"absolute", []string{"2G"}, 2 << 30, false},
		{"relative grow", []string{"+512M"}, 3 << 29, false},
		{"relative shrink", []string{"--shrink", "-512M"}, 1 << 29, true},
		{"absolute shrink", []string{"--shrink", "1M"}, 1 << 20, true},
		{"same size", []string{"1G"}, 1 << 30, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := tempPath(t, "x.qcow2")
			newQcow2(t, path, qcow2.CreateOptions{Size: 1 << 30}, map[int64][]byte{0: pattern(4096, 1)})
			r := runCLI(t, append([]string{"resize", path}, tt.args...)...)
			r.expect(t, 0, "Image resized.\n", "")
			if got := imageInfoOf(t, path).VirtualSize; got != tt.want {
				t.Fatalf("size %d, want %d", got, tt.want)
			}
			if warned := bytes.Contains([]byte(r.stderr), []byte("warning: shrinking")); warned != tt.warns {
				t.Fatalf("stderr %q", r.stderr)
			}
			if got := readAt(t, path, 0, 4096); !bytes.Equal(got, pattern(4096, 1)) {
				t.Fatal("data changed")
			}
		})
	}
}

func TestResizeRaw(t *testing.T) {
	path := tempPath(t, "x.raw")
	mustWrite(t, path, pattern(1<<20, 5))
	runCLI(t, "resize", "-q", path, "+1M").expect(t, 0, "", "")
	runCLI(t, "resize", "-f", "raw", "--shrink", path, "512K").expect(t, 0, "Image resized.", "")
	b, err := os.ReadFile(path)
	if err != nil || !bytes.Equal(b, pattern(1<<20, 5)[:512<<10]) {
		t.Fatalf("raw content after resize: %d bytes, %v", len(b), err)
	}
}

func TestResizeErrors(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "x.qcow2")
	newQcow2(t, path, qcow2.CreateOptions{Size: 1 << 30}, map[int64][]byte{900 << 20: pattern(4096, 1)})
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"shrink needs --shrink", []string{path, "-1M"}, "use the --shrink option"},
		{"absolute shrink needs --shrink", []string{path, "100M"}, "use the --shrink option"},
		{"allocated past the end", []string{"--shrink", path, "512M"}, "qcow2: cannot shrink"},
		{"to zero", []string{"--shrink", path, "-1G"}, "must be positive"},
		{"below zero", []string{"--shrink", path, "-2G"}, "must be positive"},
		{"bad size", []string{path, "+1X"}, "invalid size"},
		{"missing file", []string{filepath.Join(dir, "nope"), "1G"}, "could not open"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, append([]string{"resize"}, tt.args...)...)
			r.expect(t, 1, "", "csi-qcow2 image: ")
			r.expect(t, 1, "", tt.want)
			if r.stdout != "" {
				t.Fatalf("stdout %q", r.stdout)
			}
			if got := imageInfoOf(t, path).VirtualSize; got != 1<<30 {
				t.Fatalf("size changed to %d", got)
			}
		})
	}
}
