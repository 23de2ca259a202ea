package driver_test

// End-to-end tests of the driver on real /dev/nbdX, mkfs and mount(8):
// they run inside the hack/vm guest (hack/vm/e2e-driver.sh), against the
// csi-qcow2 binary named by CSI_QCOW2_E2E_DRIVER, through the CSI gRPC API
// only. Elsewhere they skip.

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestGuestE2E: volumes, snapshots taken while mounted, restore, clone,
// online expansion and stats, for ext4 and xfs; then everything is
// unstaged and deleted and the data dir is empty.
func TestGuestE2E(t *testing.T) {
	e := newE2E(t)
	var vols, snaps []string
	ext4 := e.createVolume("e2e-ext4", mib(128), "ext4", nil)
	vols = append(vols, ext4)
	a := e.stagePublish(ext4, "ext4")
	old := writeFiles(t, a, map[string]int{"old-1": 1 << 20, "old-2": 12345})

	// The snapshot is taken while the files are only in the page cache:
	// the driver freezes the filesystem, which writes them back.
	snap := e.snapshot("e2e-ext4-snap", ext4)
	snaps = append(snaps, snap)
	newer := writeFiles(t, a, map[string]int{"new-1": 1 << 20})

	restored := e.createVolume("e2e-ext4-restored", mib(128), "ext4", snapshotSource(snap))
	vols = append(vols, restored)
	checkFiles(t, e.stagePublish(restored, "ext4"), old, newer)
	t.Logf("restored %s from %s while %s is mounted: the snapshot's files, not the later one", restored, snap, ext4)

	// A clone of a mounted volume holds what was written before it,
	// synced or not.
	clone := e.createVolume("e2e-ext4-clone", mib(128), "ext4", volumeSource(ext4))
	vols = append(vols, clone)
	checkFiles(t, e.stagePublish(clone, "ext4"), merge(old, newer), nil)
	t.Logf("cloned %s while mounted into %s: all its files", ext4, clone)

	e.expand(ext4, a, mib(256))
	e.stats(restored, e.targetPath(restored))

	xfs := e.createVolume("e2e-xfs", mib(320), "xfs", nil)
	vols = append(vols, xfs)
	x := e.stagePublish(xfs, "xfs")
	xold := writeFiles(t, x, map[string]int{"old-x": 3 << 20})
	xsnap := e.snapshot("e2e-xfs-snap", xfs)
	snaps = append(snaps, xsnap)
	xnew := writeFiles(t, x, map[string]int{"new-x": 1 << 20})
	// The restored xfs has its source's UUID and both are mounted here.
	xrestored := e.createVolume("e2e-xfs-restored", mib(320), "xfs", snapshotSource(xsnap))
	vols = append(vols, xrestored)
	checkFiles(t, e.stagePublish(xrestored, "xfs"), xold, xnew)
	t.Logf("restored %s from %s while %s is mounted", xrestored, xsnap, xfs)
	e.expand(xfs, x, mib(400))
	checkFiles(t, x, merge(xold, xnew), nil)

	for _, id := range vols {
		e.unpublishUnstage(id)
		e.checkImage(id)
	}
	for _, id := range snaps {
		if _, err := e.ctl.DeleteSnapshot(e.ctx(), &csi.DeleteSnapshotRequest{SnapshotId: id}); err != nil {
			t.Fatalf("DeleteSnapshot %s: %v", id, err)
		}
	}
	for _, id := range vols {
		if _, err := e.ctl.DeleteVolume(e.ctx(), &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatalf("DeleteVolume %s: %v", id, err)
		}
	}
	e.dataDirEmpty()
	if bad := kernelErrors(dmesg(t)[e.dmesgAt:]); len(bad) > 0 {
		t.Errorf("kernel log during the test:\n%s", joinLines(bad))
	}
}

