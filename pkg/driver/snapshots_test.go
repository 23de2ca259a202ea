package driver

import (
	"context"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestSnapshotFreezesOnlyMountPoints: a staged filesystem volume is frozen
// around its snapshot while its staging path is a mount point, and never
// otherwise (FIFREEZE on a plain directory would freeze the filesystem
// that holds it).
func TestSnapshotFreezesOnlyMountPoints(t *testing.T) {
	e := newTestEnv(t)
	ctx := context.Background()
	id := e.mustCreate(t, createReq("v", 2<<20, nil)).GetVolumeId()
	e.stage(t, id, rwo)
	snap := func(name string) {
		t.Helper()
		if _, err := e.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
	snap("mounted")
	if got := strings.Join(e.mounter.events, ","); got != "freeze "+e.stagingPath(id)+",thaw "+e.stagingPath(id) {
		t.Fatalf("events %q, want one freeze and thaw", got)
	}
	if err := e.mounter.FakeMounter.Unmount(e.stagingPath(id)); err != nil {
		t.Fatal(err)
	}
	e.mounter.events = nil
	snap("unmounted")
	if len(e.mounter.events) != 0 {
		t.Fatalf("events %q on a path that is not mounted", e.mounter.events)
	}
}
