//go:build linux

package nbdattach

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// A queue is one connection of a device: a socketpair whose kernel end is
// handed to the kernel (which keeps its own reference) and whose server end
// is served by Server.ServeTransmission. The queue keeps its own descriptor
// of the server end open until it is closed, so that it can still shut the
// socket down and watch the kernel's end after the server has returned.
type queue struct {
	fd     int // server end, owned by the queue
	cancel context.CancelFunc
	done   chan struct{} // closed when ServeTransmission has returned
	err    error         // what it returned; read after done
}

// socketPairs makes n AF_UNIX stream socketpairs and returns their kernel
// and server ends.
func socketPairs(n int) (kernel, server []int, err error) {
	for range n {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			closeFDs(kernel)
			closeFDs(server)
			return nil, nil, fmt.Errorf("nbdattach: socketpair: %w", err)
		}
		kernel, server = append(kernel, fds[0]), append(server, fds[1])
	}
	return kernel, server, nil
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// startQueue serves server end fd with srv until the peer disconnects or
// stop is called. The queue owns fd from then on, even on error.
func startQueue(srv Server, fd int, onErr func(error)) (*queue, error) {
	conn, err := fdConn(fd)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	q := &queue{fd: fd, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(q.done)
		q.err = srv.ServeTransmission(ctx, conn)
		if ctx.Err() == nil {
			// The server ended by itself (NBD_CMD_DISC, an error). q.fd
			// keeps the socket open, so shut it down for the kernel to
			// see the connection end (NBD_DO_IT waits for that).
			unix.Shutdown(fd, unix.SHUT_RDWR)
		}
		if q.err != nil && onErr != nil {
			onErr(q.err)
		}
	}()
	return q, nil
}

// fdConn returns a net.Conn on a duplicate of fd (fd itself stays open).
func fdConn(fd int) (net.Conn, error) {
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("nbdattach: dup: %w", err)
	}
	f := os.NewFile(uintptr(dup), "nbd-server")
	defer f.Close() // net.FileConn holds a duplicate of its own
	conn, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("nbdattach: serving socket: %w", err)
	}
	return conn, nil
}

// stop ends serving: no new requests are read, replies in flight are sent.
func (q *queue) stop() {
	q.cancel()
	<-q.done
}

// wait waits until the server has returned or ctx is done.
func (q *queue) wait(ctx context.Context) error {
	select {
	case <-q.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// peerGone reports whether the kernel end of the socket has been released
// or shut down. After a RECONFIGURE and the close of our copy of the kernel
// end, a socket the kernel did not keep has no peer left.
func (q *queue) peerGone() (bool, error) {
	fds := []unix.PollFd{{Fd: int32(q.fd), Events: unix.POLLIN | unix.POLLRDHUP}}
	for {
		_, err := unix.Poll(fds, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return false, fmt.Errorf("nbdattach: poll: %w", err)
		}
		return fds[0].Revents&(unix.POLLHUP|unix.POLLRDHUP|unix.POLLERR) != 0, nil
	}
}

// retire makes the kernel mark this connection dead and waits until it has:
// it shuts down our sending side, so the kernel's receiver reads EOF, marks
// the socket dead and shuts down its own end, which we see as EOF. Anything
// the kernel still sent is discarded (those requests time out and are
// retried by the kernel). Call after stop.
func (q *queue) retire(ctx context.Context) error {
	if err := unix.Shutdown(q.fd, unix.SHUT_WR); err != nil && err != unix.ENOTCONN {
		return fmt.Errorf("nbdattach: shutdown: %w", err)
	}
	buf := make([]byte, 64<<10)
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("nbdattach: waiting for the kernel to drop a connection: %w", err)
		}
		fds := []unix.PollFd{{Fd: int32(q.fd), Events: unix.POLLIN | unix.POLLRDHUP}}
		if _, err := unix.Poll(fds, 50); err != nil && err != unix.EINTR {
			return fmt.Errorf("nbdattach: poll: %w", err)
		}
		if fds[0].Revents == 0 {
			continue
		}
		n, err := unix.Read(q.fd, buf)
		switch {
		case n == 0 && err == nil, errors.Is(err, unix.ECONNRESET):
			return nil
		case err != nil && err != unix.EAGAIN && err != unix.EINTR:
			return fmt.Errorf("nbdattach: draining a retired connection: %w", err)
		}
	}
}

// close releases our descriptor of the server end. Call after stop.
func (q *queue) close() { unix.Close(q.fd) }

// retireTimeout bounds how long Reconfigure waits for the kernel to notice
// that an old connection is gone.
const retireTimeout = 10 * time.Second
