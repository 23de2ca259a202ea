package nbdattach

import (
	"encoding/binary"
	"fmt"
	"io"
)

// handshake runs the fixed-newstyle negotiation. It returns enter=true when
// the client chose this export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) and the
// transmission phase begins, and enter=false with a nil error when the
// client aborted or hung up between options.
func (s *session) handshake() (enter bool, err error) {
	var g [greetingSize]byte
	binary.BigEndian.PutUint64(g[0:], nbdMagic)
	binary.BigEndian.PutUint64(g[8:], optionMagic)
	binary.BigEndian.PutUint16(g[16:], handshakeFixedNewstyle|handshakeNoZeroes)
	if _, err := s.conn.Write(g[:]); err != nil {
		return false, fmt.Errorf("nbdattach: sending greeting: %w", err)
	}
	var cf [4]byte
	if _, err := io.ReadFull(s.r, cf[:]); err != nil {
		if err == io.EOF {
			return false, nil // a probe that connects and leaves
		}
		return false, fmt.Errorf("nbdattach: reading client flags: %w", err)
	}
	// A client without NBD_FLAG_C_FIXED_NEWSTYLE is served as if it had
	// set it, as the spec permits.
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&^clientKnownFlags != 0 {
		return false, fmt.Errorf("client flags %#x: %w", flags, ErrProtocol)
	}
	noZeroes := flags&clientNoZeroes != 0
	for {
		opt, data, err := s.readOption()
		if err == io.EOF {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		next, err := s.option(opt, data, noZeroes)
		if err != nil || next != keepHaggling {
			return err == nil && next == startTransmission, err
		}
	}
}

// readOption reads one option and its data. It returns io.EOF, unwrapped,
// if the client hung up before the option began.
func (s *session) readOption() (optionType, []byte, error) {
	var b [optionHeaderSize]byte
	if _, err := io.ReadFull(s.r, b[:]); err != nil {
		if err == io.EOF {
			return 0, nil, err
		}
		return 0, nil, fmt.Errorf("nbdattach: reading option: %w", err)
	}
	var h optionHeader
	h.decode(b[:])
	if h.Magic != optionMagic {
		return 0, nil, fmt.Errorf("option magic %#016x: %w", h.Magic, ErrProtocol)
	}
	if h.Length > maxOptionLength {
		if h.Option != optExportName { // EXPORT_NAME has no error reply
			// Best effort: the connection is dropped either way.
			_ = s.replyOption(h.Option, repErrTooBig, []byte("option data too large"))
		}
		return 0, nil, fmt.Errorf("%v with %d bytes of data (limit %d): %w", h.Option, h.Length, maxOptionLength, ErrProtocol)
	}
	data := make([]byte, h.Length)
	if _, err := io.ReadFull(s.r, data); err != nil {
		return 0, nil, fmt.Errorf("nbdattach: reading %v data: %w", h.Option, err)
	}
	return h.Option, data, nil
}

// optionOutcome says what follows an option.
type optionOutcome int

const (
	keepHaggling      optionOutcome = iota // read the next option
	startTransmission                      // GO or EXPORT_NAME succeeded
	abortSession                           // the client sent NBD_OPT_ABORT
)

// option answers one option.
func (s *session) option(opt optionType, data []byte, noZeroes bool) (optionOutcome, error) {
	switch opt {
	case optExportName:
		return startTransmission, s.exportName(string(data), noZeroes)
	case optAbort:
		// The client may hang up without reading the ACK; that is fine.
		_ = s.replyOption(opt, repAck, nil)
		return abortSession, nil
	case optList:
		return keepHaggling, s.list(data)
	case optInfo, optGo:
		ok, err := s.info(opt, data)
		if ok && opt == optGo {
			return startTransmission, err
		}
		return keepHaggling, err
	default:
		// STARTTLS, STRUCTURED_REPLY, the meta-context options,
		// EXTENDED_HEADERS and whatever comes next.
		return keepHaggling, s.replyOption(opt, repErrUnsup, []byte(fmt.Sprintf("%v is not supported", opt)))
	}
}

// replyOption sends one fixed-newstyle option reply.
func (s *session) replyOption(opt optionType, typ replyType, data []byte) error {
	b := make([]byte, optionReplyHeaderSize+len(data))
	optionReplyHeader{Magic: optionReplyMagic, Option: opt, Type: typ, Length: uint32(len(data))}.encode(b)
	copy(b[optionReplyHeaderSize:], data)
	if _, err := s.conn.Write(b); err != nil {
		return fmt.Errorf("nbdattach: replying to %v: %w", opt, err)
	}
	return nil
}

// matches reports whether a client asking for name means this export; ""
// is the default export.
func (e *Export) matches(name string) bool { return name == "" || name == e.opts.Name }

// exportName answers NBD_OPT_EXPORT_NAME: size, flags and (unless the client
// negotiated NBD_FLAG_C_NO_ZEROES) 124 bytes of zeroes. An unknown name
// cannot be refused with a reply, only by hanging up.
func (s *session) exportName(name string, noZeroes bool) error {
	if !s.e.matches(name) {
		return fmt.Errorf("NBD_OPT_EXPORT_NAME %q: %w", name, ErrUnknownExport)
	}
	n := 10 + exportNameReplyZeroes
	if noZeroes {
		n = 10
	}
	b := make([]byte, n)
	binary.BigEndian.PutUint64(b[0:], uint64(max(s.e.Size(), 0)))
	binary.BigEndian.PutUint16(b[8:], uint16(s.e.Flags()))
	if _, err := s.conn.Write(b); err != nil {
		return fmt.Errorf("nbdattach: replying to %v: %w", optExportName, err)
	}
	return nil
}

// list answers NBD_OPT_LIST with this export's name and description.
func (s *session) list(data []byte) error {
	if len(data) != 0 {
		return s.replyOption(optList, repErrInvalid, []byte("NBD_OPT_LIST carries no data"))
	}
	name, desc := s.e.opts.Name, s.e.opts.Description
	b := make([]byte, 4+len(name)+len(desc))
	binary.BigEndian.PutUint32(b, uint32(len(name)))
	copy(b[4:], name)
	copy(b[4+len(name):], desc)
	if err := s.replyOption(optList, repServer, b); err != nil {
		return err
	}
	return s.replyOption(optList, repAck, nil)
}

// info answers NBD_OPT_INFO and NBD_OPT_GO, which share a format: the name,
// then a list of NBD_INFO_* requests. ok reports success (the final reply
// was NBD_REP_ACK).
func (s *session) info(opt optionType, data []byte) (ok bool, err error) {
	name, requests, valid := parseInfoRequest(data)
	if !valid {
		return false, s.replyOption(opt, repErrInvalid, []byte(fmt.Sprintf("malformed %v request", opt)))
	}
	if !s.e.matches(name) {
		return false, s.replyOption(opt, repErrUnknown, []byte(fmt.Sprintf("no export named %q", name)))
	}
	for _, info := range s.e.infoReplies(requests) {
		if err := s.replyOption(opt, repInfo, info); err != nil {
			return false, err
		}
	}
	return true, s.replyOption(opt, repAck, nil)
}

// parseInfoRequest splits NBD_OPT_INFO/GO data: 32-bit name length, name,
// 16-bit request count, 16-bit requests. The lengths must add up exactly.
func parseInfoRequest(data []byte) (name string, requests []infoType, ok bool) {
	if len(data) < 6 {
		return "", nil, false
	}
	nameLen := binary.BigEndian.Uint32(data)
	if uint64(nameLen) > uint64(len(data)-6) {
		return "", nil, false
	}
	name = string(data[4 : 4+nameLen])
	rest := data[4+nameLen:]
	n := int(binary.BigEndian.Uint16(rest))
	if len(rest) != 2+2*n {
		return "", nil, false
	}
	for i := range n {
		requests = append(requests, infoType(binary.BigEndian.Uint16(rest[2+2*i:])))
	}
	return name, requests, true
}

// infoReplies builds the NBD_REP_INFO payloads for a successful INFO/GO:
// always NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE (this server enforces a
// 32 MiB maximum, which is not the protocol's default, so it says so even
// unasked), plus the name and description when asked for.
func (e *Export) infoReplies(requests []infoType) [][]byte {
	export := make([]byte, 12)
	binary.BigEndian.PutUint16(export[0:], uint16(infoExport))
	binary.BigEndian.PutUint64(export[2:], uint64(max(e.Size(), 0)))
	binary.BigEndian.PutUint16(export[10:], uint16(e.Flags()))

	minimum, preferred, maximum := e.blockSizes()
	block := make([]byte, 14)
	binary.BigEndian.PutUint16(block[0:], uint16(infoBlockSize))
	binary.BigEndian.PutUint32(block[2:], minimum)
	binary.BigEndian.PutUint32(block[6:], preferred)
	binary.BigEndian.PutUint32(block[10:], maximum)

	replies := [][]byte{export, block}
	for _, r := range requests {
		switch {
		case r == infoName:
			replies = append(replies, infoString(infoName, e.opts.Name))
		case r == infoDescription && e.opts.Description != "":
			replies = append(replies, infoString(infoDescription, e.opts.Description))
		}
	}
	return replies
}

func infoString(t infoType, s string) []byte {
	b := make([]byte, 2+len(s))
	binary.BigEndian.PutUint16(b, uint16(t))
	copy(b[2:], s)
	return b
}
