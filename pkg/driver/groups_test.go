package driver

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

var rwoBlock = &csi.VolumeCapability{
	AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

func (e *testEnv) group() csi.GroupControllerClient { return csi.NewGroupControllerClient(e.conn) }

func (e *testEnv) createGroup(t *testing.T, name string, vols ...string) *csi.VolumeGroupSnapshot {
	t.Helper()
	resp, err := e.group().CreateVolumeGroupSnapshot(context.Background(),
		&csi.CreateVolumeGroupSnapshotRequest{Name: name, SourceVolumeIds: vols})
	if err != nil {
		t.Fatalf("CreateVolumeGroupSnapshot(%s): %v", name, err)
	}
	return resp.GetGroupSnapshot()
}

// restoreRead restores snapshot sid into a new volume and reads n bytes
// at off from it.
func (e *testEnv) restoreRead(t *testing.T, sid string, off, n int64) []byte {
	t.Helper()
	v := e.mustCreate(t, &csi.CreateVolumeRequest{Name: "restore-" + sid, VolumeCapabilities: []*csi.VolumeCapability{rwo},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: sid}}}})
	return readImage(t, e, v.GetVolumeId())[off : off+n]
}

// internalSnapshots names the internal snapshots in volume id's image.
func internalSnapshots(t *testing.T, e *testEnv, id string) []string {
	t.Helper()
	var img *qcow2.Image
	if sv := e.d.stagedVolume(id); sv != nil {
		img = sv.img
	} else {
		var err error
		if img, err = qcow2.Open(e.d.store.imagePath(id), qcow2.OpenOptions{ReadOnly: true}); err != nil {
			t.Fatal(err)
		}
		defer img.Close()
	}
	var names []string
	for _, s := range img.Snapshots() {
		names = append(names, s.Name)
	}
	return names
}

// snapshotOf finds the member of g whose source is vol.
func snapshotOf(t *testing.T, g *csi.VolumeGroupSnapshot, vol string) string {
	t.Helper()
	for _, s := range g.GetSnapshots() {
		if s.GetSourceVolumeId() == vol {
			return s.GetSnapshotId()
		}
	}
	t.Fatalf("group %s has no snapshot of %s", g.GetGroupSnapshotId(), vol)
	return ""
}

