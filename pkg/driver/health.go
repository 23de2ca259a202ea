package driver

import (
	"context"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// CSI v1.13 reports volume conditions as VolumeHealth (it replaced
// VolumeCondition): an empty list of statuses means healthy.

// health reports a volume's condition: DATA_LOSS when its image is marked
// corrupt, INACCESSIBLE when it cannot be opened or (staged here) its
// export failed.
func (d *Driver) health(id string) *csi.VolumeHealth {
	h := &csi.VolumeHealth{VolumeId: id}
	add := func(t csi.VolumeHealthErrorType, reason, msg string) {
		h.HealthStatuses = append(h.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{Status: t, Reason: reason, Message: msg})
	}
	var info qcow2.Info
	if sv := d.stagedVolume(id); sv != nil {
		if why := sv.failed.Load(); why != nil {
			add(csi.VolumeHealthErrorType_INACCESSIBLE, "ExportFailed", *why)
		}
		info = sv.img.Info()
	} else {
		img, err := d.store.openImage(id, qcow2.OpenOptions{ReadOnly: true, CacheSize: 64 << 10, Lock: true})
		if err != nil {
			add(csi.VolumeHealthErrorType_INACCESSIBLE, "ImageOpenFailed", err.Error())
			return h
		}
		info = img.Info()
		img.Close()
	}
	if info.Corrupt {
		add(csi.VolumeHealthErrorType_DATA_LOSS, "ImageCorrupt", "the qcow2 image is marked corrupt; run `csi-qcow2 image check -r all` on it")
	}
	return h
}

func (d *Driver) ControllerGetVolumeHealth(ctx context.Context, req *csi.ControllerGetVolumeHealthRequest) (*csi.ControllerGetVolumeHealthResponse, error) {
	if err := volumeIDArg(req.GetVolumeId()); err != nil {
		return nil, err
	}
	if _, err := d.store.readVolume(req.GetVolumeId()); err != nil {
		return nil, err
	}
	return &csi.ControllerGetVolumeHealthResponse{VolumeHealth: d.health(req.GetVolumeId())}, nil
}

func (d *Driver) ControllerListVolumeHealth(ctx context.Context, req *csi.ControllerListVolumeHealthRequest) (*csi.ControllerListVolumeHealthResponse, error) {
	ids, err := d.store.list("volumes")
	if err != nil {
		return nil, err
	}
	page, next, err := paginate(ids, req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	resp := &csi.ControllerListVolumeHealthResponse{NextToken: next}
	for _, id := range page {
		resp.Entries = append(resp.Entries, d.health(id))
	}
	return resp, nil
}

func (d *Driver) NodeGetVolumeHealth(ctx context.Context, req *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	if err := volumeIDArg(req.GetVolumeId()); err != nil {
		return nil, err
	}
	if _, err := d.store.readVolume(req.GetVolumeId()); err != nil {
		return nil, err
	}
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: d.health(req.GetVolumeId())}, nil
}
