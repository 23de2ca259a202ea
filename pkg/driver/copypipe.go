package driver

import (
	"errors"
	"sync/atomic"
)

// copyPipe is the two stages of each side of a cross-node copy: the caller
// fills buffers (from the source image on the holder, from the network on
// the receiver) and a goroutine drains them (into the network, into the
// new image), so that reading, encryption, decryption and writing overlap
// on the cores instead of taking turns. At most pipeDepth buffers are in
// flight; the drain sees them in the order they were sent.
type copyPipe struct {
	free   chan []byte
	full   chan pipePiece
	failed atomic.Bool // drain returned an error: stop filling
	errc   chan error  // drain's first error, once full is closed and drained
}

type pipePiece struct {
	off int64
	buf []byte
}

// pipeDepth buffers of peerMaxFrame: 16 MiB per side of a copy.
const pipeDepth = 4

// errPipeStopped is what the fill gets when the drain has failed; finish
// returns the drain's error instead.
var errPipeStopped = errors.New("copy pipeline stopped")

// startPipe starts the drain. Every buffer is size bytes, aligned for
// O_DIRECT (directio.go).
func startPipe(size int, drain func(off int64, p []byte) error) *copyPipe {
	p := &copyPipe{free: make(chan []byte, pipeDepth), full: make(chan pipePiece, pipeDepth), errc: make(chan error, 1)}
	for range pipeDepth {
		p.free <- alignedBuffer(size)
	}
	go func() {
		var err error
		for pc := range p.full {
			if err == nil {
				if err = drain(pc.off, pc.buf); err != nil {
					p.failed.Store(true)
				}
			}
			p.free <- pc.buf[:cap(pc.buf)]
		}
		p.errc <- err
	}()
	return p
}

// buffer waits for a free buffer; nil once the drain has failed.
func (p *copyPipe) buffer() []byte {
	if p.failed.Load() {
		return nil
	}
	return <-p.free
}

// send hands b (a buffer() or a prefix of one) to the drain.
func (p *copyPipe) send(off int64, b []byte) { p.full <- pipePiece{off, b} }

// finish ends the pipe with the fill's error and waits for the drain:
// the fill's error first, else the drain's.
func (p *copyPipe) finish(fillErr error) error {
	close(p.full)
	err := <-p.errc
	if fillErr != nil && !errors.Is(fillErr, errPipeStopped) {
		return fillErr
	}
	return err
}
