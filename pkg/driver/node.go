package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, t := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
		csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
	} {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{
			Rpc: &csi.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

func (d *Driver) NodeGetInfo(ctx context.Context, _ *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	max := d.opts.MaxVolumes
	if max == 0 {
		n, err := d.attacher.FreeDevices(ctx)
		if err != nil {
			klog.ErrorS(err, "Counting free nbd devices failed; reporting no volume limit")
		}
		max = int64(n)
	}
	return &csi.NodeGetInfoResponse{NodeId: d.opts.NodeID, MaxVolumesPerNode: max, AccessibleTopology: d.topology()}, nil
}

func (d *Driver) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	id, path := req.GetVolumeId(), req.GetStagingTargetPath()
	if err := requireArgs("volume id", id, "staging target path", path); err != nil {
		return nil, err
	}
	if err := validateOneCapability(req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	vol, unlock, err := d.lockVolume(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	c := req.GetVolumeCapability()
	want := stagedMeta{VolumeID: id, StagingPath: path, Block: c.GetBlock() != nil, FSType: vol.Params.FSType,
		ReadOnly: c.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY}
	if fsType := c.GetMount().GetFsType(); fsType != "" {
		want.FSType = fsType
	}
	if sv := d.stagedVolume(id); sv != nil {
		return d.restage(sv, want)
	}
	sv, err := d.attach(ctx, want)
	if err != nil {
		return nil, err
	}
	if err := d.mountStaged(sv, c.GetMount().GetMountFlags()); err != nil {
		d.detach(ctx, sv)
		return nil, err
	}
	sv.meta.DeviceIndex = sv.dev.Index()
	if err := d.store.write("staged", id, &sv.meta); err != nil {
		d.unmountAndDetach(ctx, sv)
		return nil, err
	}
	d.setStaged(id, sv)
	klog.V(2).InfoS("Staged volume", "volumeID", id, "device", sv.dev.Path(), "stagingPath", path)
	return &csi.NodeStageVolumeResponse{}, nil
}

// restage answers a repeated NodeStageVolume: fine if it asks for what is
// staged and the filesystem is still mounted there.
func (d *Driver) restage(sv *stagedVolume, want stagedMeta) (*csi.NodeStageVolumeResponse, error) {
	have := sv.meta
	want.DeviceIndex = have.DeviceIndex
	if have != want {
		return nil, newError(errAlreadyExists, "volume %s is staged at %s with a different capability", have.VolumeID, have.StagingPath)
	}
	if !have.Block {
		if mounted, err := d.mounter.IsMountPoint(have.StagingPath); err != nil || !mounted {
			return nil, newError(errFailedPrecondition, "volume %s is attached but %s is not mounted", have.VolumeID, have.StagingPath)
		}
	}
	return &csi.NodeStageVolumeResponse{}, nil
}

// attach opens the image, serves it and attaches it to a device.
func (d *Driver) attach(ctx context.Context, m stagedMeta) (*stagedVolume, error) {
	img, err := d.store.openImage(m.VolumeID, qcow2.OpenOptions{ReadOnly: m.ReadOnly, Lock: true})
	if err != nil {
		return nil, err
	}
	sv := newStagedVolume(m, img)
	dev, err := d.attacher.Attach(ctx, m.VolumeID, sv.backend(), sv.onExportError)
	if err != nil {
		img.Close()
		return nil, err
	}
	sv.dev = dev
	return sv, nil
}

func (sv *stagedVolume) onExportError(err error) {
	msg := err.Error()
	sv.failed.Store(&msg)
	klog.ErrorS(err, "NBD connection failed", "volumeID", sv.meta.VolumeID)
}

func (d *Driver) mountStaged(sv *stagedVolume, flags []string) error {
	if sv.meta.Block {
		return nil // the device itself is published
	}
	if err := os.MkdirAll(sv.meta.StagingPath, 0o750); err != nil {
		return err
	}
	opts := append([]string{}, flags...)
	if sv.meta.ReadOnly {
		opts = append(opts, "ro")
	}
	if sv.meta.FSType == "xfs" {
		// A restore or clone is on the same node as its source and has
		// its filesystem UUID; xfs refuses to mount a duplicate without this.
		opts = append(opts, "nouuid")
	}
	if err := d.mounter.FormatAndMount(sv.dev.Path(), sv.meta.StagingPath, sv.meta.FSType, opts); err != nil {
		return err
	}
	if sv.meta.ReadOnly {
		return nil
	}
	// A restore or clone into a volume larger than its source has the
	// source's filesystem on a bigger device, and kubelet calls no
	// NodeExpandVolume for it: grow it here (a no-op when it fills the
	// device already). On failure the mount goes too, for the caller
	// detaches the device.
	if err := d.mounter.ResizeFs(sv.dev.Path(), sv.meta.StagingPath); err != nil {
		if uerr := d.mounter.Unmount(sv.meta.StagingPath); uerr != nil {
			klog.ErrorS(uerr, "Unmounting after a failed resize", "volumeID", sv.meta.VolumeID)
		}
		return fmt.Errorf("growing the filesystem to the volume's size: %w", err)
	}
	return nil
}

func (d *Driver) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	id, path := req.GetVolumeId(), req.GetStagingTargetPath()
	if err := requireArgs("volume id", id, "staging target path", path); err != nil {
		return nil, err
	}
	if err := volumeIDArg(id); err != nil {
		return nil, err
	}
	unlock, err := d.lock(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	sv := d.stagedVolume(id)
	if sv == nil {
		// Not served here: make sure nothing is left mounted.
		return &csi.NodeUnstageVolumeResponse{}, d.unmountIfMounted(path)
	}
	if err := d.unmountAndDetach(ctx, sv); err != nil {
		return nil, err
	}
	d.setStaged(id, nil)
	if err := d.store.remove("staged", id); err != nil {
		return nil, err
	}
	klog.V(2).InfoS("Unstaged volume", "volumeID", id)
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// unmountAndDetach undoes a stage: unmount, detach (the device is synced
// first), flush and close the image cleanly so its dirty bit clears.
func (d *Driver) unmountAndDetach(ctx context.Context, sv *stagedVolume) error {
	if !sv.meta.Block {
		if err := d.unmountIfMounted(sv.meta.StagingPath); err != nil {
			return err
		}
	}
	return d.detach(ctx, sv)
}

func (d *Driver) detach(ctx context.Context, sv *stagedVolume) error {
	if err := sv.dev.Detach(ctx); err != nil {
		return fmt.Errorf("detach %s: %w", sv.dev.Path(), err)
	}
	if err := sv.img.Flush(); err != nil {
		sv.img.Close()
		return err
	}
	return sv.img.Close()
}

func (d *Driver) unmountIfMounted(path string) error {
	mounted, err := d.mounter.IsMountPoint(path)
	if errors.Is(err, fs.ErrNotExist) || (err == nil && !mounted) {
		return nil
	}
	if err != nil {
		return err
	}
	return d.mounter.Unmount(path)
}

func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	if err := requireArgs("volume id", id, "target path", target, "staging target path", req.GetStagingTargetPath()); err != nil {
		return nil, err
	}
	if err := validateOneCapability(req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	_, unlock, err := d.lockVolume(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	sv := d.stagedVolume(id)
	if sv == nil {
		return nil, newError(errFailedPrecondition, "volume %s is not staged on this node", id)
	}
	if mounted, err := d.mounter.IsMountPoint(target); err == nil && mounted {
		return &csi.NodePublishVolumeResponse{}, nil
	}
	mode := req.GetVolumeCapability().GetAccessMode().GetMode()
	if other := d.publishedElsewhere(sv, target); other != "" && mode == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER {
		return nil, newError(errFailedPrecondition, "volume %s is SINGLE_NODE_SINGLE_WRITER and already published at %s", id, other)
	}
	source, err := d.prepareTarget(sv, target)
	if err != nil {
		return nil, err
	}
	opts := append([]string{"bind"}, req.GetVolumeCapability().GetMount().GetMountFlags()...)
	if req.GetReadonly() || sv.meta.ReadOnly {
		opts = append(opts, "ro")
	}
	if err := d.mounter.Mount(source, target, "", opts); err != nil {
		return nil, err
	}
	sv.targets[target] = struct{}{}
	klog.V(2).InfoS("Published volume", "volumeID", id, "targetPath", target, "readonly", req.GetReadonly())
	return &csi.NodePublishVolumeResponse{}, nil
}

// prepareTarget creates the target (a directory, or a file for a block
// volume) and returns what to bind-mount onto it.
func (d *Driver) prepareTarget(sv *stagedVolume, target string) (string, error) {
	if !sv.meta.Block {
		return sv.meta.StagingPath, os.MkdirAll(target, 0o750)
	}
	if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
		return "", err
	}
	f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o640)
	if err != nil {
		return "", err
	}
	return sv.dev.Path(), f.Close()
}

// publishedElsewhere returns a target other than target where sv is still
// mounted, judged from the mount table. The caller holds the volume lock.
func (d *Driver) publishedElsewhere(sv *stagedVolume, target string) string {
	for t := range sv.targets {
		if mounted, err := d.mounter.IsMountPoint(t); t != target && err == nil && mounted {
			return t
		}
	}
	return ""
}

func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	if err := requireArgs("volume id", id, "target path", target); err != nil {
		return nil, err
	}
	if err := volumeIDArg(id); err != nil {
		return nil, err
	}
	unlock, err := d.lock(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := d.unmountIfMounted(target); err != nil {
		return nil, err
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	if sv := d.stagedVolume(id); sv != nil {
		delete(sv.targets, target)
	}
	klog.V(2).InfoS("Unpublished volume", "volumeID", id, "targetPath", target)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}
