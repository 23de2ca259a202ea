package qcow2_test

import (
	"bytes"
	"errors"
	"io"
	"path/filepath"
	"sync"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// API contract tests: argument checking, io.ReaderAt/WriterAt edge cases,
// read-only and closed images.

func TestCreateOptionsValidation(t *testing.T) {
	cases := []struct {
		name string
		opts qcow2.CreateOptions
	}{
		{"negative size", qcow2.CreateOptions{Size: -1}},
		{"size past 2^55", qcow2.CreateOptions{Size: 1<<55 + 512}},
		{"cluster size 256", qcow2.CreateOptions{Size: 1 << 20, ClusterSize: 256}},
		{"cluster size 4 MiB", qcow2.CreateOptions{Size: 1 << 20, ClusterSize: 4 << 20}},
		{"cluster size not a power of two", qcow2.CreateOptions{Size: 1 << 20, ClusterSize: 3 << 10}},
		{"refcount bits 3", qcow2.CreateOptions{Size: 1 << 20, RefcountBits: 3}},
		{"refcount bits 128", qcow2.CreateOptions{Size: 1 << 20, RefcountBits: 128}},
		{"l1 table over 32 MiB", qcow2.CreateOptions{Size: 1 << 50, ClusterSize: 512}},
		{"backing format vmdk", qcow2.CreateOptions{Size: 1 << 20, BackingFile: "b", BackingFormat: "vmdk"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "x.qcow2")
			if img, err := qcow2.Create(path, c.opts); !errors.Is(err, qcow2.ErrInvalid) {
				t.Errorf("Create(%+v) err = %v, want ErrInvalid", c.opts, err)
				if err == nil {
					img.Close()
				}
			}
			if img, err := qcow2.CreateFile(newMemFile(nil), c.opts); !errors.Is(err, qcow2.ErrInvalid) {
				t.Errorf("CreateFile(%+v) err = %v, want ErrInvalid", c.opts, err)
				if err == nil {
					img.Close()
				}
			}
		})
	}
}

func TestCreateInfo(t *testing.T) {
	for _, c := range []struct {
		opts qcow2.CreateOptions
		want qcow2.Info
	}{
		{qcow2.CreateOptions{Size: 1000},
			qcow2.Info{VirtualSize: 1024, ClusterSize: 65536, Version: 3, Compat: "1.1", RefcountBits: 16, CompressionType: "zlib"}},
		{qcow2.CreateOptions{Size: 1 << 30, ClusterSize: 512, RefcountBits: 1, LazyRefcounts: true},
			qcow2.Info{VirtualSize: 1 << 30, ClusterSize: 512, Version: 3, Compat: "1.1", RefcountBits: 1, LazyRefcounts: true, CompressionType: "zlib"}},
		{qcow2.CreateOptions{Size: 0, ClusterSize: 2 << 20, RefcountBits: 64},
			qcow2.Info{VirtualSize: 0, ClusterSize: 2 << 20, Version: 3, Compat: "1.1", RefcountBits: 64, CompressionType: "zlib"}},
	} {
		img, err := qcow2.CreateFile(newMemFile(nil), c.opts)
		if err != nil {
			t.Fatalf("CreateFile(%+v): %v", c.opts, err)
		}
		got := img.Info()
		got.Dirty = false // lazy refcounts may mark an open image dirty
		if got.VirtualSize != c.want.VirtualSize || got.ClusterSize != c.want.ClusterSize || got.Version != c.want.Version ||
			got.Compat != c.want.Compat || got.RefcountBits != c.want.RefcountBits || got.LazyRefcounts != c.want.LazyRefcounts ||
			got.CompressionType != c.want.CompressionType || got.Corrupt || got.BackingFile != "" || len(got.Snapshots) != 0 {
			t.Errorf("Info() after CreateFile(%+v) = %+v, want %+v", c.opts, got, c.want)
		}
		if img.Size() != c.want.VirtualSize {
			t.Errorf("Size() = %d, want %d", img.Size(), c.want.VirtualSize)
		}
		img.Close()
	}
}

