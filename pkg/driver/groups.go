package driver

import (
	"context"
	"errors"
	"slices"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// A volume group snapshot is one ordinary snapshot per member volume, all
// cut while the members' writes are held (groupcut.go), plus
// groups/<id>.json listing them. Every member's snapshots/<id>.json
// carries the group's id; restore, GetSnapshot, ListSnapshots and
// DeleteSnapshot treat it as any other snapshot.
//
// Crash order: the internal snapshots are cut and flushed, then each
// member's snapshot file is written, then the group file: the commit
// point. A crash before it leaves member snapshots that the retried
// create (same name) replaces: cutMember deletes and recuts them, since
// snapshots cut at another time are not consistent with new ones.
//
// All members must be volumes of this node: its data dir holds them, and
// only one process can hold their writes together.

func (d *Driver) GroupControllerGetCapabilities(context.Context, *csi.GroupControllerGetCapabilitiesRequest) (*csi.GroupControllerGetCapabilitiesResponse, error) {
	return &csi.GroupControllerGetCapabilitiesResponse{Capabilities: []*csi.GroupControllerServiceCapability{{
		Type: &csi.GroupControllerServiceCapability_Rpc{Rpc: &csi.GroupControllerServiceCapability_RPC{
			Type: csi.GroupControllerServiceCapability_RPC_CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT}}}}}, nil
}

func (d *Driver) CreateVolumeGroupSnapshot(ctx context.Context, req *csi.CreateVolumeGroupSnapshotRequest) (*csi.CreateVolumeGroupSnapshotResponse, error) {
	vols, err := validateCreateGroupRequest(req)
	if err != nil {
		return nil, err
	}
	id := groupIDFor(req.GetName())
	want := &groupMeta{ID: id, Name: req.GetName(), SourceVolumeIDs: vols}
	for _, v := range vols {
		want.SnapshotIDs = append(want.SnapshotIDs, memberSnapshotIDFor(id, v))
	}
	// The in-flight set takes every key at once or none (Aborted), so
	// overlapping groups cannot deadlock; sorted, the keys and the order
	// the members are frozen and cut in are the same on every retry.
	unlock, err := d.lock(ctx, slices.Concat([]string{id}, vols, want.SnapshotIDs)...)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if have, err := d.store.readGroup(id); err == nil {
		if !slices.Equal(have.SourceVolumeIDs, vols) {
			return nil, newError(errAlreadyExists, "group snapshot %q exists for volumes %s", req.GetName(), strings.Join(have.SourceVolumeIDs, ", "))
		}
		g, err := d.csiGroup(have)
		if err != nil {
			return nil, err
		}
		return &csi.CreateVolumeGroupSnapshotResponse{GroupSnapshot: g}, nil
	} else if !errors.Is(err, errNotFound) {
		return nil, err
	}
	if err := d.onThisNode(vols); err != nil {
		return nil, err
	}
	err = d.withImages(vols, func(imgs []*qcow2.Image, svs []*stagedVolume) error {
		ms := make([]*groupMember, len(vols))
		for i := range vols {
			ms[i] = &groupMember{volumeID: vols[i], snapshotID: want.SnapshotIDs[i], img: imgs[i], sv: svs[i]}
		}
		if err := d.cutTogether(ms); err != nil {
			return err
		}
		if err := d.commitGroup(want, ms); err != nil {
			return errors.Join(err, undoCuts(ms))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	klog.V(2).InfoS("Created volume group snapshot", "groupSnapshotID", id, "volumeIDs", vols)
	g, err := d.csiGroup(want)
	if err != nil {
		return nil, err
	}
	return &csi.CreateVolumeGroupSnapshotResponse{GroupSnapshot: g}, nil
}

// validateCreateGroupRequest returns the source volume ids, sorted.
func validateCreateGroupRequest(req *csi.CreateVolumeGroupSnapshotRequest) ([]string, error) {
	if err := validateName("name", req.GetName()); err != nil {
		return nil, err
	}
	if err := parseGroupSnapshotParams(req.GetParameters()); err != nil {
		return nil, err
	}
	vols := slices.Sorted(slices.Values(req.GetSourceVolumeIds()))
	if len(vols) == 0 {
		return nil, newError(errInvalid, "source volume ids are required")
	}
	for i, v := range vols {
		if v == "" {
			return nil, newError(errInvalid, "a source volume id is empty")
		}
		if i > 0 && v == vols[i-1] {
			return nil, newError(errInvalid, "source volume %s is listed twice", truncate(v))
		}
	}
	return vols, nil
}

// onThisNode checks that every volume is in this node's data dir. One that
// is not may be on another node (each node has its own data dir) or may
// not exist: with some members here that is FailedPrecondition (the spec's
// "cannot snapshot these volumes together"), with none NotFound.
func (d *Driver) onThisNode(vols []string) error {
	var missing []string
	for _, v := range vols {
		if !validVolumeID(v) {
			missing = append(missing, truncate(v))
			continue
		}
		if _, err := d.store.readVolume(v); errors.Is(err, errNotFound) {
			missing = append(missing, v)
		} else if err != nil {
			return err
		}
	}
	if len(missing) == 0 {
		return nil
	}
	kind := errFailedPrecondition
	if len(missing) == len(vols) {
		kind = errNotFound
	}
	return newError(kind, "volume(s) %s not on node %s: a group snapshot can only hold volumes of one node (each is in its node's data dir), and these are on another node or do not exist",
		strings.Join(missing, ", "), d.opts.NodeID)
}

// withImages runs fn with every volume's image open as withImage opens
// one, in the order given. The caller holds the volumes' locks.
func (d *Driver) withImages(ids []string, fn func(imgs []*qcow2.Image, svs []*stagedVolume) error) error {
	imgs, svs := make([]*qcow2.Image, len(ids)), make([]*stagedVolume, len(ids))
	var open func(i int) error
	open = func(i int) error {
		if i == len(ids) {
			return fn(imgs, svs)
		}
		return d.withImage(ids[i], false, func(img *qcow2.Image, sv *stagedVolume) error {
			imgs[i], svs[i] = img, sv
			return open(i + 1)
		})
	}
	return open(0)
}

// commitGroup writes the members' snapshot files, then the group file (the
// commit point). On error it removes what it wrote, the group file first
// (its write may have failed after the rename, in the directory's fsync).
func (d *Driver) commitGroup(g *groupMeta, ms []*groupMember) error {
	for i, m := range ms {
		if i == 0 || m.info.Date.Before(g.CreatedAt) {
			g.CreatedAt = m.info.Date.UTC()
		}
	}
	var written []string
	err := func() error {
		for _, m := range ms {
			sm := &snapshotMeta{ID: m.snapshotID, Name: g.Name + "/" + m.volumeID, SourceVolumeID: m.volumeID,
				SizeBytes: m.info.VirtualSize, CreatedAt: m.info.Date.UTC(), GroupSnapshotID: g.ID}
			if err := d.store.write("snapshots", sm.ID, sm); err != nil {
				return err
			}
			written = append(written, sm.ID)
		}
		return d.store.write("groups", g.ID, g)
	}()
	if err != nil {
		err = errors.Join(err, d.store.remove("groups", g.ID))
		for _, id := range written {
			err = errors.Join(err, d.store.remove("snapshots", id))
		}
	}
	return err
}

// csiGroup reads the group's member snapshots. One deleted on its own
// (DeleteSnapshot) is left out.
func (d *Driver) csiGroup(g *groupMeta) (*csi.VolumeGroupSnapshot, error) {
	out := &csi.VolumeGroupSnapshot{GroupSnapshotId: g.ID, CreationTime: timestamppb.New(g.CreatedAt), ReadyToUse: true}
	for _, sid := range g.SnapshotIDs {
		m, err := d.store.readSnapshot(sid)
		if errors.Is(err, errNotFound) {
			continue
		} else if err != nil {
			return nil, err
		}
		out.Snapshots = append(out.Snapshots, csiSnapshot(m))
	}
	return out, nil
}

// readGroupArgs checks a group snapshot id and the snapshot ids the CO says
// are its members against the group file. ok is false when the id is not
// one of ours, or the group does not exist.
func (d *Driver) readGroupArgs(id string, snapshotIDs []string) (g *groupMeta, ok bool, err error) {
	if id == "" {
		return nil, false, newError(errInvalid, "group snapshot id is required")
	}
	if !validGroupID(id) {
		return nil, false, nil
	}
	g, err = d.store.readGroup(id)
	if errors.Is(err, errNotFound) {
		return nil, false, nil
	} else if err != nil {
		return nil, false, err
	}
	if len(snapshotIDs) > 0 && !slices.Equal(slices.Sorted(slices.Values(snapshotIDs)), slices.Sorted(slices.Values(g.SnapshotIDs))) {
		return nil, false, newError(errInvalid, "snapshot ids %s are not the members of group snapshot %s (%s)",
			truncate(strings.Join(snapshotIDs, ", ")), id, strings.Join(g.SnapshotIDs, ", "))
	}
	return g, true, nil
}

func (d *Driver) GetVolumeGroupSnapshot(ctx context.Context, req *csi.GetVolumeGroupSnapshotRequest) (*csi.GetVolumeGroupSnapshotResponse, error) {
	g, ok, err := d.readGroupArgs(req.GetGroupSnapshotId(), req.GetSnapshotIds())
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, newError(errNotFound, "group snapshot %q does not exist", truncate(req.GetGroupSnapshotId()))
	}
	out, err := d.csiGroup(g)
	if err != nil {
		return nil, err
	}
	return &csi.GetVolumeGroupSnapshotResponse{GroupSnapshot: out}, nil
}

// DeleteVolumeGroupSnapshot deletes the members, then the group file: a
// crash in between leaves a group whose remaining members the retry
// deletes.
func (d *Driver) DeleteVolumeGroupSnapshot(ctx context.Context, req *csi.DeleteVolumeGroupSnapshotRequest) (*csi.DeleteVolumeGroupSnapshotResponse, error) {
	g, ok, err := d.readGroupArgs(req.GetGroupSnapshotId(), req.GetSnapshotIds())
	if err != nil {
		return nil, err
	}
	if !ok {
		return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
	}
	unlock, err := d.lock(ctx, slices.Concat([]string{g.ID}, g.SourceVolumeIDs, g.SnapshotIDs)...)
	if err != nil {
		return nil, err
	}
	defer unlock()
	for _, sid := range g.SnapshotIDs {
		m, err := d.store.readSnapshot(sid)
		if errors.Is(err, errNotFound) {
			continue // deleted on its own, or by an earlier attempt
		} else if err != nil {
			return nil, err
		}
		if err := d.deleteSnapshotLocked(m); err != nil {
			return nil, err
		}
	}
	if err := d.store.remove("groups", g.ID); err != nil {
		return nil, err
	}
	klog.V(2).InfoS("Deleted volume group snapshot", "groupSnapshotID", g.ID)
	return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
}