// TestGroupSnapshotLifecycle: a group of a staged filesystem volume, a
// staged block volume and a detached one is cut, found again by name,
// listed, restored member by member and deleted.
func TestGroupSnapshotLifecycle(t *testing.T) {
	e := newTestEnv(t)
	ctx := context.Background()
	fsVol := e.mustCreate(t, createReq("fs", 2<<20, nil)).GetVolumeId()
	blkVol := e.mustCreate(t, createReq("blk", 2<<20, nil)).GetVolumeId()
	offVol := e.mustCreate(t, createReq("detached", 2<<20, nil)).GetVolumeId()
	e.stage(t, fsVol, rwo)
	e.stage(t, blkVol, rwoBlock)
	for _, id := range []string{fsVol, blkVol} {
		if _, err := e.d.stagedVolume(id).backend().WriteAt([]byte("in "+id[:8]), 4096); err != nil {
			t.Fatal(err)
		}
	}
	g := e.createGroup(t, "g", offVol, fsVol, blkVol)
	if len(g.GetSnapshots()) != 3 || !g.GetReadyToUse() || !strings.HasPrefix(g.GetGroupSnapshotId(), groupPrefix) {
		t.Fatalf("group %v", g)
	}
	for _, s := range g.GetSnapshots() {
		if s.GetGroupSnapshotId() != g.GetGroupSnapshotId() || !s.GetReadyToUse() {
			t.Fatalf("member %v", s)
		}
	}
	if got, want := strings.Join(e.mounter.events, ","), "freeze "+e.stagingPath(fsVol)+",thaw "+e.stagingPath(fsVol); got != want {
		t.Fatalf("events %q, want %q", got, want)
	}
	if again := e.createGroup(t, "g", blkVol, fsVol, offVol); again.GetGroupSnapshotId() != g.GetGroupSnapshotId() || len(again.GetSnapshots()) != 3 {
		t.Fatalf("retried create: %v", again)
	}
	if len(e.mounter.events) != 2 {
		t.Fatalf("retried create froze again: %q", e.mounter.events)
	}
	_, err := e.group().CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{fsVol}})
	if status.Code(err) != codes.AlreadyExists {
		t.Fatalf("same name, other volumes: %v", err)
	}

	var ids []string
	for _, s := range g.GetSnapshots() {
		ids = append(ids, s.GetSnapshotId())
	}
	get, err := e.group().GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g.GetGroupSnapshotId(), SnapshotIds: ids})
	if err != nil || len(get.GetGroupSnapshot().GetSnapshots()) != 3 {
		t.Fatalf("GetVolumeGroupSnapshot: %v %v", get, err)
	}
	_, err = e.group().GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g.GetGroupSnapshotId(), SnapshotIds: ids[:1]})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("Get with the wrong members: %v", err)
	}
	list, err := e.ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SourceVolumeId: blkVol})
	if err != nil || len(list.GetEntries()) != 1 || list.GetEntries()[0].GetSnapshot().GetGroupSnapshotId() != g.GetGroupSnapshotId() {
		t.Fatalf("ListSnapshots: %v %v", list, err)
	}

	for _, id := range []string{fsVol, blkVol} {
		if _, err := e.d.stagedVolume(id).backend().WriteAt([]byte("after!!!!!!"), 4096); err != nil {
			t.Fatal(err)
		}
		if got := e.restoreRead(t, snapshotOf(t, g, id), 4096, 11); string(got) != "in "+id[:8] {
			t.Errorf("restored %s reads %q", id, got)
		}
	}
	if _, err := e.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: offVol}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("DeleteVolume of a group member's source: %v", err)
	}

	del := &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: g.GetGroupSnapshotId(), SnapshotIds: ids}
	if _, err := e.group().DeleteVolumeGroupSnapshot(ctx, del); err != nil {
		t.Fatal(err)
	}
	if _, err := e.group().DeleteVolumeGroupSnapshot(ctx, del); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	for _, id := range []string{fsVol, blkVol, offVol} {
		if n := internalSnapshots(t, e, id); len(n) != 0 {
			t.Errorf("%s still has internal snapshots %v", id, n)
		}
	}
	if left, _ := e.d.store.list("snapshots"); len(left) != 0 {
		t.Errorf("snapshot files left: %v", left)
	}
	if _, err := e.group().GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: g.GetGroupSnapshotId()}); status.Code(err) != codes.NotFound {
		t.Fatalf("Get after delete: %v", err)
	}
}

func TestGroupSnapshotValidation(t *testing.T) {
	e := newTestEnv(t)
	a := e.mustCreate(t, createReq("a", 1<<20, nil)).GetVolumeId()
	elsewhere := volumeIDFor("on another node")
	for _, tc := range []struct {
		name string
		req  *csi.CreateVolumeGroupSnapshotRequest
		code codes.Code
		msg  string
	}{
		{"no name", &csi.CreateVolumeGroupSnapshotRequest{SourceVolumeIds: []string{a}}, codes.InvalidArgument, "name"},
		{"no volumes", &csi.CreateVolumeGroupSnapshotRequest{Name: "g"}, codes.InvalidArgument, "source volume"},
		{"empty volume id", &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{a, ""}}, codes.InvalidArgument, "empty"},
		{"twice", &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{a, a}}, codes.InvalidArgument, "twice"},
		{"unknown parameter", &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{a},
			Parameters: map[string]string{"x": "y"}}, codes.InvalidArgument, "x"},
		{"deletionPolicy of no kind", &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{a},
			Parameters: map[string]string{"deletionPolicy": "Keep"}}, codes.InvalidArgument, "Delete or Retain"},
		{"one on another node", &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{a, elsewhere}},
			codes.FailedPrecondition, elsewhere},
		{"all elsewhere", &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{elsewhere}}, codes.NotFound, elsewhere},
		{"not an id of ours", &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{a, "pvc-1"}},
			codes.FailedPrecondition, "pvc-1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.group().CreateVolumeGroupSnapshot(context.Background(), tc.req)
			if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.msg) {
				t.Fatalf("got %v, want %v naming %q", err, tc.code, tc.msg)
			}
		})
	}
	if ids, _ := e.d.store.list("groups"); len(ids) != 0 {
		t.Fatalf("groups written: %v", ids)
	}
	// The class's deletionPolicy among its parameters, as Kubernetes'
	// storage e2e suite makes the class: accepted and ignored.
	for _, policy := range []string{"Delete", "Retain"} {
		if _, err := e.group().CreateVolumeGroupSnapshot(context.Background(), &csi.CreateVolumeGroupSnapshotRequest{
			Name: "g-" + policy, SourceVolumeIds: []string{a}, Parameters: map[string]string{"deletionPolicy": policy}}); err != nil {
			t.Errorf("group snapshot with parameter deletionPolicy=%s: %v", policy, err)
		}
	}
	if _, err := e.ctrl.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{
		Name: "s", SourceVolumeId: a, Parameters: map[string]string{"deletionPolicy": "Delete"}}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("a single snapshot with parameter deletionPolicy: %v; want InvalidArgument (only group classes carry it)", err)
	}
	if _, err := e.group().GetVolumeGroupSnapshot(context.Background(), &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: groupIDFor("none")}); status.Code(err) != codes.NotFound {
		t.Fatalf("Get of a group that does not exist: %v", err)
	}
}

