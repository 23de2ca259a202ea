package imagecli

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestInteropConvertZstd: convert -c into a compression_type=zstd DST
// writes zstd clusters QEMU reads back identically, in an image qemu-img
// reports as zstd and finds clean; and a zstd image qemu-img compressed
// converts back identically with ours.
func TestInteropConvertZstd(t *testing.T) {
	qemuTool(t, "qemu-img")
	qemuTool(t, "qemu-io")
	dir := t.TempDir()
	at := func(name string) string { return filepath.Join(dir, name) }
	src := at("src.raw")
	want := make([]byte, 4<<20+512)
	for off := 0; off < len(want); off += 64 << 10 {
		if off%(192<<10) == 0 {
			continue // a hole: left unallocated
		}
		copy(want[off:], strings.Repeat("csi-qcow2 zstd ", 4000)[:min(60000, len(want)-off)])
	}
	mustWrite(t, src, want)

	for _, opts := range []string{"compression_type=zstd", "compression_type=zstd,cluster_size=4k", "compression_type=zstd,cluster_size=512"} {
		t.Run(opts, func(t *testing.T) {
			dst := filepath.Join(t.TempDir(), "z.qcow2")
			runCLI(t, "convert", "-c", "-O", "qcow2", "-o", opts, src, dst).expect(t, 0, "", "")
			var info struct {
				FormatSpecific struct {
					Data struct {
						CompressionType string `json:"compression-type"`
					} `json:"data"`
				} `json:"format-specific"`
			}
			if err := json.Unmarshal([]byte(mustQemu(t, "qemu-img", "info", "--output=json", dst)), &info); err != nil {
				t.Fatal(err)
			}
			if got := info.FormatSpecific.Data.CompressionType; got != "zstd" {
				t.Errorf("qemu-img info: compression type %q, want zstd", got)
			}
			var check struct {
				Compressed int64 `json:"compressed-clusters"`
			}
			if err := json.Unmarshal([]byte(mustQemu(t, "qemu-img", "check", "--output=json", dst)), &check); err != nil {
				t.Fatal(err)
			}
			if check.Compressed == 0 {
				t.Errorf("qemu-img check finds no compressed clusters")
			}
			mustQemu(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, dst)
			// qemu-io reads a compressed cluster and its neighbour hole.
			mustQemu(t, "qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0 0 64k", dst)
			if r := qemu(t, "qemu-io", "-r", "-f", "qcow2", "-c", "read -v 65536 15", dst); !strings.Contains(r.stdout, "63 73 69 2d 71 63 6f 77 32 20 7a 73 74 64 20") {
				t.Errorf("qemu-io read of cluster 1:\n%s%s", r.stdout, r.stderr)
			}
			back := filepath.Join(t.TempDir(), "back.raw")
			runCLI(t, "convert", "-O", "raw", dst, back).expect(t, 0, "", "")
			if b, err := os.ReadFile(back); err != nil || string(b) != string(want) {
				t.Errorf("our read of our zstd image differs from the source (%v)", err)
			}
		})
	}

	t.Run("qemu-made", func(t *testing.T) {
		q := at("qemu.qcow2")
		mustQemu(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", src, q)
		back := at("qemu-back.raw")
		runCLI(t, "convert", "-O", "raw", q, back).expect(t, 0, "", "")
		mustQemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, back)
		ours := runCLI(t, "info", "--output=json", q)
		sameJSON(t, "info", ours.stdout, mustQemu(t, "qemu-img", "info", "--output=json", q))
	})
}
