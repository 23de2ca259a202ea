package driver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"github.com/csi-qcow2/csi-qcow2/internal/sparsecopy"
	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
	"k8s.io/klog/v2"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// source is a resolved volume content source.
type source struct {
	snapshotID string // restore from this internal snapshot...
	volumeID   string // ...of this volume; or clone this volume if snapshotID == ""
	params     createParams
	size       int64 // the new volume must be at least this big
}

func (d *Driver) resolveSource(cs *csi.VolumeContentSource) (source, error) {
	switch {
	case cs == nil:
		return source{}, nil
	case cs.GetSnapshot() != nil:
		id := cs.GetSnapshot().GetSnapshotId()
		if id == "" {
			return source{}, newError(errInvalid, "content source: snapshot id is required")
		}
		if !validSnapshotID(id) {
			return source{}, newError(errNotFound, "source snapshot %q is not a snapshot on node %s", truncate(id), d.opts.NodeID)
		}
		// Only a missing file is NotFound; anything else (a planted
		// symlink, bad JSON, an I/O error) is passed up as it is.
		s, err := d.store.readSnapshot(id)
		if errors.Is(err, errNotFound) {
			return source{}, newError(errNotFound, "source snapshot %s does not exist on node %s", id, d.opts.NodeID)
		}
		if err != nil {
			return source{}, err
		}
		v, err := d.store.readVolume(s.SourceVolumeID)
		if errors.Is(err, errNotFound) {
			return source{}, newError(errNotFound, "volume %s of source snapshot %s does not exist", s.SourceVolumeID, id)
		}
		if err != nil {
			return source{}, err
		}
		return source{snapshotID: id, volumeID: v.ID, params: v.Params, size: s.SizeBytes}, nil
	case cs.GetVolume() != nil:
		id := cs.GetVolume().GetVolumeId()
		if id == "" {
			return source{}, newError(errInvalid, "content source: volume id is required")
		}
		if !validVolumeID(id) {
			return source{}, newError(errNotFound, "source volume %q is not a volume on node %s", truncate(id), d.opts.NodeID)
		}
		v, err := d.store.readVolume(id)
		if errors.Is(err, errNotFound) {
			return source{}, newError(errNotFound, "source volume %s does not exist on node %s", id, d.opts.NodeID)
		}
		if err != nil {
			return source{}, err
		}
		return source{volumeID: id, params: v.Params, size: v.CapacityBytes}, nil
	}
	return source{}, newError(errInvalid, "content source: want a snapshot or a volume")
}

// createImage makes m's image: empty, restored from a snapshot or cloned
// from a volume. It is built under a temporary name and renamed into place,
// so a crash never leaves a half-made image under the volume's name.
func (d *Driver) createImage(ctx context.Context, m *volumeMeta, src source) error {
	final := d.store.imagePath(m.ID)
	tmp := final + ".tmp"
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	var err error
	switch {
	case src.volumeID == "":
		err = createEmpty(tmp, m)
	default:
		err = d.populate(ctx, tmp, m, src)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, final); err != nil {
		os.Remove(tmp)
		return err
	}
	return syncDir(d.store.dir("volumes"))
}

func createOptions(m *volumeMeta) qcow2.CreateOptions {
	return qcow2.CreateOptions{Size: m.CapacityBytes, ClusterSize: m.Params.ClusterSize,
		LazyRefcounts: m.Params.LazyRefcounts, Perm: 0o600}
}

func createEmpty(path string, m *volumeMeta) error {
	img, err := qcow2.Create(path, createOptions(m))
	if err != nil {
		return err
	}
	return img.Close()
}

// populate fills tmp with the source's content. A reflink (FICLONE) of an
// image nobody has open is O(1); the copy then drops every snapshot (after
// reverting to the one restored). Otherwise the allocated content is copied
// into a new image, sparsely.
func (d *Driver) populate(ctx context.Context, tmp string, m *volumeMeta, src source) error {
	if d.stagedVolume(src.volumeID) == nil && d.notHeldElsewhere(src.volumeID) == nil && src.params == m.Params {
		err := d.reflinkImage(tmp, m, src)
		if err == nil {
			return nil
		}
		if !errors.Is(err, errNoReflink) {
			return err
		}
		klog.V(4).InfoS("Reflink unavailable, copying", "volumeID", m.ID, "err", err)
		os.Remove(tmp)
	}
	return d.withImage(src.volumeID, true, func(img *qcow2.Image, sv *stagedVolume) error {
		snap := src.snapshotID
		if snap == "" && sv != nil {
			// A staged volume is being written: copy a temporary internal
			// snapshot of it, taken as CreateSnapshot takes one (filesystem
			// frozen, image flushed), so the clone holds everything written
			// before it, synced or not. One left by a crash is stale.
			snap = "clone-" + m.ID
			if err := img.DeleteSnapshot(snap); err != nil && !errors.Is(err, qcow2.ErrSnapshotNotFound) {
				return err
			}
			if _, err := d.takeSnapshot(img, sv, snap); err != nil {
				return err
			}
			defer img.DeleteSnapshot(snap)
		}
		return copyFrom(ctx, img, snap, tmp, m)
	})
}

func (d *Driver) reflinkImage(tmp string, m *volumeMeta, src source) error {
	p, err := d.store.checkImage(src.volumeID)
	if err != nil {
		return err
	}
	in, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = reflink(in, out)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	img, err := qcow2.Open(tmp, qcow2.OpenOptions{Lock: true})
	if err != nil {
		return err
	}
	if err := trimClone(img, src.snapshotID, m.CapacityBytes); err != nil {
		img.Close()
		return err
	}
	return img.Close()
}

// trimClone turns a reflinked copy into an independent volume: revert to
// the restored snapshot, drop every snapshot, grow to the asked size.
func trimClone(img *qcow2.Image, snapshotID string, size int64) error {
	if snapshotID != "" {
		if err := img.RevertSnapshot(snapshotID); err != nil {
			return fmt.Errorf("revert clone to %s: %w", snapshotID, err)
		}
	}
	for _, s := range img.Snapshots() {
		if err := img.DeleteSnapshot(s.ID); err != nil {
			return fmt.Errorf("drop snapshot %s from clone: %w", s.Name, err)
		}
	}
	if size > img.Size() {
		if err := img.Resize(size); err != nil {
			return err
		}
	}
	return img.Flush()
}

// copyFrom copies snapshot snap of img, or img itself when snap is "",
// into a new image at tmp.
func copyFrom(ctx context.Context, img *qcow2.Image, snap, tmp string, m *volumeMeta) error {
	var from io.ReaderAt = img
	size := img.Size()
	if snap != "" {
		v, err := img.OpenSnapshot(snap)
		if err != nil {
			return err
		}
		defer v.Close()
		from, size = v, v.Size()
	}
	dst, err := qcow2.Create(tmp, createOptions(m))
	if err != nil {
		return err
	}
	if err := copySparse(ctx, dst, from, size); err != nil {
		dst.Close()
		return err
	}
	return dst.Close()
}

// copySparse copies size bytes from src to dst, which is new and reads as
// zeros, and flushes it: what src's extents show reading as zeros (a qcow2
// image or snapshot view lists them) is not read, and 64 KiB blocks of
// zeros are not written, so the copy stays sparse.
func copySparse(ctx context.Context, dst *qcow2.Image, src io.ReaderAt, size int64) error {
	if err := sparsecopy.Copy(ctx, src, size, dst, 64<<10); err != nil {
		return err
	}
	return dst.Flush()
}
