package qcow2_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// compressible returns n bytes that deflate and zstd shrink to a fraction,
// different for every seed.
func compressible(rng *rand.Rand, n int64) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(rng.IntN(4)) + 'a'
	}
	return p
}

// mixedRaw writes a raw disk of compressible, random and zero clusters.
func mixedRaw(t testing.TB, rng *rand.Rand, path string, size, cs int64) []byte {
	t.Helper()
	p := make([]byte, size)
	for off := int64(0); off < size; off += cs {
		n := min(cs, size-off)
		switch rng.IntN(4) {
		case 0, 1:
			copy(p[off:], compressible(rng, n))
		case 2:
			copy(p[off:], fill(rng, n))
		}
	}
	if err := os.WriteFile(path, p, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestInteropCompressedReadIdentically: zlib and zstd images QEMU compresses
// (qemu-img convert -c and qemu-io write -c) read as QEMU reads them, check
// as qemu-img check does, and stay valid after our writes over them.
func TestInteropCompressedReadIdentically(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	for _, c := range []struct{ name, opts, qemuIO string }{
		{"convert-zlib", "cluster_size=65536", ""},
		{"convert-zstd", "cluster_size=65536,compression_type=zstd", ""},
		{"convert-zstd-cluster4k-refcount8", "cluster_size=4096,compression_type=zstd,refcount_bits=8", ""},
		{"convert-zlib-cluster2M", "cluster_size=2M", ""},
		{"convert-zstd-cluster512", "cluster_size=512,compression_type=zstd", ""},
		{"io-zstd", "compression_type=zstd", "write -c -P 0x5a 0 1M"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := filepath.Join(dir, "c.qcow2")
			rng := newRand(t)
			const size = 5<<20 + 1536
			if c.qemuIO == "" {
				raw := filepath.Join(dir, "src.raw")
				mixedRaw(t, rng, raw, size, 4096)
				run(t, dir, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", c.opts, raw, path)
			} else {
				run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", c.opts, path, fmt.Sprint(size))
				run(t, dir, "qemu-io", "-f", "qcow2", "-c", c.qemuIO, "-c", "write -c -P 0x11 2M 64k", path)
			}
			want := qemuConvertRaw(t, path)
			img := mustOpen(t, path, qcow2.OpenOptions{})
			if got := readAll(t, img); !bytes.Equal(got, want) {
				t.Fatalf("our read differs from qemu-img convert: %s", firstDiff(got, want))
			}
			ours := requireCheckClean(t, "Check", img)
			if ours.CompressedClusters == 0 {
				t.Fatalf("no compressed clusters in the image: %+v", ours)
			}
			requireSameCheck(t, "compressed image", ours, qemuCheck(t, path))
			h := newHarness(t, rng, img, path, want)
			for range 120 {
				h.step(defaultMix)
			}
			h.verifyAll()
			if err := h.img.Close(); err != nil {
				t.Fatal(err)
			}
			requireQemuClean(t, path)
			qemuCompare(t, path, h.m)
		})
	}
}

// compressedHost returns the host offset of guest cluster g's compressed
// data, or -1 if it is not compressed.
func (r *rawImage) compressedHost(g int64) int64 {
	e := r.l2EntryOff(g)
	if e < 0 {
		return -1
	}
	v := r.u64(e)
	if v&(1<<62) == 0 {
		return -1
	}
	x := 62 - (r.clusterBits() - 8)
	return int64(v & (1<<x - 1))
}

// TestCompressedOverwriteSharedHostCluster: QEMU packs many compressed
// clusters into one host cluster, which holds one reference for each. Our
// writes over them must drop exactly one reference each, freeing the host
// cluster with the last one.
func TestCompressedOverwriteSharedHostCluster(t *testing.T) {
	requireTool(t, "qemu-img")
	for _, opts := range []string{"cluster_size=65536", "cluster_size=4096,compression_type=zstd"} {
		t.Run(opts, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := filepath.Join(dir, "packed.qcow2")
			raw := filepath.Join(dir, "src.raw")
			rng := newRand(t)
			src := make([]byte, 4<<20)
			for i := range src {
				src[i] = byte(rng.IntN(3)) + '0' // a few hundred bytes per cluster compressed
			}
			if err := os.WriteFile(raw, src, 0o600); err != nil {
				t.Fatal(err)
			}
			run(t, dir, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, raw, path)
			r := loadRaw(t, path)
			cs := r.cs()
			// The guest clusters whose compressed data starts in the host
			// cluster holding guest cluster 1's.
			host := r.compressedHost(1) / cs
			var sharing []int64
			for g := int64(0); g < int64(len(src))/cs; g++ {
				if off := r.compressedHost(g); off >= 0 && off/cs == host {
					sharing = append(sharing, g)
				}
			}
			if len(sharing) < 3 || r.refcount(host) < 3 {
				t.Fatalf("host cluster %d holds %d compressed clusters, refcount %d; want a packed cluster",
					host, len(sharing), r.refcount(host))
			}
			img := mustOpen(t, path, qcow2.OpenOptions{})
			h := newHarness(t, rng, img, path, src)
			for i, g := range sharing {
				switch i % 3 {
				case 0:
					h.write(g*cs+100, fill(rng, 200)) // partial: copy-on-write of the rest
				case 1:
					h.writeZeroes(g*cs, cs, i%2 == 0)
				default:
					h.write(g*cs, fill(rng, cs))
				}
				if i == len(sharing)-2 {
					h.flush()
					requireCheckClean(t, "all but one overwritten", h.img)
					if err := h.img.Close(); err != nil {
						t.Fatal(err)
					}
					if rc := loadRaw(t, path).refcount(host); rc < 1 {
						t.Fatalf("host cluster %d freed while guest cluster %d still uses it", host, sharing[i+1])
					}
					h.img = mustOpen(t, path, qcow2.OpenOptions{})
				}
			}
			h.verifyAll()
			if err := h.img.Close(); err != nil {
				t.Fatal(err)
			}
			r = loadRaw(t, path)
			// The cluster may straddle into the next host cluster, which other
			// compressed data may share; the first must be free.
			if rc := r.refcount(host); rc != 0 {
				t.Errorf("host cluster %d has refcount %d after every compressed cluster in it was overwritten", host, rc)
			}
			requireSameCheck(t, "overwritten", checkFile(t, path), requireQemuClean(t, path))
			qemuCompare(t, path, h.m)
		})
	}
}

// TestInteropWriteCompressed: clusters we compress read back in QEMU and
// pass qemu-img check, for both compression types, several cluster sizes,
// refcounts that leave no room to pack, a partial last cluster,
// incompressible clusters and refused overwrites.
func TestInteropWriteCompressed(t *testing.T) {
	requireTool(t, "qemu-img")
	for _, opts := range []string{
		"cluster_size=65536", "cluster_size=65536,compression_type=zstd",
		"cluster_size=512,refcount_bits=1", "cluster_size=4096,compression_type=zstd,refcount_bits=2",
		"cluster_size=2M,compression_type=zstd",
	} {
		t.Run(opts, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := filepath.Join(dir, "w.qcow2")
			run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, fmt.Sprint(6<<20+1024))
			img := mustOpen(t, path, qcow2.OpenOptions{})
			rng := newRand(t)
			cs := int64(img.Info().ClusterSize)
			h := newHarness(t, rng, img, path, make([]byte, img.Size()))
			for off := int64(0); off < h.size(); off += cs {
				n := min(cs, h.size()-off)
				var p []byte
				switch rng.IntN(5) {
				case 0:
					continue
				case 1:
					p = fill(rng, n) // incompressible: written normally
				default:
					p = compressible(rng, n)
				}
				if err := img.WriteCompressed(p, off); err != nil {
					t.Fatalf("WriteCompressed(%d bytes at %d): %v", n, off, err)
				}
				copy(h.m[off:], p)
			}
			h.write(0, compressible(rng, cs))
			for _, c := range []struct{ off, n int64 }{{0, cs}, {1, cs}, {cs, cs - 1}, {h.size(), cs}} {
				if err := img.WriteCompressed(make([]byte, c.n), c.off); !errors.Is(err, qcow2.ErrInvalid) {
					t.Errorf("WriteCompressed(%d bytes at %d): err=%v, want ErrInvalid", c.n, c.off, err)
				}
			}
			h.verifyAll()
			ours := requireCheckClean(t, "Check", img)
			if ours.CompressedClusters == 0 {
				t.Errorf("nothing was compressed: %+v", ours)
			}
			for range 60 {
				h.step(defaultMix)
			}
			if err := h.img.Close(); err != nil {
				t.Fatal(err)
			}
			requireSameCheck(t, "written compressed", checkFile(t, path), requireQemuClean(t, path))
			qemuCompare(t, path, h.m)
		})
	}
}
