package nbdattach

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"
)

// A hand-written NBD client, enough to drive every option and command and
// to misbehave on purpose. It decodes the wire by hand (not with the
// server's decoders) wherever that is cheap, so that a symmetric encoding
// bug cannot hide.

const testTimeout = 10 * time.Second

// socketPair returns the two ends of a connected unix stream socket pair.
func socketPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatalf("socketpair: %v", err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), fmt.Sprintf("socketpair-%d", i))
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatalf("FileConn: %v", err)
		}
		conns[i] = c
	}
	return conns[0], conns[1]
}

type clientReply struct {
	Err  errno
	Data []byte
}

type pendingRequest struct {
	readLen uint32 // data expected after a successful reply
	ch      chan clientReply
}

type testClient struct {
	t    testing.TB
	conn net.Conn
	r    *bufio.Reader

	wmu sync.Mutex

	mu         sync.Mutex
	pending    map[uint64]pendingRequest
	nextHandle uint64
	readerDone chan struct{}
	readerErr  error
}

func newTestClient(t testing.TB, conn net.Conn) *testClient {
	return &testClient{t: t, conn: conn, r: bufio.NewReader(conn), pending: map[uint64]pendingRequest{}}
}

// serve starts e on one end of a socket pair and returns a client on the
// other and the channel ServeConn's (or ServeTransmission's) result arrives
// on.
func serve(t testing.TB, ctx context.Context, e *Export, handshake bool) (*testClient, <-chan error) {
	t.Helper()
	sconn, cconn := socketPair(t)
	done := make(chan error, 1)
	go func() {
		if handshake {
			done <- e.ServeConn(ctx, sconn)
		} else {
			done <- e.ServeTransmission(ctx, sconn)
		}
	}()
	t.Cleanup(func() { cconn.Close() })
	return newTestClient(t, cconn), done
}

// connect serves e with a handshake, negotiates NBD_OPT_GO for the default
// export and starts reading replies.
func connect(t testing.TB, e *Export) (*testClient, <-chan error) {
	t.Helper()
	c, done := serve(t, context.Background(), e, true)
	c.greet(clientFixedNewstyle | clientNoZeroes)
	if reps := c.optInfo(optGo, "", infoBlockSize); reps[len(reps)-1].Type != repAck {
		t.Fatalf("NBD_OPT_GO failed: %+v", reps)
	}
	c.startReplies()
	return c, done
}

func mustExport(t testing.TB, b Backend, opts ExportOptions) *Export {
	t.Helper()
	e, err := NewExport(b, opts)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// waitDone waits for the server side to return.
func waitDone(t testing.TB, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(testTimeout):
		t.Fatal("server did not return")
		return nil
	}
}

func (c *testClient) write(b []byte) {
	c.t.Helper()
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, err := c.conn.Write(b); err != nil {
		c.t.Errorf("client write: %v", err)
	}
}

func (c *testClient) readFull(b []byte) error {
	c.conn.SetReadDeadline(time.Now().Add(testTimeout))
	_, err := io.ReadFull(c.r, b)
	return err
}

// greet reads the greeting, checks it and sends client flags; it returns the
// handshake flags.
func (c *testClient) greet(clientFlags uint32) uint16 {
	c.t.Helper()
	var g [18]byte
	if err := c.readFull(g[:]); err != nil {
		c.t.Fatalf("reading greeting: %v", err)
	}
	if string(g[0:8]) != "NBDMAGIC" || string(g[8:16]) != "IHAVEOPT" {
		c.t.Fatalf("greeting %q", g[:16])
	}
	c.write(binary.BigEndian.AppendUint32(nil, clientFlags))
	return binary.BigEndian.Uint16(g[16:])
}

func (c *testClient) sendOption(opt optionType, data []byte) {
	b := append([]byte("IHAVEOPT"), 0, 0, 0, 0, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(b[8:], uint32(opt))
	binary.BigEndian.PutUint32(b[12:], uint32(len(data)))
	c.write(append(b, data...))
}

type optionReply struct {
	Option optionType
	Type   replyType
	Data   []byte
}

func (c *testClient) readOptionReply() (optionReply, error) {
	var h [20]byte
	if err := c.readFull(h[:]); err != nil {
		return optionReply{}, err
	}
	if m := binary.BigEndian.Uint64(h[:]); m != 0x3e889045565a9 {
		return optionReply{}, fmt.Errorf("option reply magic %#x", m)
	}
	rep := optionReply{
		Option: optionType(binary.BigEndian.Uint32(h[8:])),
		Type:   replyType(binary.BigEndian.Uint32(h[12:])),
		Data:   make([]byte, binary.BigEndian.Uint32(h[16:])),
	}
	return rep, c.readFull(rep.Data)
}

// option sends an option and returns its replies up to the final one (an
// ACK or an error).
func (c *testClient) option(opt optionType, data []byte) []optionReply {
	c.t.Helper()
	c.sendOption(opt, data)
	var reps []optionReply
	for {
		rep, err := c.readOptionReply()
		if err != nil {
			c.t.Fatalf("reading reply to %v: %v", opt, err)
		}
		if rep.Option != opt {
			c.t.Fatalf("reply for %v to %v", rep.Option, opt)
		}
		reps = append(reps, rep)
		if rep.Type == repAck || rep.Type.isError() {
			return reps
		}
	}
}

func infoRequest(name string, infos ...infoType) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, uint16(i))
	}
	return b
}

