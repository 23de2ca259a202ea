package nbdattach

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func TestReadWriteSizes(t *testing.T) {
	b := newTestBackend(64 << 20)
	c, _ := connect(t, mustExport(t, b, ExportOptions{}))
	for _, n := range []int{0, 1, 511, 4096, 1 << 20, MaxBlockSize} {
		off := uint64(64<<20 - n) // flush against the end
		p := pattern(n, byte(n))
		c.writeAt(p, off)
		mustEqual(t, fmt.Sprintf("%d bytes", n), c.readAt(off, uint32(n)), p)
	}
}

func TestCommandsReachBackend(t *testing.T) {
	for _, tc := range []struct {
		name string
		req  request
		want []string
	}{
		{"flush", request{Type: cmdFlush}, []string{"flush"}},
		{"flush fua", request{Type: cmdFlush, Flags: cmdFlagFUA}, []string{"flush"}},
		{"write", request{Type: cmdWrite, Offset: 4096, Length: 3, Payload: []byte{1, 2, 3}}, []string{"write 4096+3"}},
		{"write fua", request{Type: cmdWrite, Flags: cmdFlagFUA, Length: 3, Payload: []byte{1, 2, 3}}, []string{"write 0+3", "flush"}},
		{"read fua", request{Type: cmdRead, Flags: cmdFlagFUA, Length: 3}, nil},
		{"trim", request{Type: cmdTrim, Offset: 4096, Length: 8192}, []string{"discard 4096+8192"}},
		{"trim fua", request{Type: cmdTrim, Flags: cmdFlagFUA, Length: 512}, []string{"discard 0+512", "flush"}},
		{"trim empty", request{Type: cmdTrim, Offset: 4096}, nil},
		{"zeroes", request{Type: cmdWriteZeroes, Length: 65536}, []string{"zero 0+65536 unmap=true"}},
		{"zeroes no hole", request{Type: cmdWriteZeroes, Flags: cmdFlagNoHole, Offset: 512, Length: 512}, []string{"zero 512+512 unmap=false"}},
		{"zeroes fua no hole", request{Type: cmdWriteZeroes, Flags: cmdFlagFUA | cmdFlagNoHole, Length: 1}, []string{"zero 0+1 unmap=false", "flush"}},
		// TRIM and WRITE_ZEROES carry no payload even though Length
		// is set: the byte after the header must be the next request.
		{"zeroes whole export", request{Type: cmdWriteZeroes, Length: 1 << 20}, []string{"zero 0+1048576 unmap=true"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newTestBackend(1 << 20)
			c, _ := connect(t, mustExport(t, b, ExportOptions{}))
			b.takeCalls()
			c.mustDo(tc.req)
			if got := b.takeCalls(); !slices.Equal(got, tc.want) {
				t.Fatalf("backend calls %q, want %q", got, tc.want)
			}
			c.readAt(0, 1) // still in step
		})
	}
}

func TestZeroesAndTrimReadBackAsZero(t *testing.T) {
	b := newTestBackend(1 << 20)
	c, _ := connect(t, mustExport(t, b, ExportOptions{}))
	c.writeAt(pattern(3*4096, 9), 0)
	c.mustDo(request{Type: cmdWriteZeroes, Offset: 4096, Length: 4096})
	want := append(append(pattern(3*4096, 9)[:4096], make([]byte, 4096)...), pattern(3*4096, 9)[8192:]...)
	mustEqual(t, "after WRITE_ZEROES", c.readAt(0, 3*4096), want)
}

