// Package driver is the csi-qcow2 CSI driver: identity, controller and node
// services over volumes that are qcow2 images in a node-local data dir.
//
// Every volume lives on the node whose data dir holds it, so the driver
// runs as one process per node (Mode all) that is both the controller for
// that node's volumes and its node plugin. The process that stages a
// volume holds its image open; every other operation opens the image only
// for as long as it runs, so a detached volume can be inspected with
// qemu-img.
package driver

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Version is reported by GetPluginInfo.
var Version = "0.1.0"

// Driver implements the CSI identity, controller, node and (if enabled)
// snapshot metadata services.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer
	csi.UnimplementedSnapshotMetadataServer
	csi.UnimplementedGroupControllerServer

	opts     Options
	store    *store
	locks    *inflight
	mounter  Mounter
	attacher Attacher
	// cluster, if set, is what the orphan checker asks (orphans.go); Run
	// sets it from --orphan-check.
	cluster ClusterObjects

	// metadataTLS is set when the SnapshotMetadata service is on.
	metadataTLS *tlsFiles
	// peer is set when the peer service is on (peer.go); copies are the
	// cross-node copies in flight (crossnode.go).
	peer   *peerService
	copies *copies

	mu           sync.Mutex // guards staged, metadataAddr and peerAddr; never held across I/O
	staged       map[string]*stagedVolume
	metadataAddr net.Addr // where the snapshot metadata TLS listener is bound
	peerAddr     net.Addr // where the peer listener is bound
}

// stagedVolume is a volume this process serves: its open image and the
// device it is attached to.
type stagedVolume struct {
	meta   stagedMeta
	img    *qcow2.Image
	dev    Device
	failed atomic.Pointer[string] // why the export failed, if it did
	// targets are where it is published; guarded by the volume's lock.
	targets map[string]struct{}
	// gate holds the device's writes while a group snapshot is cut
	// (servedImage).
	gate sync.RWMutex
}

func newStagedVolume(m stagedMeta, img *qcow2.Image) *stagedVolume {
	return &stagedVolume{meta: m, img: img, targets: map[string]struct{}{}}
}

// backend is the image as the device is served it.
func (sv *stagedVolume) backend() servedImage { return servedImage{sv.img, &sv.gate} }

// New returns a driver over opts' data dir with the given OS boundary.
func New(opts Options, m Mounter, a Attacher) (*Driver, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	s, err := newStore(opts.DataDir)
	if err != nil {
		return nil, err
	}
	mt, err := setupSnapshotMetadata(opts)
	if err != nil {
		return nil, err
	}
	d := &Driver{
		opts: opts, store: s, locks: newInflight(),
		mounter: m, attacher: a, metadataTLS: mt,
		staged: map[string]*stagedVolume{}, copies: newCopies(),
	}
	if d.peer, err = setupPeer(d); err != nil {
		return nil, err
	}
	return d, nil
}

func (d *Driver) stagedVolume(id string) *stagedVolume {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.staged[id]
}

func (d *Driver) setStaged(id string, sv *stagedVolume) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if sv == nil {
		delete(d.staged, id)
	} else {
		d.staged[id] = sv
	}
}

// withImage runs fn on the volume's image: the staged one if this process
// serves it, else the image opened for fn alone. The caller holds the
// volume's lock.
func (d *Driver) withImage(id string, readOnly bool, fn func(img *qcow2.Image, sv *stagedVolume) error) (err error) {
	if sv := d.stagedVolume(id); sv != nil {
		return fn(sv.img, sv)
	}
	if err := d.notHeldElsewhere(id); err != nil {
		return err
	}
	img, err := d.store.openImage(id, qcow2.OpenOptions{ReadOnly: readOnly, Lock: true})
	if err != nil {
		return err
	}
	defer func() {
		if cerr := img.Close(); err == nil {
			err = cerr
		}
	}()
	return fn(img, nil)
}

func (d *Driver) topology() *csi.Topology {
	return &csi.Topology{Segments: map[string]string{d.opts.TopologyKey: d.opts.NodeID}}
}

// lock marks the given ids busy for the length of an RPC.
// lockVolume checks a volume id, takes its lock and reads its metadata:
// the preamble of the node RPCs that act on an existing volume. On success
// the caller runs unlock; on error nothing is held.
func (d *Driver) lockVolume(ctx context.Context, id string) (*volumeMeta, func(), error) {
	if err := volumeIDArg(id); err != nil {
		return nil, nil, err
	}
	unlock, err := d.lock(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	m, err := d.store.readVolume(id)
	if err != nil {
		unlock()
		return nil, nil, err
	}
	return m, unlock, nil
}

func (d *Driver) lock(ctx context.Context, keys ...string) (func(), error) {
	_ = ctx
	return d.locks.acquire(keys...)
}

// notHeldElsewhere refuses a volume recorded as staged that this process
// does not serve: another process (a node-mode driver, or one whose
// restart recovery failed) may have its image open, and two writers would
// corrupt it.
func (d *Driver) notHeldElsewhere(id string) error {
	if _, err := d.store.readStaged(id); err == nil {
		return newError(errFailedPrecondition, "volume %s is staged but not served by this process", id)
	} else if !errors.Is(err, errNotFound) {
		return err
	}
	return nil
}
