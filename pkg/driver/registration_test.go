package driver

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

func TestOptionsValidateRegistration(t *testing.T) {
	const kubeletPath = "/var/lib/kubelet/plugins/" + DefaultDriverName + "/csi.sock"
	tests := []validateCase{
		{"off", func(*Options) {}, ""},
		{"on", func(o *Options) { o.PluginRegistrationDir, o.KubeletRegistrationPath = "/registration", kubeletPath }, ""},
		{"node mode", func(o *Options) {
			o.PluginRegistrationDir, o.KubeletRegistrationPath, o.Mode = "/registration", kubeletPath, ModeNode
		}, ""},
		{"dir without path", func(o *Options) { o.PluginRegistrationDir = "/registration" },
			"--kubelet-registration-path is required with --plugin-registration-dir"},
		{"path without dir", func(o *Options) { o.KubeletRegistrationPath = kubeletPath },
			"--plugin-registration-dir is not"},
		{"relative path", func(o *Options) {
			o.PluginRegistrationDir, o.KubeletRegistrationPath = "/registration", "plugins/csi.sock"
		}, `--kubelet-registration-path "plugins/csi.sock": want the absolute path`},
		{"unix URL as path", func(o *Options) {
			o.PluginRegistrationDir, o.KubeletRegistrationPath = "/registration", "unix://"+kubeletPath
		}, "want the absolute path"},
		{"path too long", func(o *Options) {
			o.PluginRegistrationDir, o.KubeletRegistrationPath = "/registration", "/"+strings.Repeat("x", 120)
		}, "longer than 107 bytes"},
		{"socket too long", func(o *Options) {
			o.PluginRegistrationDir, o.KubeletRegistrationPath = "/"+strings.Repeat("d", 90), kubeletPath
		}, "--plugin-registration-dir: socket path"},
		{"controller mode", func(o *Options) {
			o.PluginRegistrationDir, o.KubeletRegistrationPath, o.Mode = "/registration", kubeletPath, ModeController
		}, "--mode controller"},
	}
	runValidateCases(t, tests)

	t.Run("relative dir made absolute", func(t *testing.T) {
		o := DefaultOptions()
		o.NodeID, o.DataDir = "n1", "/data"
		o.PluginRegistrationDir, o.KubeletRegistrationPath = "reg", kubeletPath
		if err := o.Validate(); err != nil {
			t.Fatal(err)
		}
		wd, _ := os.Getwd()
		if want := filepath.Join(wd, "reg", DefaultDriverName+"-reg.sock"); o.registrationSocket() != want {
			t.Errorf("registration socket %s, want %s", o.registrationSocket(), want)
		}
	})
}

// registeredEnv is a driver served with plugin registration on, as a
// kubelet on the node would find it.
type registeredEnv struct {
	opts   Options
	cancel context.CancelFunc
	served chan error
}

// newRegisteredEnv serves a driver with fakes at the OS boundary and the
// registration socket in a temporary plugins_registry; setup, if not nil,
// edits the options (and may prepare the directory) before it starts.
func newRegisteredEnv(t *testing.T, setup func(*Options)) *registeredEnv {
	t.Helper()
	dir := t.TempDir()
	opts := DefaultOptions()
	opts.Endpoint = "unix://" + dir + "/csi.sock"
	opts.NodeID, opts.DataDir = "node-1", dir+"/data"
	// What kubelet on the host would dial; here the same socket.
	opts.PluginRegistrationDir, opts.KubeletRegistrationPath = dir+"/registry", dir+"/csi.sock"
	if err := os.Mkdir(opts.PluginRegistrationDir, 0o750); err != nil {
		t.Fatal(err)
	}
	if setup != nil {
		setup(&opts)
	}
	d, l := newListeningDriver(t, opts)
	ctx, cancel := context.WithCancel(context.Background())
	e := &registeredEnv{opts: opts, cancel: cancel, served: make(chan error, 1)}
	go func() { e.served <- d.ServeOn(ctx, l) }()
	t.Cleanup(func() { e.stop(t) })
	return e
}

// newListeningDriver is a driver over opts with fakes at the OS boundary,
// listening on its endpoint but not yet serving.
func newListeningDriver(t *testing.T, opts Options) (*Driver, net.Listener) {
	t.Helper()
	d, err := New(opts, newFakeMounter(), newFakeAttacher())
	if err != nil {
		t.Fatal(err)
	}
	l, err := d.Listen()
	if err != nil {
		t.Fatal(err)
	}
	return d, l
}

// stop ends ServeOn and checks it returned cleanly; it runs once.
func (e *registeredEnv) stop(t *testing.T) {
	t.Helper()
	if e.cancel == nil {
		return
	}
	e.cancel()
	e.cancel = nil
	if err := <-e.served; err != nil {
		t.Errorf("ServeOn: %v", err)
	}
}

func dial(t *testing.T, path string) *grpc.ClientConn {
	t.Helper()
	// Redial a refused socket within milliseconds, not grpc's 1 s or more.
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 5 * time.Millisecond, Multiplier: 1.6, MaxDelay: 50 * time.Millisecond},
			MinConnectTimeout: time.Second,
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// getInfo calls GetInfo on the registration socket at path, waiting for
// it to answer: the socket file appears at bind(2), a moment before
// listen(2), and a connection in between is refused (kubelet retries one
// too).
func getInfo(t *testing.T, path string) *registerapi.PluginInfo {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := registerapi.NewRegistrationClient(dial(t, path)).GetInfo(ctx, &registerapi.InfoRequest{}, grpc.WaitForReady(true))
	if err != nil {
		t.Fatalf("GetInfo on %s: %v", path, err)
	}
	return info
}