// TestGroupSnapshotUndo: when one member cannot be cut, the snapshots
// already cut are deleted, nothing is recorded, and every gate and
// filesystem is released.
func TestGroupSnapshotUndo(t *testing.T) {
	e := newTestEnv(t)
	ctx := context.Background()
	v1 := e.mustCreate(t, createReq("v1", 2<<20, nil)).GetVolumeId()
	v2 := e.mustCreate(t, createReq("v2", 2<<20, nil)).GetVolumeId()
	first, second := min(v1, v2), max(v1, v2) // members are cut in sorted order
	e.stage(t, first, rwo)
	e.stage(t, second, rwo)
	// A snapshot of the member's name held open by a view: the stale one
	// cannot be replaced, so the second member fails.
	gid := groupIDFor("g")
	img := e.d.stagedVolume(second).img
	if _, err := img.CreateSnapshot(memberSnapshotIDFor(gid, second)); err != nil {
		t.Fatal(err)
	}
	view, err := img.OpenSnapshot(memberSnapshotIDFor(gid, second))
	if err != nil {
		t.Fatal(err)
	}
	_, err = e.group().CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{v1, v2}})
	if status.Code(err) != codes.Aborted || !strings.Contains(status.Convert(err).Message(), second) {
		t.Fatalf("got %v, want Aborted naming %s", err, second)
	}
	if n := internalSnapshots(t, e, first); len(n) != 0 {
		t.Fatalf("first member's snapshot not undone: %v", n)
	}
	if ids, _ := e.d.store.list("snapshots"); len(ids) != 0 {
		t.Fatalf("snapshot files written: %v", ids)
	}
	if ids, _ := e.d.store.list("groups"); len(ids) != 0 {
		t.Fatalf("group written: %v", ids)
	}
	for _, id := range []string{first, second} {
		if e.mounter.frozen[e.stagingPath(id)] != 0 {
			t.Fatalf("%s left frozen: %v", id, e.mounter.events)
		}
		if !e.d.stagedVolume(id).gate.TryLock() {
			t.Fatalf("%s's write gate left closed", id)
		}
		e.d.stagedVolume(id).gate.Unlock()
	}
	view.Close()
	// The retry replaces the stale snapshot instead of adopting it.
	if _, err := e.d.stagedVolume(second).backend().WriteAt([]byte("new"), 0); err != nil {
		t.Fatal(err)
	}
	g := e.createGroup(t, "g", v1, v2)
	if got := e.restoreRead(t, snapshotOf(t, g, second), 0, 3); string(got) != "new" {
		t.Fatalf("retried group reads %q: the stale snapshot was adopted", got)
	}
}

