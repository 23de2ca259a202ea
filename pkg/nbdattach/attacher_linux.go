//go:build linux

package nbdattach

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"
)

// kernelControl is the kernel's nbd control plane: the generic netlink
// family or the ioctls on /dev/nbdX. It is an interface, owned here at the
// OS boundary, so that everything above it (socket plumbing, ordering,
// serving, error handling) runs in unit tests without root or an nbd
// module; the fake in attach_test.go plays the kernel over real sockets.
type kernelControl interface {
	iface() Interface
	// connect starts a device with c.SocketFDs (which the kernel keeps its
	// own references to) and returns its index.
	connect(ctx context.Context, c deviceConfig) (int, error)
	// reconfigure changes a live device: sockets replace dead ones (a
	// socket is dropped silently when none is dead), Size resizes.
	reconfigure(ctx context.Context, c deviceConfig) error
	// disconnect tells the server goodbye, drops the sockets and fails
	// whatever I/O is still queued.
	disconnect(ctx context.Context, index int) error
	// status lists devices; index >= 0 asks about that one only.
	status(ctx context.Context, index int) ([]DeviceStatus, error)
}

// blockDevices is the rest of the node the attach logic touches: the device
// nodes (to flush the page cache through the device) and /sys/block. An
// interface for the same reason as kernelControl.
type blockDevices interface {
	// flush writes back the device's dirty pages and sends a FLUSH; it
	// fails with ErrDeviceBusy if the device is mounted.
	flush(ctx context.Context, index int) error
	// sys is /sys/block.
	sys() fs.FS
	// setIOTimeout sets the device's block request timer
	// (/sys/block/nbdN/queue/io_timeout, read through sys).
	setIOTimeout(index int, d time.Duration) error
	// claim opens the device exclusively and closes it again: it fails
	// with ErrDeviceBusy if the device is mounted or held exclusively.
	claim(index int) error
}

// Attacher attaches exports to /dev/nbdX. It holds no state about devices:
// what is attached is read from the kernel each time, so a restarted
// process sees the devices its predecessor left (see Reconnect). It is safe
// for concurrent use.
type Attacher struct {
	ctl kernelControl
	dev blockDevices
}

// AttacherOptions configure NewAttacher.
type AttacherOptions struct {
	// Interface picks the kernel interface; InterfaceAuto prefers netlink.
	Interface Interface
}

// NewAttacher returns an Attacher using the netlink family "nbd" or, where
// the kernel lacks it or opts say so, the ioctls.
func NewAttacher(opts AttacherOptions) (*Attacher, error) {
	dev := hostBlockDevices{dir: "/sys/block", root: os.DirFS("/sys/block")}
	switch opts.Interface {
	case InterfaceIoctl:
		return &Attacher{ctl: newIoctlControl(dev.sys()), dev: dev}, nil
	case InterfaceNetlink, InterfaceAuto:
		nl := netlinkControl{}
		err := nl.probe()
		if err == nil {
			return &Attacher{ctl: nl, dev: dev}, nil
		}
		if opts.Interface == InterfaceNetlink {
			return nil, err
		}
		return &Attacher{ctl: newIoctlControl(dev.sys()), dev: dev}, nil
	}
	return nil, fmt.Errorf("nbdattach: interface %v: %w", opts.Interface, ErrNotSupported)
}

// Interface returns the kernel interface in use.
func (a *Attacher) Interface() Interface { return a.ctl.iface() }

// Attach serves srv to the kernel on opts.Connections new sockets and
// starts an nbd device on them, telling the kernel the export's size and
// flags. Serving starts before the kernel's first request (a partition
// scan) can arrive; it ends with Detach, or when the kernel drops the
// sockets.
func (a *Attacher) Attach(ctx context.Context, srv Server, opts AttachOptions) (*Device, error) {
	opts = opts.withDefaults(srv)
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	cfg, err := opts.deviceConfig(srv)
	if err != nil {
		return nil, err
	}
	kernel, server, err := socketPairs(opts.Connections)
	if err != nil {
		return nil, err
	}
	defer closeFDs(kernel) // the kernel holds its own references
	d := newDevice(a, srv, opts)
	if err := d.serve(server); err != nil {
		return nil, err
	}
	cfg.SocketFDs = kernel
	index, err := a.ctl.connect(ctx, cfg)
	if err != nil {
		d.stopQueues()
		return nil, err
	}
	d.setIndex(index)
	if err := d.setIOTimeout(true); err != nil {
		err = errors.Join(err, a.ctl.disconnect(ctx, index))
		d.stopQueues()
		return nil, err
	}
	return d, nil
}

