package nbdattach

import (
	"bytes"
	"encoding/binary"
	"testing"

	gonbd "github.com/pojntfx/go-nbd/pkg/protocol"
)

// go-nbd's protocol package is an independent transcription of the spec:
// where it overlaps with ours, the numbers and the header layouts (which it
// writes with encoding/binary from structs) must agree.
func TestConstantsAgreeWithGoNBD(t *testing.T) {
	for _, c := range []struct {
		name      string
		ours, its uint64
	}{
		{"NBDMAGIC", nbdMagic, gonbd.NEGOTIATION_MAGIC_OLDSTYLE},
		{"IHAVEOPT", optionMagic, gonbd.NEGOTIATION_MAGIC_OPTION},
		{"option reply magic", optionReplyMagic, gonbd.NEGOTIATION_MAGIC_REPLY},
		{"request magic", uint64(requestMagic), uint64(gonbd.TRANSMISSION_MAGIC_REQUEST)},
		{"reply magic", uint64(simpleReplyMagic), uint64(gonbd.TRANSMISSION_MAGIC_REPLY)},
		{"FIXED_NEWSTYLE", uint64(handshakeFixedNewstyle), uint64(gonbd.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE)},
		{"OPT_ABORT", uint64(optAbort), uint64(gonbd.NEGOTIATION_ID_OPTION_ABORT)},
		{"OPT_LIST", uint64(optList), uint64(gonbd.NEGOTIATION_ID_OPTION_LIST)},
		{"OPT_INFO", uint64(optInfo), uint64(gonbd.NEGOTIATION_ID_OPTION_INFO)},
		{"OPT_GO", uint64(optGo), uint64(gonbd.NEGOTIATION_ID_OPTION_GO)},
		{"REP_ACK", uint64(repAck), uint64(gonbd.NEGOTIATION_TYPE_REPLY_ACK)},
		{"REP_SERVER", uint64(repServer), uint64(gonbd.NEGOTIATION_TYPE_REPLY_SERVER)},
		{"REP_INFO", uint64(repInfo), uint64(gonbd.NEGOTIATION_TYPE_REPLY_INFO)},
		{"REP_ERR_UNSUP", uint64(repErrUnsup), uint64(gonbd.NEGOTIATION_TYPE_REPLY_ERR_UNSUPPORTED)},
		{"REP_ERR_UNKNOWN", uint64(repErrUnknown), uint64(gonbd.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN)},
		{"INFO_EXPORT", uint64(infoExport), uint64(gonbd.NEGOTIATION_TYPE_INFO_EXPORT)},
		{"INFO_NAME", uint64(infoName), uint64(gonbd.NEGOTIATION_TYPE_INFO_NAME)},
		{"INFO_DESCRIPTION", uint64(infoDescription), uint64(gonbd.NEGOTIATION_TYPE_INFO_DESCRIPTION)},
		{"INFO_BLOCK_SIZE", uint64(infoBlockSize), uint64(gonbd.NEGOTIATION_TYPE_INFO_BLOCKSIZE)},
		{"FLAG_HAS_FLAGS", uint64(FlagHasFlags), uint64(gonbd.NEGOTIATION_REPLY_FLAGS_HAS_FLAGS)},
		{"FLAG_CAN_MULTI_CONN", uint64(FlagCanMultiConn), uint64(gonbd.NEGOTIATION_REPLY_FLAGS_CAN_MULTI_CONN)},
		{"CMD_READ", uint64(cmdRead), uint64(gonbd.TRANSMISSION_TYPE_REQUEST_READ)},
		{"CMD_WRITE", uint64(cmdWrite), uint64(gonbd.TRANSMISSION_TYPE_REQUEST_WRITE)},
		{"CMD_DISC", uint64(cmdDisc), uint64(gonbd.TRANSMISSION_TYPE_REQUEST_DISC)},
		{"EPERM", uint64(errnoPerm), uint64(gonbd.TRANSMISSION_ERROR_EPERM)},
		{"EINVAL", uint64(errnoInval), uint64(gonbd.TRANSMISSION_ERROR_EINVAL)},
	} {
		if c.ours != c.its {
			t.Errorf("%s: ours %#x, go-nbd %#x", c.name, c.ours, c.its)
		}
	}
}

