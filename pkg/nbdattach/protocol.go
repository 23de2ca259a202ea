package nbdattach

import (
	"encoding/binary"
	"fmt"
	"strings"
)

// Wire constants of the NBD protocol, named after doc/proto.md of
// NetworkBlockDevice/nbd. All integers travel big-endian.

// Magic numbers.
const (
	nbdMagic         uint64 = 0x4e42444d41474943 // "NBDMAGIC", first word of every handshake
	optionMagic      uint64 = 0x49484156454f5054 // "IHAVEOPT", greeting and every option
	optionReplyMagic uint64 = 0x0003e889045565a9 // every fixed-newstyle option reply
	requestMagic     uint32 = 0x25609513         // every transmission request
	simpleReplyMagic uint32 = 0x67446698         // every simple reply
)

// Handshake flags sent by the server in the greeting.
const (
	handshakeFixedNewstyle uint16 = 1 << 0
	handshakeNoZeroes      uint16 = 1 << 1
)

// Client flags sent in answer to the greeting. Any other bit is a reason to
// hang up (the spec says MUST).
const (
	clientFixedNewstyle uint32 = 1 << 0
	clientNoZeroes      uint32 = 1 << 1
	clientKnownFlags           = clientFixedNewstyle | clientNoZeroes
)

// optionType is NBD_OPT_*.
type optionType uint32

const (
	optExportName      optionType = 1
	optAbort           optionType = 2
	optList            optionType = 3
	optStartTLS        optionType = 5
	optInfo            optionType = 6
	optGo              optionType = 7
	optStructuredReply optionType = 8
	optListMetaContext optionType = 9
	optSetMetaContext  optionType = 10
	optExtendedHeaders optionType = 11
)

func (o optionType) String() string {
	names := map[optionType]string{
		optExportName: "EXPORT_NAME", optAbort: "ABORT", optList: "LIST",
		optStartTLS: "STARTTLS", optInfo: "INFO", optGo: "GO",
		optStructuredReply: "STRUCTURED_REPLY", optListMetaContext: "LIST_META_CONTEXT",
		optSetMetaContext: "SET_META_CONTEXT", optExtendedHeaders: "EXTENDED_HEADERS",
	}
	if n, ok := names[o]; ok {
		return "NBD_OPT_" + n
	}
	return fmt.Sprintf("NBD_OPT(%d)", uint32(o))
}

// replyType is NBD_REP_*; error replies have bit 31 set.
type replyType uint32

const (
	repAck    replyType = 1
	repServer replyType = 2
	repInfo   replyType = 3

	repErrUnsup   replyType = 1<<31 + 1
	repErrInvalid replyType = 1<<31 + 3
	repErrUnknown replyType = 1<<31 + 6
	repErrTooBig  replyType = 1<<31 + 9
)

func (r replyType) isError() bool { return r&(1<<31) != 0 }

// infoType is NBD_INFO_*, carried in NBD_REP_INFO replies.
type infoType uint16

const (
	infoExport      infoType = 0
	infoName        infoType = 1
	infoDescription infoType = 2
	infoBlockSize   infoType = 3
)

// TransmissionFlags are the per-export NBD_FLAG_* bits a server announces at
// the end of the handshake. The kernel takes the same bits (NBD_SET_FLAGS
// ioctl, NBD_ATTR_SERVER_FLAGS netlink attribute).
type TransmissionFlags uint16

// Transmission flags, bit for bit as in the protocol.
const (
	FlagHasFlags        TransmissionFlags = 1 << 0
	FlagReadOnly        TransmissionFlags = 1 << 1
	FlagSendFlush       TransmissionFlags = 1 << 2
	FlagSendFUA         TransmissionFlags = 1 << 3
	FlagRotational      TransmissionFlags = 1 << 4
	FlagSendTrim        TransmissionFlags = 1 << 5
	FlagSendWriteZeroes TransmissionFlags = 1 << 6
	FlagSendDF          TransmissionFlags = 1 << 7
	FlagCanMultiConn    TransmissionFlags = 1 << 8
	FlagSendResize      TransmissionFlags = 1 << 9
	FlagSendCache       TransmissionFlags = 1 << 10
	FlagSendFastZero    TransmissionFlags = 1 << 11
)