func TestRequestErrors(t *testing.T) {
	const size = 1 << 20
	for _, tc := range []struct {
		name string
		req  request
		want errno
	}{
		{"read past end", request{Type: cmdRead, Offset: size - 1, Length: 2}, errnoInval},
		{"read after end", request{Type: cmdRead, Offset: size + 4096, Length: 1}, errnoInval},
		{"read offset overflow", request{Type: cmdRead, Offset: math.MaxUint64, Length: 2}, errnoInval},
		{"read too big", request{Type: cmdRead, Length: MaxBlockSize + 1}, errnoInval},
		{"write past end", request{Type: cmdWrite, Offset: size - 1, Length: 2, Payload: []byte{1, 2}}, errnoNoSpc},
		{"write offset overflow", request{Type: cmdWrite, Offset: math.MaxUint64 - 1, Length: 4, Payload: []byte{1, 2, 3, 4}}, errnoNoSpc},
		{"write too big", request{Type: cmdWrite, Length: MaxBlockSize + 1, Payload: make([]byte, MaxBlockSize+1)}, errnoInval},
		{"zeroes past end", request{Type: cmdWriteZeroes, Offset: size, Length: 1}, errnoNoSpc},
		{"trim past end", request{Type: cmdTrim, Offset: 4096, Length: size}, errnoInval},
		{"cache", request{Type: cmdCache, Length: 4096}, errnoInval},
		{"block status", request{Type: cmdBlockStatus, Length: 4096}, errnoInval},
		{"command 8", request{Type: 8, Length: 4096}, errnoInval},
		{"command 0xffff", request{Type: 0xffff, Offset: math.MaxUint64, Length: math.MaxUint32}, errnoInval},
		{"read DF", request{Type: cmdRead, Flags: cmdFlagDF, Length: 1}, errnoInval},
		{"read unknown flag", request{Type: cmdRead, Flags: 1 << 15, Length: 1}, errnoInval},
		{"write no hole", request{Type: cmdWrite, Flags: cmdFlagNoHole, Length: 2, Payload: []byte{1, 2}}, errnoInval},
		{"zeroes fast zero", request{Type: cmdWriteZeroes, Flags: cmdFlagFastZero, Length: 1}, errnoInval},
		{"trim req one", request{Type: cmdTrim, Flags: cmdFlagReqOne, Length: 1}, errnoInval},
		{"flush no hole", request{Type: cmdFlush, Flags: cmdFlagNoHole}, errnoInval},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newTestBackend(size)
			c, _ := connect(t, mustExport(t, b, ExportOptions{}))
			b.takeCalls()
			if rep := c.do(tc.req); rep.Err != tc.want {
				t.Fatalf("%v, want %v", rep.Err, tc.want)
			}
			if calls := b.takeCalls(); len(calls) != 0 {
				t.Fatalf("backend was called: %q", calls)
			}
			// The connection is still in step: a write and a read work.
			c.writeAt([]byte{7}, 0)
			mustEqual(t, "read", c.readAt(0, 1), []byte{7})
		})
	}
}

func TestReadOnlyExport(t *testing.T) {
	b := newTestBackend(1 << 20)
	b.MemBackend.WriteAt([]byte("data"), 0)
	c, _ := connect(t, mustExport(t, b, ExportOptions{ReadOnly: true}))
	b.takeCalls()
	for _, r := range []request{
		{Type: cmdWrite, Length: 4, Payload: []byte("xxxx")},
		{Type: cmdWrite, Flags: cmdFlagFUA, Length: 4, Payload: []byte("xxxx")},
		{Type: cmdTrim, Length: 4},
		{Type: cmdWriteZeroes, Length: 4},
	} {
		if rep := c.do(r); rep.Err != errnoPerm {
			t.Errorf("%v on a read-only export: %v, want EPERM", r.Type, rep.Err)
		}
	}
	mustEqual(t, "contents", c.readAt(0, 4), []byte("data"))
	c.mustDo(request{Type: cmdFlush})
	if calls := b.takeCalls(); !slices.Equal(calls, []string{"flush"}) {
		t.Fatalf("backend calls %q, want only the flush", calls)
	}
}

