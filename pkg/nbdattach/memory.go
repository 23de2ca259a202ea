package nbdattach

import (
	"fmt"
	"io"
	"sync"
	"sync/atomic"
)

// MemBackend is a Backend held in memory, for tests (of this package and of
// attach code) and throwaway exports. It is safe for concurrent use; reads
// run in parallel, writes exclusively. Discard and WriteZeroes both leave
// zeroes behind, so its contents are always deterministic.
type MemBackend struct {
	mu       sync.RWMutex
	data     []byte
	readOnly bool
	flushes  atomic.Int64
}

var _ Backend = (*MemBackend)(nil)

// NewMemBackend returns a zero-filled in-memory backend of size bytes.
func NewMemBackend(size int64) *MemBackend {
	return &MemBackend{data: make([]byte, size)}
}

// SetReadOnly makes every later write fail with ErrReadOnly (or allows
// writes again).
func (m *MemBackend) SetReadOnly(ro bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.readOnly = ro
}

// Size returns the size in bytes.
func (m *MemBackend) Size() int64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return int64(len(m.data))
}

// ReadAt implements io.ReaderAt.
func (m *MemBackend) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if off < 0 {
		return 0, fmt.Errorf("read at %d: %w", off, ErrOutOfRange)
	}
	if off >= int64(len(m.data)) {
		return 0, io.EOF
	}
	n := copy(p, m.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// tryReadAt reads unless a writer holds the backend or the range is not
// wholly inside it. It is not the exported TryReader method, so that types
// embedding a MemBackend to change ReadAt do not inherit a way around it;
// the tests' backend offers it.
func (m *MemBackend) tryReadAt(p []byte, off int64) bool {
	if !m.mu.TryRLock() {
		return false
	}
	defer m.mu.RUnlock()
	if off < 0 || off > int64(len(m.data)) || int64(len(p)) > int64(len(m.data))-off {
		return false
	}
	copy(p, m.data[off:])
	return true
}

// WriteAt implements io.WriterAt. Writing past the end fails with
// ErrOutOfRange and writes nothing.
func (m *MemBackend) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.writable(off, int64(len(p))); err != nil {
		return 0, err
	}
	return copy(m.data[off:], p), nil
}

// WriteZeroes zeroes a range (mayUnmap makes no difference in memory).
func (m *MemBackend) WriteZeroes(off, length int64, mayUnmap bool) error {
	return m.zero(off, length)
}

// Discard zeroes a range.
func (m *MemBackend) Discard(off, length int64) error {
	return m.zero(off, length)
}

// Flush counts the call; memory has nothing to make durable.
func (m *MemBackend) Flush() error {
	m.flushes.Add(1)
	return nil
}

// Flushes returns how many times Flush was called.
func (m *MemBackend) Flushes() int64 { return m.flushes.Load() }

func (m *MemBackend) zero(off, length int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.writable(off, length); err != nil {
		return err
	}
	clear(m.data[off : off+length])
	return nil
}

// writable checks a write of length bytes at off; m.mu must be held.
func (m *MemBackend) writable(off, length int64) error {
	if m.readOnly {
		return ErrReadOnly
	}
	if off < 0 || length < 0 || off > int64(len(m.data)) || length > int64(len(m.data))-off {
		return fmt.Errorf("%d bytes at %d in a %d-byte backend: %w", length, off, len(m.data), ErrOutOfRange)
	}
	return nil
}
