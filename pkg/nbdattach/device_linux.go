//go:build linux

package nbdattach

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Device is an export attached to /dev/nbd<Index> by this process. Its
// methods are safe for concurrent use; they run one at a time.
type Device struct {
	// Index and Path name the device: Path is /dev/nbd<Index>.
	Index int
	Path  string

	a    *Attacher
	srv  Server
	opts AttachOptions

	mu       sync.Mutex
	queues   []*queue
	served   []error // what ended queues that are gone
	detached bool
	// ioTimeoutBefore is the request timer Detach puts back, 0 if
	// opts.IOTimeout left it alone.
	ioTimeoutBefore time.Duration
}

func newDevice(a *Attacher, srv Server, opts AttachOptions) *Device {
	return &Device{Index: -1, a: a, srv: srv, opts: opts}
}

func (d *Device) setIndex(index int) {
	d.Index, d.Path = index, DevicePath(index)
}

// Connections returns the number of sockets being served.
func (d *Device) Connections() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.queues)
}

// serve starts a queue on each server end; on error every queue is stopped
// and every descriptor closed.
func (d *Device) serve(server []int) error {
	for i, fd := range server {
		q, err := startQueue(d.srv, fd, d.opts.OnConnError)
		if err != nil {
			closeFDs(server[i+1:])
			d.stopQueues()
			return err
		}
		d.queues = append(d.queues, q)
	}
	return nil
}

// stopQueues stops serving and closes every queue.
func (d *Device) stopQueues() {
	for _, q := range d.queues {
		q.stop()
		q.close()
		d.served = append(d.served, q.err)
	}
	d.queues = nil
}

// setIOTimeout sets the device's request timer to opts.IOTimeout, if set,
// and notes what Detach puts back: the timer found if found, else the
// kernel's default.
func (d *Device) setIOTimeout(found bool) error {
	if d.opts.IOTimeout == 0 {
		return nil
	}
	before := kernelIOTimeout
	if found {
		var err error
		if before, err = sysfsIOTimeout(d.a.dev.sys(), d.Index); err != nil {
			return err
		}
	}
	if err := d.a.dev.setIOTimeout(d.Index, d.opts.IOTimeout); err != nil {
		return err
	}
	d.ioTimeoutBefore = before
	return nil
}

// Detach flushes the device (its page cache, then a FLUSH to the server),
// puts its request timer back (AttachOptions.IOTimeout), disconnects it,
// waits for the server to finish the sockets and for the device to be
// free. If the flush fails, a mounted device included (ErrDeviceBusy), or
// the timer cannot be put back, the device stays attached and the error
// is returned. A device merely held open by some process is disconnected
// all the same, and Detach fails with ErrDeviceBusy if it is not closed
// before ctx, or 30 s if ctx has no deadline, runs out.
func (d *Device) Detach(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.detached {
		return nil
	}
	if err := d.a.dev.flush(ctx, d.Index); err != nil {
		return fmt.Errorf("nbdattach: flushing %s before detach: %w", d.Path, err)
	}
	// The timer goes back while the device is still ours: once it is
	// free, another Attach may take it and set its own.
	if d.ioTimeoutBefore > 0 {
		if err := d.a.dev.setIOTimeout(d.Index, d.ioTimeoutBefore); err != nil {
			return err
		}
	}
	if err := d.a.ctl.disconnect(ctx, d.Index); err != nil {
		if d.ioTimeoutBefore > 0 {
			err = errors.Join(err, d.a.dev.setIOTimeout(d.Index, d.opts.IOTimeout))
		}
		return err
	}
	d.detached = true
	for _, q := range d.queues {
		if q.wait(ctx) != nil {
			break // stopQueues below ends them
		}
	}
	d.stopQueues()
	return errors.Join(d.a.waitIdle(ctx, d.Index), d.servedErr())
}

// servedErr joins the errors that ended served connections.
func (d *Device) servedErr() error {
	var errs []error
	for _, err := range d.served {
		if err != nil {
			errs = append(errs, fmt.Errorf("nbdattach: serving %s: %w", d.Path, err))
		}
	}
	return errors.Join(errs...)
}