func TestBackendErrorsBecomeReplies(t *testing.T) {
	errs := []struct {
		err  error
		want errno
	}{
		{syscall.EIO, errnoIO},
		{errors.New("disk on fire"), errnoIO},
		{fmt.Errorf("allocating cluster: %w", syscall.ENOSPC), errnoNoSpc},
		{syscall.EDQUOT, errnoNoSpc},
		{syscall.EFBIG, errnoNoSpc},
		{syscall.EROFS, errnoPerm},
		{fmt.Errorf("image: %w", ErrReadOnly), errnoPerm},
		{syscall.EINVAL, errnoInval},
		{syscall.EOVERFLOW, errnoInval}, // the spec reserves EOVERFLOW for DF
		{ErrOutOfRange, errnoInval},
		{syscall.ENOMEM, errnoNoMem},
		{io.ErrUnexpectedEOF, errnoIO},
	}
	for _, tc := range errs {
		t.Run(tc.err.Error(), func(t *testing.T) {
			b := newTestBackend(1 << 20)
			c, _ := connect(t, mustExport(t, b, ExportOptions{}))
			fail := func(int64) error { return tc.err }
			b.set(func(b *testBackend) {
				b.readHook, b.writeHook = fail, fail
				b.flushErr, b.zeroErr, b.trimErr = tc.err, tc.err, tc.err
			})
			for _, r := range []request{
				{Type: cmdRead, Length: 4096},
				{Type: cmdWrite, Length: 4, Payload: []byte("abcd")},
				{Type: cmdFlush},
				{Type: cmdTrim, Length: 4096},
				{Type: cmdWriteZeroes, Length: 4096},
			} {
				if rep := c.do(r); rep.Err != tc.want || rep.Data != nil {
					t.Errorf("%v: %v with %d bytes, want %v and no data", r.Type, rep.Err, len(rep.Data), tc.want)
				}
			}
			// The connection survives every failure.
			b.set(func(b *testBackend) {
				b.readHook, b.writeHook, b.flushErr, b.zeroErr, b.trimErr = nil, nil, nil, nil, nil
			})
			c.writeAt([]byte("ok"), 10)
			mustEqual(t, "after errors", c.readAt(10, 2), []byte("ok"))
		})
	}
}

func TestFUAFlushFailure(t *testing.T) {
	b := newTestBackend(1 << 20)
	c, _ := connect(t, mustExport(t, b, ExportOptions{}))
	b.set(func(b *testBackend) { b.flushErr = syscall.EIO })
	if rep := c.do(request{Type: cmdWrite, Flags: cmdFlagFUA, Length: 1, Payload: []byte{1}}); rep.Err != errnoIO {
		t.Fatalf("FUA write with failing flush: %v, want EIO", rep.Err)
	}
	if rep := c.do(request{Type: cmdWrite, Length: 1, Payload: []byte{1}}); rep.Err != errnoOK {
		t.Fatalf("plain write: %v", rep.Err)
	}
}

// shortBackend returns short reads and writes without an error.
type shortBackend struct{ *MemBackend }

func (s shortBackend) ReadAt(p []byte, off int64) (int, error)  { return len(p) / 2, nil }
func (s shortBackend) WriteAt(p []byte, off int64) (int, error) { return len(p) / 2, nil }

func TestShortBackendIOIsAnError(t *testing.T) {
	c, _ := connect(t, mustExport(t, shortBackend{NewMemBackend(1 << 20)}, ExportOptions{}))
	if rep := c.do(request{Type: cmdRead, Length: 4096}); rep.Err != errnoIO {
		t.Errorf("short read: %v, want EIO", rep.Err)
	}
	if rep := c.do(request{Type: cmdWrite, Length: 2, Payload: []byte{1, 2}}); rep.Err != errnoIO {
		t.Errorf("short write: %v, want EIO", rep.Err)
	}
}

// unsupportedBackend cannot zero or discard in place.
type unsupportedBackend struct{ *testBackend }

func (u unsupportedBackend) WriteZeroes(off, length int64, mayUnmap bool) error {
	return fmt.Errorf("zeroing: %w", errors.ErrUnsupported)
}
func (u unsupportedBackend) Discard(off, length int64) error { return errors.ErrUnsupported }

