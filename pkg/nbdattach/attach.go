package nbdattach

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"time"
)

// Errors of the attach side. Each is wrapped with context (and, for kernel
// refusals, the errno as well: errors.Is(err, syscall.EBUSY) works).
var (
	// ErrNotSupported: the kernel interface in use cannot do this (the
	// ioctls cannot hand a live device new sockets), or the platform has
	// no nbd at all.
	ErrNotSupported = errors.New("nbdattach: not supported")
	// ErrNoFreeDevice: every /dev/nbdX is in use.
	ErrNoFreeDevice = errors.New("nbdattach: no free nbd device")
	// ErrDeviceBusy: the device asked for is connected or held open.
	ErrDeviceBusy = errors.New("nbdattach: nbd device is busy")
	// ErrNotConnected: the device is not attached (or not by netlink).
	ErrNotConnected = errors.New("nbdattach: nbd device is not connected")
	// ErrNotFound: no attached device has the identifier asked for.
	ErrNotFound = errors.New("nbdattach: no such nbd device")
	// ErrKernel: the kernel refused a request (wrapped with its errno).
	ErrKernel = errors.New("nbdattach: kernel refused the request")
	// ErrInvalidAttachOptions: AttachOptions failed validation.
	ErrInvalidAttachOptions = errors.New("nbdattach: invalid attach options")
	// ErrSocketsRejected: the kernel took none of the sockets offered by a
	// reconfigure (its connections were not dead yet, or it has fewer).
	ErrSocketsRejected = errors.New("nbdattach: kernel took none of the new sockets")
)

// AnyIndex asks Attach for whichever nbd device is free.
const AnyIndex = -1

// DefaultBlockSize is the logical block size given to the kernel when
// AttachOptions.BlockSize is zero.
const DefaultBlockSize = 4096

// kernelIOTimeout is the request timer the kernel gives an nbd device
// without a command timeout (nbd_set_cmd_timeout with 0): what Detach puts
// back after a Reconnect, which cannot know the value before its
// predecessor's.
const kernelIOTimeout = 30 * time.Second

// maxConnections bounds AttachOptions.Connections (one kernel queue each).
const maxConnections = 64

// Server is what a device's sockets are served by. *Export implements it.
type Server interface {
	// Size is the size of the export in bytes.
	Size() int64
	// Flags are the transmission flags the kernel is told.
	Flags() TransmissionFlags
	// ServeTransmission serves NBD requests on conn, with no handshake,
	// until the peer disconnects or ctx is done, and closes conn.
	ServeTransmission(ctx context.Context, conn net.Conn) error
}

var _ Server = (*Export)(nil)

// AttachOptions tune one attached device.
type AttachOptions struct {
	// Index is the device to use, /dev/nbd<Index>, or AnyIndex (-1).
	Index int
	// Connections is the number of sockets, each a kernel queue served
	// concurrently; more than one needs FlagCanMultiConn. 0 means one per
	// CPU (at most 8), or 1 if the server cannot multi-conn or IOTimeout
	// is set. See Timeout for what several connections risk.
	Connections int
	// BlockSize is the logical block size: a power of two from 512 to
	// 4096 (the page size). 0 means DefaultBlockSize.
	BlockSize uint32
	// Timeout is how long one request may take before the kernel gives up
	// on its connection (whole seconds; with several connections the
	// request is retried on another). 0 means never: the kernel (5.x+)
	// only warns each time the request timer fires (see IOTimeout), and
	// resends requests whose connection has been replaced by Reconfigure
	// or Reconnect. A server in trouble then stalls I/O instead of failing
	// it, which keeps filesystems from going read-only.
	//
	// With several connections the kernel gives up on a connection when a
	// request on it outlives the request timer, Timeout 0 or not: it shuts
	// the live socket down and resends the request on another while the
	// server may still be carrying out the first copy, so a slow WRITE can
	// land after its resent copy and after later writes to the same
	// blocks. Nothing replaces that connection; once none is left, I/O
	// fails after DeadConnTimeout. One connection with Timeout 0 is the
	// one setting whose timer never cuts a live connection.
	Timeout time.Duration
	// IOTimeout is the period of the block queue's request timer
	// (/sys/block/nbdN/queue/io_timeout, whole milliseconds, at least 1 s),
	// set at Attach and Reconnect and put back at Detach: to what Attach
	// found, or after a Reconnect (which finds its predecessor's) to the
	// kernel's default, 30 s. 0 leaves the timer alone. For one connection
	// with Timeout 0 only (Connections 0 then means 1; Validate refuses
	// the rest, where an expiry cuts a live connection). There an expiry
	// only logs "Possible stuck request", and resends the request if its
	// connection has been replaced since: a short IOTimeout makes the
	// requests a dead server held go out about IOTimeout after Reconnect
	// instead of 30 s, and costs a slow request only that kernel message
	// each period.
	IOTimeout time.Duration
	// DeadConnTimeout is how long I/O waits for Reconfigure or Reconnect
	// once every connection is dead (netlink only; whole seconds). 0 means
	// I/O fails as soon as the last connection dies.
	DeadConnTimeout time.Duration
	// Identifier names the backend (netlink only; shown in
	// /sys/block/nbdN/backend). Reconnect with the same Identifier is
	// refused by the kernel if the device serves something else.
	Identifier string
	// OnConnError, if set, is called with the error that ended a served
	// connection (never nil). The package itself does not log.
	OnConnError func(error)
}

