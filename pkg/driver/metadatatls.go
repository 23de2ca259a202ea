package driver

import (
	"context"
	"errors"
	"io/fs"
	"net"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"k8s.io/klog/v2"
)

// The SnapshotMetadata service's own listener: mutual TLS on TCP, so that
// backup clients off the node can reach it. Upstream, the
// external-snapshot-metadata sidecar would terminate that TLS and call the
// driver on its unix socket, but its module is not served by the Go module
// proxy this project builds from, so the driver serves TLS itself: the
// server presents --snapshot-metadata-tls-cert/-key and refuses any client
// whose certificate does not chain to --snapshot-metadata-client-ca.

// newMetadataTLS loads the snapshot metadata TLS files of opts
// (tlsfiles.go). A file that does not exist wraps fs.ErrNotExist.
func newMetadataTLS(opts Options) (*tlsFiles, error) {
	return newTLSFiles("snapshot metadata", opts.SnapshotMetadataTLSCert, opts.SnapshotMetadataTLSKey, opts.SnapshotMetadataClientCA, "h2")
}

// setupSnapshotMetadata decides at New whether the service is on.
func setupSnapshotMetadata(opts Options) (*tlsFiles, error) {
	if !opts.snapshotMetadata() {
		return nil, nil
	}
	m, err := newMetadataTLS(opts)
	if errors.Is(err, fs.ErrNotExist) && opts.SnapshotMetadataOptional {
		klog.InfoS("Snapshot metadata service off: a TLS file does not exist (--snapshot-metadata-optional)", "err", err.Error())
		return nil, nil
	}
	return m, err
}

// startSnapshotMetadata listens on --snapshot-metadata-address and serves
// the SnapshotMetadata service over mutual TLS until ctx is done; the
// channel closes once it has stopped.
func (d *Driver) startSnapshotMetadata(ctx context.Context) (<-chan struct{}, error) {
	done := make(chan struct{})
	if d.metadataTLS == nil {
		close(done)
		return done, nil
	}
	l, err := net.Listen("tcp", d.opts.SnapshotMetadataAddress)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	d.metadataAddr = l.Addr()
	d.mu.Unlock()
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(d.metadataTLS.serverConfig())),
		grpc.ChainUnaryInterceptor(logAndMapErrors), grpc.ChainStreamInterceptor(logAndMapStreamErrors))
	csi.RegisterSnapshotMetadataServer(srv, d)
	go func() {
		<-ctx.Done()
		srv.GracefulStop()
	}()
	go func() {
		defer close(done)
		klog.InfoS("Serving snapshot metadata over mutual TLS", "address", l.Addr().String())
		if err := srv.Serve(l); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			klog.ErrorS(err, "Snapshot metadata server stopped")
		}
	}()
	return done, nil
}

// snapshotMetadataAddr is where the TLS listener is bound (nil before).
func (d *Driver) snapshotMetadataAddr() net.Addr {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.metadataAddr
}