// Reconnect takes over a live device left by a previous process (or by a
// server that stopped): it hands the kernel new sockets for the dead ones,
// served by srv, and returns the device. Netlink only. opts.Identifier, if
// set, must match the one the device was attached with.
func (a *Attacher) Reconnect(ctx context.Context, index int, srv Server, opts AttachOptions) (*Device, error) {
	if a.ctl.iface() != InterfaceNetlink {
		return nil, fmt.Errorf("nbdattach: reconnecting nbd%d over %v: %w", index, a.ctl.iface(), ErrNotSupported)
	}
	opts.Index = index
	opts = opts.withDefaults(srv)
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	if index < 0 {
		return nil, fmt.Errorf("nbdattach: reconnect needs an index: %w", ErrInvalidAttachOptions)
	}
	if ok, err := a.connected(ctx, index); err != nil || !ok {
		return nil, errors.Join(err, fmt.Errorf("nbdattach: reconnecting nbd%d: %w", index, ErrNotConnected))
	}
	d := newDevice(a, srv, opts)
	d.setIndex(index)
	if err := d.reconnect(ctx); err != nil {
		return nil, err
	}
	// Only now that the kernel has taken the sockets, and so the device
	// is ours. Requests already queued keep the timer they started with.
	if err := d.setIOTimeout(false); err != nil {
		d.mu.Lock()
		d.stopQueues() // the device waits for a server again, as before
		d.mu.Unlock()
		return nil, err
	}
	return d, nil
}

// Disconnect detaches device index without a Device, e.g. one left by a
// previous process: it flushes the device, disconnects it and waits until
// it is free (bounded by ctx, or idleWait if ctx has no deadline). Like
// Detach, it refuses a mounted device.
func (a *Attacher) Disconnect(ctx context.Context, index int) error {
	if err := a.dev.flush(ctx, index); err != nil {
		return fmt.Errorf("nbdattach: flushing nbd%d before disconnect: %w", index, err)
	}
	if err := a.ctl.disconnect(ctx, index); err != nil {
		return err
	}
	return a.waitIdle(ctx, index)
}

// Release disconnects device index when its server is gone: a killed
// `image map`, or a driver that died before it recorded the device. Unlike
// Disconnect it sends no flush first: with no server, a flush can only fail
// (or wait out the device's dead-connection timeout for a server that is
// not coming back), and whatever was not flushed is lost already. It still
// refuses a mounted or exclusively held device (ErrDeviceBusy): a
// filesystem is never pulled from under its mount. Whether the server is
// gone is the caller's judgement (see Connection); Release of a device that
// is still served disconnects it all the same, without a flush.
//
// Over netlink it first sets the device's dead-connection timeout to 0
// (a RECONFIGURE with no sockets): the O_EXCL open that tells a mounted
// device makes the kernel scan a device nobody opened since it was
// connected for partitions, and that read would otherwise wait the whole
// timeout (the driver's is minutes) for a reconnect. A mounted device's
// queued I/O fails from then on too, as it would have once the timeout
// ran out with nobody to reconnect.
//
// It fails with ErrNotFound if there is no such nbd device, and with
// ErrNotConnected if it is not connected.
func (a *Attacher) Release(ctx context.Context, index int) error {
	c, err := a.Connection(index)
	if err != nil {
		return err
	}
	if a.ctl.iface() == InterfaceNetlink {
		// The kernel refuses a RECONFIGURE that does not name the
		// backend the device was attached with.
		cfg := deviceConfig{Index: index, NoDeadConnTimeout: true, Identifier: c.Backend}
		if err := a.ctl.reconfigure(ctx, cfg); err != nil {
			return fmt.Errorf("nbdattach: releasing nbd%d: %w", index, err)
		}
	}
	if err := a.dev.claim(index); err != nil {
		return fmt.Errorf("nbdattach: releasing nbd%d: %w", index, err)
	}
	if err := a.ctl.disconnect(ctx, index); err != nil {
		return err
	}
	return a.waitIdle(ctx, index)
}

