package driver

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func (e *testEnv) stagingPath(id string) string {
	return filepath.Join(filepath.Dir(e.opts.DataDir), "staging", id)
}

func (e *testEnv) stage(t *testing.T, id string, c *csi.VolumeCapability) {
	t.Helper()
	_, err := e.node.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{
		VolumeId: id, StagingTargetPath: e.stagingPath(id), VolumeCapability: c})
	if err != nil {
		t.Fatalf("NodeStageVolume: %v", err)
	}
}

func (e *testEnv) unstage(t *testing.T, id string) {
	t.Helper()
	_, err := e.node.NodeUnstageVolume(context.Background(), &csi.NodeUnstageVolumeRequest{
		VolumeId: id, StagingTargetPath: e.stagingPath(id)})
	if err != nil {
		t.Fatalf("NodeUnstageVolume: %v", err)
	}
}

func TestStageUnstage(t *testing.T) {
	e := newTestEnv(t)
	ctx := context.Background()
	v := e.mustCreate(t, createReq("v", 4<<20, map[string]string{"lazyRefcounts": "true", "csi.storage.k8s.io/fstype": "xfs"}))
	id := v.GetVolumeId()
	e.stage(t, id, rwo)
	e.stage(t, id, rwo) // idempotent
	if e.attacher.count() != 1 || e.mounter.formats["/dev/fake-nbd0"] != "xfs" {
		t.Fatalf("attached %d, formats %v", e.attacher.count(), e.mounter.formats)
	}
	if mounted, _ := e.mounter.IsMountPoint(e.stagingPath(id)); !mounted {
		t.Fatal("staging path not mounted")
	}
	// A restore shares its source's UUID on the same node: xfs needs nouuid.
	mps, _ := e.mounter.List()
	var opts []string
	for _, mp := range mps {
		if mp.Path == e.stagingPath(id) {
			opts = mp.Opts
		}
	}
	if !contains(opts, "nouuid") {
		t.Fatalf("xfs staged with opts %v, want nouuid", opts)
	}
	// A second stage elsewhere is refused; deleting a staged volume too.
	_, err := e.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: "/elsewhere", VolumeCapability: rwo})
	if status.Code(err) != codes.AlreadyExists {
		t.Fatalf("stage elsewhere: %v", err)
	}
	if _, err := e.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("DeleteVolume while staged: %v", err)
	}
	if _, err := e.d.stagedVolume(id).img.WriteAt([]byte("x"), 0); err != nil {
		t.Fatal(err)
	}
	e.unstage(t, id)
	e.unstage(t, id) // idempotent
	if e.attacher.count() != 0 {
		t.Fatal("still attached")
	}
	img, err := qcow2.Open(e.d.store.imagePath(id), qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if info := img.Info(); info.Dirty || !info.LazyRefcounts {
		t.Fatalf("after unstage: %+v (want clean)", info)
	}
}

func TestStageErrors(t *testing.T) {
	e := newTestEnv(t)
	ctx := context.Background()
	v := e.mustCreate(t, createReq("v", 1<<20, nil))
	tests := []struct {
		name string
		req  *csi.NodeStageVolumeRequest
		code codes.Code
	}{
		{"no id", &csi.NodeStageVolumeRequest{StagingTargetPath: "/s", VolumeCapability: rwo}, codes.InvalidArgument},
		{"no path", &csi.NodeStageVolumeRequest{VolumeId: v.GetVolumeId(), VolumeCapability: rwo}, codes.InvalidArgument},
		{"no capability", &csi.NodeStageVolumeRequest{VolumeId: v.GetVolumeId(), StagingTargetPath: "/s"}, codes.InvalidArgument},
		{"foreign id", &csi.NodeStageVolumeRequest{VolumeId: "../x", StagingTargetPath: "/s", VolumeCapability: rwo}, codes.NotFound},
		{"multi node", &csi.NodeStageVolumeRequest{VolumeId: v.GetVolumeId(), StagingTargetPath: "/s",
			VolumeCapability: mountCap(csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)}, codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := e.node.NodeStageVolume(ctx, tt.req); status.Code(err) != tt.code {
				t.Fatalf("got %v, want %v", err, tt.code)
			}
		})
	}
	t.Run("attach fails", func(t *testing.T) {
		e.attacher.attachErr = errors.New("no nbd here")
		defer func() { e.attacher.attachErr = nil }()
		_, err := e.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.GetVolumeId(),
			StagingTargetPath: e.stagingPath(v.GetVolumeId()), VolumeCapability: rwo})
		if status.Code(err) != codes.Internal || e.d.stagedVolume(v.GetVolumeId()) != nil {
			t.Fatalf("got %v", err)
		}
	})
}