// Validate checks the options, with Connections already defaulted.
func (o AttachOptions) Validate() error {
	bs := o.BlockSize
	switch {
	case o.Index < AnyIndex:
		return fmt.Errorf("index %d: %w", o.Index, ErrInvalidAttachOptions)
	case o.Connections < 0 || o.Connections > maxConnections:
		return fmt.Errorf("%d connections, want 0..%d: %w", o.Connections, maxConnections, ErrInvalidAttachOptions)
	case bs != 0 && (bs < 512 || bs > 4096 || bs&(bs-1) != 0):
		return fmt.Errorf("block size %d: %w", bs, ErrInvalidAttachOptions)
	case o.Timeout < 0 || o.DeadConnTimeout < 0 || o.IOTimeout < 0:
		return fmt.Errorf("negative timeout: %w", ErrInvalidAttachOptions)
	case o.IOTimeout > 0 && (o.IOTimeout < time.Second || o.IOTimeout%time.Millisecond != 0):
		return fmt.Errorf("io timeout %v: want whole milliseconds, at least 1s: %w", o.IOTimeout, ErrInvalidAttachOptions)
	case o.IOTimeout > 0 && (o.Connections > 1 || o.Timeout > 0):
		return fmt.Errorf("io timeout %v with %d connections and timeout %v: each expiry would shut a live connection down; it needs one connection and timeout 0: %w",
			o.IOTimeout, o.Connections, o.Timeout, ErrInvalidAttachOptions)
	case len(o.Identifier) > 255:
		return fmt.Errorf("identifier of %d bytes: %w", len(o.Identifier), ErrInvalidAttachOptions)
	}
	return nil
}

// withDefaults fills the zero fields in for srv.
func (o AttachOptions) withDefaults(srv Server) AttachOptions {
	if o.BlockSize == 0 {
		o.BlockSize = DefaultBlockSize
	}
	if o.Connections == 0 {
		o.Connections = 1
		if srv.Flags()&FlagCanMultiConn != 0 && o.IOTimeout == 0 {
			o.Connections = min(runtime.NumCPU(), 8)
		}
	}
	return o
}

// deviceConfig returns the kernel configuration for serving srv.
func (o AttachOptions) deviceConfig(srv Server) (deviceConfig, error) {
	size := srv.Size()
	switch {
	case o.Connections > 1 && srv.Flags()&FlagCanMultiConn == 0:
		return deviceConfig{}, fmt.Errorf("%d connections to a server without CAN_MULTI_CONN: %w", o.Connections, ErrInvalidAttachOptions)
	case size <= 0 || size%int64(o.BlockSize) != 0:
		return deviceConfig{}, fmt.Errorf("export size %d is not a positive multiple of the block size %d: %w", size, o.BlockSize, ErrInvalidAttachOptions)
	}
	return deviceConfig{
		Index:           o.Index,
		Size:            uint64(size),
		BlockSize:       uint64(o.BlockSize),
		Timeout:         o.Timeout,
		DeadConnTimeout: o.DeadConnTimeout,
		ServerFlags:     srv.Flags(),
		Identifier:      o.Identifier,
	}, nil
}

// DeviceStatus is one nbd device as the kernel reports it.
type DeviceStatus struct {
	Index int
	// Connected: configured or held open, so not free to attach to.
	Connected bool
}

// Interface is the kernel interface used to configure devices.
type Interface int

const (
	// InterfaceAuto: netlink where the kernel has the "nbd" generic
	// netlink family (Linux 4.12 and later), the ioctls otherwise.
	InterfaceAuto Interface = iota
	InterfaceNetlink
	InterfaceIoctl
)

func (i Interface) String() string {
	switch i {
	case InterfaceAuto:
		return "auto"
	case InterfaceNetlink:
		return "netlink"
	case InterfaceIoctl:
		return "ioctl"
	}
	return fmt.Sprintf("Interface(%d)", int(i))
}

// DevicePath returns the device node of nbd device index.
func DevicePath(index int) string { return fmt.Sprintf("/dev/nbd%d", index) }
