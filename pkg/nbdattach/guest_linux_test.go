//go:build linux

package nbdattach

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The guest tests attach real /dev/nbdX devices. They need root and the nbd
// module, so they run only with NBDATTACH_GUEST=1, inside the throwaway VM
// of hack/vm (hack/vm/test-nbdattach.sh builds this test binary statically
// and runs it there).

const guestMiB = 1 << 20

func TestGuest(t *testing.T) {
	if os.Getenv("NBDATTACH_GUEST") != "1" {
		t.Skip("needs root and /dev/nbdX: run hack/vm/test-nbdattach.sh (sets NBDATTACH_GUEST=1 in a VM)")
	}
	for _, iface := range []Interface{InterfaceNetlink, InterfaceIoctl} {
		t.Run(iface.String(), func(t *testing.T) {
			a, err := NewAttacher(AttacherOptions{Interface: iface})
			if err != nil {
				t.Fatal(err)
			}
			t.Run("BlockIO", func(t *testing.T) { guestBlockIO(t, a) })
			t.Run("Ext4ResizeDetach", func(t *testing.T) { guestExt4(t, a) })
			t.Run("ReadOnly", func(t *testing.T) { guestReadOnly(t, a) })
			if iface == InterfaceNetlink {
				t.Run("Reconfigure", func(t *testing.T) { guestReconfigure(t, a) })
				t.Run("Reconnect", func(t *testing.T) { guestReconnect(t, a) })
				t.Run("IOTimeoutSlowRequest", func(t *testing.T) { guestSlowRequest(t, a) })
				t.Run("IOTimeoutReconnectResend", func(t *testing.T) { guestReconnectResend(t, a) })
				t.Run("XFSGrow", func(t *testing.T) { guestXFS(t, a) })
			} else {
				t.Run("ReconfigureUnsupported", func(t *testing.T) { guestNoReconfigure(t, a) })
			}
		})
	}
}

// guestServer is an export whose advertised size can be changed, counting
// the bytes each connection receives.
type guestServer struct {
	*Export
	backend *MemBackend
	size    atomic.Int64
	mu      sync.Mutex
	conns   []*atomic.Int64
}

func newGuestServer(t *testing.T, backendSize, size int64) *guestServer {
	t.Helper()
	b := NewMemBackend(backendSize)
	e, err := NewExport(b, ExportOptions{Name: "guest"})
	if err != nil {
		t.Fatal(err)
	}
	s := &guestServer{Export: e, backend: b}
	s.size.Store(size)
	return s
}

func (s *guestServer) Size() int64 { return s.size.Load() }

func (s *guestServer) ServeTransmission(ctx context.Context, conn net.Conn) error {
	n := &atomic.Int64{}
	s.mu.Lock()
	s.conns = append(s.conns, n)
	s.mu.Unlock()
	return s.Export.ServeTransmission(ctx, &guestCountingConn{Conn: conn, n: n})
}

type guestCountingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c *guestCountingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n.Add(int64(n))
	return n, err
}

func guestAttach(t *testing.T, a *Attacher, srv Server, opts AttachOptions) *Device {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	d, err := a.Attach(ctx, srv, opts)
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	t.Logf("attached %s with %d connections in %v", d.Path, d.Connections(), time.Since(start))
	t.Cleanup(func() { guestDetach(t, d) })
	return d
}

func guestDetach(t *testing.T, d *Device) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := d.Detach(ctx); err != nil {
		t.Errorf("Detach %s: %v", d.Path, err)
	}
}

