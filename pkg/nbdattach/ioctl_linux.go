//go:build linux

package nbdattach

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// The ioctls of include/uapi/linux/nbd.h: _IO(0xab, n).
const (
	nbdSetSock       = 0xab00
	nbdSetBlksize    = 0xab01
	nbdSetSize       = 0xab02
	nbdDoIt          = 0xab03
	nbdClearSock     = 0xab04
	nbdSetSizeBlocks = 0xab07
	nbdDisconnect    = 0xab08
	nbdSetTimeout    = 0xab09
	nbdSetFlags      = 0xab0a
)

// ioctlControl drives the kernel through ioctls on /dev/nbdX, for kernels
// without the netlink family. The ioctl interface keeps a thread blocked in
// NBD_DO_IT for as long as the device is up, and the kernel insists that
// the thread that handed over the sockets is the one that calls it, so each
// device gets a goroutine locked to its thread (an ioctlSession). It cannot
// hand a live device new sockets, nor set a dead-connection timeout or a
// backend identifier (those options are ignored).
type ioctlControl struct {
	sys    fs.FS
	devDir string

	mu       sync.Mutex
	sessions map[int]*ioctlSession
}

var _ kernelControl = (*ioctlControl)(nil)

func newIoctlControl(sys fs.FS) *ioctlControl {
	return &ioctlControl{sys: sys, devDir: "/dev", sessions: map[int]*ioctlSession{}}
}

func (c *ioctlControl) iface() Interface { return InterfaceIoctl }

func (c *ioctlControl) path(index int) string { return fmt.Sprintf("%s/nbd%d", c.devDir, index) }

// connect starts cfg.Index, or the first free device that is not busy.
func (c *ioctlControl) connect(ctx context.Context, cfg deviceConfig) (int, error) {
	candidates := []int{cfg.Index}
	if cfg.Index < 0 {
		devs, err := sysfsDevices(c.sys)
		if err != nil {
			return 0, err
		}
		candidates = candidates[:0]
		for _, d := range devs {
			if !d.Connected {
				candidates = append(candidates, d.Index)
			}
		}
	}
	for _, index := range candidates {
		err := c.start(ctx, index, cfg)
		if cfg.Index < 0 && errors.Is(err, ErrDeviceBusy) {
			continue // taken meanwhile by someone else
		}
		return index, err
	}
	return 0, ErrNoFreeDevice
}

// start runs an ioctlSession on device index and waits until the kernel
// has started the device (its pid file appears) or DO_IT failed.
func (c *ioctlControl) start(ctx context.Context, index int, cfg deviceConfig) error {
	s := &ioctlSession{done: make(chan struct{}), fd: -1}
	ready := make(chan error, 1)
	go s.run(c.path(index), cfg, ready)
	if err := <-ready; err != nil {
		return kernelError("setting up", index, err)
	}
	for delay := time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
		select {
		case <-s.done:
			err := s.err
			if err == nil {
				err = unix.EIO // DO_IT returned though nobody asked
			}
			return kernelError("NBD_DO_IT on", index, err)
		case <-ctx.Done():
			s.ioctl(nbdClearSock, 0)
			<-s.done
			return fmt.Errorf("nbdattach: starting nbd%d: %w", index, ctx.Err())
		case <-time.After(delay):
		}
		if up, err := sysfsConnected(c.sys, index); err == nil && up {
			c.mu.Lock()
			c.sessions[index] = s
			c.mu.Unlock()
			return nil
		}
	}
}

func (c *ioctlControl) reconfigure(ctx context.Context, cfg deviceConfig) error {
	if len(cfg.SocketFDs) > 0 {
		return fmt.Errorf("nbdattach: new sockets for nbd%d over ioctls: %w", cfg.Index, ErrNotSupported)
	}
	if cfg.Size == 0 {
		return nil
	}
	return c.withDevice(cfg.Index, func(s *ioctlSession) error {
		return s.ioctl(nbdSetSize, uintptr(cfg.Size))
	}, "NBD_SET_SIZE on")
}

