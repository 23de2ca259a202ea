//go:build linux

package nbdattach

import (
	"errors"
	"slices"
	"testing"
	"time"
)

// TestReleaseDeadDevice: a device whose server died (the process that
// attached it was killed) is described by Connection and disconnected by
// Release without a flush; a mounted one is refused and left connected.
func TestReleaseDeadDevice(t *testing.T) {
	k := newFakeKernel(t, InterfaceNetlink, 2)
	e, _ := newMemExport(t, 1<<20)
	old, err := k.attacher().Attach(attachCtx(t), e, AttachOptions{Index: 1, Connections: 1, Identifier: "/img/a.qcow2", DeadConnTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	old.mu.Lock()
	old.stopQueues() // the process dies
	old.mu.Unlock()
	<-k.device(1).socks[0].dead

	a := k.attacher()
	c, err := a.Connection(1)
	if err != nil || c != (Connection{Index: 1, PID: 42, Backend: "/img/a.qcow2"}) {
		t.Errorf("Connection(1) = %+v, %v", c, err)
	}
	if _, err := a.Connection(0); !errors.Is(err, ErrNotConnected) {
		t.Errorf("Connection of a free device = %v, want ErrNotConnected", err)
	}
	if _, err := a.Connection(5); !errors.Is(err, ErrNotFound) {
		t.Errorf("Connection of a missing device = %v, want ErrNotFound", err)
	}
	if err := a.Release(attachCtx(t), 0); !errors.Is(err, ErrNotConnected) {
		t.Errorf("Release of a free device = %v, want ErrNotConnected", err)
	}

	k.claimErr = ErrDeviceBusy
	if err := a.Release(attachCtx(t), 1); !errors.Is(err, ErrDeviceBusy) {
		t.Errorf("Release of a mounted device = %v, want ErrDeviceBusy", err)
	}
	if k.device(1).cfg == nil {
		t.Fatal("a mounted device was disconnected")
	}
	if d := k.device(1).cfg.DeadConnTimeout; d != 0 {
		t.Errorf("dead-connection timeout %v after Release, want 0: the partition scan of the O_EXCL open would wait it out", d)
	}
	k.claimErr = nil
	before := len(k.callLog())
	if err := a.Release(attachCtx(t), 1); err != nil {
		t.Fatal(err)
	}
	if got, want := k.callLog()[before:], []string{"reconfigure 1", "claim 1", "disconnect 1"}; !slices.Equal(got, want) {
		t.Errorf("Release called %q, want %q (no flush)", got, want)
	}
	if _, err := a.Connection(1); !errors.Is(err, ErrNotConnected) {
		t.Errorf("after Release: %v, want ErrNotConnected", err)
	}
}
