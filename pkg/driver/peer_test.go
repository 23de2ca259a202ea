package driver

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// issuePeer returns files of a certificate for both ends of the peer
// channel: server and client, named csi-qcow2-peer.
func (ca *testCA) issuePeer(t testing.TB, name string) (certPEM, keyPEM []byte) {
	t.Helper()
	key := mustKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:    []string{"csi-qcow2-peer"},
	}
	return ca.sign(t, tmpl, key)
}

// peerFiles writes a peer certificate of ca for name, and ca.
func peerFiles(t testing.TB, ca *testCA, name string) (cert, key, caFile string) {
	t.Helper()
	dir := t.TempDir()
	c, k := ca.issuePeer(t, name)
	for f, b := range map[string][]byte{"tls.crt": c, "tls.key": k, "ca.crt": ca.pem} {
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"), filepath.Join(dir, "ca.crt")
}

// newPeerEnv is a driver playing node name, its peer service on a
// loopback port, asking peers.
func newPeerEnv(t testing.TB, ca *testCA, name, peers string) *testEnv {
	t.Helper()
	cert, key, caFile := peerFiles(t, ca, name)
	e := newTestEnvWith(t, func(o *Options) {
		o.NodeID = name
		o.PeerAddress = "127.0.0.1:0"
		o.PeerTLSCert, o.PeerTLSKey, o.PeerCA = cert, key, caFile
		o.Peers = peers
	})
	for e.d.peerAddress() == nil {
		time.Sleep(time.Millisecond)
	}
	return e
}

// twoNodes: node a holds a volume with data and a snapshot of it; node b
// asks a.
type twoNodes struct {
	a, b      *testEnv
	ca        *testCA
	vol, snap string
	data      []byte // the snapshot's content
}

const peerVolSize = 32 << 20

func newTwoNodes(t *testing.T, size int64, write func(img *qcow2.Image)) *twoNodes {
	t.Helper()
	ca := newTestCA(t, "peer-ca")
	n := &twoNodes{ca: ca}
	n.a = newPeerEnv(t, ca, "node-a", "")
	n.b = newPeerEnv(t, ca, "node-b", n.a.d.peerAddress().String())
	n.vol = n.a.mustCreate(t, createReq("src", size, map[string]string{"clusterSize": "64K"})).GetVolumeId()
	img, err := qcow2.Open(n.a.d.store.imagePath(n.vol), qcow2.OpenOptions{Lock: true})
	if err != nil {
		t.Fatal(err)
	}
	write(img)
	n.data = make([]byte, size)
	if _, err := img.ReadAt(n.data, 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	n.snap = mustSnapshot(t, n.a, "snap", n.vol)
	return n
}

func writePattern(t *testing.T) func(img *qcow2.Image) {
	return func(img *qcow2.Image) {
		for _, off := range []int64{0, 1 << 20, 5<<20 + 4096, peerVolSize - 70000} {
			b := bytes.Repeat([]byte{byte(off>>12) | 1}, 70000)
			if _, err := img.WriteAt(b[:min(int64(len(b)), peerVolSize-off)], off); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func restoreReq(name, snap string, size int64) *csi.CreateVolumeRequest {
	r := createReq(name, size, map[string]string{"crossNodeRestore": "true"})
	r.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap}}}
	return r
}

func cloneReq(name, vol string, size int64) *csi.CreateVolumeRequest {
	r := createReq(name, size, map[string]string{"crossNodeRestore": "true"})
	r.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
		Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: vol}}}
	return r
}

// createUntilDone retries CreateVolume as the provisioner does while it
// answers Unavailable.
func createUntilDone(t *testing.T, e *testEnv, req *csi.CreateVolumeRequest) (*csi.Volume, error) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		resp, err := e.ctrl.CreateVolume(context.Background(), req)
		if status.Code(err) != codes.Unavailable || time.Now().After(deadline) {
			return resp.GetVolume(), err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestCrossNodeRestoreAndClone(t *testing.T) {
	n := newTwoNodes(t, peerVolSize, writePattern(t))
	req := restoreReq("restored", n.snap, peerVolSize)
	_, err := n.b.ctrl.CreateVolume(context.Background(), req)
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "in progress") {
		t.Fatalf("first CreateVolume = %v; want Unavailable, copy in progress", err)
	}
	v, err := createUntilDone(t, n.b, req)
	if err != nil {
		t.Fatal(err)
	}
	if got := v.GetAccessibleTopology()[0].GetSegments()[n.b.opts.TopologyKey]; got != "node-b" {
		t.Errorf("topology %q; want node-b", got)
	}
	if !bytes.Equal(readImage(t, n.b, v.GetVolumeId()), n.data) {
		t.Error("restored volume differs from the snapshot")
	}
	if again, err := n.b.ctrl.CreateVolume(context.Background(), req); err != nil || again.GetVolume().GetVolumeId() != v.GetVolumeId() {
		t.Errorf("CreateVolume again = %v; want the same volume", err)
	}
	bigger := restoreReq("restored", n.snap, 2*peerVolSize)
	bigger.CapacityRange.LimitBytes = 2 * peerVolSize
	if _, err := n.b.ctrl.CreateVolume(context.Background(), bigger); status.Code(err) != codes.AlreadyExists {
		t.Errorf("CreateVolume again with another size = %v; want AlreadyExists", err)
	}
	c, err := createUntilDone(t, n.b, cloneReq("cloned", n.vol, peerVolSize))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readImage(t, n.b, c.GetVolumeId()), n.data) {
		t.Error("cloned volume differs from the source")
	}
	img, err := qcow2.Open(n.a.d.store.imagePath(n.vol), qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if s := img.Snapshots(); len(s) != 1 {
		t.Errorf("source has %d snapshots after the clone; want the one CreateSnapshot took", len(s))
	}
	img.Close()
	p := n.a.d.peer
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.grants) != 1 {
		t.Errorf("node a gave %d live grants; want 1 (the restore's: retries joined its copy, the clone's ended with its read)", len(p.grants))
	}
}

