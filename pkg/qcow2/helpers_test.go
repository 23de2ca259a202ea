package qcow2_test

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Flags shared by the suites. The defaults keep `go test ./pkg/qcow2/` short;
// -long (or QCOW2_TEST_LONG=1) runs the property and concurrency tests with
// many more operations, and -seed replays a failing run.
var (
	flagLong = flag.Bool("long", false, "run the long variants of the property tests")
	flagSeed = flag.Uint64("seed", 0, "base seed for randomized tests (0: derive from the clock)")
)

func longRun() bool { return *flagLong || os.Getenv("QCOW2_TEST_LONG") == "1" }

// baseSeed is chosen once per process so that every subtest's seed can be
// derived from it and printed.
var baseSeed = sync.OnceValue(func() uint64 {
	if *flagSeed != 0 {
		return *flagSeed
	}
	if s := os.Getenv("QCOW2_TEST_SEED"); s != "" {
		if v, err := strconv.ParseUint(s, 0, 64); err == nil {
			return v
		}
	}
	return uint64(time.Now().UnixNano())
})

// newRand returns a generator seeded from the base seed and the test's name,
// and arranges for the seed to be printed if the test fails.
func newRand(t testing.TB) *rand.Rand {
	t.Helper()
	base := baseSeed()
	var h uint64 = 14695981039346656037
	for _, c := range []byte(t.Name()) {
		h = (h ^ uint64(c)) * 1099511628211
	}
	seed := base ^ h
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("randomized test failed: base seed %d (replay with -seed=%d or QCOW2_TEST_SEED=%d), subtest seed %#x",
				base, base, base, seed)
		}
	})
	return rand.New(rand.NewPCG(seed, seed>>1|1))
}

// sentinels is every error the package documents; anything it returns must
// wrap one of them or a host I/O error.
var sentinels = []error{
	qcow2.ErrNotQcow2, qcow2.ErrUnsupported, qcow2.ErrCorrupt, qcow2.ErrReadOnly,
	qcow2.ErrClosed, qcow2.ErrInvalid, qcow2.ErrShrink, qcow2.ErrSnapshotNotFound,
	qcow2.ErrSnapshotExists, qcow2.ErrBackingOutsideRoot, qcow2.ErrSnapshotInUse,
	qcow2.ErrSyncFailed,
}

