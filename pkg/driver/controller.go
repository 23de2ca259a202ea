package driver

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// ControllerExpandVolume is deliberately not offered: an image lives on one
// node and the external-resizer does not run per node, so growth happens in
// NodeExpandVolume (node EXPAND_VOLUME), which sends the resizer down its
// node-only path. The embedded Unimplemented server answers Unimplemented.

func (d *Driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, t := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csi.ControllerServiceCapability_RPC_GET_CAPACITY,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_GET_VOLUME_HEALTH,
		csi.ControllerServiceCapability_RPC_LIST_VOLUME_HEALTH,
		csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{
			Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

func (d *Driver) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	params, err := validateCreateVolumeRequest(req)
	if err != nil {
		return nil, err
	}
	if !d.topologyAllows(req.GetAccessibilityRequirements()) {
		return nil, newError(errExhausted, "accessibility requirements exclude node %s (%s)", d.opts.NodeID, d.opts.TopologyKey)
	}
	src, err := d.resolveSource(req.GetVolumeContentSource())
	if errors.Is(err, errNotFound) {
		if crossNodeRestore(req.GetParameters()) {
			return d.createFromPeer(ctx, req, params)
		}
		// Say what would find it elsewhere: a restore on another node than
		// the snapshot's is the likely cause, and the fix is in the class.
		err = newError(errNotFound, "%v; a source on another node is copied here only with the StorageClass parameter %s: \"true\"", err, paramCrossNodeRestore)
	}
	if err != nil {
		return nil, err
	}
	size, err := roundCapacity(req.GetCapacityRange(), src.size)
	if err != nil {
		return nil, err
	}
	id := volumeIDFor(req.GetName())
	keys := []string{id}
	if src.volumeID != "" {
		keys = append(keys, src.volumeID)
	}
	unlock, err := d.lock(ctx, keys...)
	if err != nil {
		return nil, err
	}
	defer unlock()

	want := volumeMeta{ID: id, Name: req.GetName(), CapacityBytes: size, Params: params,
		SourceSnapshotID: src.snapshotID, CreatedAt: time.Now().UTC()}
	if src.snapshotID == "" {
		want.SourceVolumeID = src.volumeID
	}
	if have, err := d.store.readVolume(id); err == nil {
		if !sameVolume(have, &want, req.GetCapacityRange()) {
			return nil, newError(errAlreadyExists, "volume %q exists with a different size, parameters or source", req.GetName())
		}
		return &csi.CreateVolumeResponse{Volume: d.csiVolume(have)}, nil
	} else if !errors.Is(err, errNotFound) {
		return nil, err
	}
	if err := d.createImage(ctx, &want, src); err != nil {
		return nil, err
	}
	// The metadata is the commit point: the volume exists once it is on disk.
	if err := d.store.write("volumes", id, &want); err != nil {
		_ = removeDurably(d.store.imagePath(id))
		return nil, err
	}
	klog.V(2).InfoS("Created volume", "volumeID", id, "name", req.GetName(), "capacityBytes", size,
		"sourceSnapshotID", src.snapshotID, "sourceVolumeID", want.SourceVolumeID)
	return &csi.CreateVolumeResponse{Volume: d.csiVolume(&want)}, nil
}

func validateCreateVolumeRequest(req *csi.CreateVolumeRequest) (createParams, error) {
	if err := validateName("name", req.GetName()); err != nil {
		return createParams{}, err
	}
	unsupported, err := validateCapabilities(req.GetVolumeCapabilities())
	if err != nil {
		return createParams{}, err
	}
	if unsupported != "" {
		return createParams{}, newError(errInvalid, "%s", unsupported)
	}
	return parseCreateParams(req.GetParameters())
}

// sameVolume: a repeated CreateVolume must ask for what exists.
func sameVolume(have, want *volumeMeta, r *csi.CapacityRange) bool {
	return have.Name == want.Name && have.Params == want.Params &&
		have.SourceSnapshotID == want.SourceSnapshotID && have.SourceVolumeID == want.SourceVolumeID &&
		fitsRange(have.CapacityBytes, r)
}

// topologyAllows: the volume can only be on this node.
func (d *Driver) topologyAllows(req *csi.TopologyRequirement) bool {
	if req == nil || len(req.GetRequisite()) == 0 {
		return true
	}
	for _, t := range req.GetRequisite() {
		if v, ok := t.GetSegments()[d.opts.TopologyKey]; ok && v == d.opts.NodeID {
			return true
		}
	}
	return false
}

func (d *Driver) csiVolume(m *volumeMeta) *csi.Volume {
	v := &csi.Volume{
		VolumeId:           m.ID,
		CapacityBytes:      m.CapacityBytes,
		VolumeContext:      map[string]string{"fsType": m.Params.FSType},
		AccessibleTopology: []*csi.Topology{d.topology()},
	}
	switch {
	case m.SourceSnapshotID != "":
		v.ContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: m.SourceSnapshotID}}}
	case m.SourceVolumeID != "":
		v.ContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
			Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: m.SourceVolumeID}}}
	}
	return v
}

