package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// Run serves the driver with the OS's mounter and /dev/nbdX attacher until
// ctx is done.
func Run(ctx context.Context, opts Options) error {
	d, err := New(opts, newOSMounter(), newNBDAttacher(opts))
	if err != nil {
		return err
	}
	if d.cluster, err = newClusterObjects(d.opts); err != nil {
		return err
	}
	return d.Serve(ctx)
}

// Serve listens on the endpoint and serves until ctx is done.
func (d *Driver) Serve(ctx context.Context) error {
	l, err := d.Listen()
	if err != nil {
		return err
	}
	return d.ServeOn(ctx, l)
}

// Listen listens on the endpoint's unix socket, replacing a stale one.
func (d *Driver) Listen() (net.Listener, error) {
	path, err := socketPath(d.opts.Endpoint)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	l, err := listenUnix(path)
	if err != nil {
		return nil, err // not a typed nil in the interface
	}
	return l, nil
}

// socketMode is the permission of the sockets the driver binds: never
// writable by others.
const socketMode = 0o660

// ServeOn recovers staged volumes, releases the devices no staged record
// accounts for, and serves on l until ctx is done, then stops gracefully.
// The HTTP endpoints, the orphan checker and the plugin registration socket
// stop with it.
func (d *Driver) ServeOn(ctx context.Context, l net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if d.opts.Mode.node() {
		d.recoverStaged(ctx)
		d.releaseLeftovers(ctx)
	}
	d.removeCopyLeftovers()
	d.copies.start(ctx)
	defer d.copies.wait()
	m := newMetrics(d.store)
	m.reg.MustRegister(&copyCollector{d.copies})
	if d.opts.MetricsAddress != "" {
		if err := m.serve(ctx, d.opts.MetricsAddress); err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
	}
	if d.opts.HealthzAddress != "" {
		if err := serveHTTP(ctx, "healthz", d.opts.HealthzAddress, d.healthzMux(d.kubeletSockets(l)...)); err != nil {
			return fmt.Errorf("healthz: %w", err)
		}
	}
	srv := d.NewGRPCServer(m.unaryInterceptor)
	metadataDone, err := d.startSnapshotMetadata(ctx)
	if err != nil {
		return fmt.Errorf("snapshot metadata: %w", err)
	}
	peerDone, err := d.startPeer(ctx)
	if err != nil {
		return fmt.Errorf("peer service: %w", err)
	}
	registered, err := d.startRegistration(ctx)
	if err != nil {
		return fmt.Errorf("plugin registration: %w", err)
	}
	checked := d.startOrphanChecker(ctx, m)
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			srv.GracefulStop()
		case <-done:
		}
	}()
	klog.InfoS("Serving CSI", "endpoint", d.opts.Endpoint, "driver", d.opts.DriverName, "nodeID", d.opts.NodeID, "mode", d.opts.Mode)
	err = srv.Serve(l)
	close(done)
	cancel()
	<-registered
	<-metadataDone
	<-peerDone
	<-checked
	d.flushStaged()
	if errors.Is(err, grpc.ErrServerStopped) {
		err = nil
	}
	return err
}

// startOrphanChecker runs the orphan checker, if the driver has a cluster
// to ask, until ctx is done; the channel closes when it has stopped.
func (d *Driver) startOrphanChecker(ctx context.Context, m *metrics) <-chan struct{} {
	done := make(chan struct{})
	if d.cluster == nil {
		close(done)
		return done
	}
	o := newOrphanChecker(d, d.cluster)
	m.reg.MustRegister(o.collectors()...)
	klog.InfoS("Orphan check on", "interval", d.opts.OrphanCheckInterval, "grace", d.opts.OrphanGrace,
		"deleteOrphansAfter", d.opts.DeleteOrphansAfter)
	go func() {
		defer close(done)
		o.run(ctx, d.opts.OrphanCheckInterval)
	}()
	return done
}

// startRegistration binds the plugin registration socket, if
// --plugin-registration-dir asks for one, and serves it until ctx is
// done; the channel closes once the socket is removed. It runs last
// before the CSI server's Serve: kubelet calls NodeGetInfo as soon as it
// sees the socket, and by then the CSI socket is bound (a connection
// waits in its backlog for Serve) and recovery is over.
func (d *Driver) startRegistration(ctx context.Context) (<-chan struct{}, error) {
	done := make(chan struct{})
	if d.opts.PluginRegistrationDir == "" {
		close(done)
		return done, nil
	}
	r := newRegistrar(d.opts)
	l, fi, err := r.listen()
	if err != nil {
		return nil, err
	}
	go func() {
		defer close(done)
		r.serve(ctx, l, fi)
	}()
	return done, nil
}

// NewGRPCServer registers the services of d.opts.Mode, and SnapshotMetadata
// when it is on. Interceptors given run outside logAndMapErrors, so they
// see the mapped gRPC status.
func (d *Driver) NewGRPCServer(outer ...grpc.UnaryServerInterceptor) *grpc.Server {
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(append(outer, logAndMapErrors)...),
		grpc.ChainStreamInterceptor(logAndMapStreamErrors))
	csi.RegisterIdentityServer(srv, d)
	if d.metadataTLS != nil {
		csi.RegisterSnapshotMetadataServer(srv, d)
	}
	if d.opts.Mode.controller() {
		csi.RegisterControllerServer(srv, d)
		csi.RegisterGroupControllerServer(srv, d)
	}
	if d.opts.Mode.node() {
		csi.RegisterNodeServer(srv, d)
	}
	return srv
}

// logAndMapErrors is the one place failed RPCs are logged, and where every
// handler's error becomes a gRPC status (errors.go).
func logAndMapErrors(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	klog.V(4).InfoS("RPC", "method", info.FullMethod, "request", req)
	resp, err := handler(ctx, req)
	if err != nil {
		err = toStatus(err)
		klog.ErrorS(err, "RPC failed", "method", info.FullMethod, "code", status.Code(err).String())
		return nil, err
	}
	return resp, nil
}

// logAndMapStreamErrors is logAndMapErrors for streaming RPCs (the
// SnapshotMetadata service's).
func logAndMapStreamErrors(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	klog.V(4).InfoS("Streaming RPC", "method", info.FullMethod)
	if err := handler(srv, ss); err != nil {
		err = toStatus(err)
		klog.ErrorS(err, "RPC failed", "method", info.FullMethod, "code", status.Code(err).String())
		return err
	}
	return nil
}

// flushStaged makes what staged volumes acknowledged durable before the
// process exits. The devices stay attached: the next process reconnects.
func (d *Driver) flushStaged() {
	d.mu.Lock()
	svs := make([]*stagedVolume, 0, len(d.staged))
	for _, sv := range d.staged {
		svs = append(svs, sv)
	}
	d.mu.Unlock()
	for _, sv := range svs {
		if err := sv.img.Flush(); err != nil {
			klog.ErrorS(err, "Flushing staged volume at exit failed", "volumeID", sv.meta.VolumeID)
		}
	}
}
