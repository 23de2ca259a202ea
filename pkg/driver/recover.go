package driver

import (
	"context"

	"k8s.io/klog/v2"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// recoverStaged serves again the volumes a previous process left staged
// (staged/<id>.json): open the image, hand the still-attached device new
// sockets (Reconnect), without unmounting anything. A volume that cannot be
// recovered is logged and left for NodeUnstageVolume.
func (d *Driver) recoverStaged(ctx context.Context) {
	ids, err := d.store.list("staged")
	if err != nil {
		klog.ErrorS(err, "Listing staged volumes failed")
		return
	}
	for _, id := range ids {
		m, err := d.store.readStaged(id)
		if err != nil {
			klog.ErrorS(err, "Reading staged volume failed", "volumeID", id)
			continue
		}
		if err := d.reconnect(ctx, *m); err != nil {
			klog.ErrorS(err, "Reattaching staged volume failed", "volumeID", id, "device", m.DeviceIndex)
			continue
		}
		klog.InfoS("Reattached staged volume", "volumeID", id, "device", m.DeviceIndex)
	}
}

func (d *Driver) reconnect(ctx context.Context, m stagedMeta) error {
	img, err := d.store.openImage(m.VolumeID, qcow2.OpenOptions{ReadOnly: m.ReadOnly, Lock: true})
	if err != nil {
		return err
	}
	sv := newStagedVolume(m, img)
	dev, err := d.attacher.Reconnect(ctx, m.VolumeID, m.DeviceIndex, sv.backend(), sv.onExportError)
	if err != nil {
		img.Close()
		return err
	}
	sv.dev = dev
	d.setStaged(m.VolumeID, sv)
	return nil
}
