package imagecli

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/pflag"

	"github.com/csi-qcow2/csi-qcow2/pkg/nbdattach"
)

func mapSpec() spec {
	return spec{
		name:     "map",
		synopsis: "[-f FMT] [-r] [--device /dev/nbdN] [-c CONNECTIONS] FILE | -d /dev/nbdN",
		summary:  "Attach an image to /dev/nbdN until SIGTERM or SIGINT, like qemu-nbd -c; -d disconnects one.",
		help: `Serves FILE (a qcow2 image with its backing chain, or a raw file) from this
process and attaches it to the first free /dev/nbdN, or to --device, through
the kernel's netlink interface (its ioctls on kernels without it). It prints
the device path on stdout once the device is usable, and serves until
SIGTERM or SIGINT. Then it flushes the device (its page cache, then a FLUSH
to the image), detaches it, closes the image cleanly (a lazy-refcounts image
gets its dirty bit cleared) and exits 0.

A device that is still mounted when the signal comes is not pulled from
under the filesystem: map says so on stderr, keeps serving, and detaches as
soon as it is unmounted. SIGKILL ends map at once: what the filesystem had
flushed (fsync, sync, journal commits) is in the image, the rest is lost,
and I/O on the device fails from then on. If someone else disconnects the
device, map closes the image and exits 0.

The kernel is told that the export can flush, write with FUA, trim and
write zeroes (or that it is read-only, with -r), with a 4096-byte block
size. Requests never time out: a slow
host disk stalls I/O instead of failing it, which would turn ext4 or xfs
read-only. -c sets the number of sockets, each a kernel queue served
concurrently (default one per CPU, at most 8).

-d /dev/nbdN disconnects a device instead, as qemu-nbd -d does. If the
process that attached it (its thread in /sys/block/nbdN/pid) is running, the device
is flushed, then disconnected, and a map serving it exits 0. If that process
is gone (map was SIGKILLed: the kernel keeps the device connected, every I/O
failing), there is nothing to flush to and the device is released at once.
A mounted device is refused either way, and so is one the CSI driver
attached (backend vol-...). Whether the attaching process is gone can only
be told from the host's pid namespace; from another one, -d only flushes
and disconnects.

Needs root and the nbd kernel module. The process marks itself
PR_SET_IO_FLUSHER, so that memory reclaim cannot deadlock on the device it
serves; where it cannot, it says so on stderr and carries on.
`,
		new: func() subcommand {
			return &mapCmd{newAttacher: newHostAttacher, newDeviceControl: newHostDeviceControl, processState: hostProcessState}
		},
	}
}

type mapCmd struct {
	format      string
	readOnly    bool
	device      string
	connections int
	disconnect  string

	newAttacher      func() (attacher, error)
	newDeviceControl func() (deviceControl, error)
	processState     func(pid int) owner
}

func (c *mapCmd) flags(fs *pflag.FlagSet) {
	fs.StringVarP(&c.format, "format", "f", "", "image format: qcow2 or raw (default: probe)")
	fs.BoolVarP(&c.readOnly, "read-only", "r", false, "attach read-only")
	fs.StringVar(&c.device, "device", "", "attach to this device, /dev/nbdN (default: the first free one)")
	fs.IntVarP(&c.connections, "connections", "c", 0, "number of sockets, one kernel queue each (default: one per CPU, at most 8)")
	fs.StringVarP(&c.disconnect, "disconnect", "d", "", "disconnect this device, /dev/nbdN, instead of attaching (releases one a killed map left)")
}

// attacher and attachedDevice are the part of nbdattach's Attacher and
// Device that map drives. They are interfaces so that map's sequencing
// (print, wait, detach or wait for an unmount, close) is tested without
// root or an nbd module.
type attacher interface {
	attach(ctx context.Context, srv nbdattach.Server, opts nbdattach.AttachOptions) (attachedDevice, error)
}

type attachedDevice interface {
	path() string
	detach(ctx context.Context) error
}

// hostAttacher attaches to the real /dev/nbdN.
type hostAttacher struct{ a *nbdattach.Attacher }

func newHostAttacher() (attacher, error) {
	a, err := nbdattach.NewAttacher(nbdattach.AttacherOptions{Interface: nbdattach.InterfaceAuto})
	if err != nil {
		return nil, err
	}
	return hostAttacher{a}, nil
}

func (h hostAttacher) attach(ctx context.Context, srv nbdattach.Server, opts nbdattach.AttachOptions) (attachedDevice, error) {
	d, err := h.a.Attach(ctx, srv, opts)
	if err != nil {
		return nil, err
	}
	return hostDevice{d}, nil
}

type hostDevice struct{ d *nbdattach.Device }

func (h hostDevice) path() string                     { return h.d.Path }
func (h hostDevice) detach(ctx context.Context) error { return h.d.Detach(ctx) }

// parseNBD returns the index of /dev/nbdN, or AnyIndex for "".
func parseNBD(flag, dev string) (int, error) {
	if dev == "" {
		return nbdattach.AnyIndex, nil
	}
	n, ok := strings.CutPrefix(dev, "/dev/nbd")
	i, err := strconv.Atoi(n)
	if !ok || err != nil || i < 0 || strconv.Itoa(i) != n {
		return 0, usageErrorf("%s must be an nbd device, /dev/nbdN, not %q", flag, dev)
	}
	return i, nil
}

