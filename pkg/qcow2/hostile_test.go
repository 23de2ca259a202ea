package qcow2_test

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Hostile images: headers and tables that lie about sizes and offsets must
// be refused with the documented sentinel errors, never with a panic or an
// allocation proportional to a number read from disk.

// handImage builds a valid empty v3 image without either implementation:
// header in cluster 0, refcount table in cluster 1, refcount block in
// cluster 2, L1 table in cluster 3 (16-bit refcounts).
type handImage struct {
	clusterBits uint
	size        uint64
}

const (
	hdrVersion      = 4
	hdrBackingOff   = 8
	hdrBackingSize  = 16
	hdrClusterBits  = 20
	hdrSize         = 24
	hdrCryptMethod  = 32
	hdrL1Size       = 36
	hdrL1Offset     = 40
	hdrRTOffset     = 48
	hdrRTClusters   = 56
	hdrNbSnapshots  = 60
	hdrSnapOffset   = 64
	hdrIncompatible = 72
	hdrCompatible   = 80
	hdrRefcountOrd  = 96
	hdrLength       = 100
	hdrCompression  = 104
)

func (h handImage) bytes() []byte {
	cs := uint64(1) << h.clusterBits
	b := make([]byte, 4*cs)
	perL2 := uint64(1) << (2*h.clusterBits - 3)
	l1Size := (h.size + perL2 - 1) / perL2
	copy(b, "QFI\xfb")
	be.PutUint32(b[hdrVersion:], 3)
	be.PutUint32(b[hdrClusterBits:], uint32(h.clusterBits))
	be.PutUint64(b[hdrSize:], h.size)
	be.PutUint32(b[hdrL1Size:], uint32(l1Size))
	be.PutUint64(b[hdrL1Offset:], 3*cs)
	be.PutUint64(b[hdrRTOffset:], cs)
	be.PutUint32(b[hdrRTClusters:], 1)
	be.PutUint32(b[hdrRefcountOrd:], 4)
	be.PutUint32(b[hdrLength:], 112) // with the compression type byte (zlib), as QEMU writes
	be.PutUint64(b[cs:], 2*cs)
	for k := uint64(0); k < 4; k++ {
		be.PutUint16(b[2*cs+2*k:], 1)
	}
	return b
}

const hostileCluster = 16 // 64 KiB clusters for the hostile base image

func hostileBase() []byte { return handImage{clusterBits: hostileCluster, size: 1 << 30}.bytes() }

func TestHandImageIsValid(t *testing.T) {
	b := hostileBase()
	img, err := qcow2.OpenFile(newMemFile(b), qcow2.OpenOptions{})
	if err != nil {
		t.Fatalf("OpenFile of the hand-built base image: %v", err)
	}
	r, err := img.Check(qcow2.CheckOptions{})
	requireClean(t, "Check of the hand-built base image", r, err)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := exec.LookPath("qemu-img"); err == nil {
		path := filepath.Join(t.TempDir(), "hand.qcow2")
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		requireQemuClean(t, path)
	}
}

func put32(off int, v uint32) func([]byte) []byte {
	return func(b []byte) []byte { be.PutUint32(b[off:], v); return b }
}

func put64(off int, v uint64) func([]byte) []byte {
	return func(b []byte) []byte { be.PutUint64(b[off:], v); return b }
}

// ext appends one header extension after the 112-byte header.
func ext(typ uint32, length uint32, data []byte) func([]byte) []byte {
	return func(b []byte) []byte {
		be.PutUint32(b[112:], typ)
		be.PutUint32(b[116:], length)
		copy(b[120:], data)
		return b
	}
}

func seq(fs ...func([]byte) []byte) func([]byte) []byte {
	return func(b []byte) []byte {
		for _, f := range fs {
			b = f(b)
		}
		return b
	}
}

const cs64k = 1 << hostileCluster

