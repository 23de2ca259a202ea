package driver_test

// The record writer of TestGuestE2ERestartInFlight: durable writes into a
// mounted filesystem, remembered once fsync acknowledged them.

import (
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The writer's footprint: record files of up to maxRecordFile bytes, the
// oldest removed beyond maxLiveFiles bytes, and a log file of logSlots
// slots of logSlot bytes, overwritten at random.
const (
	maxRecordFile = 256 << 10
	maxLiveFiles  = 32 << 20
	logSlots      = 512
	logSlot       = 32 << 10
	logName       = "log"
)

// recordKey names where a record lives: a record file (off 0), or a slot
// of the log file.
type recordKey struct {
	name string
	off  int64
}

// record is what a write left there: its length and sha256.
type record struct {
	size int
	sum  [sha256.Size]byte
}

// recordWriter writes records into a directory without pause, each made
// durable before the next one starts: either a new file (written, fsynced,
// its directory fsynced) or a slot of the log file overwritten in place
// (pwrite, fdatasync). It remembers the last record acknowledged at every
// place, and when each acknowledgement came.
type recordWriter struct {
	dir       string
	rng       *rand.Rand
	log       *os.File
	files     []string // live record files, oldest first
	fileBytes int64

	quit     chan struct{}
	done     chan struct{}
	stopOnce sync.Once

	mu     sync.Mutex
	acked  map[recordKey]record
	ackAt  []time.Time // ascending
	err    error       // why the writer stopped early
	nacked int
	bytes  int64
}

// startRecordWriter creates the log file in dir and starts writing.
func startRecordWriter(dir string, seed uint64) (*recordWriter, error) {
	log, err := os.OpenFile(filepath.Join(dir, logName), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, err
	}
	w := &recordWriter{dir: dir, rng: rand.New(rand.NewPCG(seed, 1)), log: log,
		quit: make(chan struct{}), done: make(chan struct{}), acked: map[recordKey]record{}}
	if err := syncDir(dir); err != nil {
		log.Close()
		return nil, err
	}
	go w.run()
	return w, nil
}

func (w *recordWriter) run() {
	defer close(w.done)
	defer w.log.Close()
	for seq := 0; ; seq++ {
		select {
		case <-w.quit:
			return
		default:
		}
		var err error
		if seq%2 == 0 {
			err = w.writeFile(seq)
		} else {
			err = w.writeSlot()
		}
		if err != nil {
			w.mu.Lock()
			w.err = err
			w.mu.Unlock()
			return
		}
	}
}

// stop ends the writer once its current record is done.
func (w *recordWriter) stop() {
	w.stopOnce.Do(func() { close(w.quit) })
	<-w.done
}

// writeFile writes record file seq, fsyncs it and its directory, and
// removes the oldest files beyond maxLiveFiles.
func (w *recordWriter) writeFile(seq int) error {
	name := fmt.Sprintf("rec-%06d", seq)
	b := w.random(1 + w.rng.IntN(maxRecordFile))
	if err := writeSync(filepath.Join(w.dir, name), b); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	w.ack(recordKey{name: name}, b)
	w.files = append(w.files, name)
	w.fileBytes += int64(len(b))
	for w.fileBytes > maxLiveFiles {
		old := w.files[0]
		w.mu.Lock()
		r := w.acked[recordKey{name: old}]
		delete(w.acked, recordKey{name: old})
		w.mu.Unlock()
		if err := os.Remove(filepath.Join(w.dir, old)); err != nil {
			return err
		}
		w.files = w.files[1:]
		w.fileBytes -= int64(r.size)
	}
	return nil
}

// writeSlot overwrites the start of a random log slot and fdatasyncs.
func (w *recordWriter) writeSlot() error {
	off := int64(w.rng.IntN(logSlots)) * logSlot
	b := w.random(512 + w.rng.IntN(logSlot-512))
	if _, err := w.log.WriteAt(b, off); err != nil {
		return fmt.Errorf("%s at %d: %w", logName, off, err)
	}
	if err := unix.Fdatasync(int(w.log.Fd())); err != nil {
		return fmt.Errorf("fdatasync %s: %w", logName, err)
	}
	w.ack(recordKey{name: logName, off: off}, b)
	return nil
}

func (w *recordWriter) random(n int) []byte {
	b := make([]byte, n)
	fillRandom(w.rng, b)
	return b
}

func (w *recordWriter) ack(k recordKey, b []byte) {
	now := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.acked[k] = record{size: len(b), sum: sha256.Sum256(b)}
	w.ackAt = append(w.ackAt, now)
	w.nacked++
	w.bytes += int64(len(b))
}

func (w *recordWriter) failed() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// ackAfter returns the first acknowledgement after t.
func (w *recordWriter) ackAfter(t time.Time) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	i := sort.Search(len(w.ackAt), func(i int) bool { return w.ackAt[i].After(t) })
	if i == len(w.ackAt) {
		return time.Time{}, false
	}
	return w.ackAt[i], true
}

// longestGap is the longest time without an acknowledgement from the last
// one before from to the first one after to (or now, if none came yet).
func (w *recordWriter) longestGap(from, to time.Time) time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	after := func(t time.Time) int {
		return sort.Search(len(w.ackAt), func(i int) bool { return w.ackAt[i].After(t) })
	}
	times := []time.Time{from}
	if i := after(from); i > 0 {
		times[0] = w.ackAt[i-1]
	}
	end := after(to)
	times = append(times, w.ackAt[after(times[0]):min(end+1, len(w.ackAt))]...)
	if end == len(w.ackAt) {
		times = append(times, time.Now())
	}
	var gap time.Duration
	for i := 1; i < len(times); i++ {
		gap = max(gap, times[i].Sub(times[i-1]))
	}
	return gap
}

// verify reads every acknowledged record back from dir (where the
// writer's directory is mounted now) and returns how many it checked.
func (w *recordWriter) verify(t *testing.T, dir string) int {
	t.Helper()
	w.mu.Lock()
	defer w.mu.Unlock()
	bad := 0
	for k, r := range w.acked {
		b := make([]byte, r.size)
		f, err := os.Open(filepath.Join(dir, k.name))
		if err == nil {
			_, err = f.ReadAt(b, k.off)
			f.Close()
		}
		if err == nil && sha256.Sum256(b) != r.sum {
			err = fmt.Errorf("%d bytes read back with sha256 %x, acknowledged %x", r.size, sha256.Sum256(b), r.sum)
		}
		if err != nil {
			if bad++; bad <= 10 {
				t.Errorf("record %s at %d in %s: %v", k.name, k.off, dir, err)
			}
		}
	}
	if bad > 10 {
		t.Errorf("... %d records bad in all, of %d", bad, len(w.acked))
	}
	return len(w.acked) - bad
}

// syncDir fsyncs a directory, making the names in it durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
