package qcow2_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Fuzz targets for the snapshot table and compressed cluster descriptors.
// Each splices the fuzzed bytes into a small valid image; seed corpora in
// testdata/fuzz/FuzzSnapshotTable and testdata/fuzz/FuzzCompressedCluster
// come from qemu-img (regenerate with -update-corpus). Run them with
// `go test -run '^$' -fuzz FuzzSnapshotTable ./pkg/qcow2/`.

// fuzzFileLimit bounds what a fuzzed image may grow its host file to.
const fuzzFileLimit = 64 << 20

// snapshotBase is a 512-byte-cluster image with data and two snapshots,
// and the offset of its snapshot table.
var snapshotBase = sync.OnceValues(func() ([]byte, int64) {
	f := newMemFile(nil)
	img, err := qcow2.CreateFile(f, qcow2.CreateOptions{Size: 64 << 10, ClusterSize: 512})
	if err != nil {
		panic(err)
	}
	p := bytes.Repeat([]byte{0xa5}, 20<<10)
	steps := []func() error{
		func() error { _, err := img.WriteAt(p, 1000); return err },
		func() error { _, err := img.CreateSnapshot("one"); return err },
		func() error { _, err := img.WriteAt(p[:3000], 9000); return err },
		func() error { _, err := img.CreateSnapshot("two"); return err },
		func() error { return img.WriteZeroes(0, 4096, true) },
		img.Close,
	}
	for _, s := range steps {
		if err := s(); err != nil {
			panic(err)
		}
	}
	b := f.bytes()
	return b, int64(be.Uint64(b[64:]))
})

func FuzzSnapshotTable(f *testing.F) {
	base, off := snapshotBase()
	f.Add(uint16(2), bytes.TrimRight(base[off:off+512], "\x00"))
	f.Add(uint16(1), base[off:off+64])
	f.Add(uint16(0), []byte{})
	f.Fuzz(func(t *testing.T, nb uint16, table []byte) {
		if len(table) > 1<<20 {
			t.Skip("tables are bounded to 1 MiB")
		}
		b := bytes.Clone(base)
		if need := off + int64(len(table)); need > int64(len(b)) {
			b = append(b, make([]byte, need-int64(len(b)))...)
		}
		copy(b[off:], table)
		be.PutUint32(b[60:], uint32(nb))
		fuzzSnapshotOps(t, b)
	})
}

// fuzzSnapshotOps opens the image read-only and reads every snapshot, then
// writable, deletes, reverts and creates snapshots. Every error must be a
// documented one; an image that checks clean must stay clean.
func fuzzSnapshotOps(t *testing.T, b []byte) {
	ro, err := qcow2.OpenFile(newMemFile(b), qcow2.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		if !acceptableErr(err) {
			t.Fatalf("Open: undocumented error %v", err)
		}
		return
	}
	snaps := ro.Snapshots()
	for i, s := range snaps {
		if i == 4 {
			break
		}
		v, err := ro.OpenSnapshot(s.ID)
		if err != nil {
			if !acceptableErr(err) {
				t.Fatalf("OpenSnapshot(%q): undocumented error %v", s.ID, err)
			}
			continue
		}
		p := make([]byte, 64<<10)
		for _, at := range []int64{0, v.Size() / 2, v.Size() - 100} {
			if _, err := v.ReadAt(p, max(at, 0)); err != nil && !acceptableErr(err) && !errors.Is(err, io.EOF) {
				t.Fatalf("view ReadAt(%d): undocumented error %v", at, err)
			}
		}
		v.Close()
	}
	if len(snaps) > 0 {
		// The first 64 MiB: a hostile table may claim a huge disk.
		first, last := snaps[0].ID, snaps[len(snaps)-1].ID
		if _, err := ro.SnapshotDelta(first, last, 0, 64<<20); err != nil && !acceptableErr(err) {
			t.Fatalf("SnapshotDelta(%q, %q): undocumented error %v", first, last, err)
		}
		if _, err := ro.SnapshotAllocated(last, 0, 64<<20); err != nil && !acceptableErr(err) {
			t.Fatalf("SnapshotAllocated(%q): undocumented error %v", last, err)
		}
	}
	ro.Close()

	f := newMemFile(b)
	f.limit = fuzzFileLimit
	img, err := qcow2.OpenFile(f, qcow2.OpenOptions{NoBacking: true})
	if err != nil {
		return
	}
	defer img.Close()
	r, err := img.Check(qcow2.CheckOptions{})
	clean := err == nil && r.Clean()
	var ops []func() error
	// Reverting to a snapshot of a huge disk grows the L1 table to match,
	// which is legitimate but slow in a fuzzer; keep to small disks.
	if last := snaps[max(len(snaps)-1, 0):]; len(last) > 0 && last[0].VirtualSize <= 64<<20 {
		ops = append(ops, func() error { return img.RevertSnapshot(last[0].ID) })
	}
	if len(snaps) > 0 {
		ops = append(ops, func() error { return img.DeleteSnapshot(snaps[0].ID) })
	}
	ops = append(ops, func() error { _, err := img.CreateSnapshot("fuzz"); return err })
	for i, op := range ops {
		if err := op(); err != nil {
			if !acceptableErr(err) {
				t.Fatalf("op %d: undocumented error %v", i, err)
			}
			return
		}
	}
	if !clean {
		return
	}
	r, err = img.Check(qcow2.CheckOptions{})
	if err != nil || !r.Clean() {
		t.Fatalf("a clean image is no longer clean after delete, revert and create: %+v %v", r, err)
	}
}

