package nbdattach

import (
	"errors"
	"io"
	"testing"
)

func TestMemBackend(t *testing.T) {
	m := NewMemBackend(100)
	if m.Size() != 100 {
		t.Fatalf("Size %d", m.Size())
	}
	if n, err := m.WriteAt([]byte("abcdef"), 94); n != 6 || err != nil {
		t.Fatalf("WriteAt at the end: %d %v", n, err)
	}
	if _, err := m.WriteAt([]byte("abc"), 98); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("WriteAt past the end: %v", err)
	}
	p := make([]byte, 10)
	if n, err := m.ReadAt(p, 94); n != 6 || err != io.EOF || string(p[:6]) != "abcdef" {
		t.Fatalf("ReadAt across the end: %d %v %q", n, err, p[:n])
	}
	if _, err := m.ReadAt(p, -1); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("ReadAt(-1): %v", err)
	}
	if err := m.WriteZeroes(95, 2, true); err != nil {
		t.Fatal(err)
	}
	if err := m.Discard(98, 1); err != nil {
		t.Fatal(err)
	}
	m.ReadAt(p[:6], 94)
	if string(p[:6]) != "a\x00\x00d\x00f" {
		t.Fatalf("after zero and discard: %q", p[:6])
	}
	if err := m.Discard(99, 2); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("Discard past the end: %v", err)
	}
	m.SetReadOnly(true)
	if _, err := m.WriteAt([]byte{1}, 0); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("WriteAt read-only: %v", err)
	}
	if err := m.WriteZeroes(0, 1, false); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("WriteZeroes read-only: %v", err)
	}
	m.Flush()
	m.Flush()
	if m.Flushes() != 2 {
		t.Fatalf("Flushes %d", m.Flushes())
	}
}

func TestMemBackendReadOnlyServesEPERM(t *testing.T) {
	m := NewMemBackend(4096)
	m.SetReadOnly(true) // read-only below a writable export
	c, _ := connect(t, mustExport(t, m, ExportOptions{}))
	if rep := c.do(request{Type: cmdWrite, Length: 1, Payload: []byte{1}}); rep.Err != errnoPerm {
		t.Fatalf("write: %v, want EPERM", rep.Err)
	}
}
