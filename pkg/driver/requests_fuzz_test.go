package driver

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// FuzzControllerRequests sends arbitrary controller and group controller
// requests (the fuzzed bytes are the request's protobuf encoding; the
// first byte picks the RPC) to a driver on a temporary data dir, and
// checks what every bad
// input must get: a gRPC status of a code the spec gives for bad requests,
// with a message of bounded length, never a panic or an Internal error;
// and the data dir holds nothing but the store's own files afterwards.
// Run it with `go test -run '^$' -fuzz FuzzControllerRequests ./pkg/driver/`.
func FuzzControllerRequests(f *testing.F) {
	for _, s := range []struct {
		rpc byte
		req proto.Message
	}{
		{0, createReq("pvc-1", 8<<20, map[string]string{paramFSType: "xfs", paramClusterSize: "4k"})},
		{0, createReq("pvc-2", 1<<20, map[string]string{paramLazyRefcounts: "false", "csi.storage.k8s.io/pvc/name": "x"})},
		{0, &csi.CreateVolumeRequest{Name: "pvc-3", CapacityRange: &csi.CapacityRange{RequiredBytes: 5 << 20, LimitBytes: 4 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{mountCap(csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)}}},
		{0, &csi.CreateVolumeRequest{Name: "pvc-4", VolumeCapabilities: []*csi.VolumeCapability{rwo},
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: "snap-00000000000000000000000000000000"}}}}},
		{1, &csi.DeleteVolumeRequest{VolumeId: "vol-0123456789abcdef0123456789abcdef"}},
		{2, &csi.CreateSnapshotRequest{Name: "snap", SourceVolumeId: "vol-0123456789abcdef0123456789abcdef"}},
		{3, &csi.DeleteSnapshotRequest{SnapshotId: "../volumes"}},
		{4, &csi.ListVolumesRequest{MaxEntries: 2, StartingToken: "vol-1"}},
		{5, &csi.ListSnapshotsRequest{SourceVolumeId: "vol-x", StartingToken: "7"}},
		{6, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: "vol-0123456789abcdef0123456789abcdef",
			VolumeCapabilities: []*csi.VolumeCapability{rwo}}},
		{7, &csi.GetCapacityRequest{VolumeCapabilities: []*csi.VolumeCapability{rwo}}},
		{8, &csi.CreateVolumeGroupSnapshotRequest{Name: "group",
			SourceVolumeIds: []string{"vol-0123456789abcdef0123456789abcdef", "vol-x"}}},
		{9, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: "gsnap-0123456789abcdef0123456789abcdef",
			SnapshotIds: []string{"snap-1"}}},
		{10, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: "../groups"}},
	} {
		b, err := proto.Marshal(s.req)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(append([]byte{s.rpc}, b...))
	}
	d, dataDir := fuzzDriver(f)
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) == 0 || len(in) > 1<<20 {
			return
		}
		err := callController(d, in[0], in[1:])
		if err != nil {
			st, _ := status.FromError(err)
			switch st.Code() {
			case codes.InvalidArgument, codes.NotFound, codes.AlreadyExists, codes.OutOfRange,
				codes.ResourceExhausted, codes.FailedPrecondition, codes.Aborted, codes.Unimplemented:
			default:
				t.Fatalf("rpc %d: %v (code %s): a bad request must get a client error", in[0], err, st.Code())
			}
			if len(st.Message()) > maxMessageLen {
				t.Fatalf("rpc %d: a %d-byte message echoes the request unbounded: %.200q...", in[0], len(st.Message()), st.Message())
			}
		}
		if stray := strayFiles(t, dataDir); len(stray) > 0 {
			t.Fatalf("rpc %d left files outside the store's layout: %q", in[0], stray)
		}
	})
}

// maxMessageLen bounds an error message: names, ids and parameter values
// are echoed truncated.
const maxMessageLen = 2048