// compressedBase is a 4 KiB-cluster image whose guest cluster 0 is
// allocated, and the file offset of its L2 entry.
var compressedBase = sync.OnceValues(func() ([]byte, int64) {
	f := newMemFile(nil)
	img, err := qcow2.CreateFile(f, qcow2.CreateOptions{Size: 1 << 20, ClusterSize: 4096})
	if err != nil {
		panic(err)
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte{1}, 8192), 0); err != nil {
		panic(err)
	}
	if err := img.Close(); err != nil {
		panic(err)
	}
	b := f.bytes()
	l2 := int64(be.Uint64(b[int64(be.Uint64(b[40:])):]) & offMask)
	return b, l2
})

func FuzzCompressedCluster(f *testing.F) {
	f.Add(uint8(0), uint64(0), []byte{})
	f.Add(uint8(1), uint64(7<<12|5), bytes.Repeat([]byte{0x28, 0xb5, 0x2f, 0xfd}, 10))
	f.Add(uint8(0), uint64(1<<63|0xffff_ffff_0000), []byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, typ uint8, desc uint64, payload []byte) {
		if len(payload) > 1<<20 {
			t.Skip("payloads are bounded to 1 MiB")
		}
		b := spliceCompressed(typ, desc, payload)
		img, err := qcow2.OpenFile(newMemFile(b), qcow2.OpenOptions{ReadOnly: true, NoBacking: true})
		if err != nil {
			if !acceptableErr(err) {
				t.Fatalf("Open: undocumented error %v", err)
			}
			return
		}
		p := make([]byte, 12<<10)
		if _, err := img.ReadAt(p, 0); err != nil && !acceptableErr(err) {
			t.Fatalf("ReadAt: undocumented error %v", err)
		}
		if _, err := img.Check(qcow2.CheckOptions{}); err != nil && !acceptableErr(err) {
			t.Fatalf("Check: undocumented error %v", err)
		}
		img.Close()
		w := newMemFile(b)
		w.limit = fuzzFileLimit
		if img, err = qcow2.OpenFile(w, qcow2.OpenOptions{NoBacking: true}); err != nil {
			return
		}
		defer img.Close()
		if _, err := img.WriteAt([]byte{9, 9, 9}, 100); err != nil && !acceptableErr(err) {
			t.Fatalf("WriteAt over the compressed cluster: undocumented error %v", err)
		}
	})
}

// spliceCompressed makes guest cluster 0 of compressedBase a compressed
// cluster of the given type (0 zlib, else zstd). Without bit 63, desc holds
// the byte offset of the data inside the payload (low 12 bits) and the
// extra sector count (bits 12-15), and the payload is appended to the file;
// with bit 63 it is the whole descriptor.
func spliceCompressed(typ uint8, desc uint64, payload []byte) []byte {
	base, l2 := compressedBase()
	b := bytes.Clone(base)
	at := (int64(len(b)) + 4095) &^ 4095
	b = append(b, make([]byte, at-int64(len(b)))...)
	b = append(b, payload...)
	e := desc | 1<<62
	if desc&(1<<63) == 0 {
		const x = 62 - (12 - 8)
		e = 1<<62 | (desc>>12&0xf)<<x | uint64(at) + desc&0xfff
	}
	be.PutUint64(b[l2:], e&^(1<<63))
	if typ != 0 {
		b[104] = 1
		be.PutUint64(b[72:], be.Uint64(b[72:])|1<<3)
	}
	return b
}

