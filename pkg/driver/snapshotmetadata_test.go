package driver

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// testCA is a certificate authority for tests.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t testing.TB, name string) *testCA {
	t.Helper()
	key := mustKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

func mustKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// issue returns a PEM certificate and key signed by the CA, for a server
// on 127.0.0.1 or for a client.
func (ca *testCA) issue(t *testing.T, name string, server bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key := mustKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	}
	return ca.sign(t, tmpl, key)
}

// sign returns tmpl signed by the CA and key, both PEM.
func (ca *testCA) sign(t testing.TB, tmpl *x509.Certificate, key *ecdsa.PrivateKey) (certPEM, keyPEM []byte) {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

// metadataEnv is a driver with the SnapshotMetadata service on, a volume
// of 4 KiB clusters and two snapshots of it.
type metadataEnv struct {
	*testEnv
	ca                   *testCA
	vol, base, target    string
	other                string // a snapshot of another volume
	wantDelta, wantAlloc []*csi.BlockMetadata
}

const metadataVolSize = 8 << 20

// metadataOptions turns the service on at a loopback port, with a server
// certificate of ca and ca as the client CA.
func metadataOptions(t *testing.T, ca *testCA) func(*Options) {
	t.Helper()
	dir := t.TempDir()
	cert, key := ca.issue(t, "csi-qcow2", true)
	files := map[string][]byte{"tls.crt": cert, "tls.key": key, "ca.crt": ca.pem}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return func(o *Options) {
		o.SnapshotMetadataAddress = "127.0.0.1:0"
		o.SnapshotMetadataTLSCert = filepath.Join(dir, "tls.crt")
		o.SnapshotMetadataTLSKey = filepath.Join(dir, "tls.key")
		o.SnapshotMetadataClientCA = filepath.Join(dir, "ca.crt")
	}
}

func newMetadataEnv(t *testing.T) *metadataEnv {
	t.Helper()
	ca := newTestCA(t, "test-ca")
	e := &metadataEnv{ca: ca}
	e.testEnv = newTestEnvWith(t, metadataOptions(t, ca))
	e.vol = e.mustCreate(t, createReq("v", metadataVolSize, map[string]string{"clusterSize": "4K"})).GetVolumeId()
	const cs = 4096
	e.write(t, 0, 10*cs)  // clusters 0-9
	e.write(t, 3<<20, cs) // one in the second L2 table
	e.base = e.snapshot(t, "base", e.vol)
	e.write(t, 2*cs+1, 1)      // cluster 2
	e.write(t, 5*cs, 3*cs)     // clusters 5-7
	e.write(t, 100*cs, 2*cs)   // clusters 100-101
	e.write(t, 7<<20+cs, 1000) // far away
	e.target = e.snapshot(t, "target", e.vol)
	e.write(t, 200*cs, cs) // after target: in no delta
	e.wantDelta = []*csi.BlockMetadata{{ByteOffset: 2 * cs, SizeBytes: cs}, {ByteOffset: 5 * cs, SizeBytes: 3 * cs},
		{ByteOffset: 100 * cs, SizeBytes: 2 * cs}, {ByteOffset: 7<<20 + cs, SizeBytes: cs}}
	e.wantAlloc = []*csi.BlockMetadata{{ByteOffset: 0, SizeBytes: 10 * cs}, {ByteOffset: 100 * cs, SizeBytes: 2 * cs},
		{ByteOffset: 3 << 20, SizeBytes: cs}, {ByteOffset: 7<<20 + cs, SizeBytes: cs}}
	other := e.mustCreate(t, createReq("w", metadataVolSize, nil)).GetVolumeId()
	e.other = e.snapshot(t, "other", other)
	return e
}

func (e *metadataEnv) write(t *testing.T, off, n int64) {
	t.Helper()
	img, err := qcow2.Open(e.d.store.imagePath(e.vol), qcow2.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt([]byte(strings.Repeat("x", int(n))), off); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
}

func (e *metadataEnv) snapshot(t *testing.T, name, vol string) string {
	t.Helper()
	return mustSnapshot(t, e.testEnv, name, vol)
}

func mustSnapshot(t testing.TB, e *testEnv, name, vol string) string {
	t.Helper()
	r, err := e.ctrl.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: vol})
	if err != nil {
		t.Fatal(err)
	}
	return r.GetSnapshot().GetSnapshotId()
}

