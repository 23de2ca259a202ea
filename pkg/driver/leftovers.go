package driver

import (
	"context"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-qcow2/csi-qcow2/pkg/nbdattach"
	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// releaseWait bounds the release of one leftover device.
const releaseWait = 30 * time.Second

// releaseLeftovers disconnects, at start and after recoverStaged, the
// /dev/nbdX that a previous process of this driver attached and that no
// staged record accounts for: a driver killed between attaching a device
// and writing staged/<id>.json (NodeStageVolume's last step) leaves one,
// and nothing would ever serve or detach it. Nothing else on the host is
// touched; a device is released only if every test below says it is ours
// and dead:
//
//   - its backend identifier (/sys/block/nbdN/backend) is one of our
//     volume ids, vol-<32 hex>: the driver attaches with that identifier,
//     and nothing else (image map uses the image's path, qemu-nbd and
//     nbd-client none) does;
//   - that volume's image is in this data dir (not another instance's);
//   - this process does not serve it, and no staged record names the
//     volume or the device (those are recovery's, or NodeUnstageVolume's);
//   - nobody holds the image's locks: every server of a volume (this
//     driver staging it, or QEMU) has it open with locks, so a live one
//     would show;
//   - it is not mounted or held exclusively (Release refuses that).
//
// A listing that fails means "don't know": nothing is released. A data
// dir without volumes can have no leftover, and the kernel is not asked
// (so the unprivileged process beside the resizer, with an empty data dir,
// never opens it).
func (d *Driver) releaseLeftovers(ctx context.Context) {
	if vols, err := d.store.list("volumes"); err != nil || len(vols) == 0 {
		return
	}
	conns, err := d.attacher.Connected(ctx)
	if err != nil {
		klog.ErrorS(err, "Listing nbd devices failed; leftover devices not released")
		return
	}
	accounted, err := d.stagedDevices()
	if err != nil {
		klog.ErrorS(err, "Listing staged volumes failed; leftover devices not released")
		return
	}
	for _, c := range conns {
		if !d.isLeftover(c, accounted) {
			continue
		}
		if err := d.releaseLeftover(ctx, c); err != nil {
			klog.ErrorS(err, "Releasing a leftover nbd device failed", "device", c.Index, "volumeID", c.Backend)
			continue
		}
		klog.InfoS("Released a leftover nbd device no staged record accounted for", "device", c.Index, "volumeID", c.Backend)
	}
}

// stagedSet is every volume id and device index the staged records name.
type stagedSet struct {
	ids     map[string]bool
	devices map[int]bool
}

func (d *Driver) stagedDevices() (stagedSet, error) {
	ids, err := d.store.list("staged")
	if err != nil {
		return stagedSet{}, err
	}
	out := stagedSet{ids: map[string]bool{}, devices: map[int]bool{}}
	for _, id := range ids {
		out.ids[id] = true // even if its record cannot be read
		if m, err := d.store.readStaged(id); err == nil {
			out.devices[m.DeviceIndex] = true
		}
	}
	return out, nil
}

func (d *Driver) isLeftover(c nbdattach.Connection, accounted stagedSet) bool {
	id := c.Backend
	if !validVolumeID(id) {
		return false // not attached by this driver
	}
	if _, err := d.store.checkImage(id); err != nil {
		return false // not this data dir's volume
	}
	if d.stagedVolume(id) != nil || accounted.ids[id] || accounted.devices[c.Index] {
		return false
	}
	inUse, err := qcow2.InUse(d.store.imagePath(id))
	if err != nil || inUse {
		if err != nil {
			klog.ErrorS(err, "Checking a volume's image locks failed; its device is left alone", "device", c.Index, "volumeID", id)
		}
		return false
	}
	return true
}

// releaseLeftover releases the device under the volume's lock, so that no
// RPC on the volume runs meanwhile.
func (d *Driver) releaseLeftover(ctx context.Context, c nbdattach.Connection) error {
	unlock, err := d.lock(ctx, c.Backend)
	if err != nil {
		return err
	}
	defer unlock()
	ctx, cancel := context.WithTimeout(ctx, releaseWait)
	defer cancel()
	return d.attacher.Release(ctx, c.Index)
}
