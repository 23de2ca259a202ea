package imagecli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/csi-qcow2/csi-qcow2/pkg/nbdattach"
)

// fakeAttacher plays the kernel for map: it serves the export on one end of
// an in-memory pipe and keeps the other, as the kernel keeps its socket.
type fakeAttacher struct {
	attachErr error
	busy      int   // detach answers ErrDeviceBusy this many times (mounted)
	detachErr error // then this

	mu     sync.Mutex
	opts   nbdattach.AttachOptions
	flags  nbdattach.TransmissionFlags
	dev    *fakeDevice
	called chan struct{}
}

func newFakeAttacher() *fakeAttacher { return &fakeAttacher{called: make(chan struct{})} }

func (f *fakeAttacher) attach(_ context.Context, srv nbdattach.Server, opts nbdattach.AttachOptions) (attachedDevice, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	defer close(f.called)
	f.opts, f.flags = opts, srv.Flags()
	if f.attachErr != nil {
		return nil, f.attachErr
	}
	kernel, server := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	d := &fakeDevice{f: f, kernel: kernel, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(d.done)
		srv.ServeTransmission(ctx, server)
	}()
	f.dev = d
	return d, nil
}

func (f *fakeAttacher) device(t *testing.T) *fakeDevice {
	t.Helper()
	<-f.called
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.dev
}

type fakeDevice struct {
	f       *fakeAttacher
	kernel  net.Conn
	cancel  context.CancelFunc
	done    chan struct{}
	detachs int
}

func (d *fakeDevice) path() string { return "/dev/nbd7" }

func (d *fakeDevice) detach(context.Context) error {
	d.f.mu.Lock()
	defer d.f.mu.Unlock()
	d.detachs++
	if d.f.busy > 0 {
		d.f.busy--
		return fmt.Errorf("/dev/nbd7 is mounted: %w", nbdattach.ErrDeviceBusy)
	}
	if d.f.detachErr != nil {
		return d.f.detachErr
	}
	d.disconnect()
	return nil
}

// disconnect drops the kernel's end, as a detach by anyone does.
func (d *fakeDevice) disconnect() {
	d.kernel.Close()
	<-d.done
}

// startMap runs `image map ARGS...` against f.
func startMap(t *testing.T, f *fakeAttacher, args ...string) *running {
	t.Helper()
	sp := mapSpec()
	sp.new = func() subcommand {
		return &mapCmd{newAttacher: func() (attacher, error) { return f, nil }}
	}
	return startWith(t, func(ctx context.Context, stdout, stderr io.Writer) int {
		return sp.execute(ctx, streams{stdout: stdout, stderr: stderr}, args)
	}, args)
}

func TestMapDetachesOnSignal(t *testing.T) {
	img := lazyImage(t, 1<<20)
	f := newFakeAttacher()
	r := startMap(t, f, "--device", "/dev/nbd3", "-c", "2", img)
	if r.line != "/dev/nbd7" {
		t.Errorf("printed %q, want the device path", r.line)
	}
	want := nbdattach.AttachOptions{Index: 3, Connections: 2, Identifier: absPath(img)}
	if got := f.opts; got.Index != want.Index || got.Connections != want.Connections ||
		got.Identifier != want.Identifier || got.Timeout != 0 || got.DeadConnTimeout != 0 || got.OnConnError == nil {
		t.Errorf("attach options %+v, want %+v with an OnConnError", got, want)
	}
	if f.flags&nbdattach.FlagReadOnly != 0 || f.flags&nbdattach.FlagSendFlush == 0 {
		t.Errorf("export flags %v", f.flags)
	}
	if !dirtyBit(t, img) {
		t.Error("image not open for writing while mapped")
	}
	res := r.stop(t)
	res.expect(t, 0, "/dev/nbd7\n", "")
	if d := f.device(t); d.detachs != 1 {
		t.Errorf("%d detaches, want 1", d.detachs)
	}
	if dirtyBit(t, img) {
		t.Error("dirty bit set after map exited: image not closed cleanly")
	}
}

func TestMapReadOnly(t *testing.T) {
	img := lazyImage(t, 1<<20)
	f := newFakeAttacher()
	r := startMap(t, f, "-r", img)
	if f.opts.Index != nbdattach.AnyIndex || f.flags&nbdattach.FlagReadOnly == 0 || dirtyBit(t, img) {
		t.Errorf("index %d, flags %v, dirty %v: want any device, read-only, image untouched", f.opts.Index, f.flags, dirtyBit(t, img))
	}
	r.stop(t).expect(t, 0, "", "")
}

// TestMapWaitsForUnmount: a signal while the device is mounted does not
// pull it from under the filesystem; map detaches once it is released.
func TestMapWaitsForUnmount(t *testing.T) {
	img := lazyImage(t, 1<<20)
	f := newFakeAttacher()
	f.busy = 2
	r := startMap(t, f, img)
	res := r.stop(t)
	res.expect(t, 0, "/dev/nbd7", "still serving /dev/nbd7, it is detached once unmounted")
	if d := f.device(t); d.detachs != 3 {
		t.Errorf("%d detaches, want 3", d.detachs)
	}
	if dirtyBit(t, img) {
		t.Error("dirty bit set after map exited")
	}
}

// TestMapExternalDisconnect: a device disconnected by someone else ends
// map without a signal, with the image closed cleanly.
func TestMapExternalDisconnect(t *testing.T) {
	img := lazyImage(t, 1<<20)
	f := newFakeAttacher()
	r := startMap(t, f, img)
	f.device(t).disconnect()
	select {
	case code := <-r.done:
		r.done <- code
		if code != 0 || dirtyBit(t, img) {
			t.Fatalf("exit %d, dirty %v; stderr:\n%s", code, dirtyBit(t, img), r.stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("map still running 20 s after its device was disconnected")
	}
	r.stop(t).expect(t, 0, "", "/dev/nbd7 was disconnected")
}

func TestMapErrors(t *testing.T) {
	t.Run("attach", func(t *testing.T) {
		img := lazyImage(t, 1<<20)
		f := newFakeAttacher()
		f.attachErr = fmt.Errorf("opening /dev/nbd0: %w", fs.ErrNotExist)
		sp := mapSpec()
		sp.new = func() subcommand { return &mapCmd{newAttacher: func() (attacher, error) { return f, nil }} }
		out, errb := newLineBuffer(), newLineBuffer()
		if code := sp.execute(context.Background(), streams{out, errb}, []string{img}); code != 1 {
			t.Fatalf("exit %d", code)
		}
		if !strings.Contains(errb.String(), "is the nbd module loaded?") || out.String() != "" {
			t.Errorf("stdout %q stderr %q", out.String(), errb.String())
		}
		if dirtyBit(t, img) {
			t.Error("image left open after a failed attach")
		}
	})
	t.Run("detach", func(t *testing.T) {
		img := lazyImage(t, 1<<20)
		f := newFakeAttacher()
		f.detachErr = errors.New("fsync /dev/nbd7: input/output error")
		r := startMap(t, f, img)
		r.stop(t).expect(t, 1, "", "input/output error")
		if dirtyBit(t, img) {
			t.Error("image left open after a failed detach")
		}
	})
}
