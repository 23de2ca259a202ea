package nbdattach

import "net"

// Replies are combined: a goroutine with a reply to send queues it, and if
// no other goroutine is writing it becomes the writer and sends everything
// queued, in as few writev calls as there are batches, until the queue is
// empty. Under load (QD16-32) a batch holds many replies, so the server
// makes one socket write for many requests; alone, a reply is written at
// once by the goroutine that made it. Nothing waits for a timer.
//
// A reply is queued only after its request completed (a FLUSH only once the
// backend is durable), so batching never lets a reply overtake its work.

// pendingReply is a queued reply: a header, with the READ data after it in
// buf for a successful READ (buf then holds header and data).
type pendingReply struct {
	hdr [simpleReplySize]byte
	buf *[]byte // pooled, returned once written; nil for a header alone
}

// maxHeldReplies bounds the replies the reader holds back (holdReply).
const maxHeldReplies = 32

// sendReply queues a complete reply and writes the queue unless another
// goroutine is already doing so. buf (header and data, from s.e.bufs) is
// owned by the queue from here on.
func (s *session) sendReply(r pendingReply) { s.enqueue(&r, false) }

// holdReply queues a reply the reader goroutine made itself (tryRead)
// without writing it yet, while the reader has more requests in hand:
// releaseHeld, before the reader next waits for the client, writes them
// all at once. Only the reader calls it; a worker that writes meanwhile
// takes held replies along.
func (s *session) holdReply(r pendingReply) { s.enqueue(&r, true) }

// releaseHeld writes the replies held by holdReply, if no writer is busy.
func (s *session) releaseHeld() { s.enqueue(nil, false) }

func (s *session) enqueue(r *pendingReply, hold bool) {
	s.wmu.Lock()
	if s.werr != nil {
		s.wmu.Unlock()
		if r != nil {
			s.putReply(*r)
		}
		return
	}
	if r != nil {
		s.pending = append(s.pending, *r)
	}
	if s.writing || len(s.pending) == 0 || (hold && len(s.pending) < maxHeldReplies) {
		s.wmu.Unlock()
		return
	}
	s.writing = true
	for len(s.pending) > 0 && s.werr == nil {
		batch := s.pending
		s.pending = s.spare[:0]
		s.wmu.Unlock()
		err := s.writeBatch(batch)
		s.wmu.Lock()
		clear(batch) // drop buffer pointers before the slice is reused
		s.spare = batch[:0]
		if err != nil {
			s.werr = err
			s.conn.Close() // unblocks the reader: nothing more can be answered
		}
	}
	dropped := s.pending
	s.pending = nil
	s.writing = false
	s.wmu.Unlock()
	for _, r := range dropped { // only after a write error
		s.putReply(r)
	}
}

// writeBatch writes queued replies in order with writev and returns their
// buffers to the pool.
func (s *session) writeBatch(batch []pendingReply) error {
	iov := s.iov[:0]
	for i := range batch {
		if b := batch[i].buf; b != nil {
			iov = append(iov, *b)
		} else {
			iov = append(iov, batch[i].hdr[:])
		}
	}
	s.iov = iov
	bufs := net.Buffers(iov) // WriteTo consumes bufs, not s.iov's array
	s.e.replyWrites.Add(1)   // before: a client may see the replies at once
	_, err := bufs.WriteTo(s.conn)
	clear(s.iov)
	for _, r := range batch {
		s.putReply(r)
	}
	return err
}

func (s *session) putReply(r pendingReply) {
	if r.buf != nil {
		s.e.bufs.put(r.buf)
	}
}

// replyError sends a reply without data.
func (s *session) replyError(handle uint64, e errno) {
	var r pendingReply
	simpleReply{Magic: simpleReplyMagic, Error: e, Handle: handle}.encode(r.hdr[:])
	s.sendReply(r)
}
