package nbdattach

import (
	"context"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

const allWriteFlags = FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagCanMultiConn

func TestGreetingAdvertisesFixedNewstyleAndNoZeroes(t *testing.T) {
	c, _ := serve(t, context.Background(), mustExport(t, NewMemBackend(4096), ExportOptions{}), true)
	if got := c.greet(clientFixedNewstyle); got != 0x0003 {
		t.Fatalf("handshake flags %#x, want FIXED_NEWSTYLE|NO_ZEROES (0x3)", got)
	}
}

// decodeInfo parses NBD_REP_INFO payloads by hand.
type infoSeen struct {
	size                 uint64
	flags                uint16
	minB, prefB, maxB    uint32
	name, description    string
	hasName, hasDesc, ok bool
}

func decodeInfos(t *testing.T, reps []optionReply) infoSeen {
	t.Helper()
	var s infoSeen
	for i, rep := range reps {
		if i == len(reps)-1 {
			s.ok = rep.Type == repAck
			break
		}
		if rep.Type != repInfo || len(rep.Data) < 2 {
			t.Fatalf("reply %d: type %#x len %d, want NBD_REP_INFO", i, rep.Type, len(rep.Data))
		}
		d := rep.Data
		switch binary.BigEndian.Uint16(d) {
		case 0:
			if len(d) != 12 {
				t.Fatalf("NBD_INFO_EXPORT length %d, want 12", len(d))
			}
			s.size, s.flags = binary.BigEndian.Uint64(d[2:]), binary.BigEndian.Uint16(d[10:])
		case 1:
			s.name, s.hasName = string(d[2:]), true
		case 2:
			s.description, s.hasDesc = string(d[2:]), true
		case 3:
			if len(d) != 14 {
				t.Fatalf("NBD_INFO_BLOCK_SIZE length %d, want 14", len(d))
			}
			s.minB, s.prefB, s.maxB = binary.BigEndian.Uint32(d[2:]), binary.BigEndian.Uint32(d[6:]), binary.BigEndian.Uint32(d[10:])
		}
	}
	return s
}

func TestOptInfoAndGo(t *testing.T) {
	opts := ExportOptions{Name: "vol-1", Description: "test volume"}
	for _, tc := range []struct {
		opt      optionType
		name     string
		wantOK   bool
		wantType replyType
	}{
		{optGo, "vol-1", true, repAck},
		{optGo, "", true, repAck}, // the default export
		{optInfo, "vol-1", true, repAck},
		{optGo, "vol-2", false, repErrUnknown},
		{optInfo, "vol-2", false, repErrUnknown},
	} {
		t.Run(tc.opt.String()+"/"+tc.name, func(t *testing.T) {
			c, _ := serve(t, context.Background(), mustExport(t, NewMemBackend(1<<20), opts), true)
			c.greet(clientFixedNewstyle)
			reps := c.optInfo(tc.opt, tc.name, infoName, infoDescription, infoBlockSize)
			if final := reps[len(reps)-1].Type; final != tc.wantType {
				t.Fatalf("final reply %#x, want %#x", final, tc.wantType)
			}
			if !tc.wantOK {
				if len(reps) != 1 || !strings.Contains(string(reps[0].Data), tc.name) {
					t.Fatalf("want a lone error naming the export, got %+v", reps)
				}
				// The handshake goes on: the right name works.
				if r := c.optInfo(optGo, "vol-1"); r[len(r)-1].Type != repAck {
					t.Fatalf("GO after UNKNOWN: %+v", r)
				}
				return
			}
			s := decodeInfos(t, reps)
			if s.size != 1<<20 || TransmissionFlags(s.flags) != allWriteFlags {
				t.Errorf("NBD_INFO_EXPORT size %d flags %v, want %d %v", s.size, TransmissionFlags(s.flags), 1<<20, allWriteFlags)
			}
			if s.minB != 1 || s.prefB != 4096 || s.maxB != 32<<20 {
				t.Errorf("block sizes %d/%d/%d, want 1/4096/%d", s.minB, s.prefB, s.maxB, 32<<20)
			}
			if s.name != "vol-1" || s.description != "test volume" {
				t.Errorf("name %q description %q", s.name, s.description)
			}
			if tc.opt == optInfo {
				// Still haggling: another option is answered.
				if r := c.option(optList, nil); r[len(r)-1].Type != repAck {
					t.Fatalf("LIST after INFO: %+v", r)
				}
				c.optInfo(optGo, "vol-1")
			}
			c.startReplies()
			c.writeAt([]byte("hello"), 100)
			mustEqual(t, "read back", c.readAt(100, 5), []byte("hello"))
		})
	}
}

func TestOptGoReadOnlyFlags(t *testing.T) {
	c, _ := serve(t, context.Background(), mustExport(t, NewMemBackend(4096), ExportOptions{ReadOnly: true}), true)
	c.greet(clientFixedNewstyle)
	s := decodeInfos(t, c.optInfo(optGo, ""))
	want := FlagHasFlags | FlagReadOnly | FlagSendFlush | FlagCanMultiConn
	if TransmissionFlags(s.flags) != want {
		t.Fatalf("flags %v, want %v", TransmissionFlags(s.flags), want)
	}
}

func TestOptGoNoMultiConnFlags(t *testing.T) {
	c, _ := serve(t, context.Background(), mustExport(t, NewMemBackend(4096), ExportOptions{NoMultiConn: true}), true)
	c.greet(clientFixedNewstyle)
	s := decodeInfos(t, c.optInfo(optGo, ""))
	want := FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes
	if TransmissionFlags(s.flags) != want {
		t.Fatalf("flags %v, want %v", TransmissionFlags(s.flags), want)
	}
}

func TestOptInfoMalformed(t *testing.T) {
	for name, data := range map[string][]byte{
		"empty":              nil,
		"short":              {0, 0, 0, 0, 0},
		"name past end":      {0, 0, 0, 9, 'a', 0, 0},
		"too few requests":   {0, 0, 0, 0, 0, 2, 0, 1},
		"trailing garbage":   {0, 0, 0, 0, 0, 0, 0xff},
		"huge name length":   {0xff, 0xff, 0xff, 0xff, 0, 0},
		"odd request length": {0, 0, 0, 0, 0, 1, 0, 1, 0},
	} {
		t.Run(name, func(t *testing.T) {
			c, _ := serve(t, context.Background(), mustExport(t, NewMemBackend(4096), ExportOptions{}), true)
			c.greet(clientFixedNewstyle)
			reps := c.option(optGo, data)
			if len(reps) != 1 || reps[0].Type != repErrInvalid {
				t.Fatalf("replies %+v, want one NBD_REP_ERR_INVALID", reps)
			}
			if r := c.optInfo(optGo, ""); r[len(r)-1].Type != repAck {
				t.Fatalf("GO after ERR_INVALID: %+v", r)
			}
		})
	}
}

func TestOptExportName(t *testing.T) {
	for _, noZeroes := range []bool{false, true} {
		t.Run(map[bool]string{false: "zeroes", true: "no-zeroes"}[noZeroes], func(t *testing.T) {
			c, _ := serve(t, context.Background(), mustExport(t, NewMemBackend(8192), ExportOptions{Name: "x"}), true)
			flags := clientFixedNewstyle
			if noZeroes {
				flags |= clientNoZeroes
			}
			c.greet(flags)
			c.sendOption(optExportName, []byte("x"))
			n := 10
			if !noZeroes {
				n += 124
			}
			b := make([]byte, n)
			if err := c.readFull(b); err != nil {
				t.Fatal(err)
			}
			if size, fl := binary.BigEndian.Uint64(b), TransmissionFlags(binary.BigEndian.Uint16(b[8:])); size != 8192 || fl != allWriteFlags {
				t.Fatalf("size %d flags %v", size, fl)
			}
			for i, v := range b[10:] {
				if v != 0 {
					t.Fatalf("padding byte %d is %#x", i, v)
				}
			}
			// The next bytes are transmission replies, not more padding.
			c.startReplies()
			c.writeAt([]byte{1, 2, 3}, 0)
			mustEqual(t, "read back", c.readAt(0, 3), []byte{1, 2, 3})
		})
	}
}

func TestOptExportNameUnknownHangsUp(t *testing.T) {
	c, done := serve(t, context.Background(), mustExport(t, NewMemBackend(4096), ExportOptions{Name: "x"}), true)
	c.greet(clientFixedNewstyle)
	c.sendOption(optExportName, []byte("y"))
	c.expectClosed()
	if err := waitDone(t, done); !errors.Is(err, ErrUnknownExport) {
		t.Fatalf("ServeConn: %v, want ErrUnknownExport", err)
	}
}

func TestOptList(t *testing.T) {
	c, _ := serve(t, context.Background(), mustExport(t, NewMemBackend(4096), ExportOptions{Name: "vol", Description: "desc"}), true)
	c.greet(clientFixedNewstyle)
	reps := c.option(optList, nil)
	if len(reps) != 2 || reps[0].Type != repServer || reps[1].Type != repAck {
		t.Fatalf("replies %+v, want SERVER, ACK", reps)
	}
	d := reps[0].Data
	if n := binary.BigEndian.Uint32(d); n != 3 || string(d[4:4+n]) != "vol" || string(d[4+n:]) != "desc" {
		t.Fatalf("NBD_REP_SERVER data %q", d)
	}
	if reps := c.option(optList, []byte{1}); len(reps) != 1 || reps[0].Type != repErrInvalid {
		t.Fatalf("LIST with data: %+v, want ERR_INVALID", reps)
	}
}

func TestOptAbort(t *testing.T) {
	c, done := serve(t, context.Background(), mustExport(t, NewMemBackend(4096), ExportOptions{}), true)
	c.greet(clientFixedNewstyle)
	if reps := c.option(optAbort, nil); reps[0].Type != repAck {
		t.Fatalf("ABORT: %+v", reps)
	}
	c.expectClosed()
	if err := waitDone(t, done); err != nil {
		t.Fatalf("ServeConn after ABORT: %v", err)
	}
}

func TestUnsupportedOptions(t *testing.T) {
	c, _ := serve(t, context.Background(), mustExport(t, NewMemBackend(4096), ExportOptions{}), true)
	c.greet(clientFixedNewstyle)
	for _, tc := range []struct {
		opt  optionType
		data []byte
	}{
		{optStartTLS, nil},
		{optStructuredReply, nil},
		{optListMetaContext, infoRequest("", 0)},
		{optSetMetaContext, []byte("0000base:allocation")},
		{optExtendedHeaders, nil},
		{4, nil}, // PEEK_EXPORT, withdrawn
		{0, nil},
		{0x7fffffff, make([]byte, 1000)},
	} {
		reps := c.option(tc.opt, tc.data)
		if len(reps) != 1 || reps[0].Type != repErrUnsup {
			t.Fatalf("%v: %+v, want NBD_REP_ERR_UNSUP", tc.opt, reps)
		}
	}
	if r := c.optInfo(optGo, ""); r[len(r)-1].Type != repAck {
		t.Fatalf("GO after unsupported options: %+v", r)
	}
}

func TestHandshakeMalformed(t *testing.T) {
	optHeader := func(magic string, opt optionType, length uint32) []byte {
		b := append([]byte(magic), 0, 0, 0, 0, 0, 0, 0, 0)
		binary.BigEndian.PutUint32(b[8:], uint32(opt))
		binary.BigEndian.PutUint32(b[12:], length)
		return b
	}
	for _, tc := range []struct {
		name        string
		clientFlags uint32
		send        []byte
		wantReply   replyType // 0: none expected
		wantErr     error     // nil: just some error
	}{
		{"unknown client flags", 0x4, nil, 0, ErrProtocol},
		{"bad option magic", 1, optHeader("IHAVEOPX", optGo, 0), 0, ErrProtocol},
		{"huge option", 1, optHeader("IHAVEOPT", optGo, 1<<31), repErrTooBig, ErrProtocol},
		{"huge unknown option", 1, optHeader("IHAVEOPT", 99, 0xffffffff), repErrTooBig, ErrProtocol},
		{"huge export name", 1, optHeader("IHAVEOPT", optExportName, 1<<20), 0, ErrProtocol},
		{"truncated option data", 1, optHeader("IHAVEOPT", optGo, 100)[:], 0, nil},
		{"truncated option header", 1, []byte("IHAVE"), 0, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, done := serve(t, context.Background(), mustExport(t, NewMemBackend(4096), ExportOptions{}), true)
			c.greet(tc.clientFlags)
			c.write(tc.send)
			if tc.wantErr == nil {
				c.conn.(interface{ CloseWrite() error }).CloseWrite()
			}
			if tc.wantReply != 0 {
				rep, err := c.readOptionReply()
				if err != nil || rep.Type != tc.wantReply {
					t.Fatalf("reply %+v %v, want type %#x", rep, err, tc.wantReply)
				}
			}
			c.expectClosed()
			err := waitDone(t, done)
			if err == nil || (tc.wantErr != nil && !errors.Is(err, tc.wantErr)) {
				t.Fatalf("ServeConn: %v, want %v", err, tc.wantErr)
			}
		})
	}
}