// dial connects to the TLS listener with the given client certificate
// (none if cert is nil), trusting the test CA for the server.
func (e *metadataEnv) dial(t *testing.T, cert *tls.Certificate) csi.SnapshotMetadataClient {
	t.Helper()
	var addr net.Addr
	for deadline := time.Now().Add(10 * time.Second); addr == nil; time.Sleep(10 * time.Millisecond) {
		if addr = e.d.snapshotMetadataAddr(); addr == nil && time.Now().After(deadline) {
			t.Fatal("the snapshot metadata listener did not start")
		}
	}
	roots := x509.NewCertPool()
	roots.AddCert(e.ca.cert)
	cfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	conn, err := grpc.NewClient(addr.String(), grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return csi.NewSnapshotMetadataClient(conn)
}

func (e *metadataEnv) clientCert(t *testing.T, ca *testCA) *tls.Certificate {
	t.Helper()
	c, k := ca.issue(t, "backup-client", false)
	cert, err := tls.X509KeyPair(c, k)
	if err != nil {
		t.Fatal(err)
	}
	return &cert
}

// metadataMessage is what the tests check of a response message.
type metadataMessage interface {
	GetBlockMetadataType() csi.BlockMetadataType
	GetVolumeCapacityBytes() int64
	GetBlockMetadata() []*csi.BlockMetadata
}

// drain reads a stream to its end and checks every message against the
// spec: VARIABLE_LENGTH, the capacity, at most max tuples (if max > 0),
// ascending and apart, none ending at or before start.
func drain[M metadataMessage](t *testing.T, recv func() (M, error), start int64, max int32) ([]*csi.BlockMetadata, error) {
	t.Helper()
	var all []*csi.BlockMetadata
	for {
		m, err := recv()
		if errors.Is(err, io.EOF) {
			return all, nil
		}
		if err != nil {
			return all, err
		}
		if m.GetBlockMetadataType() != csi.BlockMetadataType_VARIABLE_LENGTH || m.GetVolumeCapacityBytes() != metadataVolSize {
			t.Errorf("message type %v capacity %d, want VARIABLE_LENGTH %d", m.GetBlockMetadataType(), m.GetVolumeCapacityBytes(), metadataVolSize)
		}
		if max > 0 && len(m.GetBlockMetadata()) > int(max) {
			t.Errorf("message of %d tuples, max_results %d", len(m.GetBlockMetadata()), max)
		}
		for _, b := range m.GetBlockMetadata() {
			if b.SizeBytes <= 0 || b.ByteOffset+b.SizeBytes <= start {
				t.Errorf("tuple %v: empty, or ends before starting_offset %d", b, start)
			}
			if k := len(all); k > 0 && all[k-1].ByteOffset+all[k-1].SizeBytes > b.ByteOffset {
				t.Errorf("tuple %v overlaps or precedes %v", b, all[k-1])
			}
			all = append(all, b)
		}
	}
}

func sameTuples(a, b []*csi.BlockMetadata) bool {
	return slices.EqualFunc(a, b, func(x, y *csi.BlockMetadata) bool {
		return x.ByteOffset == y.ByteOffset && x.SizeBytes == y.SizeBytes
	})
}

// from is the part of want at or after start, the first tuple cut there.
func from(want []*csi.BlockMetadata, start int64) []*csi.BlockMetadata {
	var out []*csi.BlockMetadata
	for _, b := range want {
		if end := b.ByteOffset + b.SizeBytes; end > start {
			off := max(b.ByteOffset, start)
			out = append(out, &csi.BlockMetadata{ByteOffset: off, SizeBytes: end - off})
		}
	}
	return out
}

func TestSnapshotMetadataOverTLS(t *testing.T) {
	e := newMetadataEnv(t)
	c := e.dial(t, e.clientCert(t, e.ca))
	ctx := context.Background()
	for _, tc := range []struct {
		start int64
		max   int32
	}{{0, 0}, {0, 1}, {0, 3}, {5*4096 + 100, 1}, {101 * 4096, 0}, {metadataVolSize, 0}} {
		delta, err := c.GetMetadataDelta(ctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: e.base, TargetSnapshotId: e.target,
			StartingOffset: tc.start, MaxResults: tc.max})
		if err != nil {
			t.Fatal(err)
		}
		got, err := drain(t, delta.Recv, tc.start, tc.max)
		if err != nil || !sameTuples(got, from(e.wantDelta, tc.start)) {
			t.Errorf("GetMetadataDelta(start %d, max %d) = %v, %v; want %v", tc.start, tc.max, got, err, from(e.wantDelta, tc.start))
		}
		alloc, err := c.GetMetadataAllocated(ctx, &csi.GetMetadataAllocatedRequest{SnapshotId: e.target,
			StartingOffset: tc.start, MaxResults: tc.max})
		if err != nil {
			t.Fatal(err)
		}
		got, err = drain(t, alloc.Recv, tc.start, tc.max)
		if err != nil || !sameTuples(got, from(e.wantAlloc, tc.start)) {
			t.Errorf("GetMetadataAllocated(start %d, max %d) = %v, %v; want %v", tc.start, tc.max, got, err, from(e.wantAlloc, tc.start))
		}
	}
}

