package driver

import (
	"bytes"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// TestServedWritesSurviveKill: what the device was told is written is in
// the image file as soon as the write returns, metadata included, so a
// driver killed right after the acknowledgement loses nothing. The file is
// read while the staging driver still holds the image open and dirty, as
// a SIGKILL would leave it.
func TestServedWritesSurviveKill(t *testing.T) {
	e := newTestEnv(t)
	id := e.mustCreate(t, createReq("v", 4<<20, nil)).GetVolumeId()
	e.stage(t, id, rwo)
	defer e.unstage(t, id)
	dev := e.attacher.attached[0]
	// killed reads [off, off+n) from the file as a killed driver leaves it.
	killed := func(off int64, n int) []byte {
		t.Helper()
		img, err := qcow2.Open(e.d.store.imagePath(id), qcow2.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		b := make([]byte, n)
		if _, err := img.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		return b
	}

	data := bytes.Repeat([]byte("acknowledged"), 10000)
	if _, err := dev.backend.WriteAt(data, 1<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(killed(1<<20, len(data)), data) {
		t.Error("an allocating write is not in the file a killed driver leaves")
	}
	// Zeroes over an allocated, flushed range are zero flags: metadata only.
	if err := dev.backend.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := dev.backend.WriteZeroes(1<<20, 128<<10, false); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(killed(1<<20, 128<<10), make([]byte, 128<<10)) {
		t.Error("zeroes written are not in the file a killed driver leaves")
	}
}
