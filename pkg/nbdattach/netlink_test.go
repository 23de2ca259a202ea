package nbdattach

import (
	"bytes"
	"errors"
	"slices"
	"testing"
	"time"
)

func littleEndian() bool { return native.Uint16([]byte{1, 0}) == 1 }

func TestAttrsRoundTrip(t *testing.T) {
	var a attrBuilder
	a.u8(1, 0xfe)
	a.u16(2, 0xbeef)
	a.u32(3, 0xdeadbeef)
	a.u64(4, 1<<40+3)
	a.str(5, "nbd")
	a.nested(6, func(n *attrBuilder) { n.u32(1, 7) })
	if len(a.b)%4 != 0 {
		t.Fatalf("encoding is %d bytes, not 4-aligned", len(a.b))
	}
	as, err := parseAttrs(a.b)
	if err != nil {
		t.Fatal(err)
	}
	if len(as) != 6 {
		t.Fatalf("parsed %d attributes, want 6", len(as))
	}
	u8, _ := as[0].u8()
	u16, _ := as[1].u16()
	u32, _ := as[2].u32()
	u64, _ := as[3].u64()
	if u8 != 0xfe || u16 != 0xbeef || u32 != 0xdeadbeef || u64 != 1<<40+3 || as[4].str() != "nbd" {
		t.Errorf("values %#x %#x %#x %#x %q", u8, u16, u32, u64, as[4].str())
	}
	if as[5].Type != 6 {
		t.Errorf("nested attribute type %#x: flag bits not masked", as[5].Type)
	}
	inner, err := parseAttrs(as[5].Data)
	if v, _ := inner[0].u32(); err != nil || len(inner) != 1 || v != 7 {
		t.Errorf("nested: %v %v", inner, err)
	}
	if _, err := as[0].u64(); !errors.Is(err, ErrNetlink) {
		t.Errorf("u64 of a 1-byte attribute: %v", err)
	}
}

// TestEncodeConnect pins the bytes of an NBD_CMD_CONNECT payload, checked by
// hand against nbd-netlink.h and struct nlattr.
func TestEncodeConnect(t *testing.T) {
	if !littleEndian() {
		t.Skip("golden bytes are little-endian")
	}
	got := encodeDeviceConfig(deviceConfig{
		Index: 3, Size: 1 << 30, BlockSize: 4096, Timeout: 1500 * time.Millisecond,
		DeadConnTimeout: time.Minute, ServerFlags: FlagHasFlags | FlagSendFlush | FlagCanMultiConn,
		Identifier: "pv", SocketFDs: []int{5, 6},
	}, true)
	want := []byte{
		8, 0, 1, 0, 3, 0, 0, 0, // INDEX u32 3
		12, 0, 2, 0, 0, 0, 0, 0x40, 0, 0, 0, 0, // SIZE_BYTES 1 GiB
		12, 0, 3, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, // BLOCK_SIZE_BYTES 4096
		12, 0, 4, 0, 2, 0, 0, 0, 0, 0, 0, 0, // TIMEOUT 2 s (rounded up)
		12, 0, 8, 0, 60, 0, 0, 0, 0, 0, 0, 0, // DEAD_CONN_TIMEOUT 60 s
		12, 0, 5, 0, 0x05, 0x01, 0, 0, 0, 0, 0, 0, // SERVER_FLAGS
		7, 0, 10, 0, 'p', 'v', 0, 0, // BACKEND_IDENTIFIER "pv\0", padded
		28, 0, 7, 0x80, // SOCKETS, nested
		12, 0, 1, 0x80, 8, 0, 1, 0, 5, 0, 0, 0, // SOCK_ITEM{SOCK_FD 5}
		12, 0, 1, 0x80, 8, 0, 1, 0, 6, 0, 0, 0, // SOCK_ITEM{SOCK_FD 6}
	}
	if !bytes.Equal(got, want) {
		t.Errorf("connect attributes\n got %v\nwant %v", got, want)
	}
	// RECONFIGURE leaves out what is unset and never sends server flags.
	if got := encodeDeviceConfig(deviceConfig{Index: 0, Size: 4096}, false); len(got) != 8+12 {
		t.Errorf("resize attributes are %d bytes: %v", len(got), got)
	}
	// A dead-connection timeout of 0 is sent only when asked for.
	want = []byte{8, 0, 1, 0, 3, 0, 0, 0, 12, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	if got := encodeDeviceConfig(deviceConfig{Index: 3, NoDeadConnTimeout: true}, false); !bytes.Equal(got, want) {
		t.Errorf("no dead-connection timeout\n got %v\nwant %v", got, want)
	}
	if got := encodeIndex(AnyIndex); len(got) != 0 {
		t.Errorf("encodeIndex(AnyIndex) = %v", got)
	}
}

func TestMessagesRoundTrip(t *testing.T) {
	g := genlMessage{Cmd: nbdCmdStatus, Version: nbdGenlVersion, Attrs: encodeIndex(2)}
	m1 := message{Type: 0x1c, Flags: nlmFRequest | nlmFAck, Seq: 9, PortID: 4, Payload: g.encode()}
	m2 := message{Type: nlmsgError, Seq: 9, Payload: native.AppendUint32(nil, uint32(0xfffffff0))} // -EBUSY
	msgs, err := parseMessages(append(m1.encode(), m2.encode()...))
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 2 || msgs[0].Type != 0x1c || msgs[0].Flags != 5 || msgs[0].Seq != 9 || msgs[0].PortID != 4 {
		t.Fatalf("parsed %+v", msgs)
	}
	back, err := parseGenl(msgs[0].Payload)
	if err != nil || back.Cmd != nbdCmdStatus || back.Version != 1 || !bytes.Equal(back.Attrs, g.Attrs) {
		t.Errorf("genl %+v %v", back, err)
	}
	if code, err := parseAck(msgs[1].Payload); err != nil || code != -16 {
		t.Errorf("ack %d %v", code, err)
	}
}

func statusReply(devs ...DeviceStatus) []byte {
	var a attrBuilder
	a.nested(nbdAttrDeviceList, func(l *attrBuilder) {
		for _, d := range devs {
			l.nested(nbdDeviceItem, func(i *attrBuilder) {
				i.u32(nbdDeviceIndex, uint32(d.Index))
				var c uint8
				if d.Connected {
					c = 1
				}
				i.u8(nbdDeviceConnected, c)
			})
		}
	})
	return a.b
}

func TestParseReplies(t *testing.T) {
	want := []DeviceStatus{{0, true}, {1, false}, {15, true}}
	got, err := parseStatusReply(statusReply(want...))
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("status %v %v, want %v", got, err, want)
	}
	if idx, err := parseConnectReply(encodeIndex(12)); err != nil || idx != 12 {
		t.Errorf("connect reply %d %v", idx, err)
	}
	if _, err := parseConnectReply(nil); !errors.Is(err, ErrNetlink) {
		t.Errorf("connect reply without index: %v", err)
	}
	var noIndex attrBuilder
	noIndex.nested(nbdAttrDeviceList, func(l *attrBuilder) {
		l.nested(nbdDeviceItem, func(i *attrBuilder) { i.u8(nbdDeviceConnected, 1) })
	})
	if _, err := parseStatusReply(noIndex.b); !errors.Is(err, ErrNetlink) {
		t.Errorf("device item without index: %v", err)
	}
}

