package qcow2_test

import (
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func TestImageLocks(t *testing.T) {
	path := filepath.Join(t.TempDir(), "locked.qcow2")
	mustCreate(t, path, qcow2.CreateOptions{Size: 1 << 20}).Close()
	rw := func() (*qcow2.Image, error) { return qcow2.Open(path, qcow2.OpenOptions{Lock: true}) }
	ro := func() (*qcow2.Image, error) {
		return qcow2.Open(path, qcow2.OpenOptions{Lock: true, ReadOnly: true})
	}

	w, err := rw()
	if err != nil {
		t.Fatalf("first writer: %v", err)
	}
	for name, open := range map[string]func() (*qcow2.Image, error){"writer": rw, "reader": ro} {
		if _, err := open(); !errors.Is(err, qcow2.ErrLocked) {
			t.Errorf("%s while a writer holds the image: %v, want ErrLocked", name, err)
		}
	}
	if _, err := qcow2.CheckFile(path, qcow2.CheckOptions{Repair: qcow2.RepairLeaks}); !errors.Is(err, qcow2.ErrLocked) {
		t.Errorf("CheckFile repair of a live image: %v, want ErrLocked", err)
	}
	if haveQemu(t) {
		out, err := exec.Command("qemu-img", "info", path).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "lock") {
			t.Errorf("qemu-img info on an image we hold for writing: err=%v out=%s, want a lock error", err, out)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}

	r1, err := ro()
	if err != nil {
		t.Fatalf("reader after the writer closed: %v", err)
	}
	defer r1.Close()
	r2, err := ro()
	if err != nil {
		t.Fatalf("second reader: %v", err)
	}
	defer r2.Close()
	if _, err := rw(); !errors.Is(err, qcow2.ErrLocked) {
		t.Errorf("writer while readers hold the image: %v, want ErrLocked", err)
	}
	if _, err := qcow2.Open(path, qcow2.OpenOptions{}); err != nil {
		t.Errorf("an unlocked open is not refused: %v", err)
	}
}

func TestInUse(t *testing.T) {
	path := filepath.Join(t.TempDir(), "inuse.qcow2")
	mustCreate(t, path, qcow2.CreateOptions{Size: 1 << 20}).Close()
	inUse := func() bool {
		t.Helper()
		busy, err := qcow2.InUse(path)
		if err != nil {
			t.Fatal(err)
		}
		return busy
	}
	if inUse() {
		t.Error("a closed image is in use")
	}
	for _, ro := range []bool{false, true} {
		img, err := qcow2.Open(path, qcow2.OpenOptions{Lock: true, ReadOnly: ro})
		if err != nil {
			t.Fatal(err)
		}
		if !inUse() {
			t.Errorf("read-only %v: an image open with locks is not in use", ro)
		}
		img.Close()
		if inUse() {
			t.Errorf("read-only %v: still in use after Close", ro)
		}
	}
}