// fuzzDriver is one driver for the whole fuzzing run (New creates the data
// dir; requests are independent of each other but for the names they
// create, which a successful CreateVolume deletes again).
func fuzzDriver(f *testing.F) (*Driver, string) {
	dir := f.TempDir()
	opts := DefaultOptions()
	opts.Endpoint = "unix://" + dir + "/csi.sock"
	opts.NodeID = "node-1"
	opts.DataDir = filepath.Join(dir, "data")
	d, err := New(opts, newFakeMounter(), newFakeAttacher())
	if err != nil {
		f.Fatal(err)
	}
	return d, opts.DataDir
}

func callController(d *Driver, rpc byte, b []byte) error {
	ctx := context.Background()
	var err error
	switch rpc % 11 {
	case 0:
		req := &csi.CreateVolumeRequest{}
		if proto.Unmarshal(b, req) != nil {
			return nil
		}
		var resp *csi.CreateVolumeResponse
		if resp, err = d.CreateVolume(ctx, req); err == nil {
			_, err = d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: resp.GetVolume().GetVolumeId()})
			if err != nil {
				return status.Errorf(codes.Internal, "deleting the volume just created: %v", toStatus(err))
			}
		}
	case 1:
		req := &csi.DeleteVolumeRequest{}
		if proto.Unmarshal(b, req) != nil {
			return nil
		}
		_, err = d.DeleteVolume(ctx, req)
	case 2:
		req := &csi.CreateSnapshotRequest{}
		if proto.Unmarshal(b, req) != nil {
			return nil
		}
		_, err = d.CreateSnapshot(ctx, req)
	case 3:
		req := &csi.DeleteSnapshotRequest{}
		if proto.Unmarshal(b, req) != nil {
			return nil
		}
		_, err = d.DeleteSnapshot(ctx, req)
	case 4:
		req := &csi.ListVolumesRequest{}
		if proto.Unmarshal(b, req) != nil {
			return nil
		}
		_, err = d.ListVolumes(ctx, req)
	case 5:
		req := &csi.ListSnapshotsRequest{}
		if proto.Unmarshal(b, req) != nil {
			return nil
		}
		_, err = d.ListSnapshots(ctx, req)
	case 6:
		req := &csi.ValidateVolumeCapabilitiesRequest{}
		if proto.Unmarshal(b, req) != nil {
			return nil
		}
		_, err = d.ValidateVolumeCapabilities(ctx, req)
	case 7:
		req := &csi.GetCapacityRequest{}
		if proto.Unmarshal(b, req) != nil {
			return nil
		}
		_, err = d.GetCapacity(ctx, req)
	case 8:
		req := &csi.CreateVolumeGroupSnapshotRequest{}
		if proto.Unmarshal(b, req) != nil {
			return nil
		}
		_, err = d.CreateVolumeGroupSnapshot(ctx, req)
	case 9:
		req := &csi.GetVolumeGroupSnapshotRequest{}
		if proto.Unmarshal(b, req) != nil {
			return nil
		}
		_, err = d.GetVolumeGroupSnapshot(ctx, req)
	case 10:
		req := &csi.DeleteVolumeGroupSnapshotRequest{}
		if proto.Unmarshal(b, req) != nil {
			return nil
		}
		_, err = d.DeleteVolumeGroupSnapshot(ctx, req)
	}
	return toStatus(err)
}

// storeFile is every name the store's layout (store.go) allows.
var storeFile = regexp.MustCompile(`^(volumes/vol-[0-9a-f]{32}\.(qcow2|json)|snapshots/snap-[0-9a-f]{32}\.json|staged/vol-[0-9a-f]{32}\.json|groups/gsnap-[0-9a-f]{32}\.json|volumes|snapshots|staged|groups)$`)

var strayOnce sync.Once

// strayFiles lists what under dataDir the layout does not name.
func strayFiles(t *testing.T, dataDir string) []string {
	var out []string
	filepath.WalkDir(dataDir, func(p string, _ os.DirEntry, err error) error {
		if err != nil || p == dataDir {
			return nil
		}
		rel := strings.TrimPrefix(p, dataDir+"/")
		if !storeFile.MatchString(rel) {
			out = append(out, rel)
		}
		return nil
	})
	strayOnce.Do(func() { t.Logf("data dir %s holds only the store's files", dataDir) })
	return out
}
