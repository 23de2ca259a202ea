package driver

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	mount "k8s.io/mount-utils"

	"github.com/csi-qcow2/csi-qcow2/pkg/nbdattach"
)

// fakeAttacher "attaches" by recording the backend; the device reads and
// writes straight through to it, so tests can check data end to end.
type fakeAttacher struct {
	mu        sync.Mutex
	next      int
	free      int
	attached  map[int]*fakeDevice
	attachErr error
	// leftovers are connected devices no fakeDevice stands for (left by
	// an earlier process); Release takes them off and records them.
	leftovers  []nbdattach.Connection
	releaseErr error
	released   []int
}

func newFakeAttacher() *fakeAttacher {
	return &fakeAttacher{free: 16, attached: map[int]*fakeDevice{}}
}

type fakeDevice struct {
	a       *fakeAttacher
	id      string
	index   int
	backend nbdattach.Backend
	size    int64
	onError func(error)
}

var (
	_ Attacher = (*fakeAttacher)(nil)
	_ Device   = (*fakeDevice)(nil)
	_ Mounter  = (*fakeMounter)(nil)
)

func (a *fakeAttacher) Attach(ctx context.Context, id string, b nbdattach.Backend, onError func(error)) (Device, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.attachErr != nil {
		return nil, a.attachErr
	}
	d := &fakeDevice{a: a, id: id, index: a.next, backend: b, size: b.Size(), onError: onError}
	a.next++
	a.attached[d.index] = d
	return d, nil
}

func (a *fakeAttacher) Reconnect(ctx context.Context, id string, index int, b nbdattach.Backend, onError func(error)) (Device, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	d := &fakeDevice{a: a, id: id, index: index, backend: b, size: b.Size(), onError: onError}
	a.attached[index] = d
	return d, nil
}

func (a *fakeAttacher) FreeDevices(context.Context) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.free - len(a.attached), nil
}

func (a *fakeAttacher) Connected(context.Context) ([]nbdattach.Connection, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := append([]nbdattach.Connection(nil), a.leftovers...)
	for i, d := range a.attached {
		out = append(out, nbdattach.Connection{Index: i, PID: 1, Backend: d.id})
	}
	return out, nil
}

func (a *fakeAttacher) Release(_ context.Context, index int) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.releaseErr != nil {
		return a.releaseErr
	}
	a.released = append(a.released, index)
	if _, ok := a.attached[index]; ok {
		delete(a.attached, index)
		return nil
	}
	for i, c := range a.leftovers {
		if c.Index == index {
			a.leftovers = append(a.leftovers[:i], a.leftovers[i+1:]...)
			return nil
		}
	}
	return nbdattach.ErrNotConnected
}

func (a *fakeAttacher) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.attached)
}

func (d *fakeDevice) Index() int   { return d.index }
func (d *fakeDevice) Path() string { return fmt.Sprintf("/dev/fake-nbd%d", d.index) }
func (d *fakeDevice) Resize(ctx context.Context, size int64) error {
	d.size = size
	return nil
}
func (d *fakeDevice) Detach(context.Context) error {
	d.a.mu.Lock()
	defer d.a.mu.Unlock()
	delete(d.a.attached, d.index)
	return d.backend.Flush()
}

// fakeMounter is mount-utils' FakeMounter plus records of formats,
// resizes and freezes.
type fakeMounter struct {
	*mount.FakeMounter
	mu      sync.Mutex
	formats map[string]string // device -> fsType
	resized []string
	frozen  map[string]int
	events  []string
}

func newFakeMounter() *fakeMounter {
	return &fakeMounter{FakeMounter: mount.NewFakeMounter(nil), formats: map[string]string{}, frozen: map[string]int{}}
}

func (m *fakeMounter) FormatAndMount(source, target, fsType string, options []string) error {
	m.mu.Lock()
	if _, ok := m.formats[source]; !ok {
		m.formats[source] = fsType
	}
	m.mu.Unlock()
	return m.FakeMounter.Mount(source, target, fsType, options)
}

func (m *fakeMounter) IsMountPoint(path string) (bool, error) {
	return m.FakeMounter.IsMountPoint(path)
}

func (m *fakeMounter) ResizeFs(dev, path string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.resized = append(m.resized, dev+" "+path)
	return nil
}

func (m *fakeMounter) Freeze(path string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.frozen[path]++
	m.events = append(m.events, "freeze "+path)
	return nil
}

func (m *fakeMounter) Thaw(path string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.frozen[path]--
	m.events = append(m.events, "thaw "+path)
	return nil
}

// testEnv is a driver served over a unix socket with fakes at the OS
// boundary, and clients for its three services.
type testEnv struct {
	d        *Driver
	opts     Options
	mounter  *fakeMounter
	attacher *fakeAttacher
	conn     *grpc.ClientConn
	id       csi.IdentityClient
	ctrl     csi.ControllerClient
	node     csi.NodeClient
	endpoint string
}

func newTestEnv(t *testing.T) *testEnv {
	t.Helper()
	return newTestEnvWith(t, nil)
}

// newTestEnvWith is newTestEnv with options changed by set (may be nil).
func newTestEnvWith(t testing.TB, set func(*Options)) *testEnv {
	t.Helper()
	dir := t.TempDir()
	opts := DefaultOptions()
	opts.Endpoint = "unix://" + dir + "/csi.sock"
	opts.NodeID = "node-1"
	opts.DataDir = dir + "/data"
	if set != nil {
		set(&opts)
	}
	e := &testEnv{opts: opts, mounter: newFakeMounter(), attacher: newFakeAttacher(), endpoint: opts.Endpoint}
	d, err := New(opts, e.mounter, e.attacher)
	if err != nil {
		t.Fatal(err)
	}
	e.d = d
	l, err := d.Listen()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- d.ServeOn(ctx, l) }()
	conn, err := grpc.NewClient(opts.Endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	e.conn = conn
	e.id, e.ctrl, e.node = csi.NewIdentityClient(conn), csi.NewControllerClient(conn), csi.NewNodeClient(conn)
	return e
}