func wrapsSentinel(err error) bool {
	for _, s := range sentinels {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// memFile is an in-memory qcow2.File. Writes beyond limit fail with ENOSPC
// instead of allocating, so hostile images cannot make a test allocate
// without bound.
type memFile struct {
	mu     sync.RWMutex
	data   []byte
	limit  int64
	closed bool
}

var _ qcow2.File = (*memFile)(nil)

const defaultMemFileLimit = 512 << 20

func newMemFile(data []byte) *memFile {
	return &memFile{data: bytes.Clone(data), limit: defaultMemFileLimit}
}

func (f *memFile) ReadAt(p []byte, off int64) (int, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if off < 0 {
		return 0, fmt.Errorf("memfile: negative offset %d", off)
	}
	if off >= int64(len(f.data)) {
		return 0, io.EOF
	}
	n := copy(p, f.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (f *memFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if off < 0 {
		return 0, fmt.Errorf("memfile: negative offset %d", off)
	}
	end := off + int64(len(p))
	if end > f.limit || end < off {
		return 0, fmt.Errorf("memfile: write to %#x beyond the %d byte limit: %w", end, f.limit, syscall.ENOSPC)
	}
	f.grow(end)
	copy(f.data[off:], p)
	return len(p), nil
}

// grow extends the file to n bytes with zeros. f.mu must be held.
func (f *memFile) grow(n int64) {
	if n <= int64(len(f.data)) {
		return
	}
	if n <= int64(cap(f.data)) {
		old := len(f.data)
		f.data = f.data[:n]
		clear(f.data[old:])
		return
	}
	nd := make([]byte, n, max(n, 2*int64(cap(f.data))))
	copy(nd, f.data)
	f.data = nd
}

func (f *memFile) Sync() error { return nil }

func (f *memFile) Size() (int64, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return int64(len(f.data)), nil
}

func (f *memFile) Truncate(size int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if size < 0 || size > f.limit {
		return fmt.Errorf("memfile: truncate to %d: %w", size, syscall.EINVAL)
	}
	if size < int64(len(f.data)) {
		f.data = f.data[:size]
		return nil
	}
	f.grow(size)
	return nil
}

func (f *memFile) ZeroRange(off, length int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if off < 0 || length < 0 || off+length > f.limit {
		return fmt.Errorf("memfile: zero range %d+%d: %w", off, length, syscall.EINVAL)
	}
	f.grow(off + length)
	clear(f.data[off : off+length])
	return nil
}

func (f *memFile) PunchHole(off, length int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if off < 0 || length < 0 {
		return fmt.Errorf("memfile: punch %d+%d: %w", off, length, syscall.EINVAL)
	}
	end := min(off+length, int64(len(f.data)))
	if off < end {
		clear(f.data[off:end])
	}
	return nil
}

func (f *memFile) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	return nil
}

// bytes returns a copy of the file's contents.
func (f *memFile) bytes() []byte {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return bytes.Clone(f.data)
}

// firstDiff describes where two byte slices first differ, for failure messages.
func firstDiff(got, want []byte) string {
	n := min(len(got), len(want))
	for i := 0; i < n; i++ {
		if got[i] != want[i] {
			j := i
			for j < n && got[j] != want[j] {
				j++
			}
			return fmt.Sprintf("first difference at +%#x (%d differing bytes from there): got %#02x want %#02x",
				i, j-i, got[i], want[i])
		}
	}
	if len(got) != len(want) {
		return fmt.Sprintf("lengths differ: got %d want %d", len(got), len(want))
	}
	return "equal"
}

// fill returns n bytes from rng; never all zero so that a lost write shows.
func fill(rng *rand.Rand, n int64) []byte {
	p := make([]byte, n)
	for i := 0; i+8 <= len(p); i += 8 {
		v := rng.Uint64() | 0x0101010101010101
		for k := 0; k < 8; k++ {
			p[i+k] = byte(v >> (8 * k))
		}
	}
	for i := len(p) &^ 7; i < len(p); i++ {
		p[i] = byte(rng.IntN(255) + 1)
	}
	return p
}

func mustCreate(t testing.TB, path string, opts qcow2.CreateOptions) *qcow2.Image {
	t.Helper()
	img, err := qcow2.Create(path, opts)
	if err != nil {
		t.Fatalf("Create(%s, %+v): %v", path, opts, err)
	}
	return img
}

func mustOpen(t testing.TB, path string, opts qcow2.OpenOptions) *qcow2.Image {
	t.Helper()
	img, err := qcow2.Open(path, opts)
	if err != nil {
		t.Fatalf("Open(%s, %+v): %v", path, opts, err)
	}
	return img
}

// readAll reads the whole virtual disk.
func readAll(t testing.TB, img *qcow2.Image) []byte {
	t.Helper()
	p := make([]byte, img.Size())
	n, err := img.ReadAt(p, 0)
	if err != nil && !(err == io.EOF && n == len(p)) {
		t.Fatalf("ReadAt(whole image of %d bytes): n=%d err=%v", len(p), n, err)
	}
	return p
}

// requireClean fails the test unless r reports no corruption, leak or error.
func requireClean(t testing.TB, what string, r *qcow2.CheckResult, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if !r.Clean() {
		t.Fatalf("%s: corruptions=%d leaks=%d check-errors=%d problems=%q",
			what, r.Corruptions, r.Leaks, r.CheckErrors, firstN(r.Problems, 20))
	}
}

func firstN(s []string, n int) []string {
	if len(s) > n {
		return append(s[:n:n], fmt.Sprintf("... and %d more", len(s)-n))
	}
	return s
}