func TestSnapshotMetadataErrors(t *testing.T) {
	e := newMetadataEnv(t)
	c := e.dial(t, e.clientCert(t, e.ca))
	ctx := context.Background()
	missing := snapshotIDFor("never made")
	for _, tc := range []struct {
		name         string
		base, target string
		start        int64
		max          int32
		code         codes.Code
	}{
		{"no base", "", e.target, 0, 0, codes.InvalidArgument},
		{"no target", e.base, "", 0, 0, codes.InvalidArgument},
		{"unknown base", missing, e.target, 0, 0, codes.NotFound},
		{"foreign target", e.base, "not-ours", 0, 0, codes.NotFound},
		{"different volumes", e.base, e.other, 0, 0, codes.InvalidArgument},
		{"negative offset", e.base, e.target, -1, 0, codes.OutOfRange},
		{"offset past the end", e.base, e.target, metadataVolSize + 1, 0, codes.OutOfRange},
		{"negative max", e.base, e.target, 0, -1, codes.InvalidArgument},
	} {
		t.Run("delta "+tc.name, func(t *testing.T) {
			s, err := c.GetMetadataDelta(ctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: tc.base, TargetSnapshotId: tc.target,
				StartingOffset: tc.start, MaxResults: tc.max})
			if err == nil {
				_, err = drain(t, s.Recv, 0, 0)
			}
			if status.Code(err) != tc.code {
				t.Errorf("code %v (%v), want %v", status.Code(err), err, tc.code)
			}
		})
		if tc.base != e.base {
			continue
		}
		t.Run("allocated "+tc.name, func(t *testing.T) {
			s, err := c.GetMetadataAllocated(ctx, &csi.GetMetadataAllocatedRequest{SnapshotId: tc.target,
				StartingOffset: tc.start, MaxResults: tc.max})
			if err == nil {
				_, err = drain(t, s.Recv, 0, 0)
			}
			want := tc.code
			if tc.name == "different volumes" {
				want = codes.OK // one snapshot: no pair to mismatch
			}
			if status.Code(err) != want {
				t.Errorf("code %v (%v), want %v", status.Code(err), err, want)
			}
		})
	}
}

// TestSnapshotMetadataRefusesClients: no certificate, or one from another
// CA, gets no answer; the service is on the CSI socket too, and
// advertised.
func TestSnapshotMetadataRefusesClients(t *testing.T) {
	e := newMetadataEnv(t)
	req := &csi.GetMetadataAllocatedRequest{SnapshotId: e.base}
	for name, cert := range map[string]*tls.Certificate{"no certificate": nil, "another CA": e.clientCert(t, newTestCA(t, "rogue"))} {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			s, err := e.dial(t, cert).GetMetadataAllocated(ctx, req)
			if err == nil {
				_, err = s.Recv()
			}
			if err == nil || status.Code(err) != codes.Unavailable {
				t.Errorf("got %v, want the connection refused (Unavailable)", err)
			}
		})
	}
	s, err := csi.NewSnapshotMetadataClient(e.conn).GetMetadataAllocated(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	want := []*csi.BlockMetadata{{ByteOffset: 0, SizeBytes: 10 * 4096}, {ByteOffset: 3 << 20, SizeBytes: 4096}}
	if got, err := drain(t, s.Recv, 0, 0); err != nil || !sameTuples(got, want) {
		t.Errorf("GetMetadataAllocated(base) on the CSI socket = %v, %v; want %v", got, err, want)
	}
	if !hasPluginService(t, e.testEnv, csi.PluginCapability_Service_SNAPSHOT_METADATA_SERVICE) {
		t.Error("SNAPSHOT_METADATA_SERVICE not advertised with --snapshot-metadata-address")
	}
	if hasPluginService(t, newTestEnv(t), csi.PluginCapability_Service_SNAPSHOT_METADATA_SERVICE) {
		t.Error("SNAPSHOT_METADATA_SERVICE advertised without --snapshot-metadata-address")
	}
}