func TestOpenHostileHeaders(t *testing.T) {
	corrupt := []error{qcow2.ErrCorrupt}
	unsupported := []error{qcow2.ErrUnsupported}
	either := []error{qcow2.ErrCorrupt, qcow2.ErrUnsupported}
	cases := []struct {
		name   string
		mutate func([]byte) []byte
		want   []error
	}{
		{"empty file", func([]byte) []byte { return nil }, []error{qcow2.ErrNotQcow2}},
		{"bad magic", func(b []byte) []byte { b[3] = 0xfc; return b }, []error{qcow2.ErrNotQcow2}},
		{"raw zeros", func(b []byte) []byte { return make([]byte, len(b)) }, []error{qcow2.ErrNotQcow2}},
		{"magic only", func(b []byte) []byte { return b[:4] }, []error{qcow2.ErrNotQcow2, qcow2.ErrCorrupt}},
		{"truncated v2 header", func(b []byte) []byte { return b[:60] }, []error{qcow2.ErrNotQcow2, qcow2.ErrCorrupt}},
		{"truncated v3 header", func(b []byte) []byte { return b[:90] }, []error{qcow2.ErrNotQcow2, qcow2.ErrCorrupt}},
		{"version 1", put32(hdrVersion, 1), unsupported},
		{"version 4", put32(hdrVersion, 4), unsupported},
		{"version 0xffffffff", put32(hdrVersion, 0xffffffff), unsupported},
		{"cluster bits 8", put32(hdrClusterBits, 8), either},
		{"cluster bits 22", put32(hdrClusterBits, 22), either},
		{"cluster bits 0xffffffff", put32(hdrClusterBits, 0xffffffff), either},
		{"huge l1_size", put32(hdrL1Size, 0xffffffff), corrupt},
		{"l1_size just over 32 MiB", seq(put64(hdrSize, 1<<55), put32(hdrL1Size, 32<<20/8+1)), either},
		{"l1_size too small for the size", put64(hdrSize, 1<<40), corrupt},
		{"virtual size 2^63", put64(hdrSize, 1<<63), either},
		{"virtual size 2^64-1", put64(hdrSize, 1<<64-1), either},
		{"l1 table offset unaligned", put64(hdrL1Offset, 3*cs64k+8), corrupt},
		{"l1 table offset past 2^56", put64(hdrL1Offset, 1<<60), corrupt},
		{"l1 table at offset 0", put64(hdrL1Offset, 0), corrupt},
		{"huge refcount table", put32(hdrRTClusters, 0xffffffff), corrupt},
		{"refcount table just over 8 MiB", put32(hdrRTClusters, 8<<20/cs64k+1), corrupt},
		{"zero refcount table clusters", put32(hdrRTClusters, 0), corrupt},
		{"refcount table offset unaligned", put64(hdrRTOffset, cs64k+512), corrupt},
		{"refcount table offset past 2^56", put64(hdrRTOffset, 1<<62), corrupt},
		{"refcount table at offset 0", put64(hdrRTOffset, 0), corrupt},
		{"snapshot table unaligned", seq(put32(hdrNbSnapshots, 1), put64(hdrSnapOffset, 4*cs64k+8)), corrupt},
		{"huge nb_snapshots", seq(put32(hdrNbSnapshots, 0xffffffff), put64(hdrSnapOffset, 4*cs64k)), corrupt},
		{"snapshot table past 2^56", seq(put32(hdrNbSnapshots, 1), put64(hdrSnapOffset, 1<<58)), corrupt},
		{"crypt_method aes", put32(hdrCryptMethod, 1), unsupported},
		{"crypt_method luks", put32(hdrCryptMethod, 2), unsupported},
		{"crypt_method unknown", put32(hdrCryptMethod, 77), unsupported},
		{"external data file bit", put64(hdrIncompatible, 1<<2), unsupported},
		{"extended l2 bit", put64(hdrIncompatible, 1<<4), unsupported},
		{"unknown incompatible bit 5", put64(hdrIncompatible, 1<<5), unsupported},
		{"unknown incompatible bit 63", put64(hdrIncompatible, 1<<63), unsupported},
		{"refcount order 7", put32(hdrRefcountOrd, 7), unsupported},
		{"refcount order 0xffffffff", put32(hdrRefcountOrd, 0xffffffff), unsupported},
		{"header length beyond the cluster", put32(hdrLength, cs64k+8), corrupt},
		{"header length 0xffffffff", put32(hdrLength, 0xffffffff), corrupt},
		{"header length below 104", put32(hdrLength, 72), corrupt},
		{"compression type 2", seq(put64(hdrIncompatible, 1<<3), func(b []byte) []byte { b[hdrCompression] = 2; return b }), unsupported},
		{"encryption header extension", ext(0x0537be77, 16, nil), unsupported},
		{"external data file extension", ext(0x44415441, 8, []byte("data.raw")), unsupported},
		{"extension overruns the cluster", ext(0x12345678, 0xfffffff0, nil), corrupt},
		{"backing name of 4 GiB", seq(put64(hdrBackingOff, 512), put32(hdrBackingSize, 0xffffffff)), corrupt},
		{"backing name past the cluster", seq(put64(hdrBackingOff, cs64k-4), put32(hdrBackingSize, 100)), corrupt},
		{"backing name offset 2^63", seq(put64(hdrBackingOff, 1<<63), put32(hdrBackingSize, 10)), corrupt},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, ro := range []bool{true, false} {
				b := c.mutate(hostileBase())
				var err error
				alloc := allocatedBy(func() {
					var img *qcow2.Image
					img, err = qcow2.OpenFile(newMemFile(b), qcow2.OpenOptions{ReadOnly: ro})
					if err == nil {
						img.Close()
					}
				})
				if !isOneOf(err, c.want) {
					t.Errorf("OpenFile(ReadOnly: %v) err = %v, want one of %v", ro, err, c.want)
				}
				if alloc > 16<<20 {
					t.Errorf("OpenFile(ReadOnly: %v) allocated %d MiB for a %d KiB file", ro, alloc>>20, len(b)>>10)
				}
			}
		})
	}
}

