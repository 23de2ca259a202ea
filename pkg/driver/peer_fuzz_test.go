package driver

import (
	"bytes"
	"context"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// boundedWriter is a destination of fuzzSize bytes that records whether
// anything was written outside it.
type boundedWriter struct {
	size    int64
	outside bool
}

func (w *boundedWriter) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > w.size {
		w.outside = true
	}
	return len(p), nil
}

const fuzzSize = 1 << 20

// FuzzReadFrames feeds arbitrary bytes to the receiver of a peer read
// stream (readFrames, the one parser of peer wire bytes): it must never
// panic, never write outside the size granted, and accept a stream only
// if it ends in a well-formed last frame with the right CRC-32C; what it
// refuses wraps errBadStream. Seeds are real streams from writeFrames.
// Run it with `go test -run '^$' -fuzz FuzzReadFrames ./pkg/driver/`.
func FuzzReadFrames(f *testing.F) {
	f.Add(fuzzStream(f, nil))
	f.Add(fuzzStream(f, map[int64][]byte{0: bytes.Repeat([]byte{1}, 4096), 300 << 10: []byte("data")}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, stream []byte) {
		w := &boundedWriter{size: fuzzSize}
		var copied atomic.Int64
		err := readFrames(bytes.NewReader(stream), w, fuzzSize, &copied)
		if w.outside {
			t.Fatal("wrote outside the size granted")
		}
		if err != nil {
			if !errors.Is(err, errBadStream) {
				t.Fatalf("refused with %v; want errBadStream", err)
			}
			return
		}
		// Accepted: the last frame's header and CRC end the stream's
		// checked prefix, and the CRC is right.
		if len(stream) < 20 {
			t.Fatalf("accepted %d bytes", len(stream))
		}
	})
}

// fuzzStream is what writeFrames sends for an image with these writes.
func fuzzStream(f testing.TB, writes map[int64][]byte) []byte {
	path := f.TempDir() + "/f.qcow2"
	img, err := qcow2.Create(path, qcow2.CreateOptions{Size: fuzzSize, ClusterSize: 4096, Perm: 0o600})
	if err != nil {
		f.Fatal(err)
	}
	defer img.Close()
	for off, b := range writes {
		if _, err := img.WriteAt(b, off); err != nil {
			f.Fatal(err)
		}
	}
	if _, err := img.CreateSnapshot("s"); err != nil {
		f.Fatal(err)
	}
	v, err := img.OpenSnapshot("s")
	if err != nil {
		f.Fatal(err)
	}
	defer v.Close()
	src := newSnapshotReader(v, path)
	defer src.Close()
	var buf bytes.Buffer
	if err := writeFrames(context.Background(), &buf, src, v.Size()); err != nil {
		f.Fatal(err)
	}
	var copied atomic.Int64
	if err := readFrames(bytes.NewReader(buf.Bytes()), &boundedWriter{size: fuzzSize}, fuzzSize, &copied); err != nil {
		f.Fatalf("a real stream is refused: %v", err)
	}
	return buf.Bytes()
}
