//go:build linux

package nbdattach

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"golang.org/x/sys/unix"
)

// fakeKernel plays the kernel's nbd driver for the attach logic: it keeps
// its own duplicates of the sockets it is handed (as sockfd_lookup does),
// speaks NBD to the served ends like the kernel's queues, marks a socket
// dead when its peer shuts down, and answers status and sysfs questions.
// It implements both kernelControl and blockDevices.
type fakeKernel struct {
	t    testing.TB
	kind Interface

	mu           sync.Mutex
	devices      []*fakeDevice // index -> device; nil cfg means free
	calls        []string
	connectErr   error
	flushErr     error
	claimErr     error // claim fails with it (a mounted device)
	ioTimeoutErr error // setIOTimeout fails with it
	staysOpen    bool  // the device is held open after a disconnect
	resizeNoop   bool  // reconfigure ignores Size (an old kernel)
	flushedBy    []int // indices flushed
	reconfigures int   // RECONFIGUREs seen
}

type fakeDevice struct {
	cfg       *deviceConfig
	socks     []*fakeSock
	open      bool
	ioTimeout time.Duration // the request timer; 0 reads as the kernel's 30 s
}

var (
	_ kernelControl = (*fakeKernel)(nil)
	_ blockDevices  = (*fakeKernel)(nil)
)

func newFakeKernel(t testing.TB, iface Interface, devices int) *fakeKernel {
	k := &fakeKernel{t: t, kind: iface}
	for range devices {
		k.devices = append(k.devices, &fakeDevice{})
	}
	t.Cleanup(k.closeAll)
	return k
}

func (k *fakeKernel) attacher() *Attacher { return &Attacher{ctl: k, dev: k} }

func (k *fakeKernel) iface() Interface { return k.kind }

func (k *fakeKernel) record(format string, args ...any) {
	k.calls = append(k.calls, fmt.Sprintf(format, args...))
}

func (k *fakeKernel) connect(ctx context.Context, c deviceConfig) (int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.record("connect %d", c.Index)
	if k.connectErr != nil {
		return 0, k.connectErr
	}
	index := c.Index
	if index < 0 {
		for i, d := range k.devices {
			if d.cfg == nil && !d.open {
				index = i
				break
			}
		}
		if index < 0 {
			return 0, ErrNoFreeDevice
		}
	}
	d := k.devices[index]
	if d.cfg != nil || d.open {
		return 0, kernelError("connect", index, unix.EBUSY)
	}
	for _, fd := range c.SocketFDs {
		d.socks = append(d.socks, k.takeSocket(fd))
	}
	c.SocketFDs = nil
	d.cfg = &c
	return index, nil
}

// takeSocket duplicates fd, as the kernel takes a reference to the socket.
func (k *fakeKernel) takeSocket(fd int) *fakeSock {
	dup, err := unix.Dup(fd)
	if err != nil {
		k.t.Fatal(err)
	}
	f := os.NewFile(uintptr(dup), "fake-kernel")
	conn, err := net.FileConn(f)
	f.Close()
	if err != nil {
		k.t.Fatal(err)
	}
	s := &fakeSock{conn: conn, dead: make(chan struct{}), replies: make(chan fakeReply, 1)}
	go s.receive()
	return s
}

func (k *fakeKernel) reconfigure(ctx context.Context, c deviceConfig) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.record("reconfigure %d", c.Index)
	k.reconfigures++
	d := k.devices[c.Index]
	if d.cfg == nil {
		return kernelError("reconfigure", c.Index, unix.EINVAL)
	}
	if c.Identifier != "" && c.Identifier != d.cfg.Identifier {
		return kernelError("reconfigure", c.Index, unix.EINVAL)
	}
	if c.Size > 0 && !k.resizeNoop {
		d.cfg.Size = c.Size
	}
	if c.NoDeadConnTimeout {
		d.cfg.DeadConnTimeout = 0
	}
	for _, fd := range c.SocketFDs {
		for i, s := range d.socks {
			if s.isDead() { // like nbd_reconnect_socket: only dead slots
				d.socks[i] = k.takeSocket(fd)
				break
			}
		}
	}
	return nil
}

func (k *fakeKernel) disconnect(ctx context.Context, index int) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.record("disconnect %d", index)
	d := k.devices[index]
	for _, s := range d.socks {
		s.disconnect()
	}
	d.socks, d.cfg = nil, nil
	d.open = k.staysOpen
	return nil
}

