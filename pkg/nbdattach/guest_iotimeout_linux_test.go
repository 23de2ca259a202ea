//go:build linux

package nbdattach

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Guest tests of AttachOptions.IOTimeout (part of TestGuest): one
// connection, Timeout 0, a one-second request timer.

// holdBackend is a MemBackend whose READ at one offset is held, once, until
// released.
type holdBackend struct {
	*MemBackend
	mu      sync.Mutex
	off     int64 // -1: hold nothing
	held    chan struct{}
	release chan struct{}
}

func newHoldBackend(size int64) *holdBackend {
	return &holdBackend{MemBackend: NewMemBackend(size), off: -1}
}

// hold arms the backend: the next READ at off waits for the returned
// function to be called.
func (b *holdBackend) hold(off int64) (held <-chan struct{}, release func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.off, b.held, b.release = off, make(chan struct{}), make(chan struct{})
	return b.held, sync.OnceFunc(func() { close(b.release) })
}

func (b *holdBackend) ReadAt(p []byte, off int64) (int, error) {
	b.mu.Lock()
	hold := off == b.off
	if hold {
		b.off = -1
		close(b.held)
	}
	release := b.release
	b.mu.Unlock()
	if hold {
		<-release
	}
	return b.MemBackend.ReadAt(p, off)
}

func guestIOTimeout(t *testing.T, a *Attacher, index int) time.Duration {
	t.Helper()
	d, err := sysfsIOTimeout(a.dev.sys(), index)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// guestKernelLog returns the kernel log lines about /dev/nbd<index> from
// line from on, and the number of lines.
func guestKernelLog(t *testing.T, index int, from int) ([]string, int) {
	t.Helper()
	out, err := exec.Command("dmesg").Output()
	if err != nil {
		t.Fatalf("dmesg: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	var ours []string
	for _, l := range lines[min(from, len(lines)):] {
		if strings.Contains(l, fmt.Sprintf(" nbd%d:", index)) {
			ours = append(ours, l)
		}
	}
	return ours, len(lines)
}

func guestDirectRead(path string, off int64) error {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return err
	}
	defer unix.Munmap(buf)
	_, err = f.ReadAt(buf, off)
	return err
}

// guestSlowRequest: a READ the server holds for several periods of a 1 s
// request timer only makes the kernel log "Possible stuck request" each
// period (which shows the timer is ours, not the default 30 s); it is
// neither failed nor resent, and the connection stays. Detach puts the
// timer back.
func guestSlowRequest(t *testing.T, a *Attacher) {
	b := newHoldBackend(16 * guestMiB)
	e, err := NewExport(b, ExportOptions{Name: "slow"})
	if err != nil {
		t.Fatal(err)
	}
	d, err := a.Attach(context.Background(), e, AttachOptions{Index: AnyIndex, IOTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	before := d.ioTimeoutBefore
	if got := guestIOTimeout(t, a, d.Index); got != time.Second || d.Connections() != 1 {
		t.Errorf("attached with %d connections, io_timeout %v; want 1 and 1s", d.Connections(), got)
	}
	_, logAt := guestKernelLog(t, d.Index, 0)
	held, release := b.hold(8 * guestMiB)
	done := make(chan error, 1)
	go func() { done <- guestDirectRead(d.Path, 8*guestMiB) }()
	<-held
	time.Sleep(3500 * time.Millisecond)
	release()
	if err := <-done; err != nil {
		t.Errorf("the slow READ failed: %v", err)
	}
	log, _ := guestKernelLog(t, d.Index, logAt)
	stuck := 0
	for _, l := range log {
		switch {
		case strings.Contains(l, "Possible stuck request"):
			stuck++
		case strings.Contains(l, "timed out"), strings.Contains(l, "Dead connection"),
			strings.Contains(l, "failed"), strings.Contains(l, "error"):
			t.Errorf("kernel: %s", l)
		}
	}
	if stuck == 0 {
		t.Errorf("no \"Possible stuck request\" in 3.5 s: the 1 s timer is not in force")
	}
	t.Logf("a READ held 3.5 s: %d \"Possible stuck request\" warnings, no timeout or error", stuck)
	d.mu.Lock()
	for _, q := range d.queues {
		if gone, err := q.peerGone(); err != nil || gone {
			t.Errorf("the kernel dropped the connection (%v)", err)
		}
	}
	d.mu.Unlock()
	guestDirectIO(t, d.Path, 0, 5)
	guestDetach(t, d)
	if got := guestIOTimeout(t, a, d.Index); got != before {
		t.Errorf("io_timeout %v after Detach, want %v as before Attach", got, before)
	}
}

// guestReconnectResend: a server dies holding a READ. With no server the
// kernel keeps it (the timer fires, the connection is the same); once
// Reconnect has handed over a new socket, the next expiry of the 1 s timer
// resends it there, instead of the default timer's 30 s.
func guestReconnectResend(t *testing.T, a *Attacher) {
	b := newHoldBackend(16 * guestMiB)
	e, err := NewExport(b, ExportOptions{Name: "resend"})
	if err != nil {
		t.Fatal(err)
	}
	opts := AttachOptions{Index: AnyIndex, IOTimeout: time.Second, DeadConnTimeout: time.Minute, Identifier: "pvc-guest-resend"}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	old, err := a.Attach(ctx, e, opts)
	if err != nil {
		t.Fatal(err)
	}
	held, release := b.hold(8 * guestMiB)
	done := make(chan error, 1)
	go func() { done <- guestDirectRead(old.Path, 8*guestMiB) }()
	<-held
	// The "process" dies with the READ in hand: its socket goes first,
	// then the READ returns into it.
	old.mu.Lock()
	for _, q := range old.queues {
		unix.Shutdown(q.fd, unix.SHUT_RDWR)
	}
	release()
	old.stopQueues()
	old.mu.Unlock()
	time.Sleep(2500 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("the READ ended with no server: %v", err)
	default:
	}
	start := time.Now()
	d, err := a.Reconnect(ctx, old.Index, e, opts)
	if err != nil {
		t.Fatalf("Reconnect: %v", err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("the READ held by the dead server: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("the READ held by the dead server was never resent")
	}
	// A bound far from both timers: only the kernel's 30 s would miss it.
	resent := time.Since(start)
	t.Logf("the READ the dead server held was answered %v after Reconnect", resent.Round(time.Millisecond))
	if resent > 15*time.Second {
		t.Errorf("resent %v after Reconnect: the 1 s timer is not in force", resent)
	}
	guestDirectIO(t, d.Path, 0, 6)
	guestDetach(t, d)
	if got := guestIOTimeout(t, a, d.Index); got != kernelIOTimeout {
		t.Errorf("io_timeout %v after Detach of a reconnected device, want the kernel's %v", got, kernelIOTimeout)
	}
}
