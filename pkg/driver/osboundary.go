package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"

	"github.com/csi-qcow2/csi-qcow2/pkg/nbdattach"
)

// Attacher turns a served image into a block device. It is an interface
// because the real one needs root and the kernel's nbd driver; unit tests
// and csi-sanity on a host without nbd use a fake.
type Attacher interface {
	// Attach serves b and attaches it to a free device. onError is called
	// when a served connection fails (the volume condition turns abnormal).
	Attach(ctx context.Context, volumeID string, b nbdattach.Backend, onError func(error)) (Device, error)
	// Reconnect serves b to the device a previous process left attached.
	Reconnect(ctx context.Context, volumeID string, index int, b nbdattach.Backend, onError func(error)) (Device, error)
	// FreeDevices counts the devices free to attach to.
	FreeDevices(ctx context.Context) (int, error)
	// Connected lists the connected devices: who started each, and the
	// backend identifier it was attached with (Attach names it by the
	// volume id).
	Connected(ctx context.Context) ([]nbdattach.Connection, error)
	// Release disconnects a device whose server is gone, without a
	// flush; it refuses a mounted one.
	Release(ctx context.Context, index int) error
}

// Device is one attached block device.
type Device interface {
	Index() int
	Path() string
	Resize(ctx context.Context, size int64) error
	Detach(ctx context.Context) error
}

// Mounter is the mount side of the OS boundary: mount-utils in production
// (needs root), mount-utils' FakeMounter in tests.
type Mounter interface {
	// FormatAndMount formats source with fsType if it holds no filesystem,
	// then mounts it.
	FormatAndMount(source, target, fsType string, options []string) error
	Mount(source, target, fsType string, options []string) error
	Unmount(target string) error
	IsMountPoint(path string) (bool, error)
	// ResizeFs grows the filesystem on devicePath mounted at mountPath
	// to fill the device; one that fills it already is left alone.
	ResizeFs(devicePath, mountPath string) error
	// Freeze and Thaw suspend writes to the filesystem mounted at path.
	Freeze(path string) error
	Thaw(path string) error
}

var (
	_ Attacher = (*nbdAttacher)(nil)
	_ Device   = (*nbdDevice)(nil)
	_ Mounter  = (*osMounter)(nil)
)

// nbdAttacher attaches through pkg/nbdattach. The kernel is opened on
// first use, so a controller-only process, or a host without nbd, starts.
type nbdAttacher struct {
	opts Options
	once sync.Once
	a    *nbdattach.Attacher
	err  error
}

func newNBDAttacher(opts Options) *nbdAttacher { return &nbdAttacher{opts: opts} }

// kernel opens the kernel attacher on first use (recovery at start, or the
// first stage) and then, before this process serves its first /dev/nbdX,
// marks it PR_SET_IO_FLUSHER: memory reclaim must not wait on writeback to
// a device that waits on this process. Without the flag (no
// CAP_SYS_RESOURCE, or Linux before 5.6) it logs and carries on. Doing it
// here rather than in Run spares processes that never attach, such as the
// unprivileged one beside the resizer, a false alarm.
func (n *nbdAttacher) kernel() (*nbdattach.Attacher, error) {
	n.once.Do(func() {
		n.a, n.err = nbdattach.NewAttacher(nbdattach.AttacherOptions{})
		if n.err != nil {
			return
		}
		if i := n.a.Interface(); i != nbdattach.InterfaceNetlink {
			klog.ErrorS(nil, "The kernel's nbd netlink family is not reachable (a pod needs hostNetwork: true; it exists in the host's network namespace only): attaching with the ioctls, whose devices fail all I/O as soon as this process exits, so a restarted driver cannot take them back",
				"interface", i)
		} else {
			klog.InfoS("Attaching NBD devices over netlink", "interface", i)
		}
		if c := n.opts.NBDConnections; c != 1 {
			klog.InfoS("NBD devices may get several connections: a request slower than the kernel's 30 s timer then gets its live connection cut and is resent on another, a late write may overwrite newer data, cut connections are not replaced, and --nbd-io-timeout does not apply",
				"nbdConnections", c)
		}
		if err := nbdattach.SetIOFlusher(); err != nil {
			klog.ErrorS(err, "Serving nbd devices without PR_SET_IO_FLUSHER; memory reclaim may deadlock on them (it needs CAP_SYS_RESOURCE and Linux 5.6)")
			return
		}
		klog.V(2).InfoS("Marked the process PR_SET_IO_FLUSHER")
	})
	return n.a, n.err
}

