package driver

import (
	"context"
	"errors"
	"net"
	"net/http"
	"path"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// Metric names, served on --metrics-address at /metrics.
const (
	metricOperations       = "csi_qcow2_operations_total"
	metricOperationErrors  = "csi_qcow2_operation_errors_total"
	metricOperationLatency = "csi_qcow2_operation_duration_seconds"
	metricVolumes          = "csi_qcow2_volumes"
	metricVolumeVirtual    = "csi_qcow2_volume_virtual_bytes"
	metricVolumeAllocated  = "csi_qcow2_volume_allocated_bytes"
	metricVolumeSnapshots  = "csi_qcow2_volume_snapshots"
	metricVolumeStaged     = "csi_qcow2_volume_staged"
)

// metrics holds the driver's Prometheus registry: per-RPC counters and
// latencies fed by an interceptor, and a collector that reads the data
// dir's metadata at scrape time. One per Driver; nothing global.
type metrics struct {
	reg     *prometheus.Registry
	ops     *prometheus.CounterVec
	errs    *prometheus.CounterVec
	latency *prometheus.HistogramVec
}

func newMetrics(s *store) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricOperations,
			Help: "CSI RPCs served, by method and gRPC status code.",
		}, []string{"method", "grpc_code"}),
		errs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricOperationErrors,
			Help: "CSI RPCs that failed, by method and gRPC status code.",
		}, []string{"method", "grpc_code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    metricOperationLatency,
			Help:    "CSI RPC latency in seconds, by method.",
			Buckets: []float64{.001, .005, .01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120},
		}, []string{"method"}),
	}
	m.reg.MustRegister(m.ops, m.errs, m.latency, &volumeCollector{store: s},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// unaryInterceptor counts and times every RPC. It runs outside
// logAndMapErrors, so it sees the gRPC code the CO sees.
func (m *metrics) unaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := handler(ctx, req)
	method := path.Base(info.FullMethod)
	code := status.Code(err).String()
	m.latency.WithLabelValues(method).Observe(time.Since(start).Seconds())
	m.ops.WithLabelValues(method, code).Inc()
	if err != nil {
		m.errs.WithLabelValues(method, code).Inc()
	}
	return resp, err
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// serve listens on addr and serves /metrics there until ctx is done.
func (m *metrics) serve(ctx context.Context, addr string) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", m.handler())
	return serveHTTP(ctx, "metrics", addr, mux)
}

// serveHTTP listens on addr and serves h there until ctx is done: the
// shape of the driver's small HTTP endpoints (/metrics, /healthz). A
// listen error is returned, later serving errors are logged.
func serveHTTP(ctx context.Context, name, addr string, h http.Handler) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	// "Serving metrics" address=... is what hack/e2e-k8s.sh looks for.
	klog.InfoS("Serving "+name, "address", l.Addr().String())
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			klog.ErrorS(err, "HTTP server stopped", "endpoint", name)
		}
	}()
	return nil
}

var (
	descVolumes = prometheus.NewDesc(metricVolumes,
		"Volumes in this node's data dir.", nil, nil)
	descVolumeVirtual = prometheus.NewDesc(metricVolumeVirtual,
		"A volume's size as the guest sees it (its capacity).", []string{"volume_id", "name"}, nil)
	descVolumeAllocated = prometheus.NewDesc(metricVolumeAllocated,
		"Bytes the volume's qcow2 image occupies on the data dir's filesystem (snapshots included).",
		[]string{"volume_id", "name"}, nil)
	descVolumeSnapshots = prometheus.NewDesc(metricVolumeSnapshots,
		"CSI snapshots (internal qcow2 snapshots) of a volume.", []string{"volume_id", "name"}, nil)
	descVolumeStaged = prometheus.NewDesc(metricVolumeStaged,
		"1 if the volume is staged on this node (attached to /dev/nbdX), else 0.", []string{"volume_id", "name"}, nil)
)

// volumeCollector reads the data dir's metadata at each scrape: the same
// files the driver keeps, so what it reports is what is on disk. It takes no
// volume locks and opens no image: sizes come from the metadata, the
// allocation from stat(2).
type volumeCollector struct {
	store *store
}

var _ prometheus.Collector = (*volumeCollector)(nil)

func (c *volumeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descVolumes, descVolumeVirtual, descVolumeAllocated, descVolumeSnapshots, descVolumeStaged} {
		ch <- d
	}
}

func (c *volumeCollector) Collect(ch chan<- prometheus.Metric) {
	snaps := c.snapshotsPerVolume()
	ids, err := c.store.list("volumes")
	if err != nil {
		ch <- prometheus.NewInvalidMetric(descVolumes, err)
		return
	}
	n := 0
	for _, id := range ids {
		m, err := c.store.readVolume(id)
		if err != nil {
			continue // deleted since the listing, or being written
		}
		n++
		labels := []string{id, m.Name}
		ch <- prometheus.MustNewConstMetric(descVolumeVirtual, prometheus.GaugeValue, float64(m.CapacityBytes), labels...)
		var st syscall.Stat_t
		if err := syscall.Lstat(c.store.imagePath(id), &st); err == nil {
			ch <- prometheus.MustNewConstMetric(descVolumeAllocated, prometheus.GaugeValue, float64(st.Blocks)*512, labels...)
		}
		ch <- prometheus.MustNewConstMetric(descVolumeSnapshots, prometheus.GaugeValue, float64(snaps[id]), labels...)
		staged := 0.0
		if _, err := c.store.readStaged(id); err == nil {
			staged = 1
		}
		ch <- prometheus.MustNewConstMetric(descVolumeStaged, prometheus.GaugeValue, staged, labels...)
	}
	ch <- prometheus.MustNewConstMetric(descVolumes, prometheus.GaugeValue, float64(n))
}

func (c *volumeCollector) snapshotsPerVolume() map[string]int {
	out := map[string]int{}
	ids, err := c.store.list("snapshots")
	if err != nil {
		return out
	}
	for _, id := range ids {
		if !strings.HasPrefix(id, snapshotPrefix) {
			continue
		}
		if m, err := c.store.readSnapshot(id); err == nil {
			out[m.SourceVolumeID]++
		}
	}
	return out
}
