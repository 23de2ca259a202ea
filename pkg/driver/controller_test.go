package driver

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func mountCap(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
	}
}

var rwo = mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)

func createReq(name string, size int64, params map[string]string) *csi.CreateVolumeRequest {
	return &csi.CreateVolumeRequest{Name: name, Parameters: params,
		CapacityRange:      &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{rwo}}
}

func (e *testEnv) mustCreate(t testing.TB, req *csi.CreateVolumeRequest) *csi.Volume {
	t.Helper()
	resp, err := e.ctrl.CreateVolume(context.Background(), req)
	if err != nil {
		t.Fatalf("CreateVolume(%s): %v", req.GetName(), err)
	}
	return resp.GetVolume()
}

func TestCreateVolumeValidation(t *testing.T) {
	e := newTestEnv(t)
	ctx := context.Background()
	e.mustCreate(t, createReq("taken", 8<<20, nil))
	tests := []struct {
		name string
		req  *csi.CreateVolumeRequest
		code codes.Code
		msg  string
	}{
		{"ok default ext4", createReq("a", 1<<20, nil), codes.OK, ""},
		{"ok xfs and sidecar keys", createReq("b", 1<<20, map[string]string{
			"csi.storage.k8s.io/fstype": "xfs", "csi.storage.k8s.io/pvc/name": "p",
			"csi.storage.k8s.io/pvc/namespace": "ns", "csi.storage.k8s.io/pv/name": "pv"}), codes.OK, ""},
		{"ok cluster size", createReq("c", 1<<20, map[string]string{"clusterSize": "4K", "lazyRefcounts": "true"}), codes.OK, ""},
		{"unknown parameter named", createReq("d", 1<<20, map[string]string{"size": "1", "foo": "x"}), codes.InvalidArgument, "foo, size"},
		{"bad fstype", createReq("e", 1<<20, map[string]string{"csi.storage.k8s.io/fstype": "btrfs"}), codes.InvalidArgument, "btrfs"},
		{"bad cluster size", createReq("f", 1<<20, map[string]string{"clusterSize": "3000"}), codes.InvalidArgument, "clusterSize"},
		{"no name", createReq("", 1<<20, nil), codes.InvalidArgument, "name"},
		{"no capabilities", &csi.CreateVolumeRequest{Name: "g"}, codes.InvalidArgument, "capabilities"},
		{"multi node refused", &csi.CreateVolumeRequest{Name: "h", VolumeCapabilities: []*csi.VolumeCapability{
			mountCap(csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)}}, codes.InvalidArgument, "MULTI_NODE"},
		{"limit below rounding", &csi.CreateVolumeRequest{Name: "i", VolumeCapabilities: []*csi.VolumeCapability{rwo},
			CapacityRange: &csi.CapacityRange{RequiredBytes: 1<<20 + 1, LimitBytes: 1<<20 + 2}}, codes.OutOfRange, "limit"},
		{"same name other size", createReq("taken", 16<<20, nil), codes.AlreadyExists, ""},
		{"same name other params", createReq("taken", 8<<20, map[string]string{"csi.storage.k8s.io/fstype": "xfs"}), codes.AlreadyExists, ""},
		{"same name same request", createReq("taken", 8<<20, nil), codes.OK, ""},
		{"snapshot source not ours", &csi.CreateVolumeRequest{Name: "j", VolumeCapabilities: []*csi.VolumeCapability{rwo},
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: "../../etc/passwd"}}}}, codes.NotFound, "node-1"},
		{"topology elsewhere", &csi.CreateVolumeRequest{Name: "k", VolumeCapabilities: []*csi.VolumeCapability{rwo},
			AccessibilityRequirements: &csi.TopologyRequirement{Requisite: []*csi.Topology{
				{Segments: map[string]string{DefaultTopologyKey: "node-2"}}}}}, codes.ResourceExhausted, "node-1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := e.ctrl.CreateVolume(ctx, tt.req)
			if status.Code(err) != tt.code || !strings.Contains(status.Convert(err).Message(), tt.msg) {
				t.Fatalf("got %v, want %v containing %q", err, tt.code, tt.msg)
			}
			if err == nil {
				v := resp.GetVolume()
				if v.GetCapacityBytes()%capacityUnit != 0 || !validVolumeID(v.GetVolumeId()) ||
					v.GetAccessibleTopology()[0].GetSegments()[DefaultTopologyKey] != "node-1" {
					t.Fatalf("volume %v", v)
				}
			}
		})
	}
}

