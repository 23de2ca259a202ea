//go:build linux

package nbdattach

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// netlinkControl drives the kernel through the generic netlink family
// "nbd". Each request opens its own netlink socket and resolves the family
// id again: that costs microseconds, needs no locking, and survives the nbd
// module being reloaded.
type netlinkControl struct{}

var _ kernelControl = netlinkControl{}

func (netlinkControl) iface() Interface { return InterfaceNetlink }

// probe checks that the family exists.
func (netlinkControl) probe() error {
	c, err := dialGenl(context.Background())
	if err != nil {
		return err
	}
	defer c.close()
	_, err = c.family(nbdGenlFamily)
	return err
}

func (netlinkControl) connect(ctx context.Context, cfg deviceConfig) (int, error) {
	replies, err := nbdRequest(ctx, nbdCmdConnect, encodeDeviceConfig(cfg, true))
	if err != nil {
		return 0, kernelError("connect", cfg.Index, err)
	}
	for _, r := range replies {
		if r.Cmd == nbdCmdConnect {
			return parseConnectReply(r.Attrs)
		}
	}
	return 0, fmt.Errorf("nbdattach: connect: no reply with the device index: %w", ErrNetlink)
}

func (netlinkControl) reconfigure(ctx context.Context, cfg deviceConfig) error {
	_, err := nbdRequest(ctx, nbdCmdReconfigure, encodeDeviceConfig(cfg, false))
	return kernelError("reconfigure", cfg.Index, err)
}

func (netlinkControl) disconnect(ctx context.Context, index int) error {
	_, err := nbdRequest(ctx, nbdCmdDisconnect, encodeIndex(index))
	return kernelError("disconnect", index, err)
}

func (netlinkControl) status(ctx context.Context, index int) ([]DeviceStatus, error) {
	replies, err := nbdRequest(ctx, nbdCmdStatus, encodeIndex(index))
	if err != nil {
		return nil, kernelError("status", index, err)
	}
	var devs []DeviceStatus
	for _, r := range replies {
		d, err := parseStatusReply(r.Attrs)
		if err != nil {
			return nil, err
		}
		devs = append(devs, d...)
	}
	return devs, nil
}

// kernelError wraps an errno from the kernel with ErrKernel, and EBUSY also
// with ErrDeviceBusy.
func kernelError(op string, index int, err error) error {
	var errno syscall.Errno
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("nbdattach: %s nbd%d: %w: %w", op, index, ErrDeviceBusy, err)
	case errors.As(err, &errno):
		return fmt.Errorf("nbdattach: %s nbd%d: %w: %w", op, index, ErrKernel, err)
	}
	return fmt.Errorf("nbdattach: %s nbd%d: %w", op, index, err)
}

// nbdRequest sends one command to the nbd family and returns its replies.
func nbdRequest(ctx context.Context, cmd uint8, attrs []byte) ([]genlMessage, error) {
	c, err := dialGenl(ctx)
	if err != nil {
		return nil, err
	}
	defer c.close()
	family, err := c.family(nbdGenlFamily)
	if err != nil {
		return nil, err
	}
	return c.request(family, genlMessage{Cmd: cmd, Version: nbdGenlVersion, Attrs: attrs})
}

// genlConn is one NETLINK_GENERIC socket.
type genlConn struct {
	fd  int
	seq uint32
}

// requestTimeout bounds one netlink round trip when ctx has no deadline.
const requestTimeout = 30 * time.Second

func dialGenl(ctx context.Context) (*genlConn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_GENERIC)
	if err != nil {
		return nil, fmt.Errorf("nbdattach: netlink socket: %w", err)
	}
	c := &genlConn{fd: fd, seq: uint32(time.Now().UnixNano())}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(requestTimeout)
	}
	tv := unix.NsecToTimeval(max(time.Until(deadline), time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		c.close()
		return nil, fmt.Errorf("nbdattach: netlink receive timeout: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		c.close()
		return nil, fmt.Errorf("nbdattach: netlink bind: %w", err)
	}
	return c, nil
}

func (c *genlConn) close() { unix.Close(c.fd) }

// family resolves a generic netlink family name to its id; a missing
// family is ErrNotSupported.
func (c *genlConn) family(name string) (uint16, error) {
	var a attrBuilder
	a.str(ctrlAttrFamilyName, name)
	replies, err := c.request(genlIDCtrl, genlMessage{Cmd: ctrlCmdGetFamily, Version: ctrlVersion, Attrs: a.b})
	if errors.Is(err, unix.ENOENT) {
		return 0, fmt.Errorf("nbdattach: generic netlink family %q: %w", name, ErrNotSupported)
	}
	if err != nil {
		return 0, fmt.Errorf("nbdattach: resolving generic netlink family %q: %w", name, err)
	}
	for _, r := range replies {
		as, err := parseAttrs(r.Attrs)
		if err != nil {
			return 0, err
		}
		for _, at := range as {
			if at.Type == ctrlAttrFamilyID {
				return at.u16()
			}
		}
	}
	return 0, fmt.Errorf("nbdattach: family %q: reply without an id: %w", name, ErrNetlink)
}

// request sends g to family with an ack requested and collects the replies
// up to the ack. An error ack is returned as its syscall.Errno.
func (c *genlConn) request(family uint16, g genlMessage) ([]genlMessage, error) {
	c.seq++
	m := message{Type: family, Flags: nlmFRequest | nlmFAck, Seq: c.seq, Payload: g.encode()}
	if err := unix.Sendto(c.fd, m.encode(), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("nbdattach: netlink send: %w", err)
	}
	var replies []genlMessage
	buf := make([]byte, 64<<10)
	for {
		n, _, err := unix.Recvfrom(c.fd, buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("nbdattach: netlink receive: %w", err)
		}
		done, err := c.collect(buf[:n], family, &replies)
		if err != nil || done {
			return replies, err
		}
	}
}

// collect adds the replies in one datagram to replies; done is true once
// the ack (or an error) for the current request has arrived.
func (c *genlConn) collect(b []byte, family uint16, replies *[]genlMessage) (done bool, err error) {
	msgs, err := parseMessages(b)
	if err != nil {
		return false, err
	}
	for _, m := range msgs {
		if m.Seq != c.seq {
			continue
		}
		switch m.Type {
		case nlmsgError:
			code, err := parseAck(m.Payload)
			if err != nil {
				return false, err
			}
			if code != 0 {
				return true, syscall.Errno(-code)
			}
			return true, nil
		case nlmsgDone:
			return true, nil
		case family:
			// The receive buffer is reused for the next datagram.
			g, err := parseGenl(bytes.Clone(m.Payload))
			if err != nil {
				return false, err
			}
			*replies = append(*replies, g)
		}
	}
	return false, nil
}
