package nbdattach

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Host faults under a served qcow2 image: the host file runs out of space
// (ENOSPC past a size limit) or fails writes (EIO). The NBD client must get
// an error reply for the command that hit the fault, not a dropped
// connection; the image must stay consistent (leaks allowed); and once the
// fault clears, the same connection must work again with every write that
// succeeded intact.
//
// A failed sync (EIO from fdatasync) is different: the host may have lost
// what it covered, so every later FLUSH fails too, until the image is
// closed and reopened (qcow2.ErrSyncFailed).

// faultFile is an in-memory qcow2.File whose writes past limit fail with
// ENOSPC, and whose writes and syncs fail with writeErr and syncErr while
// those are set.
type faultFile struct {
	mu       sync.Mutex
	data     []byte
	limit    int64
	writeErr error
	syncErr  error
	faults   int // errors returned, for the test's log

	// loseUnsynced makes a failed sync lose what it covered, as Linux may
	// drop the dirty pages of a failed fdatasync: the file reverts to
	// durable, what it held at the last good sync made while set.
	loseUnsynced bool
	durable      []byte

	// writeFailP, if not 0, is the probability that a write fails with
	// writeErr (drawn from rng); 0 fails every write while writeErr is set.
	writeFailP float64
	rng        *rand.Rand
}

var _ qcow2.File = (*faultFile)(nil)

func (f *faultFile) set(fn func(f *faultFile)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *faultFile) ReadAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if off >= int64(len(f.data)) {
		return 0, io.EOF
	}
	n := copy(p, f.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// extend checks a write or an allocation of [off, end) against the faults
// and grows the file to end. f.mu is held.
func (f *faultFile) extend(off, end int64) error {
	switch {
	case f.writeErr != nil && (f.writeFailP == 0 || f.rng.Float64() < f.writeFailP):
		f.faults++
		return fmt.Errorf("faultfile: write at %#x: %w", off, f.writeErr)
	case end > f.limit:
		f.faults++
		return fmt.Errorf("faultfile: write to %#x past the %d-byte limit: %w", end, f.limit, syscall.ENOSPC)
	}
	if end > int64(len(f.data)) {
		f.data = append(f.data, make([]byte, end-int64(len(f.data)))...)
	}
	return nil
}

func (f *faultFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.extend(off, off+int64(len(p))); err != nil {
		return 0, err
	}
	return copy(f.data[off:], p), nil
}

func (f *faultFile) ZeroRange(off, length int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.extend(off, off+length); err != nil {
		return err
	}
	clear(f.data[off : off+length])
	return nil
}

func (f *faultFile) PunchHole(off, length int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	end := min(off+length, int64(len(f.data)))
	if off < end {
		clear(f.data[off:end])
	}
	return nil
}

func (f *faultFile) Truncate(size int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if size <= int64(len(f.data)) {
		f.data = f.data[:size]
		return nil
	}
	return f.extend(size, size)
}

func (f *faultFile) Sync() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case f.syncErr != nil:
		f.faults++
		if f.loseUnsynced && f.durable != nil {
			f.data = bytes.Clone(f.durable)
		}
		return fmt.Errorf("faultfile: sync: %w", f.syncErr)
	case f.loseUnsynced:
		f.durable = bytes.Clone(f.data)
	}
	return nil
}

func (f *faultFile) Size() (int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return int64(len(f.data)), nil
}

func (f *faultFile) Close() error { return nil }

func (f *faultFile) bytes() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return bytes.Clone(f.data)
}

// fill marks the file full: any write that would extend it fails.
func (f *faultFile) fill() { f.set(func(f *faultFile) { f.limit = int64(len(f.data)) }) }

func newFaultImage(t *testing.T, size int64, clusterSize int) (*faultFile, *qcow2.Image) {
	t.Helper()
	f := &faultFile{limit: 1 << 40}
	img, err := qcow2.CreateFile(f, qcow2.CreateOptions{Size: size, ClusterSize: clusterSize})
	if err != nil {
		t.Fatalf("CreateFile: %v", err)
	}
	return f, img
}