// Resize tells the kernel the device's new size, live: a filesystem on it
// can be grown afterwards. size must be a multiple of the block size; the
// server should already serve that many bytes.
func (d *Device) Resize(ctx context.Context, size int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if size <= 0 || size%int64(d.opts.BlockSize) != 0 {
		return fmt.Errorf("nbdattach: size %d is not a positive multiple of the block size %d: %w", size, d.opts.BlockSize, ErrInvalidAttachOptions)
	}
	if d.detached {
		return fmt.Errorf("nbdattach: resizing %s: %w", d.Path, ErrNotConnected)
	}
	// The kernel refuses a RECONFIGURE of a device attached with a backend
	// identifier unless it names the same one ("must specify backend").
	c := deviceConfig{Index: d.Index, Size: uint64(size), BlockSize: uint64(d.opts.BlockSize),
		Identifier: d.opts.Identifier}
	if err := d.a.ctl.reconfigure(ctx, c); err != nil {
		return err
	}
	got, err := sysfsSize(d.a.dev.sys(), d.Index)
	if err != nil {
		return err
	}
	if got != size {
		return fmt.Errorf("nbdattach: %s is %d bytes after resizing to %d: %w", d.Path, got, size, ErrNotSupported)
	}
	return nil
}

// Reconfigure hands the kernel new sockets for the device, served anew,
// and retires the old ones: what a server does when it restarts without
// the device being detached. Netlink only. Best called while the device is
// idle: requests in flight on the old sockets are resent by the kernel when
// their timer fires (every AttachOptions.IOTimeout, or 30 s, with Timeout
// 0), or fail.
func (d *Device) Reconfigure(ctx context.Context) error {
	if d.a.ctl.iface() != InterfaceNetlink {
		return fmt.Errorf("nbdattach: reconfiguring %s over %v: %w", d.Path, d.a.ctl.iface(), ErrNotSupported)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.detached {
		return fmt.Errorf("nbdattach: reconfiguring %s: %w", d.Path, ErrNotConnected)
	}
	rctx, cancel := context.WithTimeout(ctx, retireTimeout)
	defer cancel()
	var errs []error
	for _, q := range d.queues {
		q.stop()
		errs = append(errs, q.retire(rctx))
		q.close()
	}
	d.queues = nil
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return d.reconnectLocked(ctx)
}

// reconnect is reconnectLocked for a Device nobody else has seen yet.
func (d *Device) reconnect(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.reconnectLocked(ctx)
}

// Attempts of reconnectLocked: a socket can be refused because the kernel
// has not yet marked the old one dead, which takes it a moment.
const (
	reconnectAttempts = 40
	reconnectBackoff  = 25 * time.Millisecond
)

// reconnectLocked offers the kernel new sockets until it has taken
// opts.Connections of them or stops taking any. The kernel drops a socket
// it has no dead slot for without saying so; such a socket has no peer once
// our copy of the kernel end is closed, which is how it is detected.
func (d *Device) reconnectLocked(ctx context.Context) error {
	want := d.opts.Connections
	for attempt := 0; len(d.queues) < want && attempt < reconnectAttempts; attempt++ {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return fmt.Errorf("nbdattach: reconnecting %s: %w", d.Path, ctx.Err())
			case <-time.After(reconnectBackoff):
			}
		}
		if err := d.offerSockets(ctx, want-len(d.queues)); err != nil {
			return err
		}
	}
	if len(d.queues) == 0 {
		return fmt.Errorf("nbdattach: reconnecting %s: %w", d.Path, ErrSocketsRejected)
	}
	return nil
}

// offerSockets hands the kernel n new sockets in one RECONFIGURE and keeps
// serving those it took.
func (d *Device) offerSockets(ctx context.Context, n int) error {
	kernel, server, err := socketPairs(n)
	if err != nil {
		return err
	}
	fresh := &Device{Path: d.Path, srv: d.srv, opts: d.opts}
	if err := fresh.serve(server); err != nil {
		closeFDs(kernel)
		return err
	}
	c := deviceConfig{Index: d.Index, Timeout: d.opts.Timeout, DeadConnTimeout: d.opts.DeadConnTimeout,
		Identifier: d.opts.Identifier, SocketFDs: kernel}
	err = d.a.ctl.reconfigure(ctx, c)
	closeFDs(kernel)
	if err != nil {
		fresh.stopQueues()
		return err
	}
	for _, q := range fresh.queues {
		gone, err := q.peerGone()
		if err != nil || gone {
			q.stop()
			q.close()
			continue
		}
		d.queues = append(d.queues, q)
	}
	return nil
}