// TestGroupSnapshotRecutsAfterCrash: member snapshots left without a
// group file (a crash before the commit point) are cut again by the
// retried create, not adopted.
func TestGroupSnapshotRecutsAfterCrash(t *testing.T) {
	e := newTestEnv(t)
	v1 := e.mustCreate(t, createReq("v1", 2<<20, nil)).GetVolumeId()
	v2 := e.mustCreate(t, createReq("v2", 2<<20, nil)).GetVolumeId()
	e.stage(t, v1, rwoBlock)
	g := e.createGroup(t, "g", v1, v2)
	if err := os.Remove(filepath.Join(e.d.store.dir("groups"), g.GetGroupSnapshotId()+metaExt)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.stagedVolume(v1).backend().WriteAt([]byte("later"), 0); err != nil {
		t.Fatal(err)
	}
	again := e.createGroup(t, "g", v1, v2)
	if got := e.restoreRead(t, snapshotOf(t, again, v1), 0, 5); string(got) != "later" {
		t.Fatalf("recut member reads %q", got)
	}
	if n := internalSnapshots(t, e, v1); len(n) != 1 {
		t.Fatalf("internal snapshots %v, want one", n)
	}
}

// TestGroupSnapshotCrashConsistent: a writer makes each write to volume B
// only after the same round's write to A is acknowledged, and A's next
// round only after B's, both through the devices' backends, while groups
// are cut. Every group must hold rounds (a, b) with b == a or b == a-1:
// anything else is a state no crash could leave, as when B is cut later
// than A while writes went on. With the write gates taken shared instead
// of exclusively, 3 to 6 of the 20 groups failed this in each of 5 runs.
func TestGroupSnapshotCrashConsistent(t *testing.T) {
	e := newTestEnv(t)
	va := e.mustCreate(t, createReq("a", 2<<20, nil)).GetVolumeId()
	vb := e.mustCreate(t, createReq("b", 2<<20, nil)).GetVolumeId()
	a, b := min(va, vb), max(va, vb) // a is cut first
	e.stage(t, a, rwoBlock)
	e.stage(t, b, rwoBlock)
	ba, bb := e.d.stagedVolume(a).backend(), e.d.stagedVolume(b).backend()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 8)
		for round := uint64(1); ; round++ {
			select {
			case <-stop:
				return
			default:
			}
			binary.LittleEndian.PutUint64(buf, round)
			if _, err := ba.WriteAt(buf, 0); err != nil {
				t.Error(err)
				return
			}
			if _, err := bb.WriteAt(buf, 0); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	var groups []*csi.VolumeGroupSnapshot
	for i := range 20 {
		groups = append(groups, e.createGroup(t, fmt.Sprint("g", i), a, b))
	}
	close(stop)
	wg.Wait()
	for _, g := range groups {
		ra := binary.LittleEndian.Uint64(e.restoreRead(t, snapshotOf(t, g, a), 0, 8))
		rb := binary.LittleEndian.Uint64(e.restoreRead(t, snapshotOf(t, g, b), 0, 8))
		if rb != ra && rb+1 != ra {
			t.Errorf("group %s holds round %d of A and %d of B: not crash consistent", g.GetGroupSnapshotId(), ra, rb)
		}
	}
}

// TestGroupSnapshotCommitFailure: when the group file cannot be written,
// the member snapshot files and internal snapshots already made go too.
func TestGroupSnapshotCommitFailure(t *testing.T) {
	e := newTestEnv(t)
	v1 := e.mustCreate(t, createReq("v1", 2<<20, nil)).GetVolumeId()
	v2 := e.mustCreate(t, createReq("v2", 2<<20, nil)).GetVolumeId()
	e.stage(t, v1, rwoBlock)
	groups := e.d.store.dir("groups")
	if err := os.Remove(groups); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(groups, nil, 0o600); err != nil { // not a directory: every write fails
		t.Fatal(err)
	}
	_, err := e.group().CreateVolumeGroupSnapshot(context.Background(), &csi.CreateVolumeGroupSnapshotRequest{Name: "g", SourceVolumeIds: []string{v1, v2}})
	if err == nil {
		t.Fatal("CreateVolumeGroupSnapshot succeeded without a groups directory")
	}
	if ids, _ := e.d.store.list("snapshots"); len(ids) != 0 {
		t.Fatalf("member snapshot files left: %v", ids)
	}
	for _, id := range []string{v1, v2} {
		if n := internalSnapshots(t, e, id); len(n) != 0 {
			t.Fatalf("internal snapshots left in %s: %v", id, n)
		}
	}
}
