package nbdattach

import (
	"errors"
	"io"
)

// check validates a request before it reaches the backend and returns the
// error to answer it with, or errnoOK. The order matters: unknown commands
// and flags first, then read-only, then sizes, alignment and range.
func (e *Export) check(req requestHeader) errno {
	// FUA is valid on every command once negotiated; clients are known to
	// set it on reads and flushes, where it means nothing more.
	allowed, writes := cmdFlagFUA, false
	switch req.Type {
	case cmdRead:
	case cmdWrite, cmdTrim:
		writes = true
	case cmdWriteZeroes:
		allowed, writes = cmdFlagFUA|cmdFlagNoHole, true
	case cmdFlush:
		if req.Flags&^allowed != 0 {
			return errnoInval
		}
		return errnoOK // offset and length are reserved: ignored
	default:
		// CACHE, BLOCK_STATUS and anything unknown. None carries a
		// payload (only WRITE does), so the stream stays in step.
		return errnoInval
	}
	switch {
	case req.Flags&^allowed != 0:
		return errnoInval // DF and FAST_ZERO were never advertised
	case writes && e.opts.ReadOnly:
		return errnoPerm
	case (req.Type == cmdRead || req.Type == cmdWrite) && req.Length > MaxBlockSize:
		return errnoInval
	case !e.aligned(req):
		return errnoInval
	case !e.inRange(req):
		// As the spec recommends: ENOSPC for writes past the end,
		// EINVAL for reads and trims.
		if req.Type == cmdWrite || req.Type == cmdWriteZeroes {
			return errnoNoSpc
		}
		return errnoInval
	}
	return errnoOK
}

func (e *Export) aligned(req requestHeader) bool {
	m := uint64(e.opts.MinBlockSize)
	return m <= 1 || (req.Offset%m == 0 && uint64(req.Length)%m == 0)
}

// inRange reports whether [Offset, Offset+Length) lies inside the export,
// without overflowing.
func (e *Export) inRange(req requestHeader) bool {
	size := uint64(max(e.backend.Size(), 0))
	return req.Offset <= size && uint64(req.Length) <= size-req.Offset
}

// execute runs a checked request against the backend and replies.
// payload is the WRITE data (nil otherwise); execute returns it to the pool.
func (s *session) execute(req requestHeader, payload *[]byte) {
	e := s.e
	off, length := int64(req.Offset), int64(req.Length)
	var err error
	switch req.Type {
	case cmdRead:
		s.read(req)
		return
	case cmdWrite:
		err = e.write(*payload, off)
		e.bufs.put(payload)
	case cmdFlush:
		err = e.backend.Flush()
	case cmdTrim:
		err = e.trim(off, length)
	case cmdWriteZeroes:
		err = e.writeZeroes(off, length, req.Flags&cmdFlagNoHole == 0)
	}
	if err == nil && req.Flags&cmdFlagFUA != 0 && req.Type != cmdFlush {
		err = e.backend.Flush() // FUA: durable before the reply
	}
	s.replyError(req.Handle, errnoFor(err))
}

// tryRead answers a READ on the reader goroutine if the backend can serve
// it at once (TryReader), and reports whether it did. While more requests
// are already buffered the reply is held, to go out in one write with the
// replies to those (see holdReply).
func (s *session) tryRead(req requestHeader) bool {
	if s.e.try == nil || req.Length > maxTryRead {
		return false
	}
	buf := s.e.bufs.get(simpleReplySize + int(req.Length))
	b := *buf
	if !s.e.try.TryReadAt(b[simpleReplySize:], int64(req.Offset)) {
		s.e.bufs.put(buf)
		return false
	}
	simpleReply{Magic: simpleReplyMagic, Error: errnoOK, Handle: req.Handle}.encode(b)
	r := pendingReply{buf: buf}
	if s.r.Buffered() >= requestHeaderSize {
		s.holdReply(r)
	} else {
		s.sendReply(r)
	}
	return true
}

// read reads first and replies after, so that a failed read becomes an error
// reply rather than a success header followed by a dropped connection.
func (s *session) read(req requestHeader) {
	buf := s.e.bufs.get(simpleReplySize + int(req.Length))
	b := *buf
	n, err := s.e.backend.ReadAt(b[simpleReplySize:], int64(req.Offset))
	switch {
	case n == int(req.Length):
		err = nil // io.ReaderAt may report io.EOF along with a full read
	case err == nil:
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		s.e.bufs.put(buf)
		s.replyError(req.Handle, errnoFor(err))
		return
	}
	simpleReply{Magic: simpleReplyMagic, Error: errnoOK, Handle: req.Handle}.encode(b)
	s.sendReply(pendingReply{buf: buf}) // the queue returns buf to the pool
}

func (e *Export) write(p []byte, off int64) error {
	n, err := e.backend.WriteAt(p, off)
	if err == nil && n < len(p) {
		err = io.ErrShortWrite
	}
	return err
}

// trim discards a range. TRIM is a hint, so a backend that cannot discard
// (errors.ErrUnsupported) still succeeds.
func (e *Export) trim(off, length int64) error {
	if length == 0 {
		return nil
	}
	if err := e.backend.Discard(off, length); !errors.Is(err, errors.ErrUnsupported) {
		return err
	}
	return nil
}

// writeZeroes zeroes a range. A backend that cannot zero in place
// (errors.ErrUnsupported) gets ordinary writes of zeroes instead.
func (e *Export) writeZeroes(off, length int64, mayUnmap bool) error {
	if length == 0 {
		return nil
	}
	err := e.backend.WriteZeroes(off, length, mayUnmap)
	if !errors.Is(err, errors.ErrUnsupported) {
		return err
	}
	zero := make([]byte, min(length, 1<<20))
	for length > 0 {
		n := min(length, int64(len(zero)))
		if err := e.write(zero[:n], off); err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return nil
}