func TestHandshakeClientHangsUpAfterGreeting(t *testing.T) {
	c, done := serve(t, context.Background(), mustExport(t, NewMemBackend(4096), ExportOptions{}), true)
	var g [18]byte
	if err := c.readFull(g[:]); err != nil {
		t.Fatal(err)
	}
	c.conn.Close()
	if err := waitDone(t, done); err != nil {
		t.Fatalf("ServeConn: %v, want nil", err)
	}
}

func TestHandshakeClientHangsUpBetweenOptions(t *testing.T) {
	c, done := serve(t, context.Background(), mustExport(t, NewMemBackend(4096), ExportOptions{}), true)
	c.greet(clientFixedNewstyle)
	c.option(optList, nil)
	c.conn.Close()
	if err := waitDone(t, done); err != nil {
		t.Fatalf("ServeConn: %v, want nil", err)
	}
}

func TestMinBlockSize(t *testing.T) {
	e := mustExport(t, NewMemBackend(1<<20), ExportOptions{MinBlockSize: 512})
	c, _ := serve(t, context.Background(), e, true)
	c.greet(clientFixedNewstyle)
	s := decodeInfos(t, c.optInfo(optGo, "", infoBlockSize))
	if s.minB != 512 || s.prefB != 4096 || s.maxB != 32<<20 {
		t.Fatalf("block sizes %d/%d/%d", s.minB, s.prefB, s.maxB)
	}
	c.startReplies()
	for _, r := range []request{
		{Type: cmdRead, Offset: 1, Length: 512},
		{Type: cmdRead, Offset: 0, Length: 100},
		{Type: cmdWrite, Offset: 512, Length: 1, Payload: []byte{1}},
		{Type: cmdTrim, Offset: 0, Length: 513},
	} {
		if rep := c.do(r); rep.Err != errnoInval {
			t.Errorf("misaligned %v %d+%d: %v, want EINVAL", r.Type, r.Offset, r.Length, rep.Err)
		}
	}
	c.writeAt(make([]byte, 1024), 512)
}

func TestExportOptionsValidate(t *testing.T) {
	for _, tc := range []struct {
		opts ExportOptions
		ok   bool
	}{
		{ExportOptions{}, true},
		{ExportOptions{Name: strings.Repeat("n", 4096), MinBlockSize: 65536, MaxInFlight: 1}, true},
		{ExportOptions{Name: strings.Repeat("n", 4097)}, false},
		{ExportOptions{Description: strings.Repeat("d", 4097)}, false},
		{ExportOptions{MaxInFlight: -1}, false},
		{ExportOptions{MinBlockSize: 3}, false},
		{ExportOptions{MinBlockSize: 1 << 17}, false},
	} {
		_, err := NewExport(NewMemBackend(1), tc.opts)
		if (err == nil) != tc.ok || (err != nil && !errors.Is(err, ErrInvalidOptions)) {
			t.Errorf("NewExport(%+.40v): %v, want ok=%v", tc.opts, err, tc.ok)
		}
	}
	if _, err := NewExport(nil, ExportOptions{}); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("nil backend: %v", err)
	}
}