func TestUnsupportedZeroAndTrimFallBack(t *testing.T) {
	b := newTestBackend(4 << 20)
	c, _ := connect(t, mustExport(t, unsupportedBackend{b}, ExportOptions{}))
	c.writeAt(pattern(3<<20, 1), 0)
	b.takeCalls()
	c.mustDo(request{Type: cmdTrim, Length: 4096}) // a hint: success, nothing done
	c.mustDo(request{Type: cmdWriteZeroes, Offset: 1, Length: 3<<20 - 2})
	if calls := b.takeCalls(); !slices.Equal(calls, []string{"write 1+1048576", "write 1048577+1048576", "write 2097153+1048574"}) {
		t.Fatalf("fallback calls %q", calls)
	}
	got := c.readAt(0, 3<<20)
	want := make([]byte, 3<<20)
	want[0], want[len(want)-1] = pattern(3<<20, 1)[0], pattern(3<<20, 1)[3<<20-1]
	mustEqual(t, "zeroed range", got, want)
}

func TestRepliesOutOfOrder(t *testing.T) {
	b := newTestBackend(1 << 20)
	c, _ := connect(t, mustExport(t, b, ExportOptions{}))
	release := make(chan struct{})
	b.set(func(b *testBackend) {
		b.readHook = func(off int64) error {
			if off == 0 {
				<-release
			}
			return nil
		}
	})
	b.MemBackend.WriteAt([]byte("slow....fast...."), 0)
	slow := c.send(request{Type: cmdRead, Offset: 0, Length: 8})
	fast := c.send(request{Type: cmdRead, Offset: 8, Length: 8})
	rep, err := c.wait(fast)
	if err != nil || string(rep.Data) != "fast...." {
		t.Fatalf("fast read: %q %v", rep.Data, err)
	}
	select {
	case <-slow:
		t.Fatal("slow read answered before its backend call returned")
	default:
	}
	close(release)
	if rep, err := c.wait(slow); err != nil || string(rep.Data) != "slow...." {
		t.Fatalf("slow read: %q %v", rep.Data, err)
	}
}