func TestPublishBlockAndReadonly(t *testing.T) {
	e := newTestEnv(t)
	ctx := context.Background()
	block := &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	v := e.mustCreate(t, &csi.CreateVolumeRequest{Name: "b", VolumeCapabilities: []*csi.VolumeCapability{block}})
	id := v.GetVolumeId()
	target := filepath.Join(t.TempDir(), "pod", "dev")
	pub := &csi.NodePublishVolumeRequest{VolumeId: id, TargetPath: target, StagingTargetPath: e.stagingPath(id), VolumeCapability: block, Readonly: true}
	if _, err := e.node.NodePublishVolume(ctx, pub); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("publish before stage: %v", err)
	}
	e.stage(t, id, block)
	if len(e.mounter.formats) != 0 {
		t.Fatal("block volume formatted")
	}
	if _, err := e.node.NodePublishVolume(ctx, pub); err != nil {
		t.Fatal(err)
	}
	mps, _ := e.mounter.List()
	var found bool
	for _, mp := range mps {
		if mp.Path == target && mp.Device == "/dev/fake-nbd0" {
			found = true
			if !contains(mp.Opts, "ro") || !contains(mp.Opts, "bind") {
				t.Fatalf("opts %v", mp.Opts)
			}
		}
	}
	if !found {
		t.Fatalf("no bind mount of the device at %s: %v", target, mps)
	}
	st, err := e.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
	if err != nil || st.GetUsage()[0].GetTotal() != defaultCapacity {
		t.Fatalf("stats %v %v", st, err)
	}
	if _, err := e.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Fatalf("target left: %v", err)
	}
	e.unstage(t, id)
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

func TestNodeExpand(t *testing.T) {
	e := newTestEnv(t)
	ctx := context.Background()
	v := e.mustCreate(t, createReq("v", 4<<20, nil))
	id := v.GetVolumeId()
	req := &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: e.stagingPath(id),
		CapacityRange: &csi.CapacityRange{RequiredBytes: 10<<20 + 1}}
	if _, err := e.node.NodeExpandVolume(ctx, req); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("expand unstaged: %v", err)
	}
	e.stage(t, id, rwo)
	staged := len(e.mounter.resized) // stage grows a filesystem smaller than its device
	r, err := e.node.NodeExpandVolume(ctx, req)
	if err != nil || r.GetCapacityBytes() != 11<<20 {
		t.Fatalf("expand: %v %v", r, err)
	}
	if e.d.stagedVolume(id).img.Size() != 11<<20 || len(e.mounter.resized) != staged+1 {
		t.Fatalf("image %d, resized %v", e.d.stagedVolume(id).img.Size(), e.mounter.resized)
	}
	g, err := e.ctrl.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: id})
	if err != nil || g.GetVolume().GetCapacityBytes() != 11<<20 {
		t.Fatalf("controller sees %v %v", g, err)
	}
	// Shrinking is not a thing: a smaller request keeps the size.
	req.CapacityRange.RequiredBytes = 1 << 20
	if r, err := e.node.NodeExpandVolume(ctx, req); err != nil || r.GetCapacityBytes() != 11<<20 {
		t.Fatalf("smaller expand: %v %v", r, err)
	}
	e.unstage(t, id)
}