func TestRoundCapacity(t *testing.T) {
	tests := []struct {
		req, lim, min, want int64
		err                 bool
	}{
		{0, 0, 0, defaultCapacity, false},
		{1, 0, 0, 1 << 20, false},
		{1<<20 + 1, 0, 0, 2 << 20, false},
		{0, 10 << 20, 0, 10 << 20, false},
		{0, 0, 3 << 20, 3 << 20, false},
		{1 << 20, 0, 5<<20 + 1, 6 << 20, false},
		{1 << 20, 1<<20 + 5, 0, 1 << 20, false},
		{1<<20 + 1, 1<<20 + 5, 0, 0, true},
		{5, 4, 0, 0, true},
		{maxCapacity + 1, 0, 0, 0, true},
	}
	for _, tt := range tests {
		got, err := roundCapacity(&csi.CapacityRange{RequiredBytes: tt.req, LimitBytes: tt.lim}, tt.min)
		if (err != nil) != tt.err || got != tt.want {
			t.Errorf("roundCapacity(%d, %d, min %d) = %d, %v; want %d", tt.req, tt.lim, tt.min, got, err, tt.want)
		}
	}
}

// TestForeignIDs: ids that are not ours never become paths.
func TestForeignIDs(t *testing.T) {
	e := newTestEnv(t)
	ctx := context.Background()
	victim := filepath.Join(filepath.Dir(e.opts.DataDir), "victim.json")
	os.WriteFile(victim, []byte("{}"), 0o600)
	for _, id := range []string{"../victim", "vol-../../victim", "/etc/passwd", "vol-\x00", strings.Repeat("a", 200000),
		"vol-0123456789abcdef0123456789ABCDEF", "snap-0123456789abcdef0123456789abcdef"} {
		if _, err := e.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil && status.Code(err) != codes.ResourceExhausted {
			t.Errorf("DeleteVolume(%.20q) = %v, want OK", id, err)
		}
		if _, err := e.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id}); err != nil && status.Code(err) != codes.ResourceExhausted {
			t.Errorf("DeleteSnapshot(%.20q) = %v, want OK", id, err)
		}
		_, err := e.ctrl.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: id})
		if c := status.Code(err); c != codes.NotFound && c != codes.ResourceExhausted {
			t.Errorf("ControllerGetVolume(%.20q) = %v, want NotFound", id, err)
		}
		_, err = e.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: id})
		if c := status.Code(err); c != codes.NotFound && c != codes.ResourceExhausted {
			t.Errorf("CreateSnapshot(source %.20q) = %v, want NotFound", id, err)
		}
	}
	if _, err := os.Stat(victim); err != nil {
		t.Fatalf("a file outside the data dir was touched: %v", err)
	}
}

func TestDeleteVolumeWithSnapshotsRefused(t *testing.T) {
	e := newTestEnv(t)
	ctx := context.Background()
	v := e.mustCreate(t, createReq("v", 4<<20, nil))
	s, err := e.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: v.GetVolumeId()})
	if err != nil {
		t.Fatal(err)
	}
	if !s.GetSnapshot().GetReadyToUse() || s.GetSnapshot().GetSizeBytes() != 4<<20 {
		t.Fatalf("snapshot %v", s.GetSnapshot())
	}
	_, err = e.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.GetVolumeId()})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("DeleteVolume with a snapshot: %v, want FailedPrecondition", err)
	}
	if _, err := e.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s.GetSnapshot().GetSnapshotId()}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ { // idempotent
		if _, err := e.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.GetVolumeId()}); err != nil {
			t.Fatalf("DeleteVolume #%d: %v", i, err)
		}
	}
	ents, _ := os.ReadDir(filepath.Join(e.opts.DataDir, "volumes"))
	if len(ents) != 0 {
		t.Fatalf("left behind: %v", ents)
	}
}