// closeAndCheck closes img and reopens a copy of its file: no corruption
// may be found; leaks are allowed, and must be gone after RepairLeaks. It
// returns the reopened image.
func closeAndCheck(t *testing.T, f *faultFile, img *qcow2.Image) *qcow2.Image {
	t.Helper()
	if err := img.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	qemuImgCheck(t, "the file after Close", f.bytes())
	img, err := qcow2.OpenFile(&faultFile{data: f.bytes(), limit: 1 << 40}, qcow2.OpenOptions{})
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	t.Cleanup(func() { img.Close() })
	if img.Info().Corrupt {
		t.Fatal("image is marked corrupt")
	}
	r, err := img.Check(qcow2.CheckOptions{Repair: qcow2.RepairLeaks})
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	if r.Corruptions != 0 || r.CheckErrors != 0 || !r.Clean() {
		t.Fatalf("after the faults: %d corruptions, %d check errors, %d leaks after repairing %d: %q",
			r.Corruptions, r.CheckErrors, r.Leaks, r.LeaksFixed, r.Problems)
	}
	if r.LeaksFixed > 0 {
		t.Logf("%d leaked clusters repaired", r.LeaksFixed)
	}
	return img
}

func TestQcow2HostFaults(t *testing.T) {
	const size, cs = 8 << 20, 4096
	f, img := newFaultImage(t, size, cs)
	c, _ := connect(t, mustExport(t, img, ExportOptions{}))
	model := make([]byte, size)
	write := func(p []byte, off int) {
		t.Helper()
		c.writeAt(p, uint64(off))
		copy(model[off:], p)
	}
	expect := func(what string, r request, want errno) {
		t.Helper()
		if rep := c.do(r); rep.Err != want {
			t.Fatalf("%s: %v reply, want %v", what, rep.Err, want)
		}
	}
	before := pattern(64<<10, 1)
	write(before, 0)
	c.mustDo(request{Type: cmdFlush})

	// (a) The file is full: writes that need new clusters fail with
	// ENOSPC; overwrites of allocated clusters and reads still work, and
	// a flush has nothing that needs space.
	f.fill()
	expect("allocating write on a full host file", request{Type: cmdWrite, Offset: 1 << 20, Length: 8192, Payload: pattern(8192, 2)}, errnoNoSpc)
	expect("unaligned allocating write", request{Type: cmdWrite, Offset: 5<<20 + 100, Length: 100, Payload: pattern(100, 3)}, errnoNoSpc)
	expect("write in a new L2 table's range", request{Type: cmdWrite, Offset: size - cs, Length: cs, Payload: pattern(cs, 4)}, errnoNoSpc)
	write(pattern(4096, 5), 8192) // in place
	mustEqual(t, "read on a full host file", c.readAt(0, 64<<10), model[:64<<10])
	c.mustDo(request{Type: cmdFlush})

	// Writes fail with EIO, in place or allocating.
	f.set(func(f *faultFile) { f.writeErr = syscall.EIO; f.limit = 1 << 40 })
	expect("in-place write with EIO", request{Type: cmdWrite, Offset: 0, Length: 512, Payload: pattern(512, 8)}, errnoIO)
	expect("allocating write with EIO", request{Type: cmdWrite, Offset: 2 << 20, Length: 512, Payload: pattern(512, 9)}, errnoIO)
	f.set(func(f *faultFile) { f.writeErr = nil })
	// The failed in-place write's range is undefined until rewritten.
	write(model[:512], 0)

	// (c) Space returns: the same connection writes where it could not.
	after := pattern(8192, 10)
	write(after, 1<<20)
	write(pattern(cs, 11), size-cs)
	write(pattern(100, 12), 5<<20+100)
	c.mustDo(request{Type: cmdFlush})
	mustEqual(t, "data before and after the faults", c.readAt(0, size/2), model[:size/2])
	mustEqual(t, "data before and after the faults", c.readAt(size/2, size/2), model[size/2:])
	if img.Info().Corrupt {
		t.Fatal("the faults marked the image corrupt")
	}
	c.disconnect()
	c.expectClosed()

	// (b) Consistent on disk, and the data survives a reopen.
	img = closeAndCheck(t, f, img)
	got := make([]byte, size)
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "data after reopen", got, model)
	t.Logf("%d host faults injected", f.faults)
}