// optInfo sends NBD_OPT_INFO or NBD_OPT_GO.
func (c *testClient) optInfo(opt optionType, name string, infos ...infoType) []optionReply {
	c.t.Helper()
	return c.option(opt, infoRequest(name, infos...))
}

// startReplies starts the goroutine that matches replies to requests.
func (c *testClient) startReplies() {
	c.conn.SetReadDeadline(time.Time{})
	c.readerDone = make(chan struct{})
	go c.readReplies()
}

func (c *testClient) readReplies() {
	defer close(c.readerDone)
	var h [16]byte
	for {
		if _, err := io.ReadFull(c.r, h[:]); err != nil {
			c.readerErr = err
			return
		}
		if m := binary.BigEndian.Uint32(h[:]); m != 0x67446698 {
			c.readerErr = fmt.Errorf("reply magic %#x", m)
			return
		}
		handle := binary.BigEndian.Uint64(h[8:])
		c.mu.Lock()
		p, ok := c.pending[handle]
		delete(c.pending, handle)
		c.mu.Unlock()
		if !ok {
			c.readerErr = fmt.Errorf("reply to unknown handle %d", handle)
			return
		}
		rep := clientReply{Err: errno(binary.BigEndian.Uint32(h[4:]))}
		if rep.Err == errnoOK && p.readLen > 0 {
			rep.Data = make([]byte, p.readLen)
			if _, err := io.ReadFull(c.r, rep.Data); err != nil {
				c.readerErr = err
				return
			}
		}
		p.ch <- rep
	}
}

type request struct {
	Type    command
	Flags   commandFlags
	Offset  uint64
	Length  uint32
	Payload []byte // sent after the header whatever the command
}

func encodeRequest(handle uint64, r request) []byte {
	b := binary.BigEndian.AppendUint32(nil, 0x25609513)
	b = binary.BigEndian.AppendUint16(b, uint16(r.Flags))
	b = binary.BigEndian.AppendUint16(b, uint16(r.Type))
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, r.Offset)
	b = binary.BigEndian.AppendUint32(b, r.Length)
	return append(b, r.Payload...)
}

// send sends a request and returns where its reply will arrive.
func (c *testClient) send(r request) <-chan clientReply {
	ch, b := c.prepare(r)
	c.write(b)
	return ch
}

// sendAll sends the requests in one write.
func (c *testClient) sendAll(rs []request) []<-chan clientReply {
	var chs []<-chan clientReply
	var all []byte
	for _, r := range rs {
		ch, b := c.prepare(r)
		chs, all = append(chs, ch), append(all, b...)
	}
	c.write(all)
	return chs
}

// prepare registers a request and returns where its reply will arrive and
// its encoding.
func (c *testClient) prepare(r request) (<-chan clientReply, []byte) {
	ch := make(chan clientReply, 1)
	c.mu.Lock()
	c.nextHandle++
	handle := c.nextHandle<<8 | 0x5a // exercise all 64 bits of the handle
	handle |= 0xfeed << 48
	p := pendingRequest{ch: ch}
	if r.Type == cmdRead {
		p.readLen = r.Length
	}
	c.pending[handle] = p
	c.mu.Unlock()
	return ch, encodeRequest(handle, r)
}

// wait waits for a reply; it fails if the connection broke first.
func (c *testClient) wait(ch <-chan clientReply) (clientReply, error) {
	select {
	case rep := <-ch:
		return rep, nil
	case <-c.readerDone:
		select {
		case rep := <-ch:
			return rep, nil
		default:
		}
		return clientReply{}, fmt.Errorf("connection closed: %v", c.readerErr)
	case <-time.After(testTimeout):
		return clientReply{}, errors.New("no reply")
	}
}

