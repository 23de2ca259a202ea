package driver

import (
	"context"
	"slices"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/nbdattach"
	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// TestReleaseLeftovers: at start, a connected device is released only if
// it is one of this data dir's volumes (by its backend identifier), no
// staged record names the volume or the device, this process does not
// serve it and nobody holds its image; anything else on the host, ours or
// not, is left alone.
func TestReleaseLeftovers(t *testing.T) {
	e := newTestEnv(t)
	vol := func(name string) string { return e.mustCreate(t, createReq(name, 1<<20, nil)).GetVolumeId() }
	leftover := vol("pvc-leftover")
	staged := vol("pvc-staged-record") // its record names device 11
	otherDevice := vol("pvc-record-names-device")
	held := vol("pvc-held")
	served := vol("pvc-served")
	e.stage(t, served, rwo) // fake device 0, backend = its id
	for id, index := range map[string]int{staged: 11, otherDevice: 7} {
		if err := e.d.store.write("staged", id, &stagedMeta{VolumeID: id, StagingPath: "/s/" + id, DeviceIndex: index}); err != nil {
			t.Fatal(err)
		}
	}
	img, err := qcow2.Open(e.d.store.imagePath(held), qcow2.OpenOptions{Lock: true, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()

	e.attacher.leftovers = []nbdattach.Connection{
		{Index: 3, PID: 100, Backend: leftover},
		{Index: 4, PID: 101, Backend: "/var/lib/images/x.qcow2"}, // image map
		{Index: 5, PID: 102},                                     // qemu-nbd, nbd-client: no backend
		{Index: 6, PID: 103, Backend: volumeIDFor("another-data-dir")},
		{Index: 11, PID: 104, Backend: staged},
		{Index: 8, PID: 105, Backend: vol("pvc-second-leftover")},
		{Index: 7, PID: 106, Backend: vol("pvc-on-recorded-device")}, // otherDevice's record names device 7
		{Index: 9, PID: 107, Backend: held},
		{Index: 10, PID: 108, Backend: "vol-not-an-id"},
	}

	e.d.releaseLeftovers(context.Background())
	if got, want := e.attacher.released, []int{3, 8}; !slices.Equal(got, want) {
		t.Errorf("released %v, want %v", got, want)
	}
	if e.d.stagedVolume(served) == nil || e.attacher.count() != 1 {
		t.Error("the device this process serves was touched")
	}

	// A failed release is logged, and the next start tries again.
	e.attacher.released = nil
	e.attacher.releaseErr = nbdattach.ErrDeviceBusy
	e.d.releaseLeftovers(context.Background())
	if len(e.attacher.released) != 0 {
		t.Errorf("released %v while releases fail", e.attacher.released)
	}
}