// TestCrossNodeLeftoverTempSnapshot: a clone grant's snapshot that a
// killed driver left is dropped when the peer service starts.
func TestCrossNodeLeftoverTempSnapshot(t *testing.T) {
	n := newTwoNodes(t, peerVolSize, writePattern(t))
	name := tempSnapshotPrefix + "0123456789abcdef"
	if _, err := n.a.d.tempSnapshot(n.vol, name); err != nil {
		t.Fatal(err)
	}
	n.a.d.dropLeftoverTempSnapshots()
	img, err := qcow2.Open(n.a.d.store.imagePath(n.vol), qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	for _, s := range img.Snapshots() {
		if s.Name == name {
			t.Errorf("snapshot %s left", name)
		}
	}
}

func TestCrossNodeNeedsParameter(t *testing.T) {
	n := newTwoNodes(t, peerVolSize, writePattern(t))
	r := restoreReq("plain", n.snap, peerVolSize)
	delete(r.Parameters, "crossNodeRestore")
	_, err := n.b.ctrl.CreateVolume(context.Background(), r)
	if status.Code(err) != codes.NotFound {
		t.Errorf("restore of another node's snapshot without crossNodeRestore = %v; want NotFound", err)
	}
	// The message names the node and the parameter that would copy it.
	if msg := status.Convert(err).Message(); !strings.Contains(msg, "does not exist on node") || !strings.Contains(msg, `crossNodeRestore: "true"`) {
		t.Errorf("NotFound message %q names neither the node nor crossNodeRestore", msg)
	}
	r = restoreReq("nowhere", snapshotIDFor("nowhere"), peerVolSize)
	if _, err := n.b.ctrl.CreateVolume(context.Background(), r); status.Code(err) != codes.NotFound {
		t.Errorf("restore of a snapshot no node has = %v; want NotFound", err)
	}
}

// peerHTTP is a client of a's peer service with the given certificate.
func peerHTTP(t *testing.T, ca, issuer *testCA, name string) *http.Client {
	t.Helper()
	cert, key := issuer.issuePeer(t, name)
	pair, err := tls.X509KeyPair(cert, key)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca.pem)
	tr := &http.Transport{TLSClientConfig: &tls.Config{Certificates: []tls.Certificate{pair}, RootCAs: pool, ServerName: "csi-qcow2-peer", NextProtos: []string{"http/1.1"}},
		Protocols: peerProtocols()}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

func TestPeerRefuses(t *testing.T) {
	n := newTwoNodes(t, peerVolSize, writePattern(t))
	ctx := context.Background()
	addr := n.a.d.peerAddress().String()
	gr := grantRequest{SnapshotID: n.snap}

	// A certificate of another CA: the handshake fails, nothing is read.
	other := newTestCA(t, "other")
	bad := peerHTTP(t, n.ca, other, "intruder")
	// The handshake fails: no answer at all, not even a 403. (The client
	// sees the server's alert.)
	if _, err := askGrant(ctx, bad, addr, gr); !errors.Is(err, errUnavailable) {
		t.Errorf("grant to a certificate of another CA = %v; want no connection", err)
	}
	if resp, err := bad.Get("https://" + addr + peerReadPath + "?snapshot=" + n.snap); err == nil {
		resp.Body.Close()
		t.Error("read with a certificate of another CA succeeded")
	}

	good := peerHTTP(t, n.ca, n.ca, "node-c")
	g, err := askGrant(ctx, good, addr, gr)
	if err != nil {
		t.Fatal(err)
	}
	read := func(c *http.Client, query, token string) (int, string) {
		req, _ := http.NewRequest(http.MethodGet, "https://"+addr+peerReadPath+"?"+query, nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
		return resp.StatusCode, string(b)
	}
	snap2 := mustSnapshot(t, n.a, "snap2", n.vol)
	for _, tc := range []struct {
		name         string
		client       *http.Client
		query, token string
		code         int
		msg          string
	}{
		{"no token", good, "snapshot=" + n.snap, "", http.StatusForbidden, "no such grant"},
		{"other snapshot", good, "snapshot=" + snap2, g.Token, http.StatusForbidden, "another source"},
		{"clone of the volume", good, "volume=" + n.vol, g.Token, http.StatusForbidden, "another source"},
		{"other certificate", peerHTTP(t, n.ca, n.ca, "node-d"), "snapshot=" + n.snap, g.Token, http.StatusForbidden, "not this certificate's"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if code, msg := read(tc.client, tc.query, tc.token); code != tc.code || !strings.Contains(msg, tc.msg) {
				t.Errorf("read = %d %q; want %d %q", code, msg, tc.code, tc.msg)
			}
		})
	}
	if _, err := askGrant(ctx, good, addr, grantRequest{SnapshotID: snapshotIDFor("nope")}); !isKind(err, errNotFound) {
		t.Errorf("grant of a snapshot not there = %v; want not found", err)
	}
	if code, _ := read(good, "snapshot="+n.snap, g.Token); code != http.StatusOK {
		t.Errorf("read with the grant = %d; want 200", code)
	}
	// Expired: the clock moves past the grant.
	p := n.a.d.peer
	p.mu.Lock()
	p.now = func() time.Time { return time.Now().Add(time.Hour) }
	p.mu.Unlock()
	if code, msg := read(good, "snapshot="+n.snap, g.Token); code != http.StatusForbidden || !strings.Contains(msg, "no such grant") && !strings.Contains(msg, "expired") {
		t.Errorf("read with an expired grant = %d %q; want 403", code, msg)
	}
}

func isKind(err, kind error) bool { return errorsIs(err, kind) }

func errorsIs(err, kind error) bool { return errors.Is(err, kind) }

// TestCrossNodePeerKilled: the peer goes away mid-copy (a proxy in front
// of it is cut); the copy fails with its reason, leaves no image and no
// metadata, and the next CreateVolume starts over.
func TestCrossNodePeerKilled(t *testing.T) {
	const size = 256 << 20
	ca := newTestCA(t, "peer-ca")
	a := newPeerEnv(t, ca, "node-a", "")
	px := newCutProxy(t, a.d.peerAddress().String())
	b := newPeerEnv(t, ca, "node-b", px.addr())
	snap := bigSnapshot(t, a, size, 1<<20, 7)
	req := restoreReq("restored", snap, size)
	if _, err := b.ctrl.CreateVolume(context.Background(), req); status.Code(err) != codes.Unavailable {
		t.Fatalf("CreateVolume = %v; want Unavailable", err)
	}
	id := volumeIDFor("restored")
	cc := b.d.copies.get(id)
	for cc.copied.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	if got := testutil.CollectAndCount(&copyCollector{b.d.copies}, metricCopiedBytes); got != 1 {
		t.Errorf("%s has %d series during the copy; want 1", metricCopiedBytes, got)
	}
	px.cut()
	<-cc.done
	_, err := b.ctrl.CreateVolume(context.Background(), req)
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "failed") {
		t.Errorf("CreateVolume after the cut = %v; want Unavailable, copy failed", err)
	}
	left, _ := filepath.Glob(filepath.Join(b.d.store.dir("volumes"), "*"))
	if len(left) != 0 {
		t.Errorf("left in node b's data dir: %v", left)
	}
	if _, err := b.d.store.readVolume(id); !errorsIs(err, errNotFound) {
		t.Errorf("volume metadata after a failed copy: %v", err)
	}
}