// attachOptions: no command timeout (AttachOptions.Timeout 0), so a slow
// request stalls I/O rather than failing it; the short request timer only
// where it cannot cut a live connection, one connection per device.
func (n *nbdAttacher) attachOptions(volumeID string, onError func(error)) nbdattach.AttachOptions {
	o := nbdattach.AttachOptions{
		Index:           nbdattach.AnyIndex,
		Connections:     n.opts.NBDConnections,
		DeadConnTimeout: n.opts.DeadConnTimeout,
		Identifier:      volumeID,
		OnConnError:     onError,
	}
	if o.Connections == 1 {
		o.IOTimeout = n.opts.NBDIOTimeout
	}
	return o
}

func (n *nbdAttacher) Attach(ctx context.Context, volumeID string, b nbdattach.Backend, onError func(error)) (Device, error) {
	return n.connect(ctx, volumeID, nbdattach.AnyIndex, b, onError)
}

func (n *nbdAttacher) Reconnect(ctx context.Context, volumeID string, index int, b nbdattach.Backend, onError func(error)) (Device, error) {
	return n.connect(ctx, volumeID, index, b, onError)
}

func (n *nbdAttacher) connect(ctx context.Context, volumeID string, index int, b nbdattach.Backend, onError func(error)) (Device, error) {
	a, err := n.kernel()
	if err != nil {
		return nil, err
	}
	e, err := nbdattach.NewExport(b, nbdattach.ExportOptions{Name: volumeID})
	if err != nil {
		return nil, err
	}
	o := n.attachOptions(volumeID, onError)
	var d *nbdattach.Device
	if index == nbdattach.AnyIndex {
		d, err = a.Attach(ctx, e, o)
	} else {
		o.Index = index
		d, err = a.Reconnect(ctx, index, e, o)
	}
	if err != nil {
		return nil, err
	}
	return &nbdDevice{d: d}, nil
}

func (n *nbdAttacher) FreeDevices(ctx context.Context) (int, error) {
	a, err := n.kernel()
	if err != nil {
		return 0, err
	}
	return a.FreeDevices(ctx)
}

func (n *nbdAttacher) Connected(ctx context.Context) ([]nbdattach.Connection, error) {
	a, err := n.kernel()
	if err != nil {
		return nil, err
	}
	devs, err := a.Devices(ctx)
	if err != nil {
		return nil, err
	}
	var out []nbdattach.Connection
	for _, dev := range devs {
		if !dev.Connected {
			continue
		}
		c, err := a.Connection(dev.Index)
		if errors.Is(err, nbdattach.ErrNotConnected) {
			continue // held open but not started, or gone since
		}
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

func (n *nbdAttacher) Release(ctx context.Context, index int) error {
	a, err := n.kernel()
	if err != nil {
		return err
	}
	return a.Release(ctx, index)
}

type nbdDevice struct{ d *nbdattach.Device }

func (d *nbdDevice) Index() int                                   { return d.d.Index }
func (d *nbdDevice) Path() string                                 { return d.d.Path }
func (d *nbdDevice) Resize(ctx context.Context, size int64) error { return d.d.Resize(ctx, size) }
func (d *nbdDevice) Detach(ctx context.Context) error             { return d.d.Detach(ctx) }

// osMounter is mount-utils' SafeFormatAndMount plus resize and freeze.
type osMounter struct {
	*mount.SafeFormatAndMount
}

func newOSMounter() *osMounter {
	return &osMounter{&mount.SafeFormatAndMount{Interface: mount.New(""), Exec: utilexec.New()}}
}

func (m *osMounter) IsMountPoint(path string) (bool, error) {
	return m.Interface.IsMountPoint(path)
}

func (m *osMounter) ResizeFs(devicePath, mountPath string) error {
	r := mount.NewResizeFs(m.Exec)
	need, err := r.NeedResize(devicePath, mountPath)
	if err != nil || !need {
		return err
	}
	_, err = r.Resize(devicePath, mountPath)
	return err
}

func (m *osMounter) Freeze(path string) error { return fsIoctl(path, fiFreeze) }
func (m *osMounter) Thaw(path string) error   { return fsIoctl(path, fiThaw) }

// FIFREEZE and FITHAW: _IOWR('X', 119, int) and _IOWR('X', 120, int).
const (
	fiFreeze = 0xC0045877
	fiThaw   = 0xC0045878
)

func fsIoctl(path string, req uint) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), req, 0); err != nil {
		return fmt.Errorf("ioctl %#x on %s: %w", req, path, err)
	}
	return nil
}

// errNoReflink means the filesystem cannot clone file extents.
var errNoReflink = errors.New("reflink not supported")

// reflink makes dst share src's extents (FICLONE). Any failure is reported
// as errNoReflink wrapping the cause, and the caller copies instead.
func reflink(src, dst *os.File) error {
	if err := unix.IoctlFileClone(int(dst.Fd()), int(src.Fd())); err != nil {
		return fmt.Errorf("%w: %w", errNoReflink, err)
	}
	return nil
}
