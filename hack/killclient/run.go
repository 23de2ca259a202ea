package main

import (
	"bufio"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"time"
)

// writer drives random writes, WRITE_ZEROES and FLUSHes at a server until
// the connection dies, journaling what became durable.
type writer struct {
	c       *nbdConn
	rng     *rand.Rand
	round   int
	cluster int64
	depth   int

	jf *os.File
	jw *bufio.Writer

	inflight map[uint64]*op
	undur    []int // acknowledged writes not yet covered by a flush
	flushing bool
	nextSeq  int
	next     uint64

	issued, acked, durable, flushes, fua int
	// ackIsDurable is a mutation for showing that kill-rounds.sh can fail:
	// writes are journaled durable when acknowledged, with no FLUSH.
	ackIsDurable bool
}

type op struct {
	flush  bool
	w      write
	fua    bool
	covers []int // for a flush: the writes it makes durable
}

func (r *writer) run(timeout time.Duration) error {
	if _, err := fmt.Fprintf(r.jw, "R %d\n", r.round); err != nil {
		return err
	}
	replies := make(chan reply, r.depth)
	readErr := make(chan error, 1)
	go func() {
		for {
			rep, err := r.c.recv()
			if err != nil {
				readErr <- err
				return
			}
			replies <- rep
		}
	}()
	deadline := time.After(timeout)
	for {
		for len(r.inflight) < r.depth {
			if err := r.issue(); err != nil {
				return r.finish(err)
			}
		}
		select {
		case rep := <-replies:
			if err := r.complete(rep); err != nil {
				return err
			}
		case err := <-readErr:
			return r.finish(err)
		case <-deadline:
			return fmt.Errorf("still connected after %v: the server was not killed", timeout)
		}
	}
}

// finish ends a run at a connection error, which is how it should end.
func (r *writer) finish(cause error) error {
	if err := r.jw.Flush(); err != nil {
		return err
	}
	if err := r.jf.Sync(); err != nil {
		return err
	}
	fmt.Printf("issued=%d acked=%d durable=%d flushes=%d fua=%d end=%q\n",
		r.issued, r.acked, r.durable, r.flushes, r.fua, cause.Error())
	return nil
}

func (r *writer) issue() error {
	r.next++
	h := r.next
	if len(r.undur) > 0 && !r.flushing && r.rng.IntN(8) == 0 {
		o := &op{flush: true, covers: r.undur}
		r.undur = nil
		r.flushing = true
		r.inflight[h] = o
		r.flushes++
		return r.c.send(cmdFlush, 0, h, 0, 0, nil)
	}
	o := &op{w: r.pick()}
	o.fua = r.c.flags&flagSendFUA != 0 && r.rng.IntN(10) == 0
	r.inflight[h] = o
	w := o.w
	if _, err := fmt.Fprintf(r.jw, "W %d %d %d %c\n", w.seq, w.off, w.len, w.kind); err != nil {
		return err
	}
	var flags uint16
	if o.fua {
		flags = cmdFlagFUA
		r.fua++
	}
	r.issued++
	if w.kind == kindZeros {
		return r.c.send(cmdWriteZeroes, flags, h, w.off, uint32(w.len), nil)
	}
	buf := make([]byte, w.len)
	fillPattern(buf, writeKey(r.round, w.seq), w.off)
	return r.c.send(cmdWrite, flags, h, w.off, uint32(w.len), buf)
}

// pick chooses the next write: small unaligned ones, ones spanning a few
// clusters, sector-aligned ones; never overlapping a write in flight,
// whose order against it would be undefined.
func (r *writer) pick() write {
	w := write{seq: r.nextSeq, kind: kindData}
	r.nextSeq++
	if r.c.flags&flagSendWriteZeroes != 0 && r.rng.IntN(10) == 0 {
		w.kind = kindZeros
	}
	for try := 0; ; try++ {
		switch r.rng.IntN(3) {
		case 0:
			w.len = 1 + r.rng.Int64N(4096)
		case 1:
			w.len = 1 + r.rng.Int64N(3*r.cluster+r.cluster/2)
		default:
			w.len = 512 * (1 + r.rng.Int64N(512))
		}
		w.off = r.rng.Int64N(r.c.size - w.len + 1)
		if r.rng.IntN(2) == 0 {
			w.off &^= 511
		}
		if !r.overlapsInflight(w) || try > 100 {
			return w
		}
	}
}

func (r *writer) overlapsInflight(w write) bool {
	for _, o := range r.inflight {
		if !o.flush && w.off < o.w.off+o.w.len && o.w.off < w.off+w.len {
			return true
		}
	}
	return false
}

func (r *writer) complete(rep reply) error {
	o, ok := r.inflight[rep.handle]
	if !ok {
		return fmt.Errorf("reply for unknown handle %d", rep.handle)
	}
	delete(r.inflight, rep.handle)
	if rep.err != 0 {
		return fmt.Errorf("server replied error %d to %+v", rep.err, *o)
	}
	switch {
	case o.flush:
		r.flushing = false
		return r.markDurable(o.covers)
	case o.fua || r.ackIsDurable:
		r.acked++
		return r.markDurable([]int{o.w.seq})
	default:
		r.acked++
		r.undur = append(r.undur, o.w.seq)
	}
	return nil
}

// markDurable journals seqs as durable and fsyncs the journal.
func (r *writer) markDurable(seqs []int) error {
	if len(seqs) == 0 {
		return nil
	}
	s := make([]string, len(seqs))
	for i, q := range seqs {
		s[i] = strconv.Itoa(q)
	}
	if _, err := fmt.Fprintf(r.jw, "D %s\n", strings.Join(s, " ")); err != nil {
		return err
	}
	r.durable += len(seqs)
	if err := r.jw.Flush(); err != nil {
		return err
	}
	return r.jf.Sync()
}

// runWrite is the write subcommand.
func runWrite(socket, journalPath, readyPath string, round int, cluster int64, depth int, seed uint64, timeout time.Duration, ackIsDurable bool) error {
	if depth < 1 || cluster < 512 {
		return errors.New("-depth must be >= 1 and -cluster >= 512")
	}
	c, err := dial(socket)
	if err != nil {
		return err
	}
	defer c.conn.Close()
	if c.flags&flagSendFlush == 0 {
		return errors.New("server does not accept FLUSH")
	}
	if readyPath != "" {
		if err := os.WriteFile(readyPath, nil, 0o644); err != nil {
			return err
		}
	}
	jf, err := os.OpenFile(journalPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	defer jf.Close()
	w := &writer{
		c: c, rng: rand.New(rand.NewPCG(seed, uint64(round))), round: round,
		cluster: cluster, depth: depth, jf: jf, jw: bufio.NewWriter(jf),
		inflight: map[uint64]*op{}, ackIsDurable: ackIsDurable,
	}
	return w.run(timeout)
}
