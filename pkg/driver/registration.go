package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// Kubelet finds node plugins through its plugin watcher: a unix socket in
// its plugins_registry directory that serves the Registration service.
// Kubelet calls GetInfo, then NodeGetInfo on the endpoint GetInfo names,
// then NotifyRegistrationStatus; it deregisters the plugin when the socket
// goes away. node-driver-registrar is the usual server of this API; the
// driver serves it itself with --plugin-registration-dir.

// registrationCheckInterval is how often the registration socket is
// checked for: kubelet or a person clearing plugins_registry deletes it,
// and kubelet only sees a plugin again when a socket is created.
const registrationCheckInterval = 5 * time.Second

// csiRegistrationVersions are the CSI versions kubelet is told the driver
// speaks; kubelet's CSI handler accepts 1.x.
var csiRegistrationVersions = []string{"1.0.0"}

// registrar serves kubelet's plugin registration API on one socket.
type registrar struct {
	registerapi.UnimplementedRegistrationServer

	driverName string
	endpoint   string // the CSI socket as kubelet on the host sees it
	path       string // the registration socket
	interval   time.Duration
}

var _ registerapi.RegistrationServer = (*registrar)(nil)

func newRegistrar(o Options) *registrar {
	return &registrar{
		driverName: o.DriverName,
		endpoint:   o.KubeletRegistrationPath,
		path:       o.registrationSocket(),
		interval:   registrationCheckInterval,
	}
}

func (r *registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.driverName,
		Endpoint:          r.endpoint,
		SupportedVersions: csiRegistrationVersions,
	}, nil
}

// NotifyRegistrationStatus logs what kubelet made of the registration. A
// failure is only logged: node-driver-registrar exits on it to be
// restarted, but kubelet's plugin manager retries a failed registration
// by itself (exponential backoff up to ~2 min) for as long as the socket
// exists, and restarting this process would stall the I/O of every
// volume it serves for nothing: the causes (a wrong
// --kubelet-registration-path, a kubelet without the CSI handler) outlive
// a restart. The error reply would make kubelet deregister a plugin it
// had just registered, so the reply is always success.
func (r *registrar) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if st.GetPluginRegistered() {
		klog.V(2).InfoS("Registered with kubelet", "driver", r.driverName, "endpoint", r.endpoint)
	} else {
		klog.ErrorS(errors.New(st.GetError()), "Kubelet failed to register the plugin; it retries while the registration socket exists",
			"driver", r.driverName, "endpoint", r.endpoint, "socket", r.path)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// listen binds the registration socket, replacing a stale socket a killed
// process left behind.
func (r *registrar) listen() (*net.UnixListener, fs.FileInfo, error) {
	l, err := listenUnix(r.path)
	if err != nil {
		return nil, nil, err
	}
	// serve removes the socket itself, and only while it is still ours:
	// Close must not unlink a socket created in its place.
	l.SetUnlinkOnClose(false)
	fi, err := os.Lstat(r.path)
	if err != nil {
		l.Close()
		return nil, nil, err
	}
	return l, fi, nil
}

// serve serves on l until ctx is done, then removes the socket. Each
// interval it checks the socket is still at its path, and if it is gone
// binds a new one, which kubelet sees as a new plugin and registers.
func (r *registrar) serve(ctx context.Context, l *net.UnixListener, fi fs.FileInfo) {
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, r)
	go r.serveOn(srv, l)
	klog.InfoS("Serving plugin registration", "socket", r.path, "driver", r.driverName, "endpoint", r.endpoint)
	t := time.NewTicker(r.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			srv.Stop()
			r.remove(fi)
			return
		case <-t.C:
		}
		if _, err := os.Lstat(r.path); !errors.Is(err, fs.ErrNotExist) {
			continue
		}
		nl, nfi, err := r.listen()
		if err != nil {
			klog.ErrorS(err, "Re-creating the plugin registration socket failed", "socket", r.path)
			continue
		}
		l.Close()
		l, fi = nl, nfi
		go r.serveOn(srv, l)
		klog.InfoS("Re-created the plugin registration socket, which had gone", "socket", r.path)
	}
}

func (r *registrar) serveOn(srv *grpc.Server, l net.Listener) {
	// Serve ends with nil after Stop and with net.ErrClosed when serve
	// closed l for a new socket.
	if err := srv.Serve(l); err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, grpc.ErrServerStopped) {
		klog.ErrorS(err, "Plugin registration server stopped", "socket", r.path)
	}
}

// remove deletes the socket if it is still the one bound last (fi), so
// kubelet deregisters the plugin now rather than at its next failed dial.
func (r *registrar) remove(fi fs.FileInfo) {
	cur, err := os.Lstat(r.path)
	if err != nil || !os.SameFile(cur, fi) {
		return
	}
	if err := os.Remove(r.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		klog.ErrorS(err, "Removing the plugin registration socket failed", "socket", r.path)
	}
}

// listenUnix binds a unix socket at path with socketMode, first removing
// a stale socket at the path; anything else there is refused, as not ours
// to delete.
func listenUnix(path string) (*net.UnixListener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("%s exists and is not a socket (%v); refusing to remove it", path, fi.Mode().Type())
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket: %w", err)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	// Connecting takes write permission on the socket, which would
	// otherwise follow the umask (0777 under umask 0). Owner and group:
	// the sidecars and kubelet run as the driver's user or root, or share
	// its group. (A umask around bind would close the short window before
	// the chmod, but the umask is per process and other goroutines create
	// files.)
	if err := os.Chmod(path, socketMode); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// checkSocket reports whether a unix socket is at path.
func checkSocket(path string) error {
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("socket %s does not exist", path)
	case err != nil:
		return err
	case fi.Mode().Type() != fs.ModeSocket:
		return fmt.Errorf("%s is not a socket (%v)", path, fi.Mode().Type())
	}
	return nil
}