// bigSnapshot makes a volume of size on e with 1 MiB of b every `every`
// bytes, and a snapshot of it.
func bigSnapshot(t *testing.T, e *testEnv, size, every int64, b byte) string {
	t.Helper()
	vol := e.mustCreate(t, createReq("src", size, nil)).GetVolumeId()
	img, err := qcow2.Open(e.d.store.imagePath(vol), qcow2.OpenOptions{Lock: true})
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte{b}, 1<<20)
	for off := int64(0); off < size; off += every {
		if _, err := img.WriteAt(chunk, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	return mustSnapshot(t, e, "snap", vol)
}

// cutProxy forwards TCP to a peer until cut.
type cutProxy struct {
	l     net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func newCutProxy(t *testing.T, to string) *cutProxy {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{l: l}
	t.Cleanup(p.cut)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", to)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			go io.Copy(u, c)
			go io.Copy(c, u)
		}
	}()
	return p
}

func (p *cutProxy) addr() string { return p.l.Addr().String() }

func (p *cutProxy) cut() {
	p.l.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
}

func TestCopyLeftoversRemovedAtStart(t *testing.T) {
	dir := t.TempDir()
	e := newTestEnvWith(t, func(o *Options) { o.DataDir = dir })
	_ = e
	tmp := filepath.Join(dir, "volumes", volumeIDFor("half")+imageExt+".tmp")
	if err := os.WriteFile(tmp, []byte("half a copy"), 0o600); err != nil {
		t.Fatal(err)
	}
	e.d.removeCopyLeftovers()
	if _, err := os.Stat(tmp); !os.IsNotExist(err) {
		t.Errorf("leftover .tmp image after start: %v", err)
	}
}

