package qcow2_test

import (
	"bytes"
	"sync"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// pausingFile holds the next host write at its start until released, and
// knows whether any write landed since the last Sync.
type pausingFile struct {
	*memFile
	mu      sync.Mutex
	pause   chan struct{} // armed: the next WriteAt signals entered and waits
	entered chan struct{}
	dirty   bool
}

func (f *pausingFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	pause := f.pause
	f.pause = nil
	f.mu.Unlock()
	if pause != nil {
		close(f.entered)
		<-pause
	}
	n, err := f.memFile.WriteAt(p, off)
	f.mu.Lock()
	f.dirty = true
	f.mu.Unlock()
	return n, err
}

func (f *pausingFile) Sync() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.dirty = false
	return f.memFile.Sync()
}

func (f *pausingFile) isDirty() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.dirty
}

// TestFlushCoversWriteRacingEarlierFlush: an in-place write that is still
// in flight while one Flush syncs completes after that sync; a Flush issued
// after the write completed must sync again. (The record that a write
// happened must be made after the write lands, or the earlier Flush clears
// it and the later one skips its fdatasync: an acknowledged write that a
// completed flush does not cover.)
func TestFlushCoversWriteRacingEarlierFlush(t *testing.T) {
	const cs = 65536
	f := &pausingFile{memFile: newMemFile(nil)}
	img, err := qcow2.CreateFile(f, qcow2.CreateOptions{Size: 1 << 20, ClusterSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := img.WriteAt(bytes.Repeat([]byte{1}, cs), 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}

	release := make(chan struct{})
	f.mu.Lock()
	f.pause, f.entered = release, make(chan struct{})
	entered := f.entered
	f.mu.Unlock()
	done := make(chan error, 1)
	go func() { // in place: the cluster is allocated
		_, err := img.WriteAt(bytes.Repeat([]byte{2}, 4096), 0)
		done <- err
	}()
	<-entered
	if err := img.Flush(); err != nil { // concurrent with the write
		t.Fatal(err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil { // issued after the write completed
		t.Fatal(err)
	}
	if f.isDirty() {
		t.Fatal("Flush returned with an acknowledged write not yet synced")
	}
}