// guestAlignedBuf returns n bytes of page-aligned memory, as O_DIRECT wants.
func guestAlignedBuf(t *testing.T, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

func guestPattern(b []byte, seed byte) {
	for i := range b {
		b[i] = seed + byte(i/512)
	}
}

func guestBackendBytes(t *testing.T, b *MemBackend, off int64, n int) []byte {
	t.Helper()
	got := make([]byte, n)
	if _, err := b.ReadAt(got, off); err != nil {
		t.Fatal(err)
	}
	return got
}

func guestBlockIO(t *testing.T, a *Attacher) {
	srv := newGuestServer(t, 64*guestMiB, 64*guestMiB)
	free0, err := a.FreeDevices(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	d := guestAttach(t, a, srv, AttachOptions{Index: AnyIndex, Connections: 2})
	if free, _ := a.FreeDevices(context.Background()); free != free0-1 {
		t.Errorf("FreeDevices = %d after attach, was %d", free, free0)
	}
	guestCheckSize(t, a, d.Index, 64*guestMiB)
	guestODirect(t, d, srv)
	guestFsyncAndDetach(t, d, srv)
	srv.mu.Lock()
	for i, n := range srv.conns {
		t.Logf("connection %d received %d bytes", i, n.Load())
	}
	srv.mu.Unlock()
	if free, _ := a.FreeDevices(context.Background()); free != free0 {
		t.Errorf("FreeDevices = %d after detach, want %d", free, free0)
	}
}

// guestODirect writes and reads with O_DIRECT, straight to the server, and
// checks the backend.
func guestODirect(t *testing.T, d *Device, srv *guestServer) {
	f, err := os.OpenFile(d.Path, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := guestAlignedBuf(t, 1*guestMiB)
	for i, off := range []int64{0, 8 * guestMiB, 64*guestMiB - 1*guestMiB} {
		guestPattern(buf, byte(i+1))
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatalf("O_DIRECT write at %d: %v", off, err)
		}
		if got := guestBackendBytes(t, srv.backend, off, len(buf)); !bytes.Equal(got, buf) {
			t.Fatalf("backend at %d differs after an O_DIRECT write", off)
		}
		clear(buf)
		if _, err := f.ReadAt(buf, off); err != nil {
			t.Fatalf("O_DIRECT read at %d: %v", off, err)
		}
		if got := guestBackendBytes(t, srv.backend, off, len(buf)); !bytes.Equal(got, buf) {
			t.Fatalf("O_DIRECT read at %d differs from the backend", off)
		}
	}
}

// guestFsyncAndDetach checks that fsync makes the kernel send FLUSH, and
// that Detach flushes what was written without one.
func guestFsyncAndDetach(t *testing.T, d *Device, srv *guestServer) {
	g, err := os.OpenFile(d.Path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	data := bytes.Repeat([]byte("buffered"), 4096/8*16)
	if _, err := g.WriteAt(data, 16*guestMiB); err != nil {
		t.Fatal(err)
	}
	before := srv.backend.Flushes()
	if err := g.Sync(); err != nil {
		t.Fatal(err)
	}
	if after := srv.backend.Flushes(); after <= before {
		t.Errorf("fsync sent no FLUSH: %d flushes before, %d after", before, after)
	}
	if got := guestBackendBytes(t, srv.backend, 16*guestMiB, len(data)); !bytes.Equal(got, data) {
		t.Errorf("backend lacks the buffered write after fsync")
	}
	if _, err := g.WriteAt(data, 32*guestMiB); err != nil {
		t.Fatal(err)
	}
	g.Close()
	guestDetach(t, d)
	if got := guestBackendBytes(t, srv.backend, 32*guestMiB, len(data)); !bytes.Equal(got, data) {
		t.Errorf("backend lacks a buffered write after Detach")
	}
}

func guestCheckSize(t *testing.T, a *Attacher, index int, want int64) {
	t.Helper()
	got, err := sysfsSize(a.dev.sys(), index)
	if err != nil || got != want {
		t.Errorf("/sys/block/nbd%d/size = %d bytes (%v), want %d", index, got, err, want)
	}
}

func guestRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

func guestMount(t *testing.T, dev, fstype string) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount(dev, dir, fstype, 0, ""); err != nil {
		t.Fatalf("mount %s: %v", dev, err)
	}
	return dir
}

func guestFSBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * st.Bsize
}

func guestWriteSync(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	unix.Sync()
}

func guestExt4(t *testing.T, a *Attacher) {
	srv := newGuestServer(t, 128*guestMiB, 64*guestMiB)
	d := guestAttach(t, a, srv, AttachOptions{Index: AnyIndex, Connections: 2, Identifier: "pvc-guest-ext4"})
	guestRun(t, "mkfs.ext4", "-q", "-F", "-b", "4096", d.Path)
	dir := guestMount(t, d.Path, "ext4")
	data := bytes.Repeat([]byte("ext4 on nbd\n"), 100000)
	guestWriteSync(t, filepath.Join(dir, "file"), data)
	small := guestFSBytes(t, dir)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv.size.Store(128 * guestMiB)
	if err := d.Resize(ctx, 128*guestMiB); err != nil {
		t.Fatalf("Resize: %v", err)
	}
	guestCheckSize(t, a, d.Index, 128*guestMiB)
	guestRun(t, "resize2fs", d.Path)
	if big := guestFSBytes(t, dir); big <= small {
		t.Errorf("ext4 is %d bytes after growing, was %d", big, small)
	}
	if err := d.Detach(ctx); !errors.Is(err, ErrDeviceBusy) {
		t.Errorf("Detach of a mounted device = %v, want ErrDeviceBusy", err)
	}
	guestWriteSync(t, filepath.Join(dir, "after-detach-refused"), []byte("still attached\n"))
	if err := unix.Unmount(dir, 0); err != nil {
		t.Fatal(err)
	}
	guestRun(t, "e2fsck", "-fn", d.Path)
	dir = guestMount(t, d.Path, "ext4")
	got, err := os.ReadFile(filepath.Join(dir, "file"))
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("file differs after remount (%v)", err)
	}
	if err := unix.Unmount(dir, 0); err != nil {
		t.Fatal(err)
	}
}