// TestQcow2SyncFaultIsSticky: a sync that fails with EIO fails the FLUSH
// (and a FUA write) that ran it, and every FLUSH after it, even once the
// fault clears: the host file may have lost what that sync covered, and no
// later sync can vouch for it. Writes are still accepted. Closing fails
// too; reopened, the file holds no corruption (qcow2.Check, qemu-img
// check), reads as it did at the last good flush or with the writes since,
// and a new connection's flushes succeed again.
func TestQcow2SyncFaultIsSticky(t *testing.T) {
	const size = 8 << 20
	f, img := newFaultImage(t, size, 4096)
	f.set(func(f *faultFile) { f.loseUnsynced = true })
	c, done := connect(t, mustExport(t, img, ExportOptions{}))
	flushed, latest := make([]byte, size), make([]byte, size)
	write := func(p []byte, off int) {
		t.Helper()
		c.writeAt(p, uint64(off))
		copy(latest[off:], p)
	}
	expect := func(what string, r request, want errno) {
		t.Helper()
		if rep := c.do(r); rep.Err != want {
			t.Fatalf("%s: %v reply, want %v", what, rep.Err, want)
		}
	}
	write(pattern(64<<10, 1), 0)
	c.mustDo(request{Type: cmdFlush})
	copy(flushed, latest)
	write(pattern(8192, 2), 4096)  // in place
	write(pattern(8192, 3), 1<<20) // allocating

	f.set(func(f *faultFile) { f.syncErr = syscall.EIO })
	expect("flush with a failing sync", request{Type: cmdFlush}, errnoIO)
	f.set(func(f *faultFile) { f.syncErr = nil })
	expect("flush after the fault cleared", request{Type: cmdFlush}, errnoIO)
	fua := pattern(10, 4)
	expect("FUA write after a failed sync", request{Type: cmdWrite, Flags: cmdFlagFUA, Offset: 100, Length: 10, Payload: fua}, errnoIO)
	copy(latest[100:], fua) // the write itself landed; its flush failed
	write(pattern(512, 5), 2<<20)
	expect("flush after more writes", request{Type: cmdFlush}, errnoIO)
	c.disconnect()
	c.expectClosed()
	if err := waitDone(t, done); !errors.Is(err, qcow2.ErrSyncFailed) {
		t.Fatalf("session ended with %v, want its disconnect flush to fail with ErrSyncFailed", err)
	}

	img = reopenAfterSyncFault(t, f, img, flushed, latest)
	c, _ = connect(t, mustExport(t, img, ExportOptions{}))
	copy(latest, c.readAt(0, size))
	write(pattern(8192, 6), 3<<20)
	c.mustDo(request{Type: cmdFlush})
	mustEqual(t, "data after reopen and a new write", c.readAt(0, size), latest)
	c.disconnect()
	c.expectClosed()
	img = closeAndCheck(t, f, img)
	got := make([]byte, size)
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "data after the second reopen", got, latest)
}

// reopenAfterSyncFault closes img after a failed sync, which must fail with
// ErrSyncFailed, clears the fault and reopens the same file. The file must
// pass qemu-img check as Close left it (leaks allowed), every byte must read
// as at the last good flush (flushed) or as written since (latest), and
// qcow2.Check must find no corruption and repair any leaks.
func reopenAfterSyncFault(t *testing.T, f *faultFile, img *qcow2.Image, flushed, latest []byte) *qcow2.Image {
	t.Helper()
	if err := img.Close(); !errors.Is(err, qcow2.ErrSyncFailed) {
		t.Fatalf("Close after a failed sync: %v, want ErrSyncFailed", err)
	}
	f.set(func(f *faultFile) { f.syncErr = nil })
	qemuImgCheck(t, "the file Close left after a failed sync", f.bytes())
	img, err := qcow2.OpenFile(f, qcow2.OpenOptions{})
	if err != nil {
		t.Fatalf("reopen after a failed sync: %v", err)
	}
	t.Cleanup(func() { img.Close() })
	got := make([]byte, len(latest))
	if _, err := img.ReadAt(got, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	for i := range got {
		if got[i] != flushed[i] && got[i] != latest[i] {
			t.Fatalf("after reopen byte %d is %#x: neither %#x as flushed nor %#x as written since",
				i, got[i], flushed[i], latest[i])
		}
	}
	r, err := img.Check(qcow2.CheckOptions{Repair: qcow2.RepairLeaks})
	if err != nil {
		t.Fatalf("Check after reopen: %v", err)
	}
	if r.Corruptions != 0 || r.CheckErrors != 0 || !r.Clean() {
		t.Fatalf("after reopen: %d corruptions, %d check errors, %d leaks after repairing %d: %q",
			r.Corruptions, r.CheckErrors, r.Leaks, r.LeaksFixed, r.Problems)
	}
	return img
}

// qemuImgCheck runs qemu-img check on a copy of an image file: corruption
// fails the test, leaks (exit status 3) do not. Without qemu-img it does
// nothing, except under CI=true, where requireTool fails the test.
func qemuImgCheck(t *testing.T, what string, b []byte) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil && os.Getenv("CI") != "true" {
		return
	}
	path := filepath.Join(t.TempDir(), "image.qcow2")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := toolCommand(t, ctx, "qemu-img", "check", "-f", "qcow2", path).CombinedOutput()
	var exit *exec.ExitError
	if err != nil && !(errors.As(err, &exit) && exit.ExitCode() == 3) {
		t.Fatalf("qemu-img check of %s: %v\n%s", what, err, out)
	}
}