func TestConcurrentRequests(t *testing.T) {
	const (
		workers = 16
		ops     = 200
		region  = 64 << 10
	)
	b := newTestBackend(workers * region)
	b.readHook = func(off int64) error {
		if off%3 == 0 {
			time.Sleep(50 * time.Microsecond) // reorder replies
		}
		return nil
	}
	c, _ := connect(t, mustExport(t, b, ExportOptions{MaxInFlight: 8}))
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			model := make([]byte, region)
			base := uint64(w * region)
			for range ops {
				off := rng.IntN(region - 1)
				n := 1 + rng.IntN(min(region-off, 8192))
				var r request
				switch rng.IntN(3) {
				case 0:
					p := make([]byte, n)
					for i := range p {
						p[i] = byte(rng.Uint32())
					}
					copy(model[off:], p)
					r = request{Type: cmdWrite, Offset: base + uint64(off), Length: uint32(n), Payload: p}
				case 1:
					clear(model[off : off+n])
					r = request{Type: cmdWriteZeroes, Offset: base + uint64(off), Length: uint32(n)}
				case 2:
					r = request{Type: cmdRead, Offset: base + uint64(off), Length: uint32(n)}
				}
				rep, err := c.wait(c.send(r))
				if err == nil && rep.Err != errnoOK {
					err = fmt.Errorf("%v: %v", r.Type, rep.Err)
				}
				if err == nil && r.Type == cmdRead && string(rep.Data) != string(model[off:off+n]) {
					err = fmt.Errorf("worker %d: read %d+%d differs from the model", w, off, n)
				}
				if err != nil {
					errs <- err
					return
				}
			}
			got := make([]byte, region)
			b.MemBackend.ReadAt(got, int64(base))
			if string(got) != string(model) {
				errs <- fmt.Errorf("worker %d: backend differs from the model", w)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestMaxInFlightBoundsConcurrency(t *testing.T) {
	const limit, total = 4, 20
	b := newTestBackend(1 << 20)
	var cur, peak atomic.Int32
	gate := make(chan struct{})
	b.readHook = func(int64) error {
		n := cur.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		<-gate
		cur.Add(-1)
		return nil
	}
	c, _ := connect(t, mustExport(t, b, ExportOptions{MaxInFlight: limit}))
	var chans []<-chan clientReply
	for range total {
		chans = append(chans, c.send(request{Type: cmdRead, Length: 512}))
	}
	deadline := time.Now().Add(testTimeout)
	for cur.Load() < limit && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond) // give a 5th request the chance to sneak in
	if p := peak.Load(); p != limit {
		t.Fatalf("%d backend calls at once, want %d", p, limit)
	}
	close(gate)
	for _, ch := range chans {
		if rep, err := c.wait(ch); err != nil || rep.Err != errnoOK {
			t.Fatalf("read: %v %v", rep.Err, err)
		}
	}
}

func TestDisconnectWaitsForInFlight(t *testing.T) {
	b := newTestBackend(1 << 20)
	c, done := connect(t, mustExport(t, b, ExportOptions{}))
	gate := make(chan struct{})
	b.set(func(b *testBackend) { b.writeHook = func(int64) error { <-gate; return nil } })
	b.takeCalls()
	w := c.send(request{Type: cmdWrite, Length: 2, Payload: []byte{1, 2}})
	c.disconnect()
	select {
	case err := <-done:
		t.Fatalf("ServeConn returned (%v) with a write in flight", err)
	case <-time.After(20 * time.Millisecond):
	}
	close(gate)
	if rep, err := c.wait(w); err != nil || rep.Err != errnoOK {
		t.Fatalf("in-flight write: %v %v", rep.Err, err)
	}
	if err := waitDone(t, done); err != nil {
		t.Fatalf("ServeConn after DISC: %v", err)
	}
	c.expectClosed()
	if calls := b.takeCalls(); !slices.Equal(calls, []string{"write 0+2", "flush"}) {
		t.Fatalf("backend calls %q, want the write, then a flush", calls)
	}
}

func TestMalformedRequests(t *testing.T) {
	header := func(magic uint32) []byte {
		b := encodeRequest(1, request{Type: cmdRead, Length: 1})
		b[0], b[1], b[2], b[3] = byte(magic>>24), byte(magic>>16), byte(magic>>8), byte(magic)
		return b
	}
	for _, tc := range []struct {
		name    string
		send    []byte
		wantErr error // nil: any error
	}{
		{"bad magic", header(0x25609514), ErrProtocol},
		{"reply magic", header(0x67446698), ErrProtocol},
		{"zeroes", make([]byte, 64), ErrProtocol},
		{"truncated header", header(0x25609513)[:20], io.ErrUnexpectedEOF},
		{"truncated payload", encodeRequest(1, request{Type: cmdWrite, Length: 100, Payload: make([]byte, 50)}), io.ErrUnexpectedEOF},
		{"truncated oversized payload", encodeRequest(1, request{Type: cmdWrite, Length: math.MaxUint32, Payload: make([]byte, 50)}), io.EOF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newTestBackend(1 << 20)
			c, done := connect(t, mustExport(t, b, ExportOptions{}))
			b.takeCalls()
			c.write(tc.send)
			c.conn.(interface{ CloseWrite() error }).CloseWrite()
			err := waitDone(t, done)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("ServeConn: %v, want %v", err, tc.wantErr)
			}
			c.expectClosed()
			if calls := b.takeCalls(); !slices.Equal(calls, []string{"flush"}) {
				t.Fatalf("backend calls %q, want a final flush", calls)
			}
		})
	}
}

func TestClientHangsUpWithoutDisc(t *testing.T) {
	b := newTestBackend(1 << 20)
	c, done := connect(t, mustExport(t, b, ExportOptions{}))
	c.writeAt([]byte{1}, 0)
	b.takeCalls()
	c.conn.Close()
	if err := waitDone(t, done); err != nil {
		t.Fatalf("ServeConn: %v", err)
	}
	if calls := b.takeCalls(); !slices.Equal(calls, []string{"flush"}) {
		t.Fatalf("backend calls %q, want a final flush", calls)
	}
}

