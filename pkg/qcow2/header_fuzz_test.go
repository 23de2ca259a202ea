package qcow2

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
)

// Fuzz targets for the two byte layouts the engine decodes field by field
// and writes back: the header with its extensions and backing file name,
// and one snapshot table entry with its extra data. They run the decoders
// directly, without an image around them, so the fuzzer spends its time in
// the parsing (FuzzOpen and FuzzSnapshotTable cover them inside an image).
// Run them with `go test -run '^$' -fuzz FuzzHeader ./pkg/qcow2/`.

// headerSeeds are headers as Create lays them out, with the extensions
// the decoder knows and one it keeps unread.
func headerSeeds(t testing.TB) [][]byte {
	var out [][]byte
	for _, o := range []CreateOptions{
		{Size: 1 << 30},
		{Size: 1 << 20, ClusterSize: 512, LazyRefcounts: true},
		{Size: 1 << 30, BackingFile: "base.qcow2", BackingFormat: "qcow2"},
		{Size: 1 << 30, CompressionType: CompressionZstd},
	} {
		bits := uint(16)
		if o.ClusterSize != 0 {
			bits = uint(len64(o.ClusterSize)) - 1
		}
		h := newHeader(o, bits, defaultRefcountOrder)
		h.l1Size, h.l1TableOffset = 1, 3<<bits
		h.refcountTableOffset, h.refcountTableClusters = 1<<bits, 1
		if o.LazyRefcounts {
			h.unknown = []extension{{typ: 0x23852875, data: []byte("bitmaps!")}}
		}
		b, err := h.encode()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	return out
}

func len64(n int) int {
	l := 0
	for ; n > 0; n >>= 1 {
		l++
	}
	return l
}

// FuzzHeader: a header decodes with a documented error or not at all, and
// one that decodes survives encode (what the engine writes back on every
// open for writing) with its fields, extensions and backing file intact.
func FuzzHeader(f *testing.F) {
	for _, s := range headerSeeds(f) {
		f.Add(s)
	}
	f.Add([]byte("QFI\xfb\x00\x00\x00\x02"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > 1<<maxClusterBits {
			t.Skip("cluster 0 is at most 2 MiB")
		}
		h, err := decodeHeader(b)
		if err != nil {
			if !documented(err) {
				t.Fatalf("decodeHeader: undocumented error %v", err)
			}
			return
		}
		want := *h
		enc, err := h.encode()
		if err != nil {
			t.Fatalf("a header that decoded does not encode: %v", err)
		}
		// encode writes into cluster 0; what follows it there is kept.
		again := append(enc, b[min(len(enc), len(b)):]...)
		got, err := decodeHeader(again)
		if err != nil {
			t.Fatalf("re-encoded header does not decode: %v\n% x", err, enc)
		}
		// encode clears autoclear bits, moves the backing file name and
		// ignores its length field when there is none; v2
		// headers keep extensions only beside a backing format or an unknown
		// one (the feature name table is informational).
		want.autoclear, got.autoclear = 0, 0
		want.backingFileOffset, got.backingFileOffset = 0, 0
		want.backingFileSize, got.backingFileSize = uint32(len(want.backingFile)), uint32(len(got.backingFile))
		if want.version < 3 && want.backingFormat == "" && len(want.unknown) == 0 {
			want.featureTable, got.featureTable = nil, nil
		}
		if !reflect.DeepEqual(&want, got) {
			t.Fatalf("header changed across encode:\n was %+v\n now %+v", &want, got)
		}
	})
}

// documented reports whether err wraps one of the package's sentinels.
func documented(err error) bool {
	for _, s := range []error{ErrNotQcow2, ErrCorrupt, ErrUnsupported, ErrInvalid} {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// FuzzSnapshotEntry: one snapshot table entry decodes with a documented
// error or survives encodeSnapshotTable (what every snapshot create and
// delete writes) with its ids, sizes and extra data intact.
func FuzzSnapshotEntry(f *testing.F) {
	h := &header{clusterBits: 16, size: 1 << 30}
	for _, s := range []snapshot{
		{id: "1", name: "one", l1Offset: 5 << 16, l1Size: 2, diskSize: 1 << 30, dateSec: 7},
		{id: "2", name: "", l1Offset: 9 << 16, l1Size: 1, diskSize: 4 << 30, vmStateSize: 1 << 33,
			extra: make([]byte, 40)},
	} {
		f.Add(encodeSnapshotTable([]snapshot{s}))
	}
	f.Add(bytes.Repeat([]byte{0xff}, 40))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > 1<<20 {
			t.Skip("one entry is at most 64 KiB of names and 1 KiB of extra data")
		}
		s, n, err := readSnapshotEntry(newMemBytes(b), 0, int64(len(b)), h)
		if err != nil {
			if !documented(err) {
				t.Fatalf("readSnapshotEntry: undocumented error %v", err)
			}
			return
		}
		if n <= 0 || n > int64(len(b))+7 {
			t.Fatalf("entry length %d for %d bytes", n, len(b))
		}
		enc := encodeSnapshotTable([]snapshot{s})
		got, m, err := readSnapshotEntry(newMemBytes(enc), 0, int64(len(enc)), h)
		if err != nil || m != int64(len(enc)) {
			t.Fatalf("re-encoded entry: %v (length %d of %d)", err, m, len(enc))
		}
		// The encoder writes at least the 24 bytes of extra data QEMU
		// writes (vmstate size, disk size, icount), from the decoded fields.
		if got.id != s.id || got.name != s.name || got.l1Offset != s.l1Offset || got.l1Size != s.l1Size ||
			got.diskSize != s.diskSize || got.vmStateSize != s.vmStateSize ||
			got.dateSec != s.dateSec || got.dateNsec != s.dateNsec || got.vmClockNsec != s.vmClockNsec {
			t.Fatalf("entry changed across encode:\n was %+v\n now %+v", s, got)
		}
		if len(s.extra) > 24 && !bytes.Equal(got.extra[24:], s.extra[24:]) {
			t.Fatalf("extra data past the known fields changed: % x -> % x", s.extra, got.extra)
		}
	})
}

// memBytes is a File whose bytes can only be read; readSnapshotEntry
// calls nothing else (the embedded nil File would panic).
type memBytes struct {
	File
	r *bytes.Reader
}

func newMemBytes(b []byte) memBytes { return memBytes{r: bytes.NewReader(b)} }

func (m memBytes) ReadAt(p []byte, off int64) (int, error) { return m.r.ReadAt(p, off) }
