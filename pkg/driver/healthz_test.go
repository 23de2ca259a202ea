package driver

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func getHealthz(t *testing.T, h http.Handler, method string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(method, "/healthz", nil))
	return rec.Code, strings.TrimSpace(rec.Body.String())
}

// TestHealthzProbe: the answer follows Probe and the sockets, with the
// reason in the body.
func TestHealthzProbe(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "csi.sock")
	l, err := listenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	answer := func(resp *csi.ProbeResponse, err error) probeFunc {
		return func(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) { return resp, err }
	}
	ready := answer(&csi.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil)
	tests := []struct {
		name     string
		probe    probeFunc
		sockets  []string
		wantCode int
		wantBody string
	}{
		{"ready", ready, []string{sock}, 200, "ok"},
		{"ready absent means ready", answer(&csi.ProbeResponse{}, nil), nil, 200, "ok"},
		{"not ready", answer(&csi.ProbeResponse{Ready: wrapperspb.Bool(false)}, nil), []string{sock}, 500, "probe: the driver is not ready"},
		{"probe error", answer(nil, status.Error(codes.FailedPrecondition, "data dir gone")), nil, 500, "data dir gone"},
		{"socket missing", ready, []string{sock, filepath.Join(dir, "reg.sock")}, 500, "reg.sock does not exist"},
		{"not a socket", ready, []string{file}, 500, file + " is not a socket"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, body := getHealthz(t, &healthz{probe: tc.probe, sockets: tc.sockets}, "GET")
			if code != tc.wantCode || !strings.Contains(body, tc.wantBody) {
				t.Errorf("GET /healthz = %d %q, want %d %q", code, body, tc.wantCode, tc.wantBody)
			}
		})
	}
}

// TestHealthzDriver: the driver's own Probe through its mux, the CSI
// socket checked, and other methods and paths refused.
func TestHealthzDriver(t *testing.T) {
	e := newTestEnv(t)
	csiSock, err := socketPath(e.endpoint)
	if err != nil {
		t.Fatal(err)
	}
	mux := e.d.healthzMux(csiSock)
	if code, body := getHealthz(t, mux, "GET"); code != 200 || body != "ok" {
		t.Errorf("GET /healthz = %d %q, want 200 ok", code, body)
	}
	if code, _ := getHealthz(t, mux, "POST"); code != http.StatusMethodNotAllowed {
		t.Errorf("POST /healthz = %d, want 405", code)
	}
	rec := httptest.NewRecorder()
	mux.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != http.StatusNotFound {
		t.Errorf("GET /metrics on the healthz mux = %d, want 404", rec.Code)
	}

	missing := e.d.healthzMux(csiSock + ".gone")
	if code, body := getHealthz(t, missing, "GET"); code != 500 || !strings.Contains(body, "csi.sock.gone does not exist") {
		t.Errorf("GET /healthz, CSI socket gone = %d %q, want 500 naming it", code, body)
	}

}

// TestHealthzSockets: /healthz checks the CSI socket when it is a unix
// one, and the registration socket when registration is on.
func TestHealthzSockets(t *testing.T) {
	dir := t.TempDir()
	csiSock := filepath.Join(dir, "csi.sock")
	unixL, err := listenUnix(csiSock)
	if err != nil {
		t.Fatal(err)
	}
	defer unixL.Close()
	tcpL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tcpL.Close()
	regSock := "/registration/" + DefaultDriverName + "-reg.sock"
	for _, tc := range []struct {
		name   string
		l      net.Listener
		regDir string
		want   []string
	}{
		{"unix", unixL, "", []string{csiSock}},
		{"unix and registration", unixL, "/registration", []string{csiSock, regSock}},
		{"tcp", tcpL, "", nil},
		{"tcp and registration", tcpL, "/registration", []string{regSock}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := DefaultOptions()
			o.NodeID, o.DataDir = "n1", filepath.Join(dir, "data")
			if tc.regDir != "" {
				o.PluginRegistrationDir, o.KubeletRegistrationPath = tc.regDir, csiSock
			}
			d, err := New(o, newFakeMounter(), newFakeAttacher())
			if err != nil {
				t.Fatal(err)
			}
			if got := d.kubeletSockets(tc.l); !slices.Equal(got, tc.want) {
				t.Errorf("kubeletSockets = %q, want %q", got, tc.want)
			}
		})
	}
}

// TestHealthzServed: --healthz-address serves /healthz over TCP alongside
// the registration socket.
func TestHealthzServed(t *testing.T) {
	addr := freeAddr(t)
	newRegisteredEnv(t, func(o *Options) { o.HealthzAddress = addr })
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 && string(body) == "ok" {
				return
			}
			err = errors.New(resp.Status + ": " + string(body))
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET /healthz: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// freeAddr is a loopback address with a port nothing listens on now.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
