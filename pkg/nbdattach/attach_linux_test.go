//go:build linux

package nbdattach

import (
	"bytes"
	"context"
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func attachCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func newMemExport(t *testing.T, size int64) (*Export, *MemBackend) {
	t.Helper()
	b := NewMemBackend(size)
	e, err := NewExport(b, ExportOptions{Name: "attach-test"})
	if err != nil {
		t.Fatal(err)
	}
	return e, b
}

// overrideServer changes what a Server reports.
type overrideServer struct {
	Server
	flags TransmissionFlags
	size  int64
}

func (s overrideServer) Flags() TransmissionFlags { return s.flags }
func (s overrideServer) Size() int64              { return s.size }

func mustOK(t *testing.T, r fakeReply) fakeReply {
	t.Helper()
	if r.err != nil || r.errno != errnoOK {
		t.Fatalf("request failed: %v, errno %d", r.err, r.errno)
	}
	return r
}

func TestAttachServesEverySocket(t *testing.T) {
	k := newFakeKernel(t, InterfaceNetlink, 4)
	a := k.attacher()
	e, b := newMemExport(t, 1<<20)
	opts := AttachOptions{Index: AnyIndex, Connections: 3, Timeout: 1500 * time.Millisecond,
		DeadConnTimeout: 10 * time.Second, Identifier: "pvc-1"}
	d, err := a.Attach(attachCtx(t), e, opts)
	if err != nil {
		t.Fatal(err)
	}
	if d.Index != 0 || d.Path != "/dev/nbd0" || d.Connections() != 3 {
		t.Fatalf("attached %+v with %d connections", d, d.Connections())
	}
	cfg := k.device(0).cfg
	want := deviceConfig{Index: AnyIndex, Size: 1 << 20, BlockSize: 4096, Timeout: opts.Timeout,
		DeadConnTimeout: opts.DeadConnTimeout, ServerFlags: e.Flags(), Identifier: "pvc-1"}
	if cfg.Index != want.Index || cfg.Size != want.Size || cfg.BlockSize != want.BlockSize ||
		cfg.Timeout != want.Timeout || cfg.DeadConnTimeout != want.DeadConnTimeout ||
		cfg.ServerFlags != want.ServerFlags || cfg.Identifier != want.Identifier {
		t.Errorf("kernel told %+v, want %+v", *cfg, want)
	}

	data := bytes.Repeat([]byte{0xa5}, 8192)
	mustOK(t, k.sock(0, 0).do(cmdWrite, 4096, uint32(len(data)), data))
	mustOK(t, k.sock(0, 1).do(cmdFlush, 0, 0, nil))
	if got := mustOK(t, k.sock(0, 2).do(cmdRead, 4096, 8192, nil)).data; !bytes.Equal(got, data) {
		t.Errorf("read on another queue differs from the write")
	}
	if b.Flushes() == 0 {
		t.Errorf("FLUSH did not reach the backend")
	}
	if free, err := a.FreeDevices(attachCtx(t)); err != nil || free != 3 {
		t.Errorf("FreeDevices = %d, %v; want 3", free, err)
	}

	if err := d.Detach(attachCtx(t)); err != nil {
		t.Fatal(err)
	}
	if err := d.Detach(attachCtx(t)); err != nil {
		t.Errorf("second Detach: %v", err)
	}
	if got, want := k.callLog(), []string{"connect -1", "flush 0", "disconnect 0"}; !slices.Equal(got, want) {
		t.Errorf("calls %q, want %q", got, want)
	}
	if free, _ := a.FreeDevices(attachCtx(t)); free != 4 {
		t.Errorf("FreeDevices = %d after Detach, want 4", free)
	}
	if err := d.Resize(attachCtx(t), 1<<21); !errors.Is(err, ErrNotConnected) {
		t.Errorf("Resize after Detach = %v, want ErrNotConnected", err)
	}
}

func TestAttachRejectsBadOptions(t *testing.T) {
	e, _ := newMemExport(t, 1<<20)
	single := overrideServer{Server: e, flags: FlagHasFlags | FlagSendFlush, size: 1 << 20}
	odd := overrideServer{Server: e, flags: e.Flags(), size: 1<<20 + 512}
	tests := []struct {
		name string
		srv  Server
		opts AttachOptions
	}{
		{"index", e, AttachOptions{Index: -2}},
		{"too many connections", e, AttachOptions{Connections: maxConnections + 1}},
		{"negative connections", e, AttachOptions{Connections: -1}},
		{"block size not a power of two", e, AttachOptions{BlockSize: 1000}},
		{"block size above a page", e, AttachOptions{BlockSize: 8192}},
		{"block size below a sector", e, AttachOptions{BlockSize: 256}},
		{"negative timeout", e, AttachOptions{Timeout: -time.Second}},
		{"negative dead timeout", e, AttachOptions{DeadConnTimeout: -time.Second}},
		{"negative io timeout", e, AttachOptions{IOTimeout: -time.Second}},
		{"io timeout below a second", e, AttachOptions{Connections: 1, IOTimeout: 999 * time.Millisecond}},
		{"io timeout not in milliseconds", e, AttachOptions{Connections: 1, IOTimeout: 5*time.Second + time.Microsecond}},
		{"io timeout with several connections", e, AttachOptions{Connections: 2, IOTimeout: 5 * time.Second}},
		{"io timeout with a command timeout", e, AttachOptions{Connections: 1, Timeout: time.Minute, IOTimeout: 5 * time.Second}},
		{"long identifier", e, AttachOptions{Identifier: strings.Repeat("x", 256)}},
		{"multi-conn unsupported", single, AttachOptions{Connections: 2}},
		{"size not a block multiple", odd, AttachOptions{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			k := newFakeKernel(t, InterfaceNetlink, 1)
			_, err := k.attacher().Attach(attachCtx(t), tc.srv, tc.opts)
			if !errors.Is(err, ErrInvalidAttachOptions) {
				t.Errorf("Attach = %v, want ErrInvalidAttachOptions", err)
			}
			if calls := k.callLog(); len(calls) != 0 {
				t.Errorf("kernel was called: %q", calls)
			}
		})
	}
}

func TestAttachDefaults(t *testing.T) {
	k := newFakeKernel(t, InterfaceNetlink, 1)
	e, _ := newMemExport(t, 1<<20)
	single := overrideServer{Server: e, flags: FlagHasFlags | FlagSendFlush, size: 1 << 20}
	d, err := k.attacher().Attach(attachCtx(t), single, AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if d.Connections() != 1 || k.device(0).cfg.BlockSize != DefaultBlockSize {
		t.Errorf("defaults: %d connections, block size %d", d.Connections(), k.device(0).cfg.BlockSize)
	}
	if err := d.Detach(attachCtx(t)); err != nil {
		t.Fatal(err)
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

func TestAttachConnectFailsCleanly(t *testing.T) {
	k := newFakeKernel(t, InterfaceNetlink, 1)
	k.connectErr = kernelError("connect", 0, unix.EBUSY)
	e, _ := newMemExport(t, 1<<20)
	before := openFDs(t)
	_, err := k.attacher().Attach(attachCtx(t), e, AttachOptions{Index: 0, Connections: 4})
	if !errors.Is(err, ErrDeviceBusy) || !errors.Is(err, unix.EBUSY) {
		t.Errorf("Attach = %v, want ErrDeviceBusy and EBUSY", err)
	}
	if after := openFDs(t); after != before {
		t.Errorf("%d descriptors open before, %d after", before, after)
	}
}

func TestDetachKeepsDeviceWhenFlushFails(t *testing.T) {
	k := newFakeKernel(t, InterfaceNetlink, 1)
	e, _ := newMemExport(t, 1<<20)
	d, err := k.attacher().Attach(attachCtx(t), e, AttachOptions{Connections: 2})
	if err != nil {
		t.Fatal(err)
	}
	k.mu.Lock()
	k.flushErr = unix.EIO
	k.mu.Unlock()
	if err := d.Detach(attachCtx(t)); !errors.Is(err, unix.EIO) {
		t.Errorf("Detach = %v, want EIO", err)
	}
	if slices.Contains(k.callLog(), "disconnect 0") {
		t.Errorf("disconnected although the flush failed")
	}
	mustOK(t, k.sock(0, 1).do(cmdRead, 0, 512, nil))
	k.mu.Lock()
	k.flushErr = nil
	k.mu.Unlock()
	if err := d.Detach(attachCtx(t)); err != nil {
		t.Errorf("Detach after the flush recovered: %v", err)
	}
}

func TestDetachWaitsForTheDeviceToBeFree(t *testing.T) {
	k := newFakeKernel(t, InterfaceNetlink, 1)
	k.staysOpen = true // mounted, say
	e, _ := newMemExport(t, 1<<20)
	d, err := k.attacher().Attach(attachCtx(t), e, AttachOptions{Connections: 1})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := d.Detach(ctx); !errors.Is(err, ErrDeviceBusy) {
		t.Errorf("Detach of a device held open = %v, want ErrDeviceBusy", err)
	}
}

func TestResize(t *testing.T) {
	k := newFakeKernel(t, InterfaceNetlink, 2)
	e, _ := newMemExport(t, 4<<20)
	srv := overrideServer{Server: e, flags: e.Flags(), size: 1 << 20}
	d, err := k.attacher().Attach(attachCtx(t), srv, AttachOptions{Index: 1, Connections: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Detach(attachCtx(t))
	if err := d.Resize(attachCtx(t), 4<<20); err != nil {
		t.Fatal(err)
	}
	if got, err := sysfsSize(k.sys(), 1); err != nil || got != 4<<20 {
		t.Errorf("size %d (%v) after Resize, want %d", got, err, 4<<20)
	}
	if err := d.Resize(attachCtx(t), 4<<20+512); !errors.Is(err, ErrInvalidAttachOptions) {
		t.Errorf("Resize to a partial block = %v", err)
	}
	k.mu.Lock()
	k.resizeNoop = true
	k.mu.Unlock()
	if err := d.Resize(attachCtx(t), 2<<20); !errors.Is(err, ErrNotSupported) {
		t.Errorf("Resize the kernel ignored = %v, want ErrNotSupported", err)
	}
}

func TestReconfigureHandsOverNewSockets(t *testing.T) {
	k := newFakeKernel(t, InterfaceNetlink, 1)
	e, _ := newMemExport(t, 1<<20)
	d, err := k.attacher().Attach(attachCtx(t), e, AttachOptions{Connections: 2, DeadConnTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Detach(attachCtx(t))
	mustOK(t, k.sock(0, 0).do(cmdWrite, 0, 4, []byte("old!")))
	for round := range 2 {
		oldSocks := slices.Clone(k.device(0).socks)
		if err := d.Reconfigure(attachCtx(t)); err != nil {
			t.Fatalf("Reconfigure %d: %v", round, err)
		}
		if d.Connections() != 2 {
			t.Errorf("%d connections after Reconfigure", d.Connections())
		}
		for i, s := range k.device(0).socks {
			if s == oldSocks[i] || !oldSocks[i].isDead() {
				t.Errorf("queue %d was not replaced", i)
			}
			if got := mustOK(t, s.do(cmdRead, 0, 4, nil)).data; string(got) != "old!" {
				t.Errorf("queue %d reads %q", i, got)
			}
		}
	}
}

func TestReconfigureNeedsNetlink(t *testing.T) {
	k := newFakeKernel(t, InterfaceIoctl, 1)
	e, _ := newMemExport(t, 1<<20)
	a := k.attacher()
	d, err := a.Attach(attachCtx(t), e, AttachOptions{Connections: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Detach(attachCtx(t))
	if err := d.Reconfigure(attachCtx(t)); !errors.Is(err, ErrNotSupported) {
		t.Errorf("Reconfigure = %v, want ErrNotSupported", err)
	}
	if _, err := a.Reconnect(attachCtx(t), 0, e, AttachOptions{}); !errors.Is(err, ErrNotSupported) {
		t.Errorf("Reconnect = %v, want ErrNotSupported", err)
	}
}

// TestReconnectAfterRestart: a server goes away without detaching; a new
// Attacher finds the device by identifier and takes it over.
func TestReconnectAfterRestart(t *testing.T) {
	k := newFakeKernel(t, InterfaceNetlink, 3)
	e, _ := newMemExport(t, 1<<20)
	opts := AttachOptions{Index: 2, Connections: 2, Identifier: "pvc-restart"}
	old, err := k.attacher().Attach(attachCtx(t), e, opts)
	if err != nil {
		t.Fatal(err)
	}
	mustOK(t, k.sock(2, 1).do(cmdWrite, 512, 5, []byte("kept!")))
	old.mu.Lock()
	old.stopQueues() // the process dies
	old.mu.Unlock()
	for _, s := range k.device(2).socks {
		<-s.dead
	}

	a := k.attacher()
	if _, err := a.Reconnect(attachCtx(t), 0, e, opts); !errors.Is(err, ErrNotConnected) {
		t.Errorf("Reconnect of a free device = %v, want ErrNotConnected", err)
	}
	index, err := a.FindByIdentifier(attachCtx(t), "pvc-restart")
	if err != nil || index != 2 {
		t.Fatalf("FindByIdentifier = %d, %v", index, err)
	}
	if _, err := a.FindByIdentifier(attachCtx(t), "pvc-other"); !errors.Is(err, ErrNotFound) {
		t.Errorf("FindByIdentifier of an unknown id = %v", err)
	}
	wrong := opts
	wrong.Identifier = "pvc-other"
	if _, err := a.Reconnect(attachCtx(t), index, e, wrong); !errors.Is(err, ErrKernel) {
		t.Errorf("Reconnect with another identifier = %v, want ErrKernel", err)
	}
	d, err := a.Reconnect(attachCtx(t), index, e, opts)
	if err != nil {
		t.Fatal(err)
	}
	if d.Connections() != 2 || d.Path != "/dev/nbd2" {
		t.Errorf("reconnected %s with %d connections", d.Path, d.Connections())
	}
	if got := mustOK(t, k.sock(2, 0).do(cmdRead, 512, 5, nil)).data; string(got) != "kept!" {
		t.Errorf("read %q after Reconnect", got)
	}
	if err := d.Detach(attachCtx(t)); err != nil {
		t.Fatal(err)
	}
}

func TestReconnectToALiveDeviceIsRejected(t *testing.T) {
	k := newFakeKernel(t, InterfaceNetlink, 1)
	e, _ := newMemExport(t, 1<<20)
	d, err := k.attacher().Attach(attachCtx(t), e, AttachOptions{Connections: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Detach(attachCtx(t))
	before := openFDs(t)
	if _, err := k.attacher().Reconnect(attachCtx(t), 0, e, AttachOptions{Connections: 1}); !errors.Is(err, ErrSocketsRejected) {
		t.Errorf("Reconnect with no dead connection = %v, want ErrSocketsRejected", err)
	}
	if after := openFDs(t); after != before {
		t.Errorf("%d descriptors open before, %d after", before, after)
	}
	mustOK(t, k.sock(0, 0).do(cmdRead, 0, 512, nil))
}

// TestIOTimeout: Attach sets the request timer after connecting and Detach
// puts back the one it found before disconnecting; Connections 0 means one
// connection then.
func TestIOTimeout(t *testing.T) {
	k := newFakeKernel(t, InterfaceNetlink, 1)
	k.devices[0].ioTimeout = 20 * time.Second // someone's own setting
	e, _ := newMemExport(t, 1<<20)
	d, err := k.attacher().Attach(attachCtx(t), e, AttachOptions{IOTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if d.Connections() != 1 || k.device(0).ioTimeout != 5*time.Second {
		t.Errorf("attached with %d connections, timer %v; want 1 and 5s", d.Connections(), k.device(0).ioTimeout)
	}
	if err := d.Detach(attachCtx(t)); err != nil {
		t.Fatal(err)
	}
	want := []string{"connect 0", "io_timeout 0 5s", "flush 0", "io_timeout 0 20s", "disconnect 0"}
	if got := k.callLog(); !slices.Equal(got, want) {
		t.Errorf("calls %q, want %q", got, want)
	}
}

func TestIOTimeoutFailureDetaches(t *testing.T) {
	k := newFakeKernel(t, InterfaceNetlink, 1)
	k.ioTimeoutErr = os.ErrPermission
	e, _ := newMemExport(t, 1<<20)
	before := openFDs(t)
	if _, err := k.attacher().Attach(attachCtx(t), e, AttachOptions{IOTimeout: 5 * time.Second}); !errors.Is(err, os.ErrPermission) {
		t.Errorf("Attach = %v, want the sysfs error", err)
	}
	if k.device(0).cfg != nil {
		t.Errorf("the device stayed connected")
	}
	if after := openFDs(t); after != before {
		t.Errorf("%d descriptors open before, %d after", before, after)
	}
}

// TestIOTimeoutReconnect: Reconnect sets the timer once the kernel has
// taken its sockets, and Detach then puts back the kernel's default.
func TestIOTimeoutReconnect(t *testing.T) {
	k := newFakeKernel(t, InterfaceNetlink, 1)
	e, _ := newMemExport(t, 1<<20)
	opts := AttachOptions{IOTimeout: 5 * time.Second, Identifier: "pvc-timer"}
	old, err := k.attacher().Attach(attachCtx(t), e, opts)
	if err != nil {
		t.Fatal(err)
	}
	old.mu.Lock()
	old.stopQueues() // the process dies
	old.mu.Unlock()
	<-k.device(0).socks[0].dead

	k.ioTimeoutErr = os.ErrPermission
	if _, err := k.attacher().Reconnect(attachCtx(t), 0, e, opts); !errors.Is(err, os.ErrPermission) {
		t.Fatalf("Reconnect = %v, want the sysfs error", err)
	}
	<-k.device(0).socks[0].dead // given back: the device waits for a server again
	k.ioTimeoutErr = nil
	d, err := k.attacher().Reconnect(attachCtx(t), 0, e, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Detach(attachCtx(t)); err != nil {
		t.Fatal(err)
	}
	want := []string{"connect 0", "io_timeout 0 5s", "reconfigure 0", "io_timeout 0 5s",
		"reconfigure 0", "io_timeout 0 5s", "flush 0", "io_timeout 0 30s", "disconnect 0"}
	if got := k.callLog(); !slices.Equal(got, want) {
		t.Errorf("calls %q, want %q", got, want)
	}
}