func TestParseMalformed(t *testing.T) {
	tests := map[string]func([]byte) error{
		"attrs":    func(b []byte) error { _, err := parseAttrs(b); return err },
		"messages": func(b []byte) error { _, err := parseMessages(b); return err },
	}
	inputs := map[string][]byte{
		"short header":       {4, 0},
		"length below hdr":   {2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
		"length beyond data": {200, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
	}
	for pname, parse := range tests {
		for iname, in := range inputs {
			if err := parse(in); !errors.Is(err, ErrNetlink) {
				t.Errorf("%s of %s: %v, want ErrNetlink", pname, iname, err)
			}
		}
	}
	if _, err := parseGenl([]byte{1}); !errors.Is(err, ErrNetlink) {
		t.Errorf("parseGenl of 1 byte: %v", err)
	}
	if _, err := parseAck([]byte{1}); !errors.Is(err, ErrNetlink) {
		t.Errorf("parseAck of 1 byte: %v", err)
	}
	if _, err := parseMessages(make([]byte, maxNetlinkMessageSize+1)); !errors.Is(err, ErrNetlink) {
		t.Errorf("oversized datagram: %v", err)
	}
}

// FuzzParseAttrs feeds arbitrary bytes to every netlink decoder: none may
// panic, and whatever parseAttrs accepts must survive re-encoding.
func FuzzParseAttrs(f *testing.F) {
	f.Add(statusReply(DeviceStatus{0, true}, DeviceStatus{1, false}))
	f.Add(encodeDeviceConfig(deviceConfig{Index: 1, Size: 4096, BlockSize: 512, SocketFDs: []int{3}}, true))
	f.Add([]byte{5, 0, 1, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		parseStatusReply(b)
		parseConnectReply(b)
		parseMessages(b)
		as, err := parseAttrs(b)
		if err != nil {
			return
		}
		var a attrBuilder
		for _, at := range as {
			parseAttrs(at.Data) // as if nested
			at.u8()
			at.u16()
			at.u32()
			at.u64()
			_ = at.str()
			a.put(at.Type, at.Data)
		}
		again, err := parseAttrs(a.b)
		if err != nil || len(again) != len(as) {
			t.Fatalf("re-encoded attributes do not parse: %v (%d vs %d)", err, len(again), len(as))
		}
		for i := range as {
			if again[i].Type != as[i].Type || !bytes.Equal(again[i].Data, as[i].Data) {
				t.Fatalf("attribute %d changed in a round trip", i)
			}
		}
	})
}
