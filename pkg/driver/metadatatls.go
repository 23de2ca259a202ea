package driver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"sync"

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

// metadataTLS holds the TLS files and the config made from them, made anew
// when a file changes (a rotated Secret), checked at each handshake.
type metadataTLS struct {
	certFile, keyFile, caFile string

	mu    sync.Mutex
	stamp string // what the files looked like when cfg was made
	cfg   *tls.Config
}

// newMetadataTLS loads the files of opts. A file that does not exist
// wraps fs.ErrNotExist.
func newMetadataTLS(opts Options) (*metadataTLS, error) {
	m := &metadataTLS{certFile: opts.SnapshotMetadataTLSCert, keyFile: opts.SnapshotMetadataTLSKey, caFile: opts.SnapshotMetadataClientCA}
	if _, err := m.config(); err != nil {
		return nil, err
	}
	return m, nil
}

// config returns the config of the files as they are now. If they changed
// but cannot be loaded (a rotation half done), the last good one is kept.
func (m *metadataTLS) config() (*tls.Config, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	stamp, err := m.fileStamp()
	if err == nil && stamp == m.stamp {
		return m.cfg, nil
	}
	var cfg *tls.Config
	if err == nil {
		cfg, err = m.load()
	}
	if err != nil {
		if m.cfg == nil {
			return nil, err
		}
		klog.ErrorS(err, "Reloading the snapshot metadata TLS files failed; serving with the previous ones")
		return m.cfg, nil
	}
	m.stamp, m.cfg = stamp, cfg
	return cfg, nil
}

func (m *metadataTLS) fileStamp() (string, error) {
	var stamp string
	for _, f := range []string{m.certFile, m.keyFile, m.caFile} {
		fi, err := os.Stat(f)
		if err != nil {
			return "", fmt.Errorf("snapshot metadata TLS: %w", err)
		}
		stamp += fmt.Sprintf("%s %d %d;", f, fi.Size(), fi.ModTime().UnixNano())
	}
	return stamp, nil
}

func (m *metadataTLS) load() (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(m.certFile, m.keyFile)
	if err != nil {
		return nil, fmt.Errorf("snapshot metadata TLS certificate %s, key %s: %w", m.certFile, m.keyFile, err)
	}
	pem, err := os.ReadFile(m.caFile)
	if err != nil {
		return nil, fmt.Errorf("snapshot metadata client CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("snapshot metadata client CA %s: no PEM certificate in it", m.caFile)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
		NextProtos:   []string{"h2"},
	}, nil
}

// serverConfig is the config the listener starts with: each handshake
// takes the files' current one.
func (m *metadataTLS) serverConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return m.config()
		},
	}
}

// setupSnapshotMetadata decides at New whether the service is on.
func setupSnapshotMetadata(opts Options) (*metadataTLS, error) {
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
