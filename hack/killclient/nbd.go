package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
)

// A minimal NBD client: fixed-newstyle handshake with NBD_OPT_GO, then
// pipelined simple requests. It encodes the wire by hand rather than with
// pkg/nbdattach's codecs, so that a bug shared by both ends cannot hide.

const (
	nbdMagic         = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic         = 0x49484156454f5054 // "IHAVEOPT"
	optReplyMagic    = 0x0003e889045565a9
	requestMagic     = 0x25609513
	simpleReplyMagic = 0x67446698

	clientFixedNewstyle = 1 << 0
	clientNoZeroes      = 1 << 1

	optGo      = 7
	repAck     = 1
	repInfo    = 3
	infoExport = 0

	flagSendFlush       = 1 << 2
	flagSendFUA         = 1 << 3
	flagSendWriteZeroes = 1 << 6

	cmdWrite       = 1
	cmdFlush       = 3
	cmdWriteZeroes = 6
	cmdFlagFUA     = 1 << 0
)

// reply is one simple reply; err is the NBD error field.
type reply struct {
	handle uint64
	err    uint32
}

type nbdConn struct {
	conn  net.Conn
	r     *bufio.Reader
	size  int64
	flags uint16

	wmu sync.Mutex
	hdr [28]byte
}

// dial connects to a unix socket and negotiates the default export.
func dial(socket string) (*nbdConn, error) {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		return nil, err
	}
	c := &nbdConn{conn: conn, r: bufio.NewReader(conn)}
	if err := c.handshake(); err != nil {
		conn.Close()
		return nil, fmt.Errorf("handshake: %w", err)
	}
	return c, nil
}

func (c *nbdConn) handshake() error {
	var greet [18]byte
	if _, err := io.ReadFull(c.r, greet[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint64(greet[0:]) != nbdMagic || binary.BigEndian.Uint64(greet[8:]) != optMagic {
		return errors.New("not a newstyle NBD server")
	}
	// Client flags, then NBD_OPT_GO for export "" with no info requests.
	msg := binary.BigEndian.AppendUint32(nil, clientFixedNewstyle|clientNoZeroes)
	msg = binary.BigEndian.AppendUint64(msg, optMagic)
	msg = binary.BigEndian.AppendUint32(msg, optGo)
	msg = binary.BigEndian.AppendUint32(msg, 6)
	msg = binary.BigEndian.AppendUint32(msg, 0) // name length
	msg = binary.BigEndian.AppendUint16(msg, 0) // info requests
	if _, err := c.conn.Write(msg); err != nil {
		return err
	}
	for {
		var h [20]byte
		if _, err := io.ReadFull(c.r, h[:]); err != nil {
			return err
		}
		if binary.BigEndian.Uint64(h[0:]) != optReplyMagic || binary.BigEndian.Uint32(h[8:]) != optGo {
			return errors.New("bad option reply header")
		}
		typ, n := binary.BigEndian.Uint32(h[12:]), binary.BigEndian.Uint32(h[16:])
		if n > 1<<16 {
			return fmt.Errorf("option reply of %d bytes", n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c.r, data); err != nil {
			return err
		}
		switch {
		case typ == repAck:
			if c.size == 0 {
				return errors.New("NBD_OPT_GO acked without NBD_INFO_EXPORT")
			}
			return nil
		case typ == repInfo && n >= 12 && binary.BigEndian.Uint16(data) == infoExport:
			c.size = int64(binary.BigEndian.Uint64(data[2:]))
			c.flags = binary.BigEndian.Uint16(data[10:])
		case typ&(1<<31) != 0:
			return fmt.Errorf("NBD_OPT_GO refused: reply type %#x: %s", typ, data)
		}
	}
}

// send writes one request; data is nil except for WRITE.
func (c *nbdConn) send(cmd, flags uint16, handle uint64, off int64, length uint32, data []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	h := c.hdr[:]
	binary.BigEndian.PutUint32(h[0:], requestMagic)
	binary.BigEndian.PutUint16(h[4:], flags)
	binary.BigEndian.PutUint16(h[6:], cmd)
	binary.BigEndian.PutUint64(h[8:], handle)
	binary.BigEndian.PutUint64(h[16:], uint64(off))
	binary.BigEndian.PutUint32(h[24:], length)
	if _, err := c.conn.Write(h); err != nil {
		return err
	}
	if data != nil {
		_, err := c.conn.Write(data)
		return err
	}
	return nil
}

// recv reads one simple reply (no command of ours has reply data).
func (c *nbdConn) recv() (reply, error) {
	var b [16]byte
	if _, err := io.ReadFull(c.r, b[:]); err != nil {
		return reply{}, err
	}
	if binary.BigEndian.Uint32(b[0:]) != simpleReplyMagic {
		return reply{}, fmt.Errorf("bad reply magic %#x", binary.BigEndian.Uint32(b[0:]))
	}
	return reply{err: binary.BigEndian.Uint32(b[4:]), handle: binary.BigEndian.Uint64(b[8:])}, nil
}