func TestImageFilesArePrivate(t *testing.T) {
	e := newTestEnv(t)
	v := e.mustCreate(t, createReq("v", 1<<20, nil))
	for _, ext := range []string{imageExt, metaExt} {
		fi, err := os.Stat(filepath.Join(e.opts.DataDir, "volumes", v.GetVolumeId()+ext))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v %v", ext, fi.Mode(), err)
		}
	}
}

func TestPagination(t *testing.T) {
	e := newTestEnv(t)
	ctx := context.Background()
	for _, n := range []string{"a", "b", "c", "d", "e"} {
		e.mustCreate(t, createReq(n, 1<<20, nil))
	}
	var seen []string
	token := ""
	for pages := 0; ; pages++ {
		r, err := e.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: 2, StartingToken: token})
		if err != nil {
			t.Fatal(err)
		}
		for _, en := range r.GetEntries() {
			seen = append(seen, en.GetVolume().GetVolumeId())
		}
		if token = r.GetNextToken(); token == "" {
			break
		}
		if pages > 5 {
			t.Fatal("no end")
		}
	}
	if len(seen) != 5 {
		t.Fatalf("saw %d volumes", len(seen))
	}
	_, err := e.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: "nope"})
	if status.Code(err) != codes.Aborted {
		t.Fatalf("bad token: %v, want Aborted", err)
	}
}

func TestControllerExpandNotOffered(t *testing.T) {
	e := newTestEnv(t)
	ctx := context.Background()
	caps, err := e.ctrl.ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range caps.GetCapabilities() {
		if c.GetRpc().GetType() == csi.ControllerServiceCapability_RPC_EXPAND_VOLUME {
			t.Fatal("EXPAND_VOLUME offered")
		}
	}
	_, err = e.ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: "vol-x"})
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("ControllerExpandVolume: %v", err)
	}
}

