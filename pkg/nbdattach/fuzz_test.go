package nbdattach

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// fuzzConn is a net.Conn that reads a fixed script and records what the
// server writes.
type fuzzConn struct {
	r   io.Reader
	mu  sync.Mutex
	out bytes.Buffer
}

func (c *fuzzConn) Read(p []byte) (int, error) { return c.r.Read(p) }
func (c *fuzzConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.Write(p)
}
func (c *fuzzConn) Close() error                     { return nil }
func (c *fuzzConn) LocalAddr() net.Addr              { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *fuzzConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *fuzzConn) SetDeadline(time.Time) error      { return nil }
func (c *fuzzConn) SetReadDeadline(time.Time) error  { return nil }
func (c *fuzzConn) SetWriteDeadline(time.Time) error { return nil }

// fuzzHandshake is what a client sends to reach transmission: client flags,
// then NBD_OPT_GO for the default export.
func fuzzHandshake() []byte {
	b := binary.BigEndian.AppendUint32(nil, clientFixedNewstyle|clientNoZeroes)
	b = append(b, "IHAVEOPT"...)
	b = binary.BigEndian.AppendUint32(b, uint32(optGo))
	data := infoRequest("", infoBlockSize)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func fuzzSeeds() [][]byte {
	seq := func(reqs ...request) []byte {
		var b []byte
		for i, r := range reqs {
			b = append(b, encodeRequest(uint64(i+1), r)...)
		}
		return b
	}
	return [][]byte{
		seq(request{Type: cmdWrite, Offset: 512, Length: 4, Payload: []byte("data")},
			request{Type: cmdRead, Offset: 510, Length: 8},
			request{Type: cmdFlush}, request{Type: cmdDisc}),
		seq(request{Type: cmdTrim, Length: 4096}, request{Type: cmdWriteZeroes, Flags: cmdFlagNoHole | cmdFlagFUA, Offset: 1, Length: 100},
			request{Type: cmdRead, Length: 4096}),
		seq(request{Type: cmdWrite, Length: 1 << 31}, request{Type: cmdRead, Offset: 1 << 63, Length: 1}),
		seq(request{Type: cmdRead, Length: MaxBlockSize + 1}, request{Type: 77, Flags: 0xffff, Length: 12}),
		[]byte("\x25\x60\x95\x14garbage after a bad magic"),
		nil,
	}
}

func FuzzRequests(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		e := mustExport(t, NewMemBackend(1<<20), ExportOptions{MaxInFlight: 4})
		conn := &fuzzConn{r: io.MultiReader(bytes.NewReader(fuzzHandshake()), bytes.NewReader(in))}
		e.ServeConn(context.Background(), conn) // any error; it must return
		checkReplyStream(t, in, conn.out.Bytes())
	})
}

// checkReplyStream checks that the server's output is a greeting, the GO
// replies, then whole simple replies, each to a handle the input used.
func checkReplyStream(t *testing.T, in, out []byte) {
	reads, handles, ok := requestHandles(in)
	if len(out) < greetingSize {
		t.Fatalf("output of %d bytes has no greeting", len(out))
	}
	out = out[greetingSize:]
	for { // option replies up to the GO's ACK
		if len(out) < optionReplyHeaderSize {
			t.Fatalf("option replies truncated")
		}
		var h optionReplyHeader
		h.decode(out)
		out = out[optionReplyHeaderSize+int(h.Length):]
		if h.Type == repAck {
			break
		}
	}
	for len(out) > 0 {
		if len(out) < simpleReplySize {
			t.Fatalf("%d stray bytes after the last reply", len(out))
		}
		var r simpleReply
		r.decode(out)
		if r.Magic != simpleReplyMagic {
			t.Fatalf("reply magic %#x", r.Magic)
		}
		if !handles[r.Handle] {
			t.Fatalf("reply to handle %#x, which no request used", r.Handle)
		}
		out = out[simpleReplySize:]
		if n, isRead := reads[r.Handle]; isRead && r.Error == errnoOK {
			if !ok {
				return // a READ shares its handle: the stream is ambiguous
			}
			if uint64(len(out)) < uint64(n) {
				t.Fatalf("READ reply with %d of %d bytes", len(out), n)
			}
			out = out[n:]
		}
	}
}

// requestHandles walks the input as the server would, collecting the
// handles used and the length of each READ; ok is false when a READ shares
// its handle with another request, which makes the replies ambiguous.
func requestHandles(in []byte) (reads map[uint64]uint32, handles map[uint64]bool, ok bool) {
	reads, handles, ok = map[uint64]uint32{}, map[uint64]bool{}, true
	for len(in) >= requestHeaderSize {
		var h requestHeader
		h.decode(in)
		in = in[requestHeaderSize:]
		if h.Magic != requestMagic || h.Type == cmdDisc {
			break
		}
		_, readBefore := reads[h.Handle]
		if handles[h.Handle] && (readBefore || h.Type == cmdRead) {
			ok = false
		}
		handles[h.Handle] = true
		switch h.Type {
		case cmdRead:
			reads[h.Handle] = h.Length
		case cmdWrite:
			in = in[min(uint64(len(in)), uint64(h.Length)):]
		}
	}
	return reads, handles, ok
}

func FuzzHandshake(f *testing.F) {
	f.Add(fuzzHandshake())
	f.Add(append(fuzzHandshake()[:4], "IHAVEOPT\x00\x00\x00\x03\x00\x00\x00\x00"...))
	f.Add([]byte("\x00\x00\x00\x03IHAVEOPT\x00\x00\x00\x01\x00\x00\x00\x00"))
	f.Add([]byte("\x00\x00\x00\x01IHAVEOPT\x00\x00\x00\x02\xff\xff\xff\xff"))
	f.Fuzz(func(t *testing.T, in []byte) {
		e := mustExport(t, NewMemBackend(4096), ExportOptions{Name: "fuzz"})
		conn := &fuzzConn{r: bytes.NewReader(in)}
		e.ServeConn(context.Background(), conn)
		if out := conn.out.Bytes(); len(out) < greetingSize || string(out[:8]) != "NBDMAGIC" {
			t.Fatalf("no greeting: % x", out[:min(len(out), 18)])
		}
	})
}