func isOneOf(err error, want []error) bool {
	for _, w := range want {
		if errors.Is(err, w) {
			return true
		}
	}
	return false
}

// allocatedBy returns the bytes the Go heap allocated while f ran.
func allocatedBy(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// TestHostileTables covers damage that only shows when a table is used:
// reads and writes must fail with ErrCorrupt, a writable image must then be
// marked corrupt (refusing further writes and setting the header bit), and
// metadata must never be overwritten with guest data.
func TestHostileTables(t *testing.T) {
	const cs = cs64k
	const l2 = 4 * cs // an L2 table appended as cluster 4
	withL2 := func(entry0 uint64) func([]byte) []byte {
		return func(b []byte) []byte {
			b = append(b, make([]byte, cs)...)
			be.PutUint64(b[3*cs:], l2|1<<63)
			be.PutUint16(b[2*cs+2*4:], 1)
			be.PutUint64(b[l2:], entry0)
			return b
		}
	}
	cases := []struct {
		name   string
		mutate func([]byte) []byte
		write  bool // the damage shows on a write, not a read
	}{
		{"l1 entry unaligned", func(b []byte) []byte { be.PutUint64(b[3*cs:], 4*cs+512|1<<63); return b }, false},
		{"l2 entry unaligned", withL2(5*cs + 4096 | 1<<63), false},
		{"data cluster is the l1 table", withL2(3*cs | 1<<63), true},
		{"data cluster is the refcount block", withL2(2*cs | 1<<63), true},
		{"l2 table is the refcount table", func(b []byte) []byte { be.PutUint64(b[3*cs:], cs|1<<63); return b }, true},
		{"data cluster is an uncached l2 table", func(b []byte) []byte {
			// L1[0] -> L2 at cluster 4, whose entry 0 points at cluster 5,
			// which is L1[1]'s L2 table.
			b = withL2(5*cs | 1<<63)(b)
			b = append(b, make([]byte, cs)...)
			be.PutUint64(b[3*cs+8:], 5*cs|1<<63)
			be.PutUint16(b[2*cs+2*5:], 1)
			be.PutUint64(b[5*cs:], 6*cs|1<<63) // a mapping the overwrite would destroy
			return b
		}, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			orig := c.mutate(hostileBase())
			f := newMemFile(orig)
			img, err := qcow2.OpenFile(f, qcow2.OpenOptions{})
			if err != nil {
				if !errors.Is(err, qcow2.ErrCorrupt) {
					t.Fatalf("OpenFile: %v, want success or ErrCorrupt", err)
				}
				return
			}
			p := make([]byte, 4096)
			_, rerr := img.ReadAt(p, 0)
			_, werr := img.WriteAt(bytes.Repeat([]byte{0xee}, 4096), 0)
			if !c.write && !errors.Is(rerr, qcow2.ErrCorrupt) {
				t.Errorf("ReadAt: %v, want ErrCorrupt", rerr)
			}
			if !errors.Is(werr, qcow2.ErrCorrupt) {
				t.Errorf("WriteAt: %v, want ErrCorrupt", werr)
			}
			img.Flush()
			got := f.bytes()
			for _, m := range []struct {
				name     string
				off, len int64
			}{{"refcount table", cs, cs}, {"refcount block", 2 * cs, cs}, {"l1 table", 3 * cs, cs}, {"l2 tables", 4 * cs, int64(len(orig)) - 4*cs}} {
				if !bytes.Equal(got[m.off:m.off+m.len], orig[m.off:m.off+m.len]) {
					t.Errorf("%s overwritten: %s", m.name, firstDiff(got[m.off:m.off+m.len], orig[m.off:m.off+m.len]))
				}
			}
			// Once corruption is seen, the image refuses every write.
			if _, err := img.WriteAt([]byte{1}, 512<<20); !errors.Is(err, qcow2.ErrCorrupt) {
				t.Errorf("WriteAt elsewhere after corruption: %v, want ErrCorrupt", err)
			}
			if !img.Info().Corrupt {
				t.Errorf("Info().Corrupt is false after corruption was detected")
			}
			img.Close()
			got = f.bytes()
			if be.Uint64(got[hdrIncompatible:])&2 == 0 {
				t.Errorf("corrupt bit not set in the header after corruption was detected")
			}
			// A corrupt image opens read-only but not read-write.
			if _, err := qcow2.OpenFile(newMemFile(got), qcow2.OpenOptions{}); !errors.Is(err, qcow2.ErrCorrupt) {
				t.Errorf("read-write OpenFile of an image marked corrupt: %v, want ErrCorrupt", err)
			}
			ro, err := qcow2.OpenFile(newMemFile(got), qcow2.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Errorf("read-only OpenFile of an image marked corrupt: %v", err)
			} else {
				ro.Close()
			}
		})
	}
}