// readImage reads a volume's whole image from disk.
func readImage(t *testing.T, e *testEnv, id string) []byte {
	t.Helper()
	img, err := qcow2.Open(e.d.store.imagePath(id), qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	b := make([]byte, img.Size())
	if _, err := img.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestRestoreAndClone: a restored volume has the snapshot's content, a
// clone the source's, both independent images without snapshots.
func TestRestoreAndClone(t *testing.T) {
	for _, staged := range []bool{false, true} {
		t.Run(map[bool]string{false: "detached", true: "staged"}[staged], func(t *testing.T) {
			e := newTestEnv(t)
			ctx := context.Background()
			v := e.mustCreate(t, createReq("src", 2<<20, nil))
			id := v.GetVolumeId()
			write := func(p []byte, off int64) {
				if staged {
					if _, err := e.d.stagedVolume(id).img.WriteAt(p, off); err != nil {
						t.Fatal(err)
					}
					return
				}
				img, err := qcow2.Open(e.d.store.imagePath(id), qcow2.OpenOptions{})
				if err != nil {
					t.Fatal(err)
				}
				img.WriteAt(p, off)
				img.Close()
			}
			if staged {
				e.stage(t, id, rwo)
			}
			write([]byte("before"), 1<<20)
			snap, err := e.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: id})
			if err != nil {
				t.Fatal(err)
			}
			write([]byte("after!"), 1<<20)
			if staged {
				if got := strings.Join(e.mounter.events, ","); !strings.Contains(got, "freeze") || e.mounter.frozen[e.stagingPath(id)] != 0 {
					t.Fatalf("freeze/thaw events %q", got)
				}
				e.unstage(t, id)
			}
			restored := e.mustCreate(t, &csi.CreateVolumeRequest{Name: "restored", VolumeCapabilities: []*csi.VolumeCapability{rwo},
				CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20},
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
					Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.GetSnapshot().GetSnapshotId()}}}})
			clone := e.mustCreate(t, &csi.CreateVolumeRequest{Name: "clone", VolumeCapabilities: []*csi.VolumeCapability{rwo},
				VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
					Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}})
			if restored.GetCapacityBytes() != 4<<20 || clone.GetCapacityBytes() != 2<<20 {
				t.Fatalf("sizes %d %d", restored.GetCapacityBytes(), clone.GetCapacityBytes())
			}
			if b := readImage(t, e, restored.GetVolumeId()); !bytes.Equal(b[1<<20:1<<20+6], []byte("before")) || len(b) != 4<<20 {
				t.Fatalf("restored reads %q (size %d)", b[1<<20:1<<20+6], len(b))
			}
			if b := readImage(t, e, clone.GetVolumeId()); !bytes.Equal(b[1<<20:1<<20+6], []byte("after!")) {
				t.Fatalf("clone reads %q", b[1<<20:1<<20+6])
			}
			for _, nid := range []string{restored.GetVolumeId(), clone.GetVolumeId(), id} {
				img, err := qcow2.Open(e.d.store.imagePath(nid), qcow2.OpenOptions{ReadOnly: true})
				if err != nil {
					t.Fatal(err)
				}
				n, lazy := len(img.Snapshots()), img.Info().LazyRefcounts
				img.Close()
				if want := map[bool]int{true: 1, false: 0}[nid == id]; n != want {
					t.Errorf("%s has %d internal snapshots, want %d", nid, n, want)
				}
				if !lazy {
					t.Errorf("%s has no lazy refcounts", nid)
				}
			}
		})
	}
}

// TestCreateVolumeLazyRefcounts: volumes get lazy refcounts unless the
// StorageClass refuses them; the image says so.
func TestCreateVolumeLazyRefcounts(t *testing.T) {
	e := newTestEnv(t)
	for _, c := range []struct {
		name   string
		params map[string]string
		want   bool
	}{
		{"default", nil, true},
		{"true", map[string]string{"lazyRefcounts": "true"}, true},
		{"false", map[string]string{"lazyRefcounts": "false"}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			v := e.mustCreate(t, createReq("lazy-"+c.name, 1<<20, c.params))
			img, err := qcow2.Open(e.d.store.imagePath(v.GetVolumeId()), qcow2.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if got := img.Info().LazyRefcounts; got != c.want {
				t.Fatalf("lazy refcounts %v, want %v", got, c.want)
			}
		})
	}
}

// TestGetCapacityIgnoresParameters: a StorageClass with a parameter
// CreateVolume refuses still gets its capacity, so that its PVCs reach
// CreateVolume and the error naming the parameter, instead of waiting on a
// scheduler that sees no CSIStorageCapacity for it.
func TestGetCapacityIgnoresParameters(t *testing.T) {
	e := newTestEnv(t)
	ctx := context.Background()
	want, err := e.ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{})
	if err != nil || want.GetAvailableCapacity() <= 0 {
		t.Fatalf("GetCapacity() = %v, %v; want free space", want, err)
	}
	for _, params := range []map[string]string{
		{"noSuchParameter": "1"},
		{"csi.storage.k8s.io/fstype": "btrfs", "clusterSize": "3000"},
	} {
		got, err := e.ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: params})
		if err != nil || got.GetAvailableCapacity() <= 0 {
			t.Errorf("GetCapacity(%v) = %v, %v; want free space", params, got, err)
		}
		_, err = e.ctrl.CreateVolume(ctx, createReq("p", 1<<20, params))
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("CreateVolume(%v): %v; want InvalidArgument", params, err)
		}
	}
}