func (d *Driver) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, newError(errInvalid, "volume id is required")
	}
	if !validVolumeID(id) {
		return &csi.DeleteVolumeResponse{}, nil // not ours: nothing to delete
	}
	unlock, err := d.lock(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	d.cancelCopy(id)
	if err := d.deleteVolumeLocked(id); err != nil {
		return nil, err
	}
	return &csi.DeleteVolumeResponse{}, nil
}

// deleteVolumeLocked deletes volume id, a valid id whose lock the caller
// holds: DeleteVolume's work, and the orphan checker's (orphans.go). A
// staged volume, or one with snapshots, is refused.
func (d *Driver) deleteVolumeLocked(id string) error {
	if d.stagedVolume(id) != nil {
		return newError(errFailedPrecondition, "volume %s is staged on this node", id)
	}
	if err := d.notHeldElsewhere(id); err != nil {
		return err
	}
	snaps, err := d.snapshotsOf(id)
	if err != nil {
		return err
	}
	if len(snaps) > 0 {
		return newError(errFailedPrecondition, "volume %s has %d snapshot(s) (%s...): delete them first", id, len(snaps), snaps[0])
	}
	// Metadata first: once it is gone the volume is gone, and a crash
	// leaves at worst an image without metadata, which the next
	// DeleteVolume or CreateVolume with this id removes.
	if err := d.store.remove("volumes", id); err != nil {
		return err
	}
	if err := removeDurably(d.store.imagePath(id)); err != nil {
		return err
	}
	klog.V(2).InfoS("Deleted volume", "volumeID", id)
	return nil
}

// snapshotsOf lists the snapshot ids whose source is volume id.
func (d *Driver) snapshotsOf(id string) ([]string, error) {
	ids, err := d.store.list("snapshots")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, sid := range ids {
		m, err := d.store.readSnapshot(sid)
		if err == nil && m.SourceVolumeID == id {
			out = append(out, sid)
		}
	}
	return out, nil
}

func (d *Driver) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	if err := volumeIDArg(req.GetVolumeId()); err != nil {
		return nil, err
	}
	unsupported, err := validateCapabilities(req.GetVolumeCapabilities())
	if err != nil {
		return nil, err
	}
	if _, err := d.store.readVolume(req.GetVolumeId()); err != nil {
		return nil, err
	}
	if unsupported == "" && req.GetParameters() != nil {
		if _, err := parseCreateParams(req.GetParameters()); err != nil {
			unsupported = err.Error()
		}
	}
	if unsupported != "" {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: unsupported}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}

func (d *Driver) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	ids, err := d.store.list("volumes")
	if err != nil {
		return nil, err
	}
	page, next, err := paginate(ids, req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	resp := &csi.ListVolumesResponse{NextToken: next}
	for _, id := range page {
		m, err := d.store.readVolume(id)
		if err != nil {
			continue // deleted meanwhile
		}
		resp.Entries = append(resp.Entries, &csi.ListVolumesResponse_Entry{Volume: d.csiVolume(m)})
	}
	return resp, nil
}

// paginate returns ids[token:token+max] and the next token ("" at the end).
// A token is an offset into the sorted ids; anything else is Aborted, as
// the spec asks.
func paginate(ids []string, token string, max int32) ([]string, string, error) {
	if max < 0 {
		return nil, "", newError(errInvalid, "max_entries must not be negative")
	}
	start := 0
	if token != "" {
		n, err := strconv.Atoi(token)
		if err != nil || n < 0 || n > len(ids) {
			return nil, "", newError(errBadToken, "starting token %q is not valid", truncate(token))
		}
		start = n
	}
	end := len(ids)
	if max > 0 && start+int(max) < end {
		end = start + int(max)
	}
	next := ""
	if end < len(ids) {
		next = strconv.Itoa(end)
	}
	return ids[start:end], next, nil
}

func (d *Driver) ControllerGetVolume(ctx context.Context, req *csi.ControllerGetVolumeRequest) (*csi.ControllerGetVolumeResponse, error) {
	if err := volumeIDArg(req.GetVolumeId()); err != nil {
		return nil, err
	}
	m, err := d.store.readVolume(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	return &csi.ControllerGetVolumeResponse{Volume: d.csiVolume(m)}, nil
}

func (d *Driver) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	if len(req.GetVolumeCapabilities()) > 0 {
		unsupported, err := validateCapabilities(req.GetVolumeCapabilities())
		if err != nil {
			return nil, err
		}
		if unsupported != "" {
			return &csi.GetCapacityResponse{}, nil
		}
	}
	// The parameters are not judged here: the free space of the data dir
	// is the same whatever they say, and CreateVolume refuses bad ones
	// with an error that names them. Refusing them here too would keep
	// the StorageClass from ever getting a CSIStorageCapacity, so the
	// scheduler would hold its pods back with "not enough free storage"
	// and the PVC would never reach CreateVolume and its event.
	if t := req.GetAccessibleTopology(); t != nil && t.GetSegments()[d.opts.TopologyKey] != d.opts.NodeID {
		return &csi.GetCapacityResponse{}, nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(d.opts.DataDir, &st); err != nil {
		return nil, fmt.Errorf("statfs %s: %w", d.opts.DataDir, err)
	}
	free := int64(st.Bavail)*int64(st.Bsize) - d.opts.CapacityReserve
	if free < 0 {
		free = 0
	}
	return &csi.GetCapacityResponse{AvailableCapacity: free}, nil
}
