package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/klog/v2"
)

// probeFunc is the identity server's Probe: the Driver's own in
// production, a stand-in in tests.
type probeFunc func(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error)

// healthz answers GET /healthz in place of the livenessprobe sidecar:
// 200 "ok" when Probe, called in-process, says ready and every socket
// kubelet needs is there; else 500 with the reason. The sidecar dials the
// CSI socket to probe; checking the socket is still at its path stands in
// for that dial.
type healthz struct {
	probe   probeFunc
	sockets []string
}

// healthzMux serves /healthz for d, checking that sockets exist: the
// CSI socket and, with --plugin-registration-dir, the registration one.
func (d *Driver) healthzMux(sockets ...string) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("GET /healthz", &healthz{probe: d.Probe, sockets: sockets})
	return mux
}

// kubeletSockets are the sockets kubelet dials: the CSI socket of l, if
// it is a unix listener, and the registration socket if there is one.
func (d *Driver) kubeletSockets(l net.Listener) []string {
	var out []string
	if a := l.Addr(); a.Network() == "unix" {
		out = append(out, a.String())
	}
	if d.opts.PluginRegistrationDir != "" {
		out = append(out, d.opts.registrationSocket())
	}
	return out
}

func (h *healthz) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if err := h.check(r.Context()); err != nil {
		klog.ErrorS(err, "Health check failed")
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	_, _ = w.Write([]byte("ok"))
}

func (h *healthz) check(ctx context.Context) error {
	resp, err := h.probe(ctx, &csi.ProbeRequest{})
	if err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	// An absent ready field means ready (CSI spec, Probe).
	if ready := resp.GetReady(); ready != nil && !ready.GetValue() {
		return errors.New("probe: the driver is not ready")
	}
	for _, p := range h.sockets {
		if err := checkSocket(p); err != nil {
			return err
		}
	}
	return nil
}
