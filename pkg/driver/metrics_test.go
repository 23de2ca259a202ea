package driver

import (
	"context"
	"io"
	"net/http/httptest"
	"os"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestMetricsScrape(t *testing.T) {
	s, err := newStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	vol := volumeIDFor("pvc-1")
	if err := s.write("volumes", vol, volumeMeta{ID: vol, Name: "pvc-1", CapacityBytes: 1 << 30}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(s.imagePath(vol), make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"snap-a", "snap-b"} {
		id := snapshotIDFor(name)
		if err := s.write("snapshots", id, snapshotMeta{ID: id, Name: name, SourceVolumeID: vol}); err != nil {
			t.Fatal(err)
		}
	}

	m := newMetrics(s)
	info := &grpc.UnaryServerInfo{FullMethod: "/csi.v1.Controller/CreateVolume"}
	ok := func(context.Context, any) (any, error) { return "ok", nil }
	fail := func(context.Context, any) (any, error) { return nil, status.Error(codes.NotFound, "no") }
	for _, h := range []grpc.UnaryHandler{ok, ok, fail} {
		_, _ = m.unaryInterceptor(context.Background(), nil, info, h)
	}

	rec := httptest.NewRecorder()
	m.handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	out := string(body)

	for _, want := range []string{
		`csi_qcow2_operations_total{grpc_code="OK",method="CreateVolume"} 2`,
		`csi_qcow2_operations_total{grpc_code="NotFound",method="CreateVolume"} 1`,
		`csi_qcow2_operation_errors_total{grpc_code="NotFound",method="CreateVolume"} 1`,
		`csi_qcow2_operation_duration_seconds_count{method="CreateVolume"} 3`,
		`csi_qcow2_volumes 1`,
		`csi_qcow2_volume_virtual_bytes{name="pvc-1",volume_id="` + vol + `"} 1.073741824e+09`,
		`csi_qcow2_volume_allocated_bytes{name="pvc-1",volume_id="` + vol + `"}`,
		`csi_qcow2_volume_snapshots{name="pvc-1",volume_id="` + vol + `"} 2`,
		`csi_qcow2_volume_staged{name="pvc-1",volume_id="` + vol + `"} 0`,
		`go_goroutines`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("scrape lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("scrape:\n%s", out)
	}
}

func TestMetricsServe(t *testing.T) {
	s, err := newStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := newMetrics(s).serve(ctx, "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	if err := newMetrics(s).serve(ctx, "not-an-address"); err == nil {
		t.Error("serve on a bad address: want an error")
	}
}