// TestRegistrationFakeKubelet does what kubelet's plugin manager does with
// a new socket in plugins_registry: GetInfo, NodeGetInfo on the endpoint
// it names, NotifyRegistrationStatus. At shutdown the socket goes.
func TestRegistrationFakeKubelet(t *testing.T) {
	e := newRegisteredEnv(t, nil)
	sock := filepath.Join(e.opts.PluginRegistrationDir, DefaultDriverName+"-reg.sock")
	info := getInfo(t, sock)
	fi, err := os.Lstat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm&^0o660 != 0 {
		t.Errorf("registration socket mode %v, want 0660 or tighter", perm)
	}
	if info.GetType() != registerapi.CSIPlugin || info.GetType() != "CSIPlugin" {
		t.Errorf("type %q, want CSIPlugin", info.GetType())
	}
	if info.GetName() != DefaultDriverName {
		t.Errorf("name %q, want %q", info.GetName(), DefaultDriverName)
	}
	if info.GetEndpoint() != e.opts.KubeletRegistrationPath {
		t.Errorf("endpoint %q, want %q", info.GetEndpoint(), e.opts.KubeletRegistrationPath)
	}
	if !slices.Equal(info.GetSupportedVersions(), []string{"1.0.0"}) {
		t.Errorf("supported versions %q, want [1.0.0]", info.GetSupportedVersions())
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reg := registerapi.NewRegistrationClient(dial(t, sock))
	// Kubelet's CSI handler calls NodeGetInfo on the endpoint before it
	// reports the registration.
	ni, err := csi.NewNodeClient(dial(t, info.GetEndpoint())).NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil || ni.GetNodeId() != "node-1" {
		t.Fatalf("NodeGetInfo on the registered endpoint: %v, %v", ni, err)
	}

	for _, st := range []*registerapi.RegistrationStatus{
		{PluginRegistered: true},
		{PluginRegistered: false, Error: "RegisterPlugin error -- plugin registration failed"},
	} {
		if _, err := reg.NotifyRegistrationStatus(ctx, st); err != nil {
			t.Errorf("NotifyRegistrationStatus(%v): %v", st, err)
		}
	}
	// A failed registration is kubelet's to retry: the socket stays.
	if _, err := reg.GetInfo(ctx, &registerapi.InfoRequest{}); err != nil {
		t.Errorf("GetInfo after a failed registration: %v", err)
	}

	e.stop(t)
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("registration socket after shutdown: %v, want it removed", err)
	}
}

// TestRegistrationRecreatesSocket: a socket deleted while serving (kubelet
// clearing plugins_registry) comes back, and answers.
func TestRegistrationRecreatesSocket(t *testing.T) {
	dir := t.TempDir()
	o := DefaultOptions()
	o.PluginRegistrationDir, o.KubeletRegistrationPath = dir, "/var/lib/kubelet/plugins/x/csi.sock"
	r := newRegistrar(o)
	r.interval = 10 * time.Millisecond
	l, fi, err := r.listen()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.serve(ctx, l, fi); close(done) }()

	for round := range 3 {
		if err := os.Remove(r.path); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if info := getInfo(t, r.path); info.GetName() != DefaultDriverName {
			t.Fatalf("round %d: GetInfo on the re-created socket: %v", round, info)
		}
	}
	cancel()
	<-done
	if _, err := os.Lstat(r.path); !os.IsNotExist(err) {
		t.Errorf("socket after shutdown: %v, want it removed", err)
	}
}

// TestRegistrationStalePath: a socket left at the path by a killed
// process is replaced; anything else there stops the driver with a clear
// error and is left alone.
func TestRegistrationStalePath(t *testing.T) {
	regSock := func(regDir string) string { return filepath.Join(regDir, DefaultDriverName+"-reg.sock") }
	t.Run("stale socket replaced", func(t *testing.T) {
		e := newRegisteredEnv(t, func(o *Options) {
			l, err := listenUnix(regSock(o.PluginRegistrationDir))
			if err != nil {
				t.Fatal(err)
			}
			l.SetUnlinkOnClose(false)
			l.Close() // as a SIGKILL leaves it: no one listening
		})
		// Nothing listens on the stale socket, so a GetInfo that succeeds
		// is answered on the driver's new one.
		getInfo(t, regSock(e.opts.PluginRegistrationDir))
	})

	for _, tc := range []struct {
		name   string
		create func(path string) error
	}{
		{"regular file refused", func(p string) error { return os.WriteFile(p, []byte("keep me"), 0o600) }},
		{"directory refused", func(p string) error { return os.Mkdir(p, 0o700) }},
		{"symlink refused", func(p string) error { return os.Symlink("/nonexistent", p) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			o := DefaultOptions()
			o.Endpoint = "unix://" + dir + "/csi.sock"
			o.NodeID, o.DataDir = "node-1", dir+"/data"
			o.PluginRegistrationDir, o.KubeletRegistrationPath = dir, dir+"/csi.sock"
			sock := regSock(dir)
			if err := tc.create(sock); err != nil {
				t.Fatal(err)
			}
			before, err := os.Lstat(sock)
			if err != nil {
				t.Fatal(err)
			}
			d, l := newListeningDriver(t, o)
			defer l.Close()
			err = d.ServeOn(context.Background(), l)
			if err == nil || !strings.Contains(err.Error(), sock+" exists and is not a socket") {
				t.Fatalf("ServeOn = %v, want a refusal naming %s", err, sock)
			}
			after, err := os.Lstat(sock)
			if err != nil || !os.SameFile(before, after) {
				t.Errorf("%s after the refusal: %v, %v: want it untouched", sock, after, err)
			}
		})
	}
}