// attachOptions are the kernel settings map asks for, chosen on purpose:
//
//   - Timeout 0: a request is never failed for being slow. The server is
//     this process, and a slow one (a host disk stalling in fdatasync) is
//     not a dead one; a timeout would fail the I/O and turn the filesystem
//     read-only (ceph-csi's rbd-nbd issues #667 and #2204).
//   - DeadConnTimeout 0: once the sockets are gone (this process was
//     killed), I/O fails at once. Nothing can hand the device new sockets
//     after map dies, so waiting would only hang the processes doing I/O
//     in uninterruptible sleep.
func (c *mapCmd) attachOptions(index int, path string) nbdattach.AttachOptions {
	opts := nbdattach.AttachOptions{Index: index, Connections: c.connections}
	if id := absPath(path); len(id) <= 255 {
		opts.Identifier = id // shown in /sys/block/nbdN/backend
	}
	return opts
}

func (c *mapCmd) run(ctx context.Context, s streams, args []string) error {
	if c.disconnect != "" {
		return c.disconnectDevice(ctx, s, args)
	}
	if len(args) != 1 {
		return usageErrorf("expected FILE, got %d arguments", len(args))
	}
	index, err := parseNBD("--device", c.device)
	if err != nil {
		return err
	}
	if c.connections < 0 {
		return usageErrorf("-c must be 0 or more, not %d", c.connections)
	}
	if err := nbdattach.SetIOFlusher(); err != nil {
		fmt.Fprintf(s.stderr, "%s: note: %v; memory reclaim may deadlock on the device\n", Prog, err)
	}
	a, err := c.newAttacher()
	if err != nil {
		return err
	}
	path := args[0]
	b, err := openBackend(path, c.format, c.readOnly)
	if err != nil {
		return err
	}
	err = c.serve(ctx, s, a, b, index, path)
	if cerr := b.Close(); cerr != nil {
		err = errors.Join(err, fmt.Errorf("closing '%s': %w", path, cerr))
	}
	return err
}

// serve attaches b, waits for a signal or for the device to be
// disconnected by someone else, and detaches.
func (c *mapCmd) serve(ctx context.Context, s streams, a attacher, b exportBackend, index int, path string) error {
	stderr := &lockedWriter{w: s.stderr}
	e, err := nbdattach.NewExport(b, nbdattach.ExportOptions{ReadOnly: c.readOnly})
	if err != nil {
		return err
	}
	srv := newWatchedServer(e)
	opts := c.attachOptions(index, path)
	opts.OnConnError = func(err error) { fmt.Fprintf(stderr, "%s: %v\n", Prog, err) }
	d, err := a.attach(ctx, srv, opts)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			err = fmt.Errorf("%w (is the nbd module loaded?)", err)
		}
		return fmt.Errorf("attaching '%s': %w", path, err)
	}
	fmt.Fprintln(s.stdout, d.path())
	select {
	case <-ctx.Done():
		return detachWhenReleased(d, srv.gone, stderr)
	case <-srv.gone:
		fmt.Fprintf(stderr, "%s: %s was disconnected\n", Prog, d.path())
		return nil
	}
}

// detachRetry is how often a detach refused because the device is mounted
// is tried again.
const detachRetry = 500 * time.Millisecond

// detachWhenReleased detaches d, waiting for as long as it takes while the
// device is mounted (or held exclusively): its flush is then refused and
// the device left attached, and pulling it from under a filesystem would
// fail its I/O. A device that was disconnected but is still held open also
// fails with ErrDeviceBusy; gone is closed then, and that error is final.
func detachWhenReleased(d attachedDevice, gone <-chan struct{}, stderr *lockedWriter) error {
	told := false
	for {
		err := d.detach(context.Background())
		if err == nil || !errors.Is(err, nbdattach.ErrDeviceBusy) {
			return err
		}
		select {
		case <-gone:
			return err
		default:
		}
		if !told {
			fmt.Fprintf(stderr, "%s: %v; still serving %s, it is detached once unmounted\n", Prog, err, d.path())
			told = true
		}
		select {
		case <-gone:
			fmt.Fprintf(stderr, "%s: %s was disconnected\n", Prog, d.path())
			return nil
		case <-time.After(detachRetry):
		}
	}
}

// watchedServer closes gone when the last connection it served ends: the
// kernel dropped the device's sockets, because it was detached (by map or
// by anyone else) or because they failed.
type watchedServer struct {
	nbdattach.Server
	mu   sync.Mutex
	live int
	gone chan struct{}
	once sync.Once
}

func newWatchedServer(srv nbdattach.Server) *watchedServer {
	return &watchedServer{Server: srv, gone: make(chan struct{})}
}

func (w *watchedServer) ServeTransmission(ctx context.Context, conn net.Conn) error {
	w.mu.Lock()
	w.live++
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		if w.live--; w.live == 0 {
			w.once.Do(func() { close(w.gone) })
		}
	}()
	return w.Server.ServeTransmission(ctx, conn)
}