func TestReadWriteBounds(t *testing.T) {
	const size = 1<<20 + 512
	img, err := qcow2.CreateFile(newMemFile(nil), qcow2.CreateOptions{Size: size, ClusterSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	data := bytes.Repeat([]byte{7}, 1024)
	if n, err := img.WriteAt(data[:512], size-512); err != nil || n != 512 {
		t.Fatalf("WriteAt of the last sector: n=%d err=%v", n, err)
	}
	for _, c := range []struct {
		name string
		off  int64
		n    int
	}{{"crossing the end", size - 512, 1024}, {"at the end", size, 1}, {"past the end", size + 4096, 10}, {"negative offset", -512, 512}} {
		if _, err := img.WriteAt(data[:c.n], c.off); !errors.Is(err, qcow2.ErrInvalid) {
			t.Errorf("WriteAt %s: err=%v, want ErrInvalid", c.name, err)
		}
	}
	if err := img.WriteZeroes(size-512, 1024, false); !errors.Is(err, qcow2.ErrInvalid) {
		t.Errorf("WriteZeroes crossing the end: %v, want ErrInvalid", err)
	}
	if err := img.Discard(size, 4096); !errors.Is(err, qcow2.ErrInvalid) {
		t.Errorf("Discard past the end: %v, want ErrInvalid", err)
	}
	if err := img.WriteZeroes(-1, 10, true); !errors.Is(err, qcow2.ErrInvalid) {
		t.Errorf("WriteZeroes at a negative offset: %v, want ErrInvalid", err)
	}
	if err := img.Resize(-512); !errors.Is(err, qcow2.ErrInvalid) {
		t.Errorf("Resize(-512): %v, want ErrInvalid", err)
	}
	// The last sector is unchanged by the refused operations.
	p := make([]byte, 1024)
	n, err := img.ReadAt(p, size-512)
	if n != 512 || err != io.EOF || !bytes.Equal(p[:512], data[:512]) {
		t.Errorf("ReadAt crossing the end: n=%d err=%v data ok=%v, want 512, io.EOF, true", n, err, bytes.Equal(p[:512], data[:512]))
	}
	if n, err := img.ReadAt(p, size); n != 0 || err != io.EOF {
		t.Errorf("ReadAt at the end: n=%d err=%v, want 0, io.EOF", n, err)
	}
	if _, err := img.ReadAt(p, -1); err == nil {
		t.Errorf("ReadAt at a negative offset succeeded")
	}
	if n, err := img.ReadAt(nil, 0); n != 0 || err != nil {
		t.Errorf("empty ReadAt: n=%d err=%v", n, err)
	}
	if n, err := img.WriteAt(nil, 0); n != 0 || err != nil {
		t.Errorf("empty WriteAt: n=%d err=%v", n, err)
	}
	if err := img.WriteZeroes(0, 0, true); err != nil {
		t.Errorf("empty WriteZeroes: %v", err)
	}
	if err := img.Discard(0, 0); err != nil {
		t.Errorf("empty Discard: %v", err)
	}
}

func TestReadOnlyAndClosed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ro.qcow2")
	img := mustCreate(t, path, qcow2.CreateOptions{Size: 1 << 20})
	if _, err := img.WriteAt([]byte{1, 2, 3}, 100); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	ro := mustOpen(t, path, qcow2.OpenOptions{ReadOnly: true})
	if _, err := ro.WriteAt([]byte{1}, 0); !errors.Is(err, qcow2.ErrReadOnly) {
		t.Errorf("WriteAt: %v, want ErrReadOnly", err)
	}
	if err := ro.WriteZeroes(0, 512, true); !errors.Is(err, qcow2.ErrReadOnly) {
		t.Errorf("WriteZeroes: %v, want ErrReadOnly", err)
	}
	if err := ro.Discard(0, 65536); !errors.Is(err, qcow2.ErrReadOnly) {
		t.Errorf("Discard: %v, want ErrReadOnly", err)
	}
	if err := ro.Resize(2 << 20); !errors.Is(err, qcow2.ErrReadOnly) {
		t.Errorf("Resize: %v, want ErrReadOnly", err)
	}
	if err := ro.Flush(); err != nil {
		t.Errorf("Flush of a read-only image: %v", err)
	}
	p := make([]byte, 3)
	if _, err := ro.ReadAt(p, 100); err != nil || !bytes.Equal(p, []byte{1, 2, 3}) {
		t.Errorf("ReadAt: %v %v", p, err)
	}
	if err := ro.Close(); err != nil {
		t.Fatal(err)
	}
	for name, op := range map[string]func() error{
		"ReadAt":      func() error { _, err := ro.ReadAt(p, 0); return err },
		"WriteAt":     func() error { _, err := ro.WriteAt(p, 0); return err },
		"Flush":       ro.Flush,
		"WriteZeroes": func() error { return ro.WriteZeroes(0, 512, false) },
		"Discard":     func() error { return ro.Discard(0, 512) },
		"Resize":      func() error { return ro.Resize(2 << 20) },
		"Check":       func() error { _, err := ro.Check(qcow2.CheckOptions{}); return err },
		"Close":       ro.Close,
	} {
		if err := op(); !errors.Is(err, qcow2.ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", name, err)
		}
	}
}

// syncCountingFile counts Sync calls and the writes made since the last one.
type syncCountingFile struct {
	*memFile
	mu             sync.Mutex
	syncs          int
	writesUnsynced int
}

func (f *syncCountingFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	f.writesUnsynced++
	f.mu.Unlock()
	return f.memFile.WriteAt(p, off)
}

func (f *syncCountingFile) Sync() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.syncs++
	f.writesUnsynced = 0
	return nil
}

// TestFlushSyncsEveryWrite: Flush makes every completed write durable, so
// no write may be left unsynced when it returns, whether it allocated or
// overwrote data in place, zeroed, or discarded.
func TestFlushSyncsEveryWrite(t *testing.T) {
	f := &syncCountingFile{memFile: newMemFile(nil)}
	img, err := qcow2.CreateFile(f, qcow2.CreateOptions{Size: 4 << 20, ClusterSize: 65536})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	data := bytes.Repeat([]byte{0xa5}, 4096)
	for _, op := range []struct {
		name string
		do   func() error
	}{
		{"allocating write", func() error { _, err := img.WriteAt(data, 0); return err }},
		{"overwrite in place", func() error { _, err := img.WriteAt(data, 8192); return err }},
		{"overwrite in place again", func() error { _, err := img.WriteAt(data[:512], 0); return err }},
		{"write zeroes", func() error { return img.WriteZeroes(65536, 65536, false) }},
		{"discard", func() error { return img.Discard(0, 65536) }},
	} {
		if err := op.do(); err != nil {
			t.Fatalf("%s: %v", op.name, err)
		}
		f.mu.Lock()
		before := f.syncs
		f.mu.Unlock()
		if err := img.Flush(); err != nil {
			t.Fatalf("Flush after %s: %v", op.name, err)
		}
		f.mu.Lock()
		syncs, unsynced := f.syncs-before, f.writesUnsynced
		f.mu.Unlock()
		if syncs == 0 || unsynced != 0 {
			t.Errorf("Flush after %s: %d syncs, %d writes left unsynced", op.name, syncs, unsynced)
		}
	}
}