func TestClientVanishesWithRequestsInFlight(t *testing.T) {
	b := newTestBackend(1 << 20)
	c, done := connect(t, mustExport(t, b, ExportOptions{}))
	gate := make(chan struct{})
	b.set(func(b *testBackend) { b.readHook = func(int64) error { <-gate; return nil } })
	for range 8 {
		c.send(request{Type: cmdRead, Length: 64 << 10})
	}
	time.Sleep(10 * time.Millisecond)
	c.conn.Close()
	close(gate)
	waitDone(t, done) // any result, but it must return
}

func TestContextCancelEndsGracefully(t *testing.T) {
	b := newTestBackend(1 << 20)
	ctx, cancel := context.WithCancel(context.Background())
	c, done := serve(t, ctx, mustExport(t, b, ExportOptions{}), true)
	c.greet(clientFixedNewstyle)
	c.optInfo(optGo, "")
	c.startReplies()
	gate := make(chan struct{})
	b.set(func(b *testBackend) { b.readHook = func(int64) error { <-gate; return nil } })
	b.MemBackend.WriteAt([]byte("abc"), 0)
	r := c.send(request{Type: cmdRead, Length: 3})
	time.Sleep(10 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		t.Fatalf("ServeConn returned (%v) with a read in flight", err)
	case <-time.After(20 * time.Millisecond):
	}
	close(gate)
	if rep, err := c.wait(r); err != nil || string(rep.Data) != "abc" {
		t.Fatalf("in-flight read across cancel: %q %v", rep.Data, err)
	}
	if err := waitDone(t, done); err != nil {
		t.Fatalf("ServeConn after cancel: %v", err)
	}
	c.expectClosed()
}

func TestContextCancelDuringHandshake(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	c, done := serve(t, ctx, mustExport(t, NewMemBackend(4096), ExportOptions{}), true)
	c.greet(clientFixedNewstyle)
	cancel()
	if err := waitDone(t, done); err != nil {
		t.Fatalf("ServeConn: %v", err)
	}
}

func TestServeTransmission(t *testing.T) {
	b := newTestBackend(1 << 20)
	c, done := serve(t, context.Background(), mustExport(t, b, ExportOptions{}), false)
	c.startReplies() // no greeting: requests straight away, as the kernel does
	c.writeAt([]byte("kernel"), 512)
	mustEqual(t, "read", c.readAt(512, 6), []byte("kernel"))
	c.disconnect()
	if err := waitDone(t, done); err != nil {
		t.Fatalf("ServeTransmission: %v", err)
	}
	c.expectClosed()
}

// TestPipelinedReadsShareReplyWrites: reads the backend serves at once
// (TryReader) are answered by the reader goroutine, and while more requests
// are buffered their replies are held and written together: 64 reads sent
// in one write get their right data in a few socket writes, not 64.
func TestPipelinedReadsShareReplyWrites(t *testing.T) {
	b := newTestBackend(1 << 20)
	for i := range 64 {
		b.MemBackend.WriteAt(bytes.Repeat([]byte{byte(i)}, 4096), int64(i)*4096)
	}
	e := mustExport(t, b, ExportOptions{})
	c, _ := connect(t, e)
	before := e.replyWrites.Load()
	var reqs []request
	for i := range 64 {
		reqs = append(reqs, request{Type: cmdRead, Offset: uint64(i) * 4096, Length: 4096})
	}
	for i, ch := range c.sendAll(reqs) {
		rep, err := c.wait(ch)
		if err != nil || rep.Err != errnoOK || !bytes.Equal(rep.Data, bytes.Repeat([]byte{byte(i)}, 4096)) {
			t.Fatalf("read %d: %v %v %x...", i, err, rep.Err, rep.Data[:min(4, len(rep.Data))])
		}
	}
	if n := e.replyWrites.Load() - before; n > 64/maxHeldReplies+2 {
		t.Errorf("64 pipelined reads answered in %d socket writes, want at most %d", n, 64/maxHeldReplies+2)
	} else {
		t.Logf("64 pipelined reads answered in %d socket writes", n)
	}
}
