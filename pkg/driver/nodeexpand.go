package driver

import (
	"context"
	"errors"
	"io/fs"
	"os"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

func (d *Driver) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	if err := requireArgs("volume id", id, "volume path", path); err != nil {
		return nil, err
	}
	if err := volumeIDArg(id); err != nil {
		return nil, err
	}
	m, err := d.store.readVolume(id)
	if err != nil {
		return nil, err
	}
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, newError(errNotFound, "volume path %s does not exist", path)
	} else if err != nil {
		return nil, err
	}
	if !fi.IsDir() { // a published block volume
		size := m.CapacityBytes
		if sv := d.stagedVolume(id); sv != nil {
			size = sv.img.Size()
		}
		return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: size}}}, nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return nil, err
	}
	bs := int64(st.Bsize)
	return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Total: int64(st.Blocks) * bs, Available: int64(st.Bavail) * bs,
			Used: int64(st.Blocks-st.Bfree) * bs},
		{Unit: csi.VolumeUsage_INODES, Total: int64(st.Files), Available: int64(st.Ffree),
			Used: int64(st.Files - st.Ffree)},
	}}, nil
}

// NodeExpandVolume grows a staged volume online: the image, then the
// attached device, then the filesystem. It is where all growth happens;
// ControllerExpandVolume is not offered (see controller.go).
func (d *Driver) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	id := req.GetVolumeId()
	if err := requireArgs("volume id", id, "volume path", req.GetVolumePath()); err != nil {
		return nil, err
	}
	if c := req.GetVolumeCapability(); c != nil {
		if err := validateOneCapability(c); err != nil {
			return nil, err
		}
	}
	m, unlock, err := d.lockVolume(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	size, err := roundCapacity(req.GetCapacityRange(), m.CapacityBytes)
	if err != nil {
		return nil, err
	}
	sv := d.stagedVolume(id)
	if sv == nil {
		return nil, newError(errFailedPrecondition, "volume %s is not staged on this node", id)
	}
	if err := d.grow(ctx, sv, size); err != nil {
		return nil, err
	}
	if size != m.CapacityBytes {
		m.CapacityBytes = size
		if err := d.store.write("volumes", id, m); err != nil {
			return nil, err
		}
	}
	klog.V(2).InfoS("Expanded volume", "volumeID", id, "capacityBytes", size)
	return &csi.NodeExpandVolumeResponse{CapacityBytes: size}, nil
}

func (d *Driver) grow(ctx context.Context, sv *stagedVolume, size int64) error {
	if size > sv.img.Size() {
		if err := sv.img.Resize(size); err != nil {
			return err
		}
		if err := sv.img.Flush(); err != nil {
			return err
		}
	}
	if err := sv.dev.Resize(ctx, sv.img.Size()); err != nil {
		return err
	}
	if sv.meta.Block {
		return nil
	}
	return d.mounter.ResizeFs(sv.dev.Path(), sv.meta.StagingPath)
}