var flagNames = []string{
	"HAS_FLAGS", "READ_ONLY", "SEND_FLUSH", "SEND_FUA", "ROTATIONAL", "SEND_TRIM",
	"SEND_WRITE_ZEROES", "SEND_DF", "CAN_MULTI_CONN", "SEND_RESIZE", "SEND_CACHE",
	"SEND_FAST_ZERO",
}

// String lists the set flags, e.g. "HAS_FLAGS|SEND_FLUSH".
func (f TransmissionFlags) String() string {
	var parts []string
	for i := range 16 {
		if f&(1<<i) == 0 {
			continue
		}
		if i < len(flagNames) {
			parts = append(parts, flagNames[i])
		} else {
			parts = append(parts, fmt.Sprintf("bit%d", i))
		}
	}
	if len(parts) == 0 {
		return "0"
	}
	return strings.Join(parts, "|")
}

// command is NBD_CMD_*.
type command uint16

const (
	cmdRead        command = 0
	cmdWrite       command = 1
	cmdDisc        command = 2
	cmdFlush       command = 3
	cmdTrim        command = 4
	cmdCache       command = 5
	cmdWriteZeroes command = 6
	cmdBlockStatus command = 7
)

func (c command) String() string {
	names := [...]string{"READ", "WRITE", "DISC", "FLUSH", "TRIM", "CACHE", "WRITE_ZEROES", "BLOCK_STATUS"}
	if int(c) < len(names) {
		return "NBD_CMD_" + names[c]
	}
	return fmt.Sprintf("NBD_CMD(%d)", uint16(c))
}

// commandFlags is NBD_CMD_FLAG_*.
type commandFlags uint16

const (
	cmdFlagFUA      commandFlags = 1 << 0
	cmdFlagNoHole   commandFlags = 1 << 1
	cmdFlagDF       commandFlags = 1 << 2
	cmdFlagReqOne   commandFlags = 1 << 3
	cmdFlagFastZero commandFlags = 1 << 4
)

// errno is the error field of a reply. The protocol fixes these values; they
// are not the host's errno numbers (even if they agree on Linux).
type errno uint32

const (
	errnoOK       errno = 0
	errnoPerm     errno = 1   // NBD_EPERM
	errnoIO       errno = 5   // NBD_EIO
	errnoNoMem    errno = 12  // NBD_ENOMEM
	errnoInval    errno = 22  // NBD_EINVAL
	errnoNoSpc    errno = 28  // NBD_ENOSPC
	errnoOverflow errno = 75  // NBD_EOVERFLOW
	errnoNotSup   errno = 95  // NBD_ENOTSUP
	errnoShutdown errno = 108 // NBD_ESHUTDOWN
)

func (e errno) String() string {
	names := map[errno]string{
		errnoOK: "OK", errnoPerm: "EPERM", errnoIO: "EIO", errnoNoMem: "ENOMEM",
		errnoInval: "EINVAL", errnoNoSpc: "ENOSPC", errnoOverflow: "EOVERFLOW",
		errnoNotSup: "ENOTSUP", errnoShutdown: "ESHUTDOWN",
	}
	if n, ok := names[e]; ok {
		return n
	}
	return fmt.Sprintf("errno(%d)", uint32(e))
}

// Sizes on the wire and limits.
const (
	greetingSize          = 18  // NBDMAGIC, IHAVEOPT, handshake flags
	optionHeaderSize      = 16  // IHAVEOPT, option, length
	optionReplyHeaderSize = 20  // magic, option, reply type, length
	exportNameReplyZeroes = 124 // padding after an NBD_OPT_EXPORT_NAME reply
	requestHeaderSize     = 28
	simpleReplySize       = 16

	// maxStringLength is the protocol's limit for names and messages.
	maxStringLength = 4096
	// maxOptionLength bounds the data of one option. The largest option we
	// understand is NBD_OPT_GO: 4 + name (<= 4096) + 2 + 2 per info request.
	// Anything bigger is refused (NBD_REP_ERR_TOO_BIG) and the connection
	// dropped, rather than read into memory or skipped byte by byte.
	maxOptionLength = 16 << 10

	// MaxBlockSize is the largest READ or WRITE payload served (the
	// maximum block size advertised in NBD_INFO_BLOCK_SIZE): 32 MiB, the
	// size every client is told to expect to work.
	MaxBlockSize = 32 << 20
	// PreferredBlockSize is advertised in NBD_INFO_BLOCK_SIZE.
	PreferredBlockSize = 4096
)