func hasPluginService(t *testing.T, e *testEnv, want csi.PluginCapability_Service_Type) bool {
	t.Helper()
	r, err := e.id.GetPluginCapabilities(context.Background(), &csi.GetPluginCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range r.GetCapabilities() {
		if c.GetService().GetType() == want {
			return true
		}
	}
	return false
}

func TestSnapshotMetadataOptions(t *testing.T) {
	dir := t.TempDir()
	base := func(set func(*Options)) Options {
		o := DefaultOptions()
		o.NodeID, o.DataDir = "n", dir
		o.SnapshotMetadataAddress = ":50051"
		o.SnapshotMetadataTLSCert, o.SnapshotMetadataTLSKey, o.SnapshotMetadataClientCA = dir+"/c", dir+"/k", dir+"/ca"
		set(&o)
		return o
	}
	for _, tc := range []struct {
		name string
		set  func(*Options)
		err  string
	}{
		{"files but no address", func(o *Options) { o.SnapshotMetadataAddress = "" }, "--snapshot-metadata-address is not"},
		{"optional but no address", func(o *Options) {
			*o = base(func(*Options) {})
			o.SnapshotMetadataAddress, o.SnapshotMetadataTLSCert, o.SnapshotMetadataTLSKey, o.SnapshotMetadataClientCA = "", "", "", ""
			o.SnapshotMetadataOptional = true
		}, "--snapshot-metadata-address is not"},
		{"no key", func(o *Options) { o.SnapshotMetadataTLSKey = "" }, "no plain TCP"},
		{"bad address", func(o *Options) { o.SnapshotMetadataAddress = "50051" }, "HOST:PORT"},
		{"missing files", func(*Options) {}, "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(base(tc.set), newFakeMounter(), newFakeAttacher())
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("New: %v, want %q", err, tc.err)
			}
		})
	}
	d, err := New(base(func(o *Options) { o.SnapshotMetadataOptional = true }), newFakeMounter(), newFakeAttacher())
	if err != nil || d.metadataTLS != nil {
		t.Errorf("--snapshot-metadata-optional with missing files: %v, service on %t; want it off", err, d != nil && d.metadataTLS != nil)
	}
}

// TestMetadataTLSReload: changed files are reread at the next handshake;
// a set that does not load keeps the previous config.
func TestMetadataTLSReload(t *testing.T) {
	dir := t.TempDir()
	put := func(name string, b []byte) {
		t.Helper()
		// Kubelet swaps a Secret's files at once; a new mtime stands for it.
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, time.Now(), time.Now().Add(time.Duration(len(b))*time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	ca := newTestCA(t, "one")
	cert, key := ca.issue(t, "server", true)
	put("tls.crt", cert)
	put("tls.key", key)
	put("ca.crt", ca.pem)
	opts := Options{SnapshotMetadataTLSCert: filepath.Join(dir, "tls.crt"), SnapshotMetadataTLSKey: filepath.Join(dir, "tls.key"),
		SnapshotMetadataClientCA: filepath.Join(dir, "ca.crt")}
	m, err := newMetadataTLS(opts)
	if err != nil {
		t.Fatal(err)
	}
	first, _ := m.config()
	if again, _ := m.config(); again != first {
		t.Error("config made anew though no file changed")
	}
	two := newTestCA(t, "two")
	put("ca.crt", append(bytes.Clone(ca.pem), two.pem...))
	second, err := m.config()
	if err != nil || second == first {
		t.Fatalf("config after the client CA changed: %v, same %t", err, second == first)
	}
	if _, err := two.cert.Verify(x509.VerifyOptions{Roots: second.ClientCAs}); err != nil {
		t.Errorf("the new client CA is not trusted: %v", err)
	}
	put("tls.key", []byte("not a key"))
	if kept, err := m.config(); err != nil || kept != second {
		t.Errorf("config with a broken key: %v, kept the previous %t", err, kept == second)
	}
}

// TestSnapshotMetadataStagedVolume: with the volume staged, the delta is
// read through the image the driver serves, between writes to its device.
func TestSnapshotMetadataStagedVolume(t *testing.T) {
	e := newTestEnvWith(t, metadataOptions(t, newTestCA(t, "ca")))
	vol := e.mustCreate(t, createReq("v", metadataVolSize, map[string]string{"clusterSize": "4K"})).GetVolumeId()
	e.stage(t, vol, rwo)
	e.attacher.mu.Lock()
	dev := e.attacher.attached[0].backend
	e.attacher.mu.Unlock()
	if _, err := dev.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	base := mustSnapshot(t, e, "base", vol)
	if _, err := dev.WriteAt([]byte("changed"), 1<<20+10); err != nil {
		t.Fatal(err)
	}
	if err := dev.WriteZeroes(0, 4096, true); err != nil {
		t.Fatal(err)
	}
	target := mustSnapshot(t, e, "target", vol)
	s, err := csi.NewSnapshotMetadataClient(e.conn).GetMetadataDelta(context.Background(),
		&csi.GetMetadataDeltaRequest{BaseSnapshotId: base, TargetSnapshotId: target})
	if err != nil {
		t.Fatal(err)
	}
	want := []*csi.BlockMetadata{{ByteOffset: 0, SizeBytes: 4096}, {ByteOffset: 1 << 20, SizeBytes: 4096}}
	if got, err := drain(t, s.Recv, 0, 0); err != nil || !sameTuples(got, want) {
		t.Errorf("GetMetadataDelta of a staged volume = %v, %v; want %v", got, err, want)
	}
	e.unstage(t, vol)
}
