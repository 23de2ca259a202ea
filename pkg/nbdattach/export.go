package nbdattach

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"sync"
	"sync/atomic"
)

// Backend is what an export serves. *qcow2.Image implements it.
//
// All methods may be called concurrently, from several connections at once.
// ReadAt and WriteAt are only called with ranges inside [0, Size()).
type Backend interface {
	io.ReaderAt
	io.WriterAt
	Size() int64
	Flush() error                                       // everything acknowledged so far is durable
	WriteZeroes(off, length int64, mayUnmap bool) error // mayUnmap=false means NBD_CMD_FLAG_NO_HOLE
	Discard(off, length int64) error
}

// TryReader is an optional Backend interface for reads that can complete
// without waiting (say, from metadata and data already in memory). The
// goroutine that reads a connection's requests answers such a READ itself,
// with no hand-off to a worker and its thread wake-up; a backend that
// reports false, having read nothing that counts, gets the READ through
// ReadAt on a worker as usual. TryReadAt must never block on I/O.
type TryReader interface {
	TryReadAt(p []byte, off int64) bool
}

// maxTryRead is the largest READ offered to TryReadAt: a bigger one would
// hold up the reading of further requests for its copy.
const maxTryRead = 128 << 10

// DefaultMaxInFlight is the number of requests one connection may have in
// flight when ExportOptions.MaxInFlight is zero.
const DefaultMaxInFlight = 32

// maxInFlightBytes bounds the READ and WRITE buffers one connection holds at
// a time (a request larger than this runs alone).
const maxInFlightBytes = 2 * MaxBlockSize

// ExportOptions describe one export.
type ExportOptions struct {
	// Name is the export's name. Clients asking for "" (the default export)
	// get this export too.
	Name string
	// Description is shown to clients (NBD_INFO_DESCRIPTION, NBD_OPT_LIST).
	Description string
	// ReadOnly exports refuse WRITE, TRIM and WRITE_ZEROES with EPERM.
	ReadOnly bool
	// MaxInFlight bounds the requests each connection processes at once;
	// 0 means DefaultMaxInFlight.
	MaxInFlight int
	// MinBlockSize is the advertised minimum block size: a power of two
	// from 1 to 65536; 0 means 1. Misaligned requests get EINVAL.
	MinBlockSize uint32
	// NoMultiConn leaves NBD_FLAG_CAN_MULTI_CONN out of the flags, for a
	// server that accepts one connection at a time (qemu-nbd -e 1): a
	// client that opened more would wait for them forever.
	NoMultiConn bool
	// OnConnError, if set, is called by Serve with the error that ended a
	// connection (never with nil). The package itself does not log.
	OnConnError func(error)
}

// Validate checks the options.
func (o ExportOptions) Validate() error {
	switch {
	case len(o.Name) > maxStringLength:
		return fmt.Errorf("name is %d bytes, more than %d: %w", len(o.Name), maxStringLength, ErrInvalidOptions)
	case len(o.Description) > maxStringLength:
		return fmt.Errorf("description is %d bytes, more than %d: %w", len(o.Description), maxStringLength, ErrInvalidOptions)
	case o.MaxInFlight < 0:
		return fmt.Errorf("MaxInFlight %d is negative: %w", o.MaxInFlight, ErrInvalidOptions)
	case o.MinBlockSize > 1<<16 || bits.OnesCount32(o.MinBlockSize) > 1:
		return fmt.Errorf("MinBlockSize %d is not a power of two <= 65536: %w", o.MinBlockSize, ErrInvalidOptions)
	}
	return nil
}

// Export serves one Backend over NBD, to any number of connections at once.
// Every connection shares the Backend, so a FLUSH on any of them flushes
// everything (hence NBD_FLAG_CAN_MULTI_CONN).
type Export struct {
	backend Backend
	try     TryReader // backend's, or nil
	opts    ExportOptions
	bufs    bufPool

	replyWrites atomic.Int64 // socket writes of replies, each one batch
}

// NewExport returns an export of b. Serving does not start until Serve,
// ServeConn or ServeTransmission is called.
func NewExport(b Backend, opts ExportOptions) (*Export, error) {
	if b == nil {
		return nil, fmt.Errorf("nil backend: %w", ErrInvalidOptions)
	}
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	if opts.MaxInFlight == 0 {
		opts.MaxInFlight = DefaultMaxInFlight
	}
	if opts.MinBlockSize == 0 {
		opts.MinBlockSize = 1
	}
	try, _ := b.(TryReader)
	return &Export{backend: b, try: try, opts: opts}, nil
}

// Flags returns the transmission flags of the export, as sent to clients at
// the end of the handshake; attach code passes them to the kernel.
func (e *Export) Flags() TransmissionFlags {
	f := FlagHasFlags | FlagSendFlush
	if !e.opts.NoMultiConn {
		f |= FlagCanMultiConn
	}
	if e.opts.ReadOnly {
		return f | FlagReadOnly
	}
	return f | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes
}

// Size returns the size of the export in bytes (the backend's current size).
func (e *Export) Size() int64 { return e.backend.Size() }

// Name returns the export's name.
func (e *Export) Name() string { return e.opts.Name }

// blockSizes returns the advertised minimum, preferred and maximum block
// sizes.
func (e *Export) blockSizes() (minimum, preferred, maximum uint32) {
	return e.opts.MinBlockSize, max(PreferredBlockSize, e.opts.MinBlockSize), MaxBlockSize
}

// Serve accepts connections on l and serves each (handshake, then
// transmission) until ctx is done or Accept fails. It closes l. When it
// returns, every connection it accepted has been closed and the backend has
// been flushed. It returns nil when stopped by ctx.
func (e *Export) Serve(ctx context.Context, l net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()

	var wg sync.WaitGroup
	var err error
	for {
		conn, aerr := l.Accept()
		if aerr != nil {
			if ctx.Err() == nil {
				err = fmt.Errorf("nbdattach: accepting on %s: %w", l.Addr(), aerr)
			}
			break
		}
		wg.Go(func() {
			if cerr := e.ServeConn(ctx, conn); cerr != nil && e.opts.OnConnError != nil {
				e.opts.OnConnError(cerr)
			}
		})
	}
	cancel() // ends the connections gracefully: in-flight requests finish
	wg.Wait()
	l.Close()
	if ferr := e.backend.Flush(); ferr != nil {
		err = errors.Join(err, fmt.Errorf("nbdattach: flushing export %q: %w", e.opts.Name, ferr))
	}
	return err
}

// ServeConn runs the fixed-newstyle handshake on conn and, if the client
// picks this export, serves requests until the client disconnects or ctx is
// done. It always closes conn. It returns nil when the session ended
// cleanly: NBD_OPT_ABORT, NBD_CMD_DISC, the client hanging up between
// messages, or ctx being done.
func (e *Export) ServeConn(ctx context.Context, conn net.Conn) error {
	return newSession(e, conn).run(ctx, true)
}

// ServeTransmission serves requests on conn without a handshake: the peer is
// taken to be in the transmission phase already, as the kernel is on a
// socket handed to it with NBD_SET_SOCK or the netlink NBD_CMD_CONNECT (the
// attach code tells the kernel Size and Flags itself). Otherwise it behaves
// like ServeConn.
func (e *Export) ServeTransmission(ctx context.Context, conn net.Conn) error {
	return newSession(e, conn).run(ctx, false)
}
