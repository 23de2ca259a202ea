package qcow2_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// TestInteropCreateHeaderMatchesQemu: a new image of ours has the header
// cluster qemu-img create writes with the same options, byte for byte: for
// zstd, header length 112, the type byte at 104 and the "compression type"
// incompatible bit; for all, the header extensions (no feature name table
// for clusters of 4 KiB or less, as QEMU).
func TestInteropCreateHeaderMatchesQemu(t *testing.T) {
	requireTool(t, "qemu-img")
	for _, c := range []struct {
		compression string
		clusterSize int
		size        int64
		lazy        bool
	}{
		{"zstd", 512, 1 << 20, false},
		{"zstd", 4096, 100<<20 + 512, true},
		{"zstd", 8192, 10 << 20, false},
		{"zstd", 65536, 1 << 30, false},
		{"zstd", 2 << 20, 1 << 40, false},
		{"zlib", 512, 1 << 20, true},
		{"zlib", 4096, 1 << 20, false},
		{"zlib", 65536, 1 << 30, false},
	} {
		t.Run(fmt.Sprintf("%s-cluster%d-size%d", c.compression, c.clusterSize, c.size), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := filepath.Join(dir, "ours.qcow2")
			opts := qcow2.CreateOptions{Size: c.size, ClusterSize: c.clusterSize, LazyRefcounts: c.lazy}
			if c.compression == "zstd" {
				opts.CompressionType = qcow2.CompressionZstd
			}
			img := mustCreate(t, path, opts)
			if got := img.Info().CompressionType; got != c.compression {
				t.Errorf("Info().CompressionType = %q, want %s", got, c.compression)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			qpath := filepath.Join(dir, "qemu.qcow2")
			lazy := "off"
			if c.lazy {
				lazy = "on"
			}
			run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o",
				fmt.Sprintf("compression_type=%s,cluster_size=%d,lazy_refcounts=%s", c.compression, c.clusterSize, lazy),
				qpath, fmt.Sprint(c.size))
			ours, theirs := headerBytes(t, path, c.clusterSize), headerBytes(t, qpath, c.clusterSize)
			if !bytes.Equal(ours, theirs) {
				t.Errorf("header cluster differs from qemu-img's:\nours   % x\nqemu's % x",
					ours[:min(len(ours), 512)], theirs[:min(len(theirs), 512)])
			}
			if q := qemuImgInfo(t, path).FormatSpecific.Data.CompressionType; q != c.compression {
				t.Errorf("qemu-img info reports compression type %q, want %s", q, c.compression)
			}
			requireQemuClean(t, path)
		})
	}
}

// headerBytes returns cluster 0 of the image at path.
func headerBytes(t *testing.T, path string, clusterSize int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, clusterSize)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestInteropWriteCompressedZstdOurImage: clusters we compress into a zstd
// image we created read back identically in QEMU, which decompresses them
// with zstd because of the header, and the image checks clean in both.
func TestInteropWriteCompressedZstdOurImage(t *testing.T) {
	requireTool(t, "qemu-img")
	for _, cs := range []int{512, 4096, 65536} {
		t.Run(fmt.Sprint(cs), func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), "z.qcow2")
			img := mustCreate(t, path, qcow2.CreateOptions{Size: 3<<20 + 1024, ClusterSize: cs,
				CompressionType: qcow2.CompressionZstd})
			rng := newRand(t)
			h := newHarness(t, rng, img, path, make([]byte, img.Size()))
			for off := int64(0); off < h.size(); off += int64(cs) {
				n := min(int64(cs), h.size()-off)
				if rng.IntN(4) == 0 {
					continue
				}
				p := compressible(rng, n)
				if err := img.WriteCompressed(p, off); err != nil {
					t.Fatalf("WriteCompressed(%d bytes at %d): %v", n, off, err)
				}
				copy(h.m[off:], p)
			}
			if r := requireCheckClean(t, "Check", img); r.CompressedClusters == 0 {
				t.Fatalf("nothing was compressed: %+v", r)
			}
			h.verifyAll()
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			if q := qemuImgInfo(t, path).FormatSpecific.Data.CompressionType; q != "zstd" {
				t.Errorf("qemu-img info reports compression type %q, want zstd", q)
			}
			requireSameCheck(t, "written compressed", checkFile(t, path), requireQemuClean(t, path))
			qemuCompare(t, path, h.m)
		})
	}
}

func TestCreateCompressionTypeInvalid(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.qcow2")
	_, err := qcow2.Create(path, qcow2.CreateOptions{Size: 1 << 20, CompressionType: 2})
	if !errors.Is(err, qcow2.ErrInvalid) {
		t.Fatalf("Create with compression type 2: err=%v, want ErrInvalid", err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused Create left %s behind (%v)", path, err)
	}
}