// TestQcow2RandomHostFaults sends random batches of concurrent NBD writes,
// zeroes, trims and flushes while the host file randomly fills up or fails
// some or all writes. After a failed request its range is read back: each
// byte must be either what it held or what was written. After each flush
// that succeeds (faults armed or not) the file is copied, as a kill would
// leave it, and the copy must hold no corruption and read as the model.
//
// Syncs fail only at the end, since a failed sync is sticky: with the
// faults cleared and a flush made, one more batch is written, a sync fails
// and loses what it covered, and later flushes must fail. Closed and
// reopened, the image must check clean (after repairing leaks) and read as
// the model at the last good flush or with the last batch's writes.
func TestQcow2RandomHostFaults(t *testing.T) {
	const size, cs = 4 << 20, 512 // small clusters: many L2 tables and refcount blocks
	seed := rand.Uint64()
	if s, err := strconv.ParseUint(os.Getenv("FAULT_SEED"), 0, 64); err == nil {
		seed = s // replay a failure
	}
	rng := rand.New(rand.NewPCG(seed, 1))
	defer func() {
		if t.Failed() {
			t.Logf("seed %#x (replay with FAULT_SEED=%#x)", seed, seed)
		}
	}()
	f, img := newFaultImage(t, size, cs)
	f.rng = rand.New(rand.NewPCG(seed, 2))
	c, _ := connect(t, mustExport(t, img, ExportOptions{}))
	b := &faultBatches{t: t, c: c, rng: rng, model: make([]byte, size), cs: cs}
	killChecks := 0
	for batch := range 150 {
		switch k := rng.IntN(8); k {
		case 0:
			f.set(func(f *faultFile) { f.limit = int64(len(f.data)) + rng.Int64N(8*cs) })
		case 1, 2:
			f.set(func(f *faultFile) { f.limit = 1 << 40; f.writeErr = nil })
		case 3:
			f.set(func(f *faultFile) { f.writeErr, f.writeFailP = syscall.EIO, []float64{0, 0.05, 0.3}[rng.IntN(3)] })
		}
		if rng.IntN(6) == 0 {
			if c.do(request{Type: cmdFlush}).Err == errnoOK {
				killChecks++
				checkKilledCopy(t, f.bytes(), b.model)
			}
			continue
		}
		b.send(batch, true)
	}
	f.set(func(f *faultFile) { f.limit = 1 << 40; f.writeErr = nil; f.loseUnsynced = true })
	c.mustDo(request{Type: cmdFlush})
	if img.Info().Corrupt {
		t.Fatal("the faults marked the image corrupt")
	}
	checkKilledCopy(t, f.bytes(), b.model)
	flushed := bytes.Clone(b.model)

	f.set(func(f *faultFile) { f.syncErr = syscall.EIO })
	b.send(150, false)
	if rep := c.do(request{Type: cmdFlush}); rep.Err != errnoIO {
		t.Fatalf("flush with a failing sync: %v reply, want EIO", rep.Err)
	}
	f.set(func(f *faultFile) { f.syncErr = nil })
	if rep := c.do(request{Type: cmdFlush}); rep.Err != errnoIO {
		t.Fatalf("flush after a failed sync, the fault cleared: %v reply, want EIO", rep.Err)
	}
	c.disconnect()
	c.expectClosed()
	img = reopenAfterSyncFault(t, f, img, flushed, b.model)
	if err := img.Flush(); err != nil {
		t.Fatalf("Flush after reopen: %v", err)
	}
	t.Logf("%d replies OK, %d error replies, %d host faults injected, %d killed copies checked",
		b.ok, b.failed, f.faults, killChecks)
}