// disconnect asks the kernel to disconnect and, for a device this process
// runs, waits for DO_IT to return; if ctx runs out first the sockets are
// torn down with NBD_CLEAR_SOCK.
func (c *ioctlControl) disconnect(ctx context.Context, index int) error {
	c.mu.Lock()
	s := c.sessions[index]
	delete(c.sessions, index)
	c.mu.Unlock()
	if s == nil {
		return c.withDevice(index, func(s *ioctlSession) error {
			return errors.Join(s.ioctl(nbdDisconnect, 0), s.ioctl(nbdClearSock, 0))
		}, "disconnecting")
	}
	if err := s.ioctl(nbdDisconnect, 0); err != nil {
		return kernelError("NBD_DISCONNECT on", index, err)
	}
	select {
	case <-s.done:
	case <-ctx.Done():
		s.ioctl(nbdClearSock, 0)
		<-s.done
	}
	return nil
}

// withDevice runs fn on this process's session for index, or on a
// temporary one around a fresh descriptor of the device.
func (c *ioctlControl) withDevice(index int, fn func(*ioctlSession) error, op string) error {
	c.mu.Lock()
	s := c.sessions[index]
	c.mu.Unlock()
	if s == nil {
		fd, err := unix.Open(c.path(index), unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("nbdattach: opening nbd%d: %w", index, err)
		}
		defer unix.Close(fd)
		s = &ioctlSession{fd: fd}
	}
	return kernelError(op, index, fn(s))
}

func (c *ioctlControl) status(ctx context.Context, index int) ([]DeviceStatus, error) {
	devs, err := sysfsDevices(c.sys)
	if err != nil || index < 0 {
		return devs, err
	}
	for _, d := range devs {
		if d.Index == index {
			return []DeviceStatus{d}, nil
		}
	}
	return nil, nil
}

// ioctlSession is one device run through the ioctls.
type ioctlSession struct {
	mu   sync.Mutex // guards fd against run closing it
	fd   int
	done chan struct{} // closed when DO_IT has returned and fd is closed
	err  error         // what DO_IT returned
}

// run opens the device, configures it and blocks in NBD_DO_IT, all on one
// locked thread. It reports the configuration result on ready.
func (s *ioctlSession) run(path string, cfg deviceConfig, ready chan<- error) {
	// Never unlocked: the thread, and the signal mask changed below, go
	// away with the goroutine.
	runtime.LockOSThread()
	defer close(s.done)
	// A signal delivered to this thread interrupts DO_IT, and the kernel
	// then shuts the device down; let other threads take them.
	all := unix.Sigset_t{}
	for i := range all.Val {
		all.Val[i] = ^uint64(0)
	}
	if err := unix.PthreadSigmask(unix.SIG_BLOCK, &all, nil); err != nil {
		ready <- fmt.Errorf("blocking signals: %w", err)
		return
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		ready <- err
		return
	}
	s.mu.Lock()
	s.fd = fd
	s.mu.Unlock()
	if err := configure(fd, cfg); err != nil {
		unix.IoctlSetInt(fd, nbdClearSock, 0)
		s.closeFD()
		ready <- err
		return
	}
	ready <- nil
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), nbdDoIt, 0)
	if errno != 0 {
		s.err = errno
	}
	unix.IoctlSetInt(fd, nbdClearSock, 0)
	s.closeFD()
}

// configure tells the kernel the geometry, flags, timeout and sockets.
func configure(fd int, cfg deviceConfig) error {
	type step struct {
		req uint
		arg uint64
	}
	steps := []step{
		{nbdSetBlksize, cfg.BlockSize},
		{nbdSetSizeBlocks, cfg.Size / cfg.BlockSize},
		{nbdSetFlags, uint64(cfg.ServerFlags)},
	}
	if cfg.Timeout > 0 {
		steps = append(steps, step{nbdSetTimeout, seconds(cfg.Timeout)})
	}
	for _, sfd := range cfg.SocketFDs {
		steps = append(steps, step{nbdSetSock, uint64(sfd)})
	}
	for _, st := range steps {
		if err := unix.IoctlSetInt(fd, st.req, int(st.arg)); err != nil {
			return fmt.Errorf("ioctl %#x: %w", st.req, err)
		}
	}
	return nil
}

func (s *ioctlSession) ioctl(req uint, arg uintptr) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fd < 0 {
		return unix.EBADF
	}
	return unix.IoctlSetInt(s.fd, req, int(arg))
}

func (s *ioctlSession) closeFD() {
	s.mu.Lock()
	defer s.mu.Unlock()
	unix.Close(s.fd)
	s.fd = -1
}
