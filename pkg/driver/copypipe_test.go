package driver

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"sync/atomic"
	"testing"
)

// A drain that fails stops the fill at its next buffer, and finish
// returns the drain's error; a fill that fails wins over a drain that did
// not; every piece reaches the drain in order.
func TestCopyPipe(t *testing.T) {
	var got []int64
	p := startPipe(8, func(off int64, b []byte) error { got = append(got, off); return nil })
	for off := int64(0); off < 100; off++ {
		b := p.buffer()
		p.send(off, b[:1])
	}
	if err := p.finish(nil); err != nil {
		t.Fatalf("finish = %v", err)
	}
	for i, off := range got {
		if off != int64(i) {
			t.Fatalf("piece %d reached the drain as %d: out of order", i, off)
		}
	}
	if len(got) != 100 {
		t.Fatalf("drained %d pieces, sent 100", len(got))
	}

	boom := errors.New("disk full")
	p = startPipe(8, func(off int64, b []byte) error {
		if off == 3 {
			return boom
		}
		return nil
	})
	var sent int
	var fillErr error
	for off := int64(0); off < 1000; off++ {
		b := p.buffer()
		if b == nil {
			fillErr = errPipeStopped
			break
		}
		p.send(off, b)
		sent++
	}
	if err := p.finish(fillErr); !errors.Is(err, boom) {
		t.Errorf("finish after a failed drain = %v; want %v", err, boom)
	}
	if sent == 1000 {
		t.Error("the fill never saw the drain fail")
	}

	p = startPipe(8, func(int64, []byte) error { return nil })
	if err := p.finish(io.ErrUnexpectedEOF); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("finish(fill error) = %v", err)
	}
}

// readFrames reports the write error of the new image, not a stream error.
func TestReadFramesWriteError(t *testing.T) {
	var stream bytes.Buffer
	data := bytes.Repeat([]byte{7}, 3*peerBlock)
	if err := writeDataRuns(&stream, data, 0); err != nil {
		t.Fatal(err)
	}
	if err := writeFrameHeader(&stream, uint64(len(data)), peerFrameEnd); err != nil {
		t.Fatal(err)
	}
	var copied atomic.Int64
	err := readFrames(&stream, failingWriterAt{}, int64(len(data)), &copied)
	if !errors.Is(err, errFailingWrite) || errors.Is(err, errBadStream) {
		t.Errorf("readFrames into a failing image = %v; want the write error", err)
	}
}

var errFailingWrite = errors.New("injected write error")

type failingWriterAt struct{}

func (failingWriterAt) WriteAt([]byte, int64) (int, error) { return 0, errFailingWrite }

// TestReadFramesChecksum: a stream with one bit flipped in a frame's
// data, in a header or in the checksum is refused with a CRC-32C
// mismatch (the bytes still parse); the stream as sent is accepted.
func TestReadFramesChecksum(t *testing.T) {
	stream := fuzzStream(t, map[int64][]byte{0: bytes.Repeat([]byte{7}, 8192), 512 << 10: []byte("tail")})
	var copied atomic.Int64
	if err := readFrames(bytes.NewReader(stream), &boundedWriter{size: fuzzSize}, fuzzSize, &copied); err != nil || copied.Load() == 0 {
		t.Fatalf("the stream as sent: %v, %d bytes copied", err, copied.Load())
	}
	for name, at := range map[string]int{"data": 16 + 100, "offset": 6, "checksum": len(stream) - 1} {
		bad := bytes.Clone(stream)
		bad[at] ^= 0x10
		err := readFrames(bytes.NewReader(bad), &boundedWriter{size: fuzzSize}, fuzzSize, &copied)
		if !errors.Is(err, errBadStream) || !strings.Contains(err.Error(), "CRC-32C mismatch") {
			t.Errorf("a bit flipped in the %s: %v; want a CRC-32C mismatch", name, err)
		}
	}
}