// TestHostileRefcountTable: a refcount table entry that is unaligned is
// corruption the first time the allocator needs it.
func TestHostileRefcountTable(t *testing.T) {
	b := hostileBase()
	be.PutUint64(b[cs64k:], 2*cs64k+8)
	img, err := qcow2.OpenFile(newMemFile(b), qcow2.OpenOptions{})
	if err != nil {
		if !errors.Is(err, qcow2.ErrCorrupt) {
			t.Fatalf("OpenFile: %v, want success or ErrCorrupt", err)
		}
		return
	}
	defer img.Close()
	_, werr := img.WriteAt([]byte{1}, 0)
	ferr := img.Flush()
	if !errors.Is(werr, qcow2.ErrCorrupt) && !errors.Is(ferr, qcow2.ErrCorrupt) {
		t.Errorf("allocating write: %v, flush: %v; want ErrCorrupt", werr, ferr)
	}
	r, err := img.Check(qcow2.CheckOptions{})
	if err == nil && r.Corruptions == 0 && r.CheckErrors == 0 {
		t.Errorf("Check of an image with an unaligned refcount block: %+v", r)
	}
}

// TestOpenCreateHostErrors: host errors pass through unwrapped enough for
// errors.Is, and Create never replaces an existing file.
func TestOpenCreateHostErrors(t *testing.T) {
	dir := t.TempDir()
	_, err := qcow2.Open(filepath.Join(dir, "missing.qcow2"), qcow2.OpenOptions{})
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Open of a missing file: %v, want os.ErrNotExist", err)
	}
	existing := filepath.Join(dir, "existing")
	if err := os.WriteFile(existing, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := qcow2.Create(existing, qcow2.CreateOptions{Size: 1 << 20}); !errors.Is(err, os.ErrExist) {
		t.Errorf("Create over an existing file: %v, want os.ErrExist", err)
	}
	if b, _ := os.ReadFile(existing); string(b) != "keep me" {
		t.Errorf("Create changed an existing file to %q", b)
	}
}