// TestFuzzSeedsRead: the committed compressed-cluster seeds taken from
// QEMU's images decompress to what QEMU wrote.
func TestFuzzSeedsRead(t *testing.T) {
	for _, s := range compressedSeedSpecs {
		path := filepath.Join("testdata", "fuzz", "FuzzCompressedCluster", s.name)
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%s: %v (regenerate with -update-corpus)", path, err)
		}
		lines := strings.Split(string(raw), "\n")
		if len(lines) < 4 || !strings.HasPrefix(lines[3], "[]byte(") {
			t.Fatalf("%s: not a corpus entry of (byte, uint64, []byte)", path)
		}
		desc, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(lines[2], "uint64("), ")"), 10, 64)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		payload, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(lines[3], "[]byte("), ")"))
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		img, err := qcow2.OpenFile(newMemFile(spliceCompressed(s.typ, desc, []byte(payload))), qcow2.OpenOptions{ReadOnly: true, NoBacking: true})
		if err != nil {
			t.Fatal(err)
		}
		p := make([]byte, 4096)
		if _, err := img.ReadAt(p, 0); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if want := bytes.Repeat([]byte{s.pattern}, 4096); !bytes.Equal(p, want) {
			t.Errorf("%s: %s", s.name, firstDiff(p, want))
		}
		img.Close()
	}
}

var compressedSeedSpecs = []struct {
	name, opts   string
	typ, pattern byte
}{
	{"qemu-zlib", "cluster_size=4096", 0, 0x5a},
	{"qemu-zstd", "cluster_size=4096,compression_type=zstd", 1, 0x6b},
}

// TestGenerateSnapshotFuzzCorpus writes the seed corpora of
// FuzzSnapshotTable and FuzzCompressedCluster from qemu-img's output.
func TestGenerateSnapshotFuzzCorpus(t *testing.T) {
	if !*flagUpdateCorpus {
		t.Skip("run with -update-corpus to regenerate the snapshot and compressed-cluster corpora")
	}
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	write := func(target, name, entry string) {
		dir := filepath.Join("testdata", "fuzz", target)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte("go test fuzz v1\n"+entry), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct{ name, opts string }{{"qemu-c512", "cluster_size=512"}, {"qemu-v2", "cluster_size=512,compat=0.10"}} {
		dir := t.TempDir()
		path := makeQemuImage(t, dir, qemuImage{name: "s", opts: c.opts, size: "64k", qemuIO: []string{"write -P 1 0 8k"}})
		for _, name := range []string{"first", "a-longer-snapshot-name"} {
			run(t, dir, "qemu-img", "snapshot", "-c", name, path)
		}
		r := loadRaw(t, path)
		off, n := int64(r.u64(64)), be.Uint32(r.b[60:])
		write("FuzzSnapshotTable", c.name, fmt.Sprintf("uint16(%d)\n[]byte(%q)\n", n, r.b[off:min(off+512, int64(len(r.b)))]))
	}
	for _, s := range compressedSeedSpecs {
		dir := t.TempDir()
		path := makeQemuImage(t, dir, qemuImage{name: "c", opts: s.opts, size: "64k",
			qemuIO: []string{fmt.Sprintf("write -c -P %#x 0 4k", s.pattern)}})
		r := loadRaw(t, path)
		e := r.u64(r.l2EntryOff(0))
		const x = 62 - (12 - 8)
		host := int64(e & (1<<x - 1))
		sectors := e >> x & 0xf
		length := int64(sectors+1)*512 - host&511
		page := host &^ 4095
		desc := sectors<<12 | uint64(host-page)
		write("FuzzCompressedCluster", s.name, fmt.Sprintf("byte(%q)\nuint64(%d)\n[]byte(%q)\n", s.typ, desc, r.b[page:min(host+length, int64(len(r.b)))]))
	}
}