func TestHeaderLayoutsAgreeWithGoNBD(t *testing.T) {
	var buf bytes.Buffer
	binary.Write(&buf, binary.BigEndian, gonbd.TransmissionRequestHeader{
		RequestMagic: gonbd.TRANSMISSION_MAGIC_REQUEST, CommandFlags: 0x0102, Type: 0x0304,
		Handle: 0x0506070809101112, Offset: 0x1314151617181920, Length: 0x21222324,
	})
	if buf.Len() != requestHeaderSize {
		t.Fatalf("go-nbd request header is %d bytes, ours %d", buf.Len(), requestHeaderSize)
	}
	var req requestHeader
	req.decode(buf.Bytes())
	want := requestHeader{Magic: requestMagic, Flags: 0x0102, Type: 0x0304, Handle: 0x0506070809101112, Offset: 0x1314151617181920, Length: 0x21222324}
	if req != want {
		t.Errorf("decoded %+v, want %+v", req, want)
	}

	buf.Reset()
	binary.Write(&buf, binary.BigEndian, gonbd.TransmissionReplyHeader{ReplyMagic: gonbd.TRANSMISSION_MAGIC_REPLY, Error: 22, Handle: 0xa1a2a3a4a5a6a7a8})
	ours := make([]byte, simpleReplySize)
	simpleReply{Magic: simpleReplyMagic, Error: errnoInval, Handle: 0xa1a2a3a4a5a6a7a8}.encode(ours)
	if !bytes.Equal(ours, buf.Bytes()) {
		t.Errorf("simple reply % x, go-nbd % x", ours, buf.Bytes())
	}

	buf.Reset()
	binary.Write(&buf, binary.BigEndian, gonbd.NegotiationReplyHeader{ReplyMagic: gonbd.NEGOTIATION_MAGIC_REPLY, ID: 7, Type: 3, Length: 14})
	ours = make([]byte, optionReplyHeaderSize)
	optionReplyHeader{Magic: optionReplyMagic, Option: optGo, Type: repInfo, Length: 14}.encode(ours)
	if !bytes.Equal(ours, buf.Bytes()) {
		t.Errorf("option reply % x, go-nbd % x", ours, buf.Bytes())
	}

	buf.Reset()
	binary.Write(&buf, binary.BigEndian, gonbd.NegotiationOptionHeader{OptionMagic: gonbd.NEGOTIATION_MAGIC_OPTION, ID: 6, Length: 99})
	var opt optionHeader
	opt.decode(buf.Bytes())
	if opt != (optionHeader{Magic: optionMagic, Option: optInfo, Length: 99}) {
		t.Errorf("option header %+v", opt)
	}
}

func TestHeadersRoundTrip(t *testing.T) {
	req := requestHeader{Magic: requestMagic, Flags: cmdFlagFUA | cmdFlagNoHole, Type: cmdWriteZeroes, Handle: 1<<63 | 5, Offset: 1 << 40, Length: 1<<32 - 1}
	b := make([]byte, requestHeaderSize)
	req.encode(b)
	var back requestHeader
	back.decode(b)
	if back != req {
		t.Errorf("request %+v came back as %+v", req, back)
	}
	rep := optionReplyHeader{Magic: optionReplyMagic, Option: optList, Type: repErrTooBig, Length: 7}
	b = make([]byte, optionReplyHeaderSize)
	rep.encode(b)
	var rback optionReplyHeader
	rback.decode(b)
	if rback != rep || !rback.Type.isError() {
		t.Errorf("option reply %+v came back as %+v", rep, rback)
	}
}

func TestTransmissionFlagsString(t *testing.T) {
	for f, want := range map[TransmissionFlags]string{
		0:                               "0",
		FlagHasFlags | FlagSendFlush:    "HAS_FLAGS|SEND_FLUSH",
		FlagCanMultiConn | 1<<15:        "CAN_MULTI_CONN|bit15",
		FlagReadOnly | FlagSendFastZero: "READ_ONLY|SEND_FAST_ZERO",
	} {
		if got := f.String(); got != want {
			t.Errorf("%#x.String() = %q, want %q", uint16(f), got, want)
		}
	}
}