// optionHeader starts every option the client sends.
type optionHeader struct {
	Magic  uint64
	Option optionType
	Length uint32
}

func (h *optionHeader) decode(b []byte) {
	h.Magic = binary.BigEndian.Uint64(b[0:])
	h.Option = optionType(binary.BigEndian.Uint32(b[8:]))
	h.Length = binary.BigEndian.Uint32(b[12:])
}

func (h optionHeader) encode(b []byte) {
	binary.BigEndian.PutUint64(b[0:], h.Magic)
	binary.BigEndian.PutUint32(b[8:], uint32(h.Option))
	binary.BigEndian.PutUint32(b[12:], h.Length)
}

// optionReplyHeader starts every fixed-newstyle option reply; Length bytes of
// data follow it.
type optionReplyHeader struct {
	Magic  uint64
	Option optionType
	Type   replyType
	Length uint32
}

func (h *optionReplyHeader) decode(b []byte) {
	h.Magic = binary.BigEndian.Uint64(b[0:])
	h.Option = optionType(binary.BigEndian.Uint32(b[8:]))
	h.Type = replyType(binary.BigEndian.Uint32(b[12:]))
	h.Length = binary.BigEndian.Uint32(b[16:])
}

func (h optionReplyHeader) encode(b []byte) {
	binary.BigEndian.PutUint64(b[0:], h.Magic)
	binary.BigEndian.PutUint32(b[8:], uint32(h.Option))
	binary.BigEndian.PutUint32(b[12:], uint32(h.Type))
	binary.BigEndian.PutUint32(b[16:], h.Length)
}

// requestHeader is a transmission request; a WRITE is followed by Length
// bytes of payload, no other command carries one.
type requestHeader struct {
	Magic  uint32
	Flags  commandFlags
	Type   command
	Handle uint64 // the "cookie" in newer revisions of the spec
	Offset uint64
	Length uint32
}

func (h *requestHeader) decode(b []byte) {
	h.Magic = binary.BigEndian.Uint32(b[0:])
	h.Flags = commandFlags(binary.BigEndian.Uint16(b[4:]))
	h.Type = command(binary.BigEndian.Uint16(b[6:]))
	h.Handle = binary.BigEndian.Uint64(b[8:])
	h.Offset = binary.BigEndian.Uint64(b[16:])
	h.Length = binary.BigEndian.Uint32(b[24:])
}

func (h requestHeader) encode(b []byte) {
	binary.BigEndian.PutUint32(b[0:], h.Magic)
	binary.BigEndian.PutUint16(b[4:], uint16(h.Flags))
	binary.BigEndian.PutUint16(b[6:], uint16(h.Type))
	binary.BigEndian.PutUint64(b[8:], h.Handle)
	binary.BigEndian.PutUint64(b[16:], h.Offset)
	binary.BigEndian.PutUint32(b[24:], h.Length)
}

// simpleReply answers one request; a successful READ reply is followed by
// the data.
type simpleReply struct {
	Magic  uint32
	Error  errno
	Handle uint64
}

func (r *simpleReply) decode(b []byte) {
	r.Magic = binary.BigEndian.Uint32(b[0:])
	r.Error = errno(binary.BigEndian.Uint32(b[4:]))
	r.Handle = binary.BigEndian.Uint64(b[8:])
}

func (r simpleReply) encode(b []byte) {
	binary.BigEndian.PutUint32(b[0:], r.Magic)
	binary.BigEndian.PutUint32(b[4:], uint32(r.Error))
	binary.BigEndian.PutUint64(b[8:], r.Handle)
}
