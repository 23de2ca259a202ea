//go:build linux

package nbdattach

import (
	"errors"
	"syscall"
	"testing"
)

func TestCollectReplies(t *testing.T) {
	c := &genlConn{seq: 5}
	reply := message{Type: 0x1c, Seq: 5, Payload: genlMessage{Cmd: nbdCmdConnect, Attrs: encodeIndex(3)}.encode()}
	stale := message{Type: 0x1c, Seq: 4, Payload: genlMessage{Cmd: nbdCmdConnect, Attrs: encodeIndex(9)}.encode()}
	buf := append(stale.encode(), reply.encode()...)
	var replies []genlMessage
	done, err := c.collect(buf, 0x1c, &replies)
	if err != nil || done || len(replies) != 1 {
		t.Fatalf("collect: done %v, %d replies, %v", done, len(replies), err)
	}
	clear(buf) // the receive buffer is reused for the next datagram
	if idx, err := parseConnectReply(replies[0].Attrs); err != nil || idx != 3 {
		t.Errorf("reply index %d %v after the buffer was reused", idx, err)
	}

	ack := message{Type: nlmsgError, Seq: 5, Payload: native.AppendUint32(nil, 0)}
	if done, err := c.collect(ack.encode(), 0x1c, &replies); !done || err != nil {
		t.Errorf("ack: done %v, %v", done, err)
	}
	nack := message{Type: nlmsgError, Seq: 5, Payload: native.AppendUint32(nil, uint32(errnoAck(syscall.EBUSY)))}
	if done, err := c.collect(nack.encode(), 0x1c, &replies); !done || !errors.Is(err, syscall.EBUSY) {
		t.Errorf("error ack: done %v, %v", done, err)
	}
}

func TestKernelError(t *testing.T) {
	if kernelError("x", 0, nil) != nil {
		t.Error("nil became an error")
	}
	if err := kernelError("x", 0, syscall.EBUSY); !errors.Is(err, ErrDeviceBusy) || !errors.Is(err, syscall.EBUSY) {
		t.Errorf("EBUSY: %v", err)
	}
	if err := kernelError("x", 0, syscall.EINVAL); !errors.Is(err, ErrKernel) || !errors.Is(err, syscall.EINVAL) {
		t.Errorf("EINVAL: %v", err)
	}
}

// errnoAck is the error field of an NLMSG_ERROR for errno e.
func errnoAck(e syscall.Errno) int32 { return -int32(e) }