// do sends a request and waits for its reply.
func (c *testClient) do(r request) clientReply {
	c.t.Helper()
	rep, err := c.wait(c.send(r))
	if err != nil {
		c.t.Fatalf("%v at %d+%d: %v", r.Type, r.Offset, r.Length, err)
	}
	return rep
}

func (c *testClient) mustDo(r request) clientReply {
	c.t.Helper()
	rep := c.do(r)
	if rep.Err != errnoOK {
		c.t.Fatalf("%v at %d+%d: %v", r.Type, r.Offset, r.Length, rep.Err)
	}
	return rep
}

func (c *testClient) writeAt(p []byte, off uint64) {
	c.t.Helper()
	c.mustDo(request{Type: cmdWrite, Offset: off, Length: uint32(len(p)), Payload: p})
}

func (c *testClient) readAt(off uint64, n uint32) []byte {
	c.t.Helper()
	return c.mustDo(request{Type: cmdRead, Offset: off, Length: n}).Data
}

// disconnect sends NBD_CMD_DISC.
func (c *testClient) disconnect() {
	c.write(encodeRequest(0, request{Type: cmdDisc}))
}

// expectClosed checks that the server closed the connection.
func (c *testClient) expectClosed() {
	c.t.Helper()
	if c.readerDone != nil {
		select {
		case <-c.readerDone:
		case <-time.After(testTimeout):
			c.t.Fatal("connection still open")
		}
		if c.readerErr != io.EOF {
			c.t.Fatalf("connection ended with %v, want EOF", c.readerErr)
		}
		return
	}
	var b [1]byte
	if err := c.readFull(b[:]); err != io.EOF {
		c.t.Fatalf("read after close: %v, want EOF", err)
	}
}

// testBackend wraps MemBackend with hooks, faults and a call log.
type testBackend struct {
	*MemBackend

	mu        sync.Mutex
	calls     []string
	readHook  func(off int64) error // runs before each ReadAt
	writeHook func(off int64) error // runs before each WriteAt
	flushErr  error
	zeroErr   error
	trimErr   error
}

func newTestBackend(size int64) *testBackend {
	return &testBackend{MemBackend: NewMemBackend(size)}
}

func (b *testBackend) log(format string, args ...any) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.calls = append(b.calls, fmt.Sprintf(format, args...))
}

func (b *testBackend) takeCalls() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	c := b.calls
	b.calls = nil
	return c
}

// set changes the backend's hooks and faults under its lock.
func (b *testBackend) set(f func(b *testBackend)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	f(b)
}

func (b *testBackend) hooks() (r, w func(int64) error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.readHook, b.writeHook
}

func (b *testBackend) ReadAt(p []byte, off int64) (int, error) {
	if r, _ := b.hooks(); r != nil {
		if err := r(off); err != nil {
			return 0, err
		}
	}
	return b.MemBackend.ReadAt(p, off)
}

// TryReadAt makes the tests cover reads answered by the reader goroutine.
// It declines while a read hook is set: the hook may block or fail, which
// only a worker's ReadAt may do.
func (b *testBackend) TryReadAt(p []byte, off int64) bool {
	if r, _ := b.hooks(); r != nil {
		return false
	}
	return b.MemBackend.tryReadAt(p, off)
}

func (b *testBackend) WriteAt(p []byte, off int64) (int, error) {
	if _, w := b.hooks(); w != nil {
		if err := w(off); err != nil {
			return 0, err
		}
	}
	b.log("write %d+%d", off, len(p))
	return b.MemBackend.WriteAt(p, off)
}

func (b *testBackend) Flush() error {
	b.log("flush")
	b.mu.Lock()
	err := b.flushErr
	b.mu.Unlock()
	if err != nil {
		return err
	}
	return b.MemBackend.Flush()
}

func (b *testBackend) WriteZeroes(off, length int64, mayUnmap bool) error {
	b.log("zero %d+%d unmap=%v", off, length, mayUnmap)
	b.mu.Lock()
	err := b.zeroErr
	b.mu.Unlock()
	if err != nil {
		return err
	}
	return b.MemBackend.WriteZeroes(off, length, mayUnmap)
}

func (b *testBackend) Discard(off, length int64) error {
	b.log("discard %d+%d", off, length)
	b.mu.Lock()
	err := b.trimErr
	b.mu.Unlock()
	if err != nil {
		return err
	}
	return b.MemBackend.Discard(off, length)
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7+i>>8)
	}
	return b
}

func mustEqual(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && i < len(want) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: differs at byte %d (len %d, want %d)", what, i, len(got), len(want))
	}
}