// TestGuestE2ERestart: SIGKILL the driver while a volume is staged,
// mounted and being written; a new driver serves the image again and hands
// the live /dev/nbdX new sockets (netlink RECONFIGURE), and the mounted
// filesystem carries on: the blocked write completes, later writes and
// fsyncs succeed, no I/O error, still read-write.
func TestGuestE2ERestart(t *testing.T) {
	e := newE2E(t)
	id := e.createVolume("e2e-restart", mib(128), "ext4", nil)
	dir := e.stagePublish(id, "ext4")
	before := writeFiles(t, dir, map[string]int{"before": 1 << 20})
	if err := writeSync(filepath.Join(dir, "synced"), []byte("synced before the kill\n")); err != nil {
		t.Fatal(err)
	}
	logLen := len(dmesg(t))

	e.kill()
	t.Logf("driver SIGKILLed with %s mounted: %s", id, mountLine(t, e.stagingPath(id)))
	// A write and fsync while nobody serves the device: it must wait for
	// the new driver, not fail.
	during := make([]byte, 2<<20)
	done := make(chan error, 1)
	go func() { done <- writeSync(filepath.Join(dir, "during"), during) }()
	time.Sleep(time.Second)
	start := time.Now()
	e.start()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("write+fsync across the restart: %v", err)
		}
	case <-time.After(90 * time.Second):
		t.Fatal("write+fsync across the restart still blocked 90 s after the restart")
	}
	t.Logf("driver restarted; the write+fsync issued while it was dead completed %v after the restart", time.Since(start).Round(time.Millisecond))
	if err := writeSync(filepath.Join(dir, "after"), []byte("after the restart\n")); err != nil {
		t.Errorf("write+fsync after the restart: %v", err)
	}
	checkFiles(t, dir, merge(before, files{"during": during, "after": []byte("after the restart\n")}), nil)
	mountedRW(t, e.stagingPath(id))
	mountedRW(t, dir)
	if bad := kernelErrors(dmesg(t)[logLen:]); len(bad) > 0 {
		t.Errorf("kernel log since the kill:\n%s", joinLines(bad))
	}
	e.stats(id, dir)
	// The new process owns the volume: expand, unstage, delete through it.
	e.expand(id, dir, mib(192))
	e.unpublishUnstage(id)
	e.checkImage(id)
	if _, err := e.ctl.DeleteVolume(e.ctx(), &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatalf("DeleteVolume %s: %v", id, err)
	}
	e.dataDirEmpty()
}

func (e *e2e) snapshot(name, volID string) string {
	e.t.Helper()
	start := time.Now()
	r, err := e.ctl.CreateSnapshot(e.ctx(), &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: volID})
	if err != nil {
		e.t.Fatalf("CreateSnapshot %s of %s: %v", name, volID, err)
	}
	s := r.GetSnapshot()
	if !s.GetReadyToUse() {
		e.t.Errorf("snapshot %s is not ready to use", s.GetSnapshotId())
	}
	e.t.Logf("snapshot %s of mounted %s in %v, %s", s.GetSnapshotId(), volID, time.Since(start).Round(time.Millisecond), sizeStr(s.GetSizeBytes()))
	return s.GetSnapshotId()
}

// expand grows a published volume online and checks that the filesystem
// and NodeGetVolumeStats see it.
func (e *e2e) expand(id, path string, size int64) {
	e.t.Helper()
	fsBefore := statfsBytes(e.t, path)
	statsBefore, _ := e.stats(id, path)
	r, err := e.node.NodeExpandVolume(e.ctx(), &csi.NodeExpandVolumeRequest{
		VolumeId: id, VolumePath: path, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		StagingTargetPath: e.stagingPath(id)})
	if err != nil {
		e.t.Fatalf("NodeExpandVolume %s: %v", id, err)
	}
	fsAfter := statfsBytes(e.t, path)
	statsAfter, _ := e.stats(id, path)
	if r.GetCapacityBytes() < size || fsAfter <= fsBefore || statsAfter <= statsBefore {
		e.t.Errorf("NodeExpandVolume %s to %s: capacity %d, df %s -> %s, stats %s -> %s",
			id, sizeStr(size), r.GetCapacityBytes(), sizeStr(fsBefore), sizeStr(fsAfter), sizeStr(statsBefore), sizeStr(statsAfter))
		return
	}
	e.t.Logf("expanded %s online to %s: df %s -> %s, NodeGetVolumeStats %s -> %s",
		id, sizeStr(size), sizeStr(fsBefore), sizeStr(fsAfter), sizeStr(statsBefore), sizeStr(statsAfter))
}

// dataDirEmpty asserts that no file is left in the data dir.
func (e *e2e) dataDirEmpty() {
	e.t.Helper()
	var left []string
	filepath.Walk(e.data, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			left = append(left, p)
		}
		return nil
	})
	if len(left) > 0 {
		e.t.Errorf("data dir not empty after deleting everything:\n%s", joinLines(left))
		return
	}
	e.t.Logf("data dir %s holds no file", e.data)
}

func snapshotSource(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}
}

func volumeSource(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
		Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
}

func merge(fs ...files) files {
	all := files{}
	for _, f := range fs {
		for k, v := range f {
			all[k] = v
		}
	}
	return all
}

func joinLines(ls []string) string {
	s := ""
	for _, l := range ls {
		s += "  " + l + "\n"
	}
	return s
}