func TestHealth(t *testing.T) {
	e := newTestEnv(t)
	ctx := context.Background()
	a := e.mustCreate(t, createReq("a", 1<<20, nil)).GetVolumeId()
	b := e.mustCreate(t, createReq("b", 1<<20, nil)).GetVolumeId()
	c := e.mustCreate(t, createReq("c", 1<<20, nil)).GetVolumeId()
	// b: set the corrupt bit (incompatible_features bit 1, header offset 72).
	f, err := os.OpenFile(e.d.store.imagePath(b), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte{0, 0, 0, 0, 0, 0, 0, 2}, 72)
	f.Close()
	// c: staged, and its export fails.
	e.stage(t, c, rwo)
	e.attacher.attached[0].onError(errors.New("connection reset"))
	want := map[string]csi.VolumeHealthErrorType{a: -1, b: csi.VolumeHealthErrorType_DATA_LOSS, c: csi.VolumeHealthErrorType_INACCESSIBLE}
	for id, w := range want {
		r, err := e.ctrl.ControllerGetVolumeHealth(ctx, &csi.ControllerGetVolumeHealthRequest{VolumeId: id})
		if err != nil {
			t.Fatal(err)
		}
		hs := r.GetVolumeHealth().GetHealthStatuses()
		if (w == -1) != (len(hs) == 0) || (w != -1 && hs[0].GetStatus() != w) {
			t.Errorf("%s: %v, want %v", id, hs, w)
		}
		n, err := e.node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: id})
		if err != nil || len(n.GetVolumeHealth().GetHealthStatuses()) != len(hs) {
			t.Errorf("node health %v %v", n, err)
		}
	}
	l, err := e.ctrl.ControllerListVolumeHealth(ctx, &csi.ControllerListVolumeHealthRequest{})
	if err != nil || len(l.GetEntries()) != 3 {
		t.Fatalf("list health %v %v", l, err)
	}
	e.unstage(t, c)
}

// TestRecoverStaged: a new process over the same data dir serves the
// staged volume again on the device it had, without remounting.
func TestRecoverStaged(t *testing.T) {
	e := newTestEnv(t)
	id := e.mustCreate(t, createReq("v", 1<<20, nil)).GetVolumeId()
	e.stage(t, id, rwo)
	mounts := len(e.mounter.MountPoints)
	e.d.stagedVolume(id).img.Close() // the old process is gone
	e.d.setStaged(id, nil)

	d2, err := New(e.opts, e.mounter, e.attacher)
	if err != nil {
		t.Fatal(err)
	}
	// Before recovery the image may be open elsewhere: hands off.
	if err := d2.withImage(id, true, func(*qcow2.Image, *stagedVolume) error { return nil }); codeOf(err) != codes.FailedPrecondition {
		t.Fatalf("withImage on a volume staged elsewhere: %v", err)
	}
	d2.recoverStaged(context.Background())
	sv := d2.stagedVolume(id)
	if sv == nil || sv.dev.Index() != 0 || len(e.mounter.MountPoints) != mounts {
		t.Fatalf("recovered %+v, mounts %d -> %d", sv, mounts, len(e.mounter.MountPoints))
	}
	if err := d2.unmountAndDetach(context.Background(), sv); err != nil {
		t.Fatal(err)
	}
}

func TestNodeGetInfo(t *testing.T) {
	e := newTestEnv(t)
	r, err := e.node.NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{})
	if err != nil || r.GetNodeId() != "node-1" || r.GetMaxVolumesPerNode() != 16 ||
		r.GetAccessibleTopology().GetSegments()[DefaultTopologyKey] != "node-1" {
		t.Fatalf("%v %v", r, err)
	}
}

// TestStageGrowsFilesystem: a writable mount is grown to its device at
// stage (a restore or clone into a larger volume carries the source's
// smaller filesystem); a read-only one and a block volume are not touched.
func TestStageGrowsFilesystem(t *testing.T) {
	block := &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
	tests := []struct {
		name string
		c    *csi.VolumeCapability
		want int
	}{
		{"mount", rwo, 1},
		{"read-only mount", mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY), 0},
		{"block", block, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newTestEnv(t)
			id := e.mustCreate(t, createReq("v", 4<<20, nil)).GetVolumeId()
			e.stage(t, id, tc.c)
			if len(e.mounter.resized) != tc.want {
				t.Errorf("resized %v, want %d call(s)", e.mounter.resized, tc.want)
			}
		})
	}
}
