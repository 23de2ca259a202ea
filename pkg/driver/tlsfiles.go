package driver

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"sync"

	"k8s.io/klog/v2"
)

// tlsFiles holds the PEM files of a mutual-TLS listener (certificate, key,
// and the CA bundle the other side must chain to) and the config made from
// them, made anew when a file changes (a rotated Secret) and checked at
// each handshake. The snapshot metadata listener (metadatatls.go) and the
// node-to-node peer listener (peer.go) each have one; the peer client
// dials with the same files.
type tlsFiles struct {
	what                      string // for messages: "snapshot metadata", "peer"
	certFile, keyFile, caFile string
	protos                    []string // ALPN: "h2" for gRPC, "http/1.1" for the peer stream

	mu    sync.Mutex
	stamp string // what the files looked like when cfg was made
	cfg   *tls.Config
}

// newTLSFiles loads the files; protos is what ALPN offers. A file that
// does not exist wraps fs.ErrNotExist.
func newTLSFiles(what, cert, key, ca string, protos ...string) (*tlsFiles, error) {
	m := &tlsFiles{what: what, certFile: cert, keyFile: key, caFile: ca, protos: protos}
	if _, err := m.config(); err != nil {
		return nil, err
	}
	return m, nil
}

// config returns the server config of the files as they are now. If they
// changed but cannot be loaded (a rotation half done), the last good one
// is kept.
func (m *tlsFiles) config() (*tls.Config, error) {
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
		klog.ErrorS(err, "Reloading the TLS files failed; serving with the previous ones", "service", m.what)
		return m.cfg, nil
	}
	m.stamp, m.cfg = stamp, cfg
	return cfg, nil
}

func (m *tlsFiles) fileStamp() (string, error) {
	var stamp string
	for _, f := range []string{m.certFile, m.keyFile, m.caFile} {
		fi, err := os.Stat(f)
		if err != nil {
			return "", fmt.Errorf("%s TLS: %w", m.what, err)
		}
		stamp += fmt.Sprintf("%s %d %d;", f, fi.Size(), fi.ModTime().UnixNano())
	}
	return stamp, nil
}

func (m *tlsFiles) load() (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(m.certFile, m.keyFile)
	if err != nil {
		return nil, fmt.Errorf("%s TLS certificate %s, key %s: %w", m.what, m.certFile, m.keyFile, err)
	}
	pem, err := os.ReadFile(m.caFile)
	if err != nil {
		return nil, fmt.Errorf("%s client CA: %w", m.what, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s client CA %s: no PEM certificate in it", m.what, m.caFile)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
		NextProtos:   m.protos,
	}, nil
}

// serverConfig is the config the listener starts with: each handshake
// takes the files' current one.
func (m *tlsFiles) serverConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return m.config()
		},
	}
}

// clientConfig is the config to dial a peer with: the same certificate,
// presented as a client, and the same CA bundle, which the peer's server
// certificate must chain to and name serverName in.
func (m *tlsFiles) clientConfig(serverName string) (*tls.Config, error) {
	cfg, err := m.config()
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		Certificates: cfg.Certificates,
		RootCAs:      cfg.ClientCAs,
		ServerName:   serverName,
		MinVersion:   tls.VersionTLS12,
		NextProtos:   m.protos,
	}, nil
}