// guestDirectIO writes a pattern with O_DIRECT and reads it back.
func guestDirectIO(t *testing.T, path string, off int64, seed byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf, want := guestAlignedBuf(t, 64<<10), make([]byte, 64<<10)
	guestPattern(want, seed)
	copy(buf, want)
	if _, err := f.WriteAt(buf, off); err != nil {
		t.Fatalf("write at %d: %v", off, err)
	}
	clear(buf)
	if _, err := f.ReadAt(buf, off); err != nil || !bytes.Equal(buf, want) {
		t.Fatalf("read back at %d: %v (equal: %v)", off, err, bytes.Equal(buf, want))
	}
}

func guestReconfigure(t *testing.T, a *Attacher) {
	srv := newGuestServer(t, 16*guestMiB, 16*guestMiB)
	d := guestAttach(t, a, srv, AttachOptions{Index: AnyIndex, Connections: 2, DeadConnTimeout: 30 * time.Second})
	guestDirectIO(t, d.Path, 0, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for round := range 3 {
		start := time.Now()
		if err := d.Reconfigure(ctx); err != nil {
			t.Fatalf("Reconfigure %d: %v", round, err)
		}
		t.Logf("reconfigured %s: %d connections in %v", d.Path, d.Connections(), time.Since(start))
		if d.Connections() != 2 {
			t.Errorf("%d connections after Reconfigure, want 2", d.Connections())
		}
		guestDirectIO(t, d.Path, int64(round+1)*guestMiB, byte(round+2))
	}
}

func guestNoReconfigure(t *testing.T, a *Attacher) {
	srv := newGuestServer(t, 16*guestMiB, 16*guestMiB)
	d := guestAttach(t, a, srv, AttachOptions{Index: AnyIndex, Connections: 2})
	if err := d.Reconfigure(context.Background()); !errors.Is(err, ErrNotSupported) {
		t.Errorf("Reconfigure over ioctls = %v, want ErrNotSupported", err)
	}
	if _, err := a.Reconnect(context.Background(), d.Index, srv, AttachOptions{}); !errors.Is(err, ErrNotSupported) {
		t.Errorf("Reconnect over ioctls = %v, want ErrNotSupported", err)
	}
	guestDirectIO(t, d.Path, 0, 7)
}

// guestReconnect plays a driver restart: the serving process goes away
// without detaching, I/O issued meanwhile waits (DeadConnTimeout), and a
// new Attacher finds the device by identifier and takes it over.
func guestReconnect(t *testing.T, a *Attacher) {
	srv := newGuestServer(t, 16*guestMiB, 16*guestMiB)
	opts := AttachOptions{Index: AnyIndex, Connections: 2, DeadConnTimeout: 60 * time.Second, Identifier: "pvc-guest-reconnect"}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	old, err := a.Attach(ctx, srv, opts)
	if err != nil {
		t.Fatal(err)
	}
	guestDirectIO(t, old.Path, 0, 1)
	old.mu.Lock()
	old.stopQueues() // the "process" dies: its sockets close, unannounced
	old.mu.Unlock()

	pending := make(chan error, 1)
	go func() { pending <- guestDirectWrite(old.Path, 4*guestMiB, 9) }()
	time.Sleep(200 * time.Millisecond)

	b, err := NewAttacher(AttacherOptions{Interface: InterfaceNetlink})
	if err != nil {
		t.Fatal(err)
	}
	index, err := b.FindByIdentifier(ctx, opts.Identifier)
	if err != nil || index != old.Index {
		t.Fatalf("FindByIdentifier = %d, %v; want %d", index, err, old.Index)
	}
	wrong := opts
	wrong.Identifier = "pvc-someone-else"
	if _, err := b.Reconnect(ctx, index, srv, wrong); err == nil {
		t.Errorf("Reconnect with the wrong identifier succeeded")
	}
	d, err := b.Reconnect(ctx, index, srv, opts)
	if err != nil {
		t.Fatalf("Reconnect: %v", err)
	}
	t.Cleanup(func() { guestDetach(t, d) })
	if err := <-pending; err != nil {
		t.Errorf("write issued while disconnected: %v", err)
	}
	want := make([]byte, 64<<10)
	guestPattern(want, 9)
	if got := guestBackendBytes(t, srv.backend, 4*guestMiB, len(want)); !bytes.Equal(got, want) {
		t.Errorf("write issued while disconnected did not reach the backend")
	}
	guestDirectIO(t, d.Path, 8*guestMiB, 3)
}

func guestDirectWrite(path string, off int64, seed byte) error {
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf, err := unix.Mmap(-1, 0, 64<<10, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return err
	}
	defer unix.Munmap(buf)
	guestPattern(buf, seed)
	if _, err := f.WriteAt(buf, off); err != nil {
		return fmt.Errorf("write at %d: %w", off, err)
	}
	return nil
}

func guestXFS(t *testing.T, a *Attacher) {
	srv := newGuestServer(t, 512*guestMiB, 320*guestMiB)
	d := guestAttach(t, a, srv, AttachOptions{Index: AnyIndex, Connections: 2})
	guestRun(t, "mkfs.xfs", "-q", d.Path)
	dir := guestMount(t, d.Path, "xfs")
	guestWriteSync(t, filepath.Join(dir, "file"), []byte("xfs on nbd\n"))
	small := guestFSBytes(t, dir)
	srv.size.Store(512 * guestMiB)
	if err := d.Resize(context.Background(), 512*guestMiB); err != nil {
		t.Fatalf("Resize: %v", err)
	}
	guestRun(t, "xfs_growfs", dir)
	if big := guestFSBytes(t, dir); big <= small {
		t.Errorf("xfs is %d bytes after growing, was %d", big, small)
	}
	guestRun(t, "fsfreeze", "--freeze", dir)
	guestRun(t, "fsfreeze", "--unfreeze", dir)
	if err := unix.Unmount(dir, 0); err != nil {
		t.Fatal(err)
	}
	guestRun(t, "xfs_repair", "-n", d.Path)
}

// guestReadOnly attaches a read-only export: the kernel must make the disk
// read-only and refuse writes, reads must work, and Detach (which flushes
// through a read-only descriptor) must too.
func guestReadOnly(t *testing.T, a *Attacher) {
	b := NewMemBackend(4 * guestMiB)
	want := bytes.Repeat([]byte("ro"), 2048)
	if _, err := b.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	e, err := NewExport(b, ExportOptions{Name: "ro", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	d := guestAttach(t, a, e, AttachOptions{Index: AnyIndex, Connections: 2})
	if ro, err := sysfsRead(a.dev.sys(), d.Index, "ro"); err != nil || ro != "1" {
		t.Errorf("/sys/block/nbd%d/ro = %q (%v), want 1", d.Index, ro, err)
	}
	// Linux 6.x lets a read-only disk be opened for writing and fails the
	// writes instead.
	if err := guestDirectWrite(d.Path, 0, 1); err == nil {
		t.Errorf("an O_DIRECT write to a read-only device succeeded")
	}
	got, err := os.ReadFile(d.Path)
	if err != nil || !bytes.Equal(got[:len(want)], want) {
		t.Errorf("reading the read-only device: %v", err)
	}
}