func TestOptionsValidatePeer(t *testing.T) {
	on := func(o *Options) {
		o.PeerAddress, o.PeerTLSCert, o.PeerTLSKey, o.PeerCA = ":7443", "c", "k", "ca"
	}
	runValidateCases(t, []validateCase{
		{"on", on, ""},
		{"with peers", func(o *Options) { on(o); o.Peers = "csi-qcow2-peers.ns.svc:7443, 10.0.0.2:7443" }, ""},
		{"peer without a port", func(o *Options) { on(o); o.Peers = "10.0.0.2" }, "--peers"},
		{"bad address", func(o *Options) { on(o); o.PeerAddress = "7443" }, "want HOST:PORT"},
		{"no CA", func(o *Options) { on(o); o.PeerCA = "" }, "mutual TLS; there is no plain TCP"},
		{"files without the address", func(o *Options) { o.PeerTLSCert = "c" }, "--peer-address is not"},
		{"peers without the address", func(o *Options) { o.Peers = "a:1" }, "--peer-address is not"},
		{"no grant ttl", func(o *Options) { on(o); o.PeerGrantTTL = 0 }, "--peer-grant-ttl"},
	})
}

// TestCrossNodeReceiverRestart: the receiving driver stops mid-copy; the
// copy stops with it and leaves nothing, and the driver started again on
// the same data dir copies the volume whole when CreateVolume is retried.
func TestCrossNodeReceiverRestart(t *testing.T) {
	const size = 256 << 20
	ca := newTestCA(t, "peer-ca")
	a := newPeerEnv(t, ca, "node-a", "")
	snap := bigSnapshot(t, a, size, 2<<20, 9)
	cert, key, caFile := peerFiles(t, ca, "node-b")
	dir := t.TempDir()
	opts := DefaultOptions()
	opts.Endpoint, opts.NodeID, opts.DataDir = "unix://"+dir+"/csi.sock", "node-b", dir+"/data"
	opts.PeerAddress, opts.PeerTLSCert, opts.PeerTLSKey, opts.PeerCA = "127.0.0.1:0", cert, key, caFile
	opts.Peers = a.d.peerAddress().String()
	start := func() (*Driver, func()) {
		d, l := newListeningDriver(t, opts)
		ctx, cancel := context.WithCancel(context.Background())
		served := make(chan error, 1)
		go func() { served <- d.ServeOn(ctx, l) }()
		for d.peerAddress() == nil {
			time.Sleep(time.Millisecond)
		}
		return d, func() {
			cancel()
			if err := <-served; err != nil {
				t.Errorf("ServeOn: %v", err)
			}
		}
	}
	req := restoreReq("restored", snap, size)
	id := volumeIDFor("restored")
	b, stop := start()
	if _, err := b.CreateVolume(context.Background(), req); codeOf(err) != codes.Unavailable {
		t.Fatalf("CreateVolume = %v; want Unavailable", err)
	}
	other := restoreReq("restored", snap, 2*size)
	if _, err := b.CreateVolume(context.Background(), other); codeOf(err) != codes.AlreadyExists {
		t.Errorf("CreateVolume of another size during the copy = %v; want AlreadyExists", err)
	}
	cc := b.copies.get(id)
	for cc.copied.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	stop()
	if left, _ := filepath.Glob(filepath.Join(opts.DataDir, "volumes", "*")); len(left) != 0 {
		t.Errorf("left in the data dir by a copy stopped mid-way: %v", left)
	}
	b, stop = start()
	defer stop()
	var err error
	deadline := time.Now().Add(time.Minute)
	for {
		_, err = b.CreateVolume(context.Background(), req)
		if codeOf(err) != codes.Unavailable || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("CreateVolume after the restart: %v", err)
	}
	got, err := qcow2.Open(b.store.imagePath(id), qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += 1 << 20 {
		got.ReadAt(buf, off)
		want := byte(0)
		if off%(2<<20) == 0 {
			want = 9
		}
		if buf[0] != want || buf[len(buf)-1] != want {
			t.Fatalf("restored volume at %d reads %d; want %d", off, buf[0], want)
		}
	}
}
