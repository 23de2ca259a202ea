package nbdattach

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Netlink framing (include/uapi/linux/netlink.h, genetlink.h): just enough
// to talk to the generic netlink family "nbd". This file is pure encoding
// and decoding, so it builds and is fuzzed on every platform; the socket is
// in netlink_linux.go. Netlink headers and attribute values are in host
// byte order.

// ErrNetlink is wrapped by every error about a malformed netlink message.
var ErrNetlink = errors.New("nbdattach: malformed netlink message")

const (
	nlmsgHeaderLen = 16 // struct nlmsghdr
	genlHeaderLen  = 4  // struct genlmsghdr
	nlaHeaderLen   = 4  // struct nlattr
	nlaAlign       = 4

	nlmsgError = 2 // NLMSG_ERROR: an error or, with error 0, an ack
	nlmsgDone  = 3 // NLMSG_DONE: end of a multipart dump

	nlmFRequest = 0x1
	nlmFAck     = 0x4

	nlaFNested       = 1 << 15
	nlaFNetByteOrder = 1 << 14
	nlaTypeMask      = ^uint16(nlaFNested | nlaFNetByteOrder)

	// Generic netlink controller (linux/genetlink.h).
	genlIDCtrl            = 0x10
	ctrlCmdGetFamily      = 3
	ctrlAttrFamilyID      = 1
	ctrlAttrFamilyName    = 2
	ctrlVersion           = 1
	maxNetlinkMessageSize = 1 << 20 // bound on what parseMessages accepts
)

var native = binary.NativeEndian

func nlaAlignLen(n int) int { return (n + nlaAlign - 1) &^ (nlaAlign - 1) }

// attrBuilder appends netlink attributes to a buffer.
type attrBuilder struct{ b []byte }

func (a *attrBuilder) put(typ uint16, data []byte) {
	l := nlaHeaderLen + len(data)
	a.b = native.AppendUint16(a.b, uint16(l))
	a.b = native.AppendUint16(a.b, typ)
	a.b = append(a.b, data...)
	a.b = append(a.b, make([]byte, nlaAlignLen(l)-l)...)
}

func (a *attrBuilder) u8(typ uint16, v uint8)   { a.put(typ, []byte{v}) }
func (a *attrBuilder) u16(typ uint16, v uint16) { a.put(typ, native.AppendUint16(nil, v)) }
func (a *attrBuilder) u32(typ uint16, v uint32) { a.put(typ, native.AppendUint32(nil, v)) }
func (a *attrBuilder) u64(typ uint16, v uint64) { a.put(typ, native.AppendUint64(nil, v)) }

// str appends a NUL-terminated string (NLA_STRING / NLA_NUL_STRING).
func (a *attrBuilder) str(typ uint16, s string) { a.put(typ, append([]byte(s), 0)) }

// nested appends an attribute whose payload is the attributes fill adds.
func (a *attrBuilder) nested(typ uint16, fill func(*attrBuilder)) {
	var inner attrBuilder
	fill(&inner)
	a.put(typ|nlaFNested, inner.b)
}

// attr is one decoded attribute. Type has the NLA_F_* flag bits removed.
type attr struct {
	Type uint16
	Data []byte
}

// parseAttrs splits b into attributes. It never panics, whatever b holds.
func parseAttrs(b []byte) ([]attr, error) {
	var attrs []attr
	for len(b) > 0 {
		if len(b) < nlaHeaderLen {
			return nil, fmt.Errorf("%d trailing bytes: %w", len(b), ErrNetlink)
		}
		l := int(native.Uint16(b))
		if l < nlaHeaderLen || l > len(b) {
			return nil, fmt.Errorf("attribute length %d with %d bytes left: %w", l, len(b), ErrNetlink)
		}
		attrs = append(attrs, attr{Type: native.Uint16(b[2:]) & nlaTypeMask, Data: b[nlaHeaderLen:l]})
		b = b[min(nlaAlignLen(l), len(b)):]
	}
	return attrs, nil
}

