package nbdattach

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// shutdownGrace is how long in-flight replies may take to reach the client
// once the context is done, before the connection is dropped regardless.
const shutdownGrace = 10 * time.Second

// session is one connection to an export. One goroutine (run) reads
// requests; each request that reaches the backend runs on its own goroutine,
// bounded by limit, on a pool of worker goroutines, and queues its reply
// for whichever goroutine is writing replies (replies.go).
type session struct {
	e     *Export
	conn  net.Conn
	r     *bufio.Reader
	limit *inflight

	stopping chan struct{} // closed when ctx is done

	work    chan job // hands requests to idle workers (see submit)
	workers int      // started so far; only the reader touches it

	wmu     sync.Mutex     // guards the reply queue (replies.go)
	pending []pendingReply // replies waiting for the writer
	spare   []pendingReply // the last batch's array, for reuse
	writing bool           // a goroutine is writing the queue
	iov     [][]byte       // the writer's scratch; only the writer touches it
	werr    error          // first reply write error; later replies are dropped
}

func newSession(e *Export, conn net.Conn) *session {
	return &session{
		e:        e,
		conn:     conn,
		r:        bufio.NewReaderSize(conn, 64<<10),
		limit:    newInflight(e.opts.MaxInFlight, maxInFlightBytes),
		stopping: make(chan struct{}),
		work:     make(chan job),
	}
}

// run serves the connection and closes it.
func (s *session) run(ctx context.Context, handshake bool) error {
	defer s.conn.Close()
	stop := context.AfterFunc(ctx, s.interrupt)
	defer stop()

	if handshake {
		enter, err := s.handshake()
		if err != nil || !enter {
			if s.interrupted() {
				return nil
			}
			return err
		}
	}
	return s.transmit()
}

// interrupt unblocks the reader so that the session ends gracefully: no more
// requests are read, replies still in flight get shutdownGrace to be sent.
func (s *session) interrupt() {
	close(s.stopping)
	now := time.Now()
	if s.conn.SetReadDeadline(now) != nil || s.conn.SetWriteDeadline(now.Add(shutdownGrace)) != nil {
		s.conn.Close() // no deadlines on this conn: the only way to unblock it
	}
}

func (s *session) interrupted() bool {
	select {
	case <-s.stopping:
		return true
	default:
		return false
	}
}

// transmit reads and dispatches requests until the client disconnects, then
// waits for the requests in flight, flushes the backend and returns.
func (s *session) transmit() error {
	err := s.readRequests()
	s.releaseHeld()
	if err != nil && s.interrupted() && !errors.Is(err, ErrProtocol) {
		err = nil // the read was cut short by ctx (a deadline, or a close)
	}
	s.limit.wait()
	close(s.work) // the workers are idle: end them
	s.wmu.Lock()
	if s.werr != nil {
		// The reply stream broke first; the read error, if any, is its echo.
		err = fmt.Errorf("nbdattach: writing reply: %w", s.werr)
	}
	s.wmu.Unlock()
	if ferr := s.e.backend.Flush(); ferr != nil {
		err = errors.Join(err, fmt.Errorf("nbdattach: flushing at disconnect: %w", ferr))
	}
	return err
}

// readRequests is the reader loop. It returns nil on NBD_CMD_DISC and when
// the client hangs up between requests.
func (s *session) readRequests() error {
	var b [requestHeaderSize]byte
	for {
		if s.r.Buffered() < requestHeaderSize {
			s.releaseHeld() // before the read that may wait for the client
		}
		if _, err := io.ReadFull(s.r, b[:]); err != nil {
			if err == io.EOF {
				return nil
			}
			return fmt.Errorf("nbdattach: reading request: %w", err)
		}
		var req requestHeader
		req.decode(b[:])
		if req.Magic != requestMagic {
			return fmt.Errorf("request magic %#08x: %w", req.Magic, ErrProtocol)
		}
		if req.Type == cmdDisc {
			return nil
		}
		if err := s.dispatch(req); err != nil {
			return err
		}
	}
}

// dispatch answers a request that fails validation at once, and otherwise
// hands it to a goroutine of its own. Only a failure to read the request's
// payload is returned.
func (s *session) dispatch(req requestHeader) error {
	if e := s.e.check(req); e != errnoOK {
		if req.Type == cmdWrite {
			// The payload must be consumed to find the next request.
			if _, err := io.CopyN(io.Discard, s.r, int64(req.Length)); err != nil {
				return fmt.Errorf("nbdattach: skipping %d-byte write payload: %w", req.Length, err)
			}
		}
		s.replyError(req.Handle, e)
		return nil
	}
	if req.Type == cmdRead && s.tryRead(req) {
		return nil
	}
	weight := 0
	if req.Type == cmdRead || req.Type == cmdWrite {
		weight = int(req.Length)
	}
	s.limit.acquire(weight)
	var payload *[]byte
	if req.Type == cmdWrite {
		payload = s.e.bufs.get(int(req.Length))
		if _, err := io.ReadFull(s.r, *payload); err != nil {
			s.e.bufs.put(payload)
			s.limit.release(weight)
			return fmt.Errorf("nbdattach: reading %d-byte write payload: %w", req.Length, err)
		}
	}
	s.submit(job{req: req, payload: payload, weight: weight})
	return nil
}

// job is a checked request on its way to a worker, holding weight bytes of
// the in-flight budget and, for a WRITE, its payload.
type job struct {
	req     requestHeader
	payload *[]byte
	weight  int
}

// submit hands j to an idle worker, or starts a new one. Workers live as
// long as the session, so the stacks they grew on the I/O path are reused
// rather than grown again for every request. limit bounds the jobs in
// flight; a worker that has released its slot but not yet come back for
// more work can make the reader start one more, so the count is capped at
// twice the limit and the reader then waits for a worker.
func (s *session) submit(j job) {
	select {
	case s.work <- j:
		return
	default:
	}
	if s.workers < 2*s.limit.maxCount {
		s.workers++
		go s.worker(j)
		return
	}
	s.work <- j
}

// worker runs j, then every job handed to it until the session ends.
func (s *session) worker(j job) {
	for ok := true; ok; j, ok = <-s.work {
		s.execute(j.req, j.payload)
		s.limit.release(j.weight)
	}
}