// faultBatches sends batches of concurrent requests, one per quarter of the
// disk, and keeps model up to date.
type faultBatches struct {
	t          *testing.T
	c          *testClient
	rng        *rand.Rand
	model      []byte
	cs         int
	ok, failed int
}

// send sends one batch of writes, zeroes and trims and waits for the
// replies. If verify, it reads each range back: each byte must be what it
// held or what was written, and all of it what was written if the request
// succeeded; the model takes what reads back. Otherwise (the host file may
// have lost writes under the image) the model takes what was written.
func (b *faultBatches) send(batch int, verify bool) {
	const lanes = 4
	t, size := b.t, len(b.model)
	type lane struct {
		r    request
		want []byte
		rep  <-chan clientReply
	}
	var ls []lane
	for q := range lanes {
		off := q*size/lanes + b.rng.IntN(size/lanes)
		n := min(1+b.rng.IntN(16*b.cs), (q+1)*size/lanes-off)
		r := request{Type: cmdWrite, Offset: uint64(off), Length: uint32(n)}
		want := pattern(n, byte(batch*lanes+q))
		switch b.rng.IntN(6) {
		case 0:
			r.Type = cmdWriteZeroes
			want = make([]byte, n)
		case 1:
			r.Type = cmdTrim // reads back as zeros or as before
			want = make([]byte, n)
		default:
			r.Payload = want
		}
		ls = append(ls, lane{r: r, want: want, rep: b.c.send(r)})
	}
	for _, l := range ls {
		rep, err := b.c.wait(l.rep)
		if err != nil {
			t.Fatalf("batch %d: %v at %d+%d: %v", batch, l.r.Type, l.r.Offset, l.r.Length, err)
		}
		switch rep.Err {
		case errnoOK:
			b.ok++
		case errnoNoSpc, errnoIO:
			b.failed++
		default:
			t.Fatalf("batch %d: %v at %d+%d: %v reply", batch, l.r.Type, l.r.Offset, l.r.Length, rep.Err)
		}
		off, n := int(l.r.Offset), int(l.r.Length)
		if !verify {
			copy(b.model[off:], l.want)
			continue
		}
		got := b.c.readAt(l.r.Offset, l.r.Length)
		for i := range n {
			if got[i] != b.model[off+i] && got[i] != l.want[i] {
				t.Fatalf("batch %d: %v at %d+%d (%v): byte %d is %#x, neither the old %#x nor the new %#x",
					batch, l.r.Type, off, n, rep.Err, off+i, got[i], b.model[off+i], l.want[i])
			}
			if rep.Err == errnoOK && l.r.Type != cmdTrim && got[i] != l.want[i] {
				t.Fatalf("batch %d: %v at %d+%d succeeded but byte %d reads %#x, want %#x",
					batch, l.r.Type, off, n, off+i, got[i], l.want[i])
			}
		}
		copy(b.model[off:], got)
	}
}

// checkKilledCopy opens a copy of the host file taken right after a
// successful flush, as a SIGKILL would leave it: it may leak, but must hold
// no corruption and must read as the model.
func checkKilledCopy(t *testing.T, b, model []byte) {
	t.Helper()
	img, err := qcow2.OpenFile(&faultFile{data: b, limit: 1 << 40}, qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("open a copy taken after a flush: %v", err)
	}
	defer img.Close()
	r, err := img.Check(qcow2.CheckOptions{})
	if err != nil {
		t.Fatalf("check a copy taken after a flush: %v", err)
	}
	if r.Corruptions != 0 || r.CheckErrors != 0 {
		t.Fatalf("copy taken after a flush: %d corruptions, %d check errors: %q",
			r.Corruptions, r.CheckErrors, r.Problems[:min(len(r.Problems), 8)])
	}
	got := make([]byte, len(model))
	if _, err := img.ReadAt(got, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	mustEqual(t, "copy taken after a flush", got, model)
}
