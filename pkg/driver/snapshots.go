package driver

import (
	"context"
	"errors"
	"io/fs"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// A snapshot is an internal qcow2 snapshot of its source volume's image,
// named by the snapshot id, plus snapshots/<id>.json, written after the
// internal snapshot exists (the commit point). A crash in between leaves
// an internal snapshot that the retried CreateSnapshot adopts.

func (d *Driver) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	if err := validateName("name", req.GetName()); err != nil {
		return nil, err
	}
	if err := volumeIDArg(req.GetSourceVolumeId()); err != nil {
		return nil, err
	}
	if err := parseSnapshotParams(req.GetParameters()); err != nil {
		return nil, err
	}
	id, volID := snapshotIDFor(req.GetName()), req.GetSourceVolumeId()
	unlock, err := d.lock(ctx, id, volID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if have, err := d.store.readSnapshot(id); err == nil {
		if have.Name != req.GetName() || have.SourceVolumeID != volID {
			return nil, newError(errAlreadyExists, "snapshot %q exists for volume %s", req.GetName(), have.SourceVolumeID)
		}
		return &csi.CreateSnapshotResponse{Snapshot: csiSnapshot(have)}, nil
	} else if !errors.Is(err, errNotFound) {
		return nil, err
	}
	if _, err := d.store.readVolume(volID); err != nil {
		return nil, err
	}
	var info qcow2.SnapshotInfo
	err = d.withImage(volID, false, func(img *qcow2.Image, sv *stagedVolume) error {
		info, err = d.takeSnapshot(img, sv, id)
		return err
	})
	if err != nil {
		return nil, err
	}
	m := &snapshotMeta{ID: id, Name: req.GetName(), SourceVolumeID: volID,
		SizeBytes: info.VirtualSize, CreatedAt: info.Date.UTC()}
	if err := d.store.write("snapshots", id, m); err != nil {
		return nil, err
	}
	klog.V(2).InfoS("Created snapshot", "snapshotID", id, "volumeID", volID, "sizeBytes", m.SizeBytes)
	return &csi.CreateSnapshotResponse{Snapshot: csiSnapshot(m)}, nil
}

// takeSnapshot creates internal snapshot id. When the volume is staged and
// mounted here, its filesystem is frozen around it, so what the snapshot
// holds is consistent (the freeze writes back dirty data through the
// device; the flush then makes it durable in the image). One image needs
// no write gate: CreateSnapshot itself waits out and holds off its I/O.
func (d *Driver) takeSnapshot(img *qcow2.Image, sv *stagedVolume, id string) (qcow2.SnapshotInfo, error) {
	thaw, err := d.freezeFS(sv)
	if err != nil {
		return qcow2.SnapshotInfo{}, err
	}
	defer thaw()
	if err := img.Flush(); err != nil {
		return qcow2.SnapshotInfo{}, err
	}
	info, err := img.CreateSnapshot(id)
	if errors.Is(err, qcow2.ErrSnapshotExists) { // left by a crash before the metadata
		for _, s := range img.Snapshots() {
			if s.Name == id {
				return s, nil
			}
		}
	}
	if err == nil {
		err = img.Flush()
	}
	return info, err
}

// freezeFS freezes the filesystem of a staged, mounted filesystem volume
// and returns what thaws it; for any other volume both do nothing. A path
// that is not a mount point is never frozen: FIFREEZE on it would freeze
// whatever filesystem holds the directory.
func (d *Driver) freezeFS(sv *stagedVolume) (thaw func(), err error) {
	if sv == nil || sv.meta.Block {
		return func() {}, nil
	}
	path := sv.meta.StagingPath
	mounted, err := d.mounter.IsMountPoint(path)
	if errors.Is(err, fs.ErrNotExist) || err == nil && !mounted {
		return func() {}, nil
	} else if err != nil {
		return nil, err
	}
	if err := d.mounter.Freeze(path); err != nil {
		return nil, err
	}
	return func() {
		if err := d.mounter.Thaw(path); err != nil {
			klog.ErrorS(err, "Thaw after snapshot failed", "volumeID", sv.meta.VolumeID)
		}
	}, nil
}

func csiSnapshot(m *snapshotMeta) *csi.Snapshot {
	return &csi.Snapshot{
		SnapshotId:      m.ID,
		SourceVolumeId:  m.SourceVolumeID,
		SizeBytes:       m.SizeBytes,
		CreationTime:    timestamppb.New(m.CreatedAt),
		ReadyToUse:      true,
		GroupSnapshotId: m.GroupSnapshotID,
	}
}

func (d *Driver) DeleteSnapshot(ctx context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	id := req.GetSnapshotId()
	if id == "" {
		return nil, newError(errInvalid, "snapshot id is required")
	}
	if !validSnapshotID(id) {
		return &csi.DeleteSnapshotResponse{}, nil // not ours: nothing to delete
	}
	m, err := d.store.readSnapshot(id)
	if errors.Is(err, errNotFound) {
		return &csi.DeleteSnapshotResponse{}, nil
	} else if err != nil {
		return nil, err
	}
	unlock, err := d.lock(ctx, id, m.SourceVolumeID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := d.deleteSnapshotLocked(m); err != nil {
		return nil, err
	}
	return &csi.DeleteSnapshotResponse{}, nil
}

// deleteSnapshotLocked deletes snapshot m: the internal snapshot, then its
// file. The caller holds the locks of m.ID and m.SourceVolumeID.
// DeleteSnapshot's work, the orphan checker's (orphans.go) and the group
// snapshots' (groups.go). A member of a group snapshot may be deleted
// alone too (the group then lists the rest): the CO may delete a group's
// VolumeSnapshots one by one.
func (d *Driver) deleteSnapshotLocked(m *snapshotMeta) error {
	if _, err := d.store.readVolume(m.SourceVolumeID); err == nil {
		err = d.withImage(m.SourceVolumeID, false, func(img *qcow2.Image, _ *stagedVolume) error {
			if err := img.DeleteSnapshot(m.ID); err != nil && !errors.Is(err, qcow2.ErrSnapshotNotFound) {
				return err
			}
			return img.Flush()
		})
		if err != nil {
			return err
		}
	}
	if err := d.store.remove("snapshots", m.ID); err != nil {
		return err
	}
	klog.V(2).InfoS("Deleted snapshot", "snapshotID", m.ID, "volumeID", m.SourceVolumeID, "groupSnapshotID", m.GroupSnapshotID)
	return nil
}

func (d *Driver) ListSnapshots(ctx context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	var metas []*snapshotMeta
	if id := req.GetSnapshotId(); id != "" {
		if m, err := d.store.readSnapshot(id); err == nil {
			metas = append(metas, m)
		}
	} else {
		ids, err := d.store.list("snapshots")
		if err != nil {
			return nil, err
		}
		for _, id := range ids {
			if m, err := d.store.readSnapshot(id); err == nil {
				metas = append(metas, m)
			}
		}
	}
	var ids []string
	byID := map[string]*snapshotMeta{}
	for _, m := range metas {
		if v := req.GetSourceVolumeId(); v == "" || v == m.SourceVolumeID {
			ids = append(ids, m.ID)
			byID[m.ID] = m
		}
	}
	page, next, err := paginate(ids, req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	resp := &csi.ListSnapshotsResponse{NextToken: next}
	for _, id := range page {
		resp.Entries = append(resp.Entries, &csi.ListSnapshotsResponse_Entry{Snapshot: csiSnapshot(byID[id])})
	}
	return resp, nil
}

func (d *Driver) GetSnapshot(ctx context.Context, req *csi.GetSnapshotRequest) (*csi.GetSnapshotResponse, error) {
	id := req.GetSnapshotId()
	if id == "" {
		return nil, newError(errInvalid, "snapshot id is required")
	}
	m, err := d.store.readSnapshot(id)
	if err != nil {
		return nil, err
	}
	return &csi.GetSnapshotResponse{Snapshot: csiSnapshot(m)}, nil
}
