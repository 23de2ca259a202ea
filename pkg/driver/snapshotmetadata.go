package driver

import (
	"context"
	"errors"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// The CSI SnapshotMetadata service (spec v1.13, alpha): changed-block
// tracking from the qcow2 trees of a volume's internal snapshots
// (qcow2.SnapshotDelta, SnapshotAllocated). Ranges are VARIABLE_LENGTH:
// the plugin picks the style and the request cannot ask for one, and
// extents say the same as cluster-sized blocks in far fewer tuples (a
// changed GiB is one tuple, not 16384).
//
// The snapshot is read a window at a time, the volume's lock held for the
// window only, so a long stream to a slow client neither holds the lock
// nor the whole listing in memory. A snapshot deleted mid-stream ends the
// stream with NotFound, which the spec lets the client resume from.

// metadataWindow is the guest range computed per lock hold.
const metadataWindow = 16 << 30

// defaultMaxResults is the tuples per message when the client says 0.
const defaultMaxResults = 1024

func (d *Driver) GetMetadataAllocated(req *csi.GetMetadataAllocatedRequest, stream csi.SnapshotMetadata_GetMetadataAllocatedServer) error {
	if err := validateGetMetadataAllocatedRequest(req); err != nil {
		return err
	}
	m, err := d.readOwnSnapshot(req.GetSnapshotId())
	if err != nil {
		return err
	}
	send := func(b []*csi.BlockMetadata) error {
		return stream.Send(&csi.GetMetadataAllocatedResponse{BlockMetadataType: csi.BlockMetadataType_VARIABLE_LENGTH,
			VolumeCapacityBytes: m.SizeBytes, BlockMetadata: b})
	}
	list := func(img *qcow2.Image, off, n int64) ([]qcow2.Change, error) {
		return img.SnapshotAllocated(m.ID, off, n)
	}
	return d.streamMetadata(stream.Context(), m, req.GetStartingOffset(), req.GetMaxResults(), list, send)
}

func (d *Driver) GetMetadataDelta(req *csi.GetMetadataDeltaRequest, stream csi.SnapshotMetadata_GetMetadataDeltaServer) error {
	if err := validateGetMetadataDeltaRequest(req); err != nil {
		return err
	}
	base, err := d.readOwnSnapshot(req.GetBaseSnapshotId())
	if err != nil {
		return err
	}
	target, err := d.readOwnSnapshot(req.GetTargetSnapshotId())
	if err != nil {
		return err
	}
	if base.SourceVolumeID != target.SourceVolumeID {
		return newError(errInvalid, "base snapshot %s is of volume %s, target snapshot %s of volume %s: a delta needs two snapshots of one volume",
			base.ID, base.SourceVolumeID, target.ID, target.SourceVolumeID)
	}
	send := func(b []*csi.BlockMetadata) error {
		return stream.Send(&csi.GetMetadataDeltaResponse{BlockMetadataType: csi.BlockMetadataType_VARIABLE_LENGTH,
			VolumeCapacityBytes: target.SizeBytes, BlockMetadata: b})
	}
	list := func(img *qcow2.Image, off, n int64) ([]qcow2.Change, error) {
		return img.SnapshotDelta(base.ID, target.ID, off, n)
	}
	return d.streamMetadata(stream.Context(), target, req.GetStartingOffset(), req.GetMaxResults(), list, send)
}

// readOwnSnapshot reads a snapshot's metadata; an id that is not ours
// names no snapshot.
func (d *Driver) readOwnSnapshot(id string) (*snapshotMeta, error) {
	if !validSnapshotID(id) {
		return nil, newError(errNotFound, "snapshot %q does not exist", truncate(id))
	}
	return d.store.readSnapshot(id)
}

// streamMetadata lists snapshot m's disk from start, window by window, and
// sends the ranges in messages of at most maxResults tuples (adjacent
// ranges merged across windows). At least one message is sent, so that
// the client learns the capacity even of an empty listing.
func (d *Driver) streamMetadata(ctx context.Context, m *snapshotMeta, start int64, maxResults int32,
	list func(img *qcow2.Image, off, n int64) ([]qcow2.Change, error), send func([]*csi.BlockMetadata) error) error {
	if start > m.SizeBytes {
		return newError(errOutOfRange, "starting offset %d is past the end of snapshot %s (%d bytes)", start, m.ID, m.SizeBytes)
	}
	limit := int(maxResults)
	if limit == 0 {
		limit = defaultMaxResults
	}
	var batch []*csi.BlockMetadata
	sent, tuples := 0, 0
	for off := start; off < m.SizeBytes; off += metadataWindow {
		changes, err := d.snapshotWindow(ctx, m, off, list)
		if err != nil {
			return err
		}
		for _, c := range changes {
			if k := len(batch); k > 0 && batch[k-1].ByteOffset+batch[k-1].SizeBytes == c.Start {
				batch[k-1].SizeBytes += c.Length
				continue
			}
			if len(batch) == limit {
				if err := send(batch); err != nil {
					return err
				}
				sent++
				tuples += len(batch)
				batch = nil
			}
			batch = append(batch, &csi.BlockMetadata{ByteOffset: c.Start, SizeBytes: c.Length})
		}
	}
	if len(batch) > 0 || sent == 0 {
		if err := send(batch); err != nil {
			return err
		}
		sent++
		tuples += len(batch)
	}
	klog.V(4).InfoS("Streamed snapshot metadata", "snapshotID", m.ID, "volumeID", m.SourceVolumeID,
		"startingOffset", start, "messages", sent, "tuples", tuples)
	return nil
}

// snapshotWindow runs list over [off, off+metadataWindow) of the source
// volume's image, holding the volume's lock.
func (d *Driver) snapshotWindow(ctx context.Context, m *snapshotMeta, off int64,
	list func(img *qcow2.Image, off, n int64) ([]qcow2.Change, error)) ([]qcow2.Change, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	unlock, err := d.lock(ctx, m.SourceVolumeID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if _, err := d.store.readVolume(m.SourceVolumeID); err != nil {
		if errors.Is(err, errNotFound) {
			return nil, newError(errNotFound, "snapshot %s: its volume %s does not exist", m.ID, m.SourceVolumeID)
		}
		return nil, err
	}
	var changes []qcow2.Change
	err = d.withImage(m.SourceVolumeID, true, func(img *qcow2.Image, _ *stagedVolume) error {
		changes, err = list(img, off, metadataWindow)
		return err
	})
	return changes, err
}