func (a attr) u8() (uint8, error) {
	if len(a.Data) < 1 {
		return 0, a.short(1)
	}
	return a.Data[0], nil
}

func (a attr) u16() (uint16, error) {
	if len(a.Data) < 2 {
		return 0, a.short(2)
	}
	return native.Uint16(a.Data), nil
}

func (a attr) u32() (uint32, error) {
	if len(a.Data) < 4 {
		return 0, a.short(4)
	}
	return native.Uint32(a.Data), nil
}

func (a attr) u64() (uint64, error) {
	if len(a.Data) < 8 {
		return 0, a.short(8)
	}
	return native.Uint64(a.Data), nil
}

// str returns the attribute as a string without its NUL terminator.
func (a attr) str() string {
	s := a.Data
	for i, c := range s {
		if c == 0 {
			s = s[:i]
			break
		}
	}
	return string(s)
}

func (a attr) short(want int) error {
	return fmt.Errorf("attribute %d has %d bytes, want %d: %w", a.Type, len(a.Data), want, ErrNetlink)
}

// message is one netlink message.
type message struct {
	Type    uint16
	Flags   uint16
	Seq     uint32
	PortID  uint32
	Payload []byte
}

// encode returns m with its nlmsghdr, length filled in.
func (m message) encode() []byte {
	b := make([]byte, 0, nlmsgHeaderLen+len(m.Payload))
	b = native.AppendUint32(b, uint32(nlmsgHeaderLen+len(m.Payload)))
	b = native.AppendUint16(b, m.Type)
	b = native.AppendUint16(b, m.Flags)
	b = native.AppendUint32(b, m.Seq)
	b = native.AppendUint32(b, m.PortID)
	return append(b, m.Payload...)
}

// parseMessages splits a datagram into netlink messages.
func parseMessages(b []byte) ([]message, error) {
	if len(b) > maxNetlinkMessageSize {
		return nil, fmt.Errorf("%d-byte datagram: %w", len(b), ErrNetlink)
	}
	var msgs []message
	for len(b) > 0 {
		if len(b) < nlmsgHeaderLen {
			return nil, fmt.Errorf("%d trailing bytes: %w", len(b), ErrNetlink)
		}
		l := native.Uint32(b)
		if l < nlmsgHeaderLen || uint64(l) > uint64(len(b)) {
			return nil, fmt.Errorf("message length %d with %d bytes left: %w", l, len(b), ErrNetlink)
		}
		msgs = append(msgs, message{
			Type:    native.Uint16(b[4:]),
			Flags:   native.Uint16(b[6:]),
			Seq:     native.Uint32(b[8:]),
			PortID:  native.Uint32(b[12:]),
			Payload: b[nlmsgHeaderLen:l],
		})
		b = b[min(nlaAlignLen(int(l)), len(b)):]
	}
	return msgs, nil
}

// genlMessage is a generic netlink payload: a command and its attributes.
type genlMessage struct {
	Cmd     uint8
	Version uint8
	Attrs   []byte
}

func (g genlMessage) encode() []byte {
	b := make([]byte, genlHeaderLen, genlHeaderLen+len(g.Attrs))
	b[0], b[1] = g.Cmd, g.Version
	return append(b, g.Attrs...)
}

func parseGenl(payload []byte) (genlMessage, error) {
	if len(payload) < genlHeaderLen {
		return genlMessage{}, fmt.Errorf("%d-byte generic netlink message: %w", len(payload), ErrNetlink)
	}
	return genlMessage{Cmd: payload[0], Version: payload[1], Attrs: payload[genlHeaderLen:]}, nil
}

// parseAck decodes the payload of an NLMSG_ERROR message: the (negative)
// errno, 0 for an ack.
func parseAck(payload []byte) (int32, error) {
	if len(payload) < 4 {
		return 0, fmt.Errorf("%d-byte error message: %w", len(payload), ErrNetlink)
	}
	return int32(native.Uint32(payload)), nil
}
