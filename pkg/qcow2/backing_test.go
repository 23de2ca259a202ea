package qcow2_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// TestInteropBackingChains: raw <- qcow2 <- qcow2 chains made by qemu-img,
// with data, zero clusters and discards at each level, read as QEMU reads
// them, through a snapshot view too; our writes on top keep them valid.
func TestInteropBackingChains(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	for _, opts := range []string{"cluster_size=65536", "cluster_size=4096,compression_type=zstd", "compat=0.10,cluster_size=512"} {
		t.Run(opts, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			rng := newRand(t)
			base := filepath.Join(dir, "base.raw")
			if err := os.WriteFile(base, fill(rng, 3<<20+512), 0o600); err != nil { // shorter than the overlays
				t.Fatal(err)
			}
			mid := filepath.Join(dir, "mid.qcow2")
			run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.raw", "-F", "raw", mid, "4M")
			run(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 0x21 64k 512k", "-c", "write -c -P 0x22 1M 128k",
				"-c", "write -z 2M 128k", mid)
			sub := filepath.Join(dir, "sub")
			if err := os.Mkdir(sub, 0o700); err != nil {
				t.Fatal(err)
			}
			top := filepath.Join(sub, "top.qcow2")
			run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", "../mid.qcow2", "-F", "qcow2", top, "5M")
			run(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 0x31 500k 100k", "-c", "write -z 1M 64k",
				"-c", "discard 64k 64k", "-c", "write -P 0x32 4600k 4k", top)
			run(t, dir, "qemu-img", "snapshot", "-c", "snap", top)
			run(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 1M", top)

			want := qemuConvertRaw(t, top)
			wantSnap := qemuConvertRaw(t, top, "-l", "snapshot.name=snap")
			img := mustOpen(t, top, qcow2.OpenOptions{BackingRoot: dir})
			if got := readAll(t, img); !bytes.Equal(got, want) {
				t.Fatalf("our read of the chain differs from qemu-img convert: %s", firstDiff(got, want))
			}
			if got := viewBytes(t, img, "snap"); !bytes.Equal(got, wantSnap) {
				t.Fatalf("our read of the snapshot differs: %s", firstDiff(got, wantSnap))
			}
			if info := img.Info(); info.BackingFile != "../mid.qcow2" || info.BackingFormat != "qcow2" {
				t.Errorf("Info() backing = %q (%q)", info.BackingFile, info.BackingFormat)
			}
			h := newHarness(t, rng, img, "", want)
			mix := defaultMix
			if strings.Contains(opts, "compat=0.10") {
				mix.discard = 0 // v2 has no zero clusters to hide the backing file's data
			}
			for range 100 {
				h.step(mix)
			}
			h.verifyAll()
			if err := h.img.Close(); err != nil {
				t.Fatal(err)
			}
			requireQemuClean(t, top)
			qemuCompare(t, top, h.m)
		})
	}
}

// TestCreateWithBacking: Create records the backing file, reads through it,
// and QEMU agrees.
func TestCreateWithBacking(t *testing.T) {
	dir := t.TempDir()
	rng := newRand(t)
	basePath := filepath.Join(dir, "base.qcow2")
	base := mustCreate(t, basePath, qcow2.CreateOptions{Size: 2 << 20})
	want := fill(rng, 2<<20)
	if _, err := base.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if err := base.Close(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "over.qcow2")
	img := mustCreate(t, path, qcow2.CreateOptions{Size: 3 << 20, BackingFile: "base.qcow2", BackingFormat: "qcow2"})
	h := newHarness(t, rng, img, path, append(want, make([]byte, 1<<20)...))
	h.verifyAll()
	for range 80 {
		h.step(defaultMix)
	}
	if err := h.img.Close(); err != nil {
		t.Fatal(err)
	}
	if haveQemu(t) {
		requireQemuClean(t, path)
		qemuCompare(t, path, h.m)
	}
}

// TestBackingConfinement: a backing name must resolve inside the allowed
// root. Hostile images name absolute paths, climb out with "..", link out
// through symlinks, or use json: and protocol names; each is refused with
// a clear error, at any depth of the chain, and nothing outside is read.
func TestBackingConfinement(t *testing.T) {
	requireTool(t, "qemu-img")
	root := t.TempDir()
	outside := t.TempDir()
	secret := filepath.Join(outside, "secret.raw")
	if err := os.WriteFile(secret, bytes.Repeat([]byte("SECRET!!"), 8192), 0o600); err != nil {
		t.Fatal(err)
	}
	inside := filepath.Join(root, "ok.raw")
	if err := os.WriteFile(inside, bytes.Repeat([]byte{7}, 64<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	mustSymlink := func(target, name string) {
		if err := os.Symlink(target, filepath.Join(root, name)); err != nil {
			t.Fatal(err)
		}
	}
	mustSymlink(secret, "link-out.raw")
	mustSymlink("ok.raw", "link-in.raw")
	mustSymlink(outside, "dir-out")
	// A qcow2 inside the root whose own backing file escapes.
	escaping := filepath.Join(root, "escaping.qcow2")
	run(t, root, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", secret, "-F", "raw", escaping, "64k")

	for _, c := range []struct {
		name, backing, format string
		want                  error // nil: opens and reads the backing file
	}{
		{"relative inside", "ok.raw", "raw", nil},
		{"absolute inside", inside, "raw", nil},
		{"symlink inside", "link-in.raw", "raw", nil},
		{"absolute outside", secret, "raw", qcow2.ErrBackingOutsideRoot},
		{"etc shadow", "/etc/shadow", "raw", qcow2.ErrBackingOutsideRoot},
		{"dot-dot", "../" + filepath.Base(outside) + "/secret.raw", "raw", qcow2.ErrBackingOutsideRoot},
		{"dot-dot inside then out", "./sub/../../" + filepath.Base(outside) + "/secret.raw", "raw", qcow2.ErrBackingOutsideRoot},
		{"symlink out", "link-out.raw", "raw", qcow2.ErrBackingOutsideRoot},
		{"through a linked directory", "dir-out/secret.raw", "raw", qcow2.ErrBackingOutsideRoot},
		{"json", `json:{"driver":"raw","file":{"driver":"file","filename":"` + secret + `"}}`, "raw", qcow2.ErrUnsupported},
		{"protocol", "nbd://localhost:10809/x", "raw", qcow2.ErrUnsupported},
		{"chain escapes one level down", "escaping.qcow2", "qcow2", qcow2.ErrBackingOutsideRoot},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(root, fmt.Sprintf("top-%s.qcow2", filepath.Base(t.Name())))
			args := []string{"create", "-q", "-f", "qcow2", "-u", "-b", c.backing}
			if c.format != "" {
				args = append(args, "-F", c.format)
			}
			run(t, root, "qemu-img", append(args, path, "64k")...)
			img, err := qcow2.Open(path, qcow2.OpenOptions{ReadOnly: true, BackingRoot: root})
			if c.want != nil {
				if !errors.Is(err, c.want) {
					t.Fatalf("Open with backing %q: err=%v, want %v", c.backing, err, c.want)
				}
				return
			}
			if err != nil {
				t.Fatalf("Open with backing %q inside the root: %v", c.backing, err)
			}
			defer img.Close()
			if got := readAll(t, img); !bytes.Equal(got, bytes.Repeat([]byte{7}, 64<<10)) {
				t.Fatalf("read through %q: %s", c.backing, firstDiff(got, bytes.Repeat([]byte{7}, 64<<10)))
			}
		})
	}
}