func (k *fakeKernel) status(ctx context.Context, index int) ([]DeviceStatus, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var devs []DeviceStatus
	for i, d := range k.devices {
		if index < 0 || index == i {
			devs = append(devs, DeviceStatus{Index: i, Connected: d.cfg != nil || d.open})
		}
	}
	return devs, nil
}

func (k *fakeKernel) flush(ctx context.Context, index int) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.record("flush %d", index)
	return k.flushErr
}

func (k *fakeKernel) claim(index int) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.record("claim %d", index)
	return k.claimErr
}

func (k *fakeKernel) setIOTimeout(index int, d time.Duration) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.record("io_timeout %d %v", index, d)
	if k.ioTimeoutErr != nil {
		return k.ioTimeoutErr
	}
	k.devices[index].ioTimeout = d
	return nil
}

// sys is a snapshot of what /sys/block would show.
func (k *fakeKernel) sys() fs.FS {
	k.mu.Lock()
	defer k.mu.Unlock()
	m := fstest.MapFS{"loop0/size": {Data: []byte("0\n")}}
	for i, d := range k.devices {
		name := fmt.Sprintf("nbd%d/", i)
		m[name+"size"] = &fstest.MapFile{Data: []byte("0\n")}
		timer := cmp.Or(d.ioTimeout, kernelIOTimeout)
		m[name+sysfsIOTimeoutFile] = &fstest.MapFile{Data: fmt.Appendf(nil, "%d\n", timer.Milliseconds())}
		if d.cfg == nil {
			continue
		}
		m[name+"pid"] = &fstest.MapFile{Data: []byte("42\n")}
		m[name+"size"] = &fstest.MapFile{Data: fmt.Appendf(nil, "%d\n", d.cfg.Size/512)}
		if d.cfg.Identifier != "" {
			m[name+"backend"] = &fstest.MapFile{Data: []byte(d.cfg.Identifier + "\n")}
		}
	}
	return m
}

func (k *fakeKernel) device(index int) *fakeDevice {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.devices[index]
}

func (k *fakeKernel) sock(index, queue int) *fakeSock {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.devices[index].socks[queue]
}

func (k *fakeKernel) callLog() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]string(nil), k.calls...)
}

func (k *fakeKernel) closeAll() {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, d := range k.devices {
		for _, s := range d.socks {
			s.conn.Close()
		}
	}
}

// fakeSock is the kernel's end of one connection. receive plays the
// kernel's receive thread: on EOF it marks the socket dead and shuts it
// down.
type fakeSock struct {
	conn    net.Conn
	dead    chan struct{}
	mu      sync.Mutex // one request at a time
	replies chan fakeReply
	readLen int // data bytes expected with the next successful reply
}

type fakeReply struct {
	errno errno
	data  []byte
	err   error
}

func (s *fakeSock) isDead() bool {
	select {
	case <-s.dead:
		return true
	default:
		return false
	}
}

func (s *fakeSock) receive() {
	defer close(s.dead)
	defer s.conn.Close()
	for {
		var hdr [simpleReplySize]byte
		if _, err := io.ReadFull(s.conn, hdr[:]); err != nil {
			return
		}
		var r simpleReply
		r.decode(hdr[:])
		reply := fakeReply{errno: r.Error}
		if r.Magic != simpleReplyMagic {
			reply.err = fmt.Errorf("reply magic %#x", r.Magic)
		} else if r.Error == errnoOK && s.readLen > 0 {
			reply.data = make([]byte, s.readLen)
			_, reply.err = io.ReadFull(s.conn, reply.data)
		}
		s.replies <- reply
	}
}

// do sends one request and waits for its reply.
func (s *fakeSock) do(typ command, off uint64, length uint32, payload []byte) fakeReply {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.readLen = 0
	if typ == cmdRead {
		s.readLen = int(length)
	}
	b := make([]byte, requestHeaderSize, requestHeaderSize+len(payload))
	requestHeader{Magic: requestMagic, Type: typ, Handle: 7, Offset: off, Length: length}.encode(b)
	if _, err := s.conn.Write(append(b, payload...)); err != nil {
		return fakeReply{err: err}
	}
	select {
	case r := <-s.replies:
		return r
	case <-s.dead:
		return fakeReply{err: errors.New("connection died")}
	}
}

// disconnect sends NBD_CMD_DISC and drops the connection, as the kernel
// does on a disconnect.
func (s *fakeSock) disconnect() {
	var b [requestHeaderSize]byte
	requestHeader{Magic: requestMagic, Type: cmdDisc, Handle: 1}.encode(b[:])
	s.conn.Write(b[:])
	if uc, ok := s.conn.(*net.UnixConn); ok {
		uc.CloseWrite()
	}
	<-s.dead
}
