package nbdattach

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// serveUnix serves e on a unix socket in a temporary directory and returns
// its path, a stop function and the channel Serve's result arrives on.
func serveUnix(t testing.TB, e *Export) (path string, stop context.CancelFunc, done <-chan error) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan error, 1)
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		ch <- e.Serve(ctx, l)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-finished:
		case <-time.After(testTimeout):
			t.Error("Serve did not return")
		}
	})
	return path, cancel, ch
}

func dialGo(t testing.TB, path string) *testClient {
	t.Helper()
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := newTestClient(t, conn)
	c.greet(clientFixedNewstyle | clientNoZeroes)
	if reps := c.optInfo(optGo, ""); reps[len(reps)-1].Type != repAck {
		t.Fatalf("GO: %+v", reps)
	}
	c.startReplies()
	return c
}

func TestServeMultiConnIsConsistent(t *testing.T) {
	b := newTestBackend(1 << 20)
	var mu sync.Mutex
	var connErrs []error
	e := mustExport(t, b, ExportOptions{OnConnError: func(err error) {
		mu.Lock()
		defer mu.Unlock()
		connErrs = append(connErrs, err)
	}})
	path, stop, done := serveUnix(t, e)
	c1, c2, c3 := dialGo(t, path), dialGo(t, path), dialGo(t, path)

	c1.writeAt([]byte("written on one"), 4096)
	mustEqual(t, "read on another connection", c2.readAt(4096, 14), []byte("written on one"))

	b.takeCalls()
	c3.mustDo(request{Type: cmdFlush})
	if calls := b.takeCalls(); len(calls) != 1 || calls[0] != "flush" {
		t.Fatalf("FLUSH on a third connection: backend calls %q", calls)
	}

	// One client leaves cleanly; the others stay until Serve stops.
	c1.disconnect()
	c1.expectClosed()
	c2.mustDo(request{Type: cmdRead, Length: 1})

	flushes := b.Flushes()
	stop()
	if err := waitDone(t, done); err != nil {
		t.Fatalf("Serve: %v", err)
	}
	c2.expectClosed()
	c3.expectClosed()
	// Every connection flushes as it ends, and Serve once more at the end.
	if got := b.Flushes() - flushes; got < 3 {
		t.Fatalf("%d flushes while stopping, want at least 3", got)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(connErrs) != 0 {
		t.Fatalf("OnConnError called for clean connections: %v", connErrs)
	}
}

func TestServeReportsConnErrors(t *testing.T) {
	errs := make(chan error, 1)
	e := mustExport(t, NewMemBackend(4096), ExportOptions{OnConnError: func(err error) { errs <- err }})
	path, _, _ := serveUnix(t, e)
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := newTestClient(t, conn)
	c.greet(clientFixedNewstyle)
	c.write([]byte("IHAVEOPX........"))
	select {
	case err := <-errs:
		if !errors.Is(err, ErrProtocol) {
			t.Fatalf("OnConnError(%v), want ErrProtocol", err)
		}
	case <-time.After(testTimeout):
		t.Fatal("OnConnError not called")
	}
}

func TestServeFailsWhenListenerCloses(t *testing.T) {
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	b := NewMemBackend(4096)
	e := mustExport(t, b, ExportOptions{})
	done := make(chan error, 1)
	go func() { done <- e.Serve(context.Background(), l) }()
	time.Sleep(10 * time.Millisecond)
	l.Close()
	if err := waitDone(t, done); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Serve: %v, want net.ErrClosed", err)
	}
	if b.Flushes() != 1 {
		t.Fatalf("%d flushes, want 1", b.Flushes())
	}
}