// Connection is what /sys/block says of a connected device.
type Connection struct {
	Index int
	// PID is the task that started the device (the thread that sent the
	// connect, so a thread of the attaching process), numbered in the
	// initial pid namespace. It may have exited since: the kernel keeps
	// a device whose sockets died connected until it is disconnected.
	PID int
	// Backend is the identifier it was attached with
	// (AttachOptions.Identifier, netlink only), "" if none.
	Backend string
}

// Connection describes device index, read from /sys/block: ErrNotFound if
// there is no such nbd device, ErrNotConnected if it is not connected.
func (a *Attacher) Connection(index int) (Connection, error) {
	sys := a.dev.sys()
	if _, err := fs.Stat(sys, fmt.Sprintf("nbd%d", index)); errors.Is(err, fs.ErrNotExist) {
		return Connection{}, fmt.Errorf("nbdattach: nbd%d: %w", index, ErrNotFound)
	} else if err != nil {
		return Connection{}, fmt.Errorf("nbdattach: nbd%d: %w", index, err)
	}
	pid, err := sysfsPID(sys, index)
	if err != nil {
		return Connection{}, err
	}
	backend, err := sysfsBackend(sys, index)
	if err != nil {
		return Connection{}, err
	}
	return Connection{Index: index, PID: pid, Backend: backend}, nil
}

// Devices lists the node's nbd devices.
func (a *Attacher) Devices(ctx context.Context) ([]DeviceStatus, error) {
	return a.ctl.status(ctx, AnyIndex)
}

// FreeDevices counts the devices that are neither connected nor held open
// (over the ioctls: not connected). It is a count of existing devices, not
// a hard limit: over netlink, Attach with AnyIndex makes the kernel add a
// device when none is free.
func (a *Attacher) FreeDevices(ctx context.Context) (int, error) {
	devs, err := a.Devices(ctx)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, d := range devs {
		if !d.Connected {
			n++
		}
	}
	return n, nil
}

// FindByIdentifier returns the index of the connected device attached with
// AttachOptions.Identifier id (netlink only), or ErrNotFound.
func (a *Attacher) FindByIdentifier(ctx context.Context, id string) (int, error) {
	devs, err := a.Devices(ctx)
	if err != nil {
		return 0, err
	}
	for _, d := range devs {
		if !d.Connected {
			continue
		}
		backend, err := sysfsBackend(a.dev.sys(), d.Index)
		if err != nil {
			return 0, err
		}
		if id != "" && backend == id {
			return d.Index, nil
		}
	}
	return 0, fmt.Errorf("nbdattach: identifier %q: %w", id, ErrNotFound)
}

func (a *Attacher) connected(ctx context.Context, index int) (bool, error) {
	devs, err := a.ctl.status(ctx, index)
	if err != nil {
		return false, err
	}
	for _, d := range devs {
		if d.Index == index {
			return d.Connected, nil
		}
	}
	return false, nil
}

// idleWait bounds waitIdle when the context has no deadline: a device that
// stays open (mounted, say) would otherwise be waited for forever.
const idleWait = 30 * time.Second

// waitIdle waits until device index is free: disconnected and closed by
// everyone.
func (a *Attacher) waitIdle(ctx context.Context, index int) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, idleWait)
		defer cancel()
	}
	delay := 5 * time.Millisecond
	for {
		busy, err := a.connected(ctx, index)
		if err != nil || !busy {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("nbdattach: nbd%d still in use after disconnect (%w): %w", index, ctx.Err(), ErrDeviceBusy)
		case <-time.After(delay):
		}
		delay = min(2*delay, 100*time.Millisecond)
	}
}
