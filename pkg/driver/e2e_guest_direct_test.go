package driver_test

// O_DIRECT writes of TestGuestE2ERestartInFlight: a stream that keeps the
// device busy across every kill, and the probe written right before one.

import (
	crand "crypto/rand"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// The direct writer's file: directChunks chunks of directChunk bytes,
// each written with one of directBufs random buffers made at the start
// (under TCG, filling and hashing a buffer per write would keep the writer
// on the CPU and the device idle).
const (
	directName   = "direct"
	directChunk  = 256 << 10
	directChunks = 32
	directBufs   = 8
)

// directWriter overwrites random chunks of one file with O_DIRECT, without
// pause and without fsync, so that the device nearly always has writes in
// flight, in the driver's hands when it is killed. Every write the device
// completed must survive: stop fsyncs the file, after which the buffer
// each chunk was last written with is what must read back.
type directWriter struct {
	path     string
	fd       int
	mem      []byte             // page-aligned, as O_DIRECT wants
	bufs     [directBufs][]byte // in mem
	sums     [directBufs][sha256.Size]byte
	rng      *rand.Rand
	quit     chan struct{}
	done     chan struct{}
	stopOnce sync.Once

	// Written by run, read once done is closed.
	chunks map[int64]int // chunk offset -> buffer last written there
	writes int
	err    error
}

func startDirectWriter(dir string, seed uint64) (*directWriter, error) {
	path := filepath.Join(dir, directName)
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_DIRECT|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open %s O_DIRECT: %w", path, err)
	}
	mem, err := unix.Mmap(-1, 0, directBufs*directChunk, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	d := &directWriter{path: path, fd: fd, mem: mem, rng: rand.New(rand.NewPCG(seed, 2)),
		quit: make(chan struct{}), done: make(chan struct{}), chunks: map[int64]int{}}
	for i := range d.bufs {
		d.bufs[i] = mem[i*directChunk : (i+1)*directChunk]
		fillRandom(d.rng, d.bufs[i])
		d.sums[i] = sha256.Sum256(d.bufs[i])
	}
	go d.run()
	return d, nil
}

func (d *directWriter) run() {
	defer close(d.done)
	for {
		select {
		case <-d.quit:
			return
		default:
		}
		off, b := int64(d.rng.IntN(directChunks))*directChunk, d.rng.IntN(directBufs)
		if n, err := unix.Pwrite(d.fd, d.bufs[b], off); err != nil || n != directChunk {
			d.err = fmt.Errorf("O_DIRECT write of %d bytes at %d in %s: %d, %v", directChunk, off, d.path, n, err)
			return
		}
		d.chunks[off] = b
		d.writes++
	}
}

// stop ends the writer once its current write is done and fsyncs the file.
func (d *directWriter) stop() {
	d.stopOnce.Do(func() {
		close(d.quit)
		<-d.done
		if err := unix.Fsync(d.fd); err != nil && d.err == nil {
			d.err = fmt.Errorf("fsync %s: %w", d.path, err)
		}
		unix.Close(d.fd)
		unix.Munmap(d.mem)
	})
}

// verify reads every chunk written back from dir, where the writer's
// directory is mounted now, and returns how many it checked.
func (d *directWriter) verify(t *testing.T, dir string) int {
	t.Helper()
	f, err := os.Open(filepath.Join(dir, directName))
	if err != nil {
		t.Error(err)
		return 0
	}
	defer f.Close()
	b := make([]byte, directChunk)
	bad := 0
	for off, i := range d.chunks {
		if _, err := f.ReadAt(b, off); err != nil {
			t.Errorf("%s at %d: %v", f.Name(), off, err)
			bad++
		} else if got := sha256.Sum256(b); got != d.sums[i] {
			t.Errorf("%s at %d: sha256 %x, the last completed write had %x", f.Name(), off, got, d.sums[i])
			bad++
		}
	}
	return len(d.chunks) - bad
}

func fillRandom(rng *rand.Rand, b []byte) {
	for i := 0; i+8 <= len(b); i += 8 {
		v := rng.Uint64()
		for j := range 8 {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	for i := len(b) &^ 7; i < len(b); i++ {
		b[i] = byte(rng.Uint32())
	}
}

// probe is a file written with O_DIRECT right before a kill: the driver
// that is killed acknowledged the write, and only the next one sees the
// fsync. A write acknowledged and then flushed must be durable, whichever
// process served the flush.
type probe struct {
	path string
	fd   int
	b    []byte
	w    *recordWriter
}

const probeSize = 1 << 20

func writeProbe(t *testing.T, dir, name string, w *recordWriter) *probe {
	t.Helper()
	path := filepath.Join(dir, name)
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_DIRECT|unix.O_CLOEXEC, 0o644)
	if err != nil {
		t.Fatalf("open %s O_DIRECT: %v", path, err)
	}
	// O_DIRECT wants an aligned buffer; an anonymous mapping is.
	b, err := unix.Mmap(-1, 0, probeSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	crand.Read(b)
	if n, err := unix.Pwrite(fd, b, 0); err != nil || n != len(b) {
		t.Fatalf("O_DIRECT write %s: %d, %v", path, n, err)
	}
	return &probe{path: path, fd: fd, b: b, w: w}
}

// sync fsyncs the probe and its directory, and hands it to the writer's
// records to be verified with them.
func (p *probe) sync(t *testing.T) {
	t.Helper()
	defer unix.Munmap(p.b)
	err := unix.Fsync(p.fd)
	unix.Close(p.fd)
	if err == nil {
		err = syncDir(filepath.Dir(p.path))
	}
	if err != nil {
		t.Errorf("fsync %s after the restart: %v", p.path, err)
		return
	}
	p.w.mu.Lock()
	defer p.w.mu.Unlock()
	p.w.acked[recordKey{name: filepath.Base(p.path)}] = record{size: len(p.b), sum: sha256.Sum256(p.b)}
}
