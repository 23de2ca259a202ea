package driver

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"math"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// The peer service: how a driver on another node restores or clones this
// node's snapshots and volumes (crossnode.go is the other side). It is
// HTTP/1.1 over mutual TLS on --peer-address, with no plain-TCP form: the
// server presents --peer-tls-cert and refuses any client whose
// certificate does not chain to --peer-ca; clients present the same files.
//
//	POST /v1/grant {"snapshotID": ID} or {"volumeID": ID}
//	    -> {"token", "sizeBytes", "expires"}: a grant to read that one
//	       snapshot (for a volume, a temporary snapshot taken for it),
//	       bound to the client certificate's identity, for --peer-grant-ttl.
//	GET /v1/read?snapshot=ID or ?volume=ID, Authorization: Bearer TOKEN
//	    -> the snapshot's data runs (writeFrames), then a CRC-32C of them.
//
// A request with another identity's token, or for another source than the
// token grants, or with an expired token gets 403 and nothing else. The
// source is read only: it is opened read-only, under its volume's lock.

const (
	peerGrantPath = "/v1/grant"
	peerReadPath  = "/v1/read"
	// peerFrameEnd in a frame's length field marks the last frame: its
	// offset is the virtual size and the stream's CRC-32C follows.
	peerFrameEnd = math.MaxUint64
	// peerMaxFrame bounds a frame's data: what writeFrames reads at a time.
	peerMaxFrame = 4 << 20
	// peerBlock is the granularity at which runs of zeros are left out.
	peerBlock = 64 << 10
	// tempSnapshotPrefix names the snapshots a clone grant takes.
	tempSnapshotPrefix = "xnode-"
)

// castagnoli is the CRC-32C table.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// grantRequest asks for one source: a snapshot, or a volume to clone.
type grantRequest struct {
	SnapshotID string `json:"snapshotID,omitempty"`
	VolumeID   string `json:"volumeID,omitempty"`
}

type grantResponse struct {
	Token     string    `json:"token"`
	SizeBytes int64     `json:"sizeBytes"`
	Expires   time.Time `json:"expires"`
}

// peerGrant is what a token lets its holder read.
type peerGrant struct {
	identity string // the client certificate's subject it was given to
	req      grantRequest
	volumeID string // the volume whose image holds snapshot
	snapshot string // the internal snapshot read
	temp     bool   // snapshot was taken for this grant and goes with it
	size     int64
	expires  time.Time
}

// peerService is the server side; one per Driver when --peer-address is set.
type peerService struct {
	d   *Driver
	tls *tlsFiles
	now func() time.Time

	mu     sync.Mutex // guards grants; never held across I/O
	grants map[string]*peerGrant
}

// setupPeer decides at New whether the peer service is on.
func setupPeer(d *Driver) (*peerService, error) {
	o := d.opts
	if o.PeerAddress == "" {
		return nil, nil
	}
	t, err := newTLSFiles("peer", o.PeerTLSCert, o.PeerTLSKey, o.PeerCA, "http/1.1")
	if errors.Is(err, fs.ErrNotExist) && o.PeerOptional {
		klog.InfoS("Peer service off: a TLS file does not exist (--peer-optional)", "err", err.Error())
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &peerService{d: d, tls: t, now: time.Now, grants: map[string]*peerGrant{}}, nil
}

// startPeer listens on --peer-address and serves the peer service until
// ctx is done; the channel closes once it has stopped.
func (d *Driver) startPeer(ctx context.Context) (<-chan struct{}, error) {
	done := make(chan struct{})
	p := d.peer
	if p == nil {
		close(done)
		return done, nil
	}
	d.dropLeftoverTempSnapshots()
	l, err := net.Listen("tcp", d.opts.PeerAddress)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	d.peerAddr = l.Addr()
	d.mu.Unlock()
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+peerGrantPath, p.handleGrant)
	mux.HandleFunc("GET "+peerReadPath, p.handleRead)
	srv := &http.Server{Handler: mux, TLSConfig: p.tls.serverConfig(), ReadHeaderTimeout: 10 * time.Second,
		Protocols: peerProtocols()}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if srv.Shutdown(sctx) != nil {
			srv.Close()
		}
	}()
	go func() {
		defer close(done)
		defer p.dropAll()
		klog.InfoS("Serving the peer service over mutual TLS", "address", l.Addr().String())
		if err := srv.ServeTLS(l, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			klog.ErrorS(err, "Peer server stopped")
		}
	}()
	return done, nil
}

// peerProtocols is HTTP/1.1 alone, for the server and the client. A copy
// is one long stream on a connection of its own, and Go's HTTP/2 moved
// it at half the speed of HTTP/1.1 over the same TLS (530 against 1,150-
// 1,340 MB/s on loopback, 2 cores, 2026-12-03): its frames go through
// the connection's single writer goroutine and flow-control windows.
func peerProtocols() *http.Protocols {
	var p http.Protocols
	p.SetHTTP1(true)
	return &p
}

// peerAddress is where the peer listener is bound (nil before).
func (d *Driver) peerAddress() net.Addr {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.peerAddr
}

// identity is who the verified client certificate names.
func identity(r *http.Request) string {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 {
		return ""
	}
	return r.TLS.VerifiedChains[0][0].Subject.String()
}

func peerError(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	switch {
	case errors.Is(err, errNotFound), errors.Is(err, qcow2.ErrSnapshotNotFound):
		code = http.StatusNotFound
	case errors.Is(err, errPermission):
		code = http.StatusForbidden
	case errors.Is(err, errInvalid):
		code = http.StatusBadRequest
	case errors.Is(err, errBusy):
		code = http.StatusConflict
	}
	http.Error(w, err.Error(), code)
}

func (p *peerService) handleGrant(w http.ResponseWriter, r *http.Request) {
	who := identity(r)
	var req grantRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 4096)).Decode(&req); err != nil {
		peerError(w, newError(errInvalid, "grant request: %v", err))
		return
	}
	g, err := p.grant(who, req)
	if err != nil {
		klog.V(2).InfoS("Peer grant refused", "peer", who, "snapshotID", req.SnapshotID, "volumeID", req.VolumeID, "err", err.Error())
		peerError(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(g)
}

// grant checks the source exists here and records a grant for it; a
// volume gets a temporary snapshot, taken as CreateSnapshot takes one.
func (p *peerService) grant(who string, req grantRequest) (*grantResponse, error) {
	p.expire()
	g := &peerGrant{identity: who, req: req}
	switch {
	case who == "":
		return nil, newError(errPermission, "no verified client certificate")
	case (req.SnapshotID == "") == (req.VolumeID == ""):
		return nil, newError(errInvalid, "grant request: want one of snapshotID and volumeID")
	case req.SnapshotID != "":
		if !validSnapshotID(req.SnapshotID) {
			return nil, newError(errNotFound, "snapshot %q is not on node %s", truncate(req.SnapshotID), p.d.opts.NodeID)
		}
		s, err := p.d.store.readSnapshot(req.SnapshotID)
		if err != nil {
			return nil, err
		}
		g.volumeID, g.snapshot, g.size = s.SourceVolumeID, s.ID, s.SizeBytes
	default:
		if !validVolumeID(req.VolumeID) {
			return nil, newError(errNotFound, "volume %q is not on node %s", truncate(req.VolumeID), p.d.opts.NodeID)
		}
		if _, err := p.d.store.readVolume(req.VolumeID); err != nil {
			return nil, err
		}
		g.volumeID, g.temp = req.VolumeID, true
	}
	token := newToken()
	if g.temp {
		g.snapshot = tempSnapshotPrefix + token[:16]
		size, err := p.d.tempSnapshot(g.volumeID, g.snapshot)
		if err != nil {
			return nil, err
		}
		g.size = size
	}
	g.expires = p.now().Add(p.d.opts.PeerGrantTTL)
	p.mu.Lock()
	p.grants[token] = g
	p.mu.Unlock()
	klog.InfoS("Peer grant", "peer", who, "volumeID", g.volumeID, "snapshot", g.snapshot, "expires", g.expires)
	return &grantResponse{Token: token, SizeBytes: g.size, Expires: g.expires}, nil
}

func newToken() string {
	b := make([]byte, 32)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// tempSnapshot takes snapshot name of volume id for a clone grant.
func (d *Driver) tempSnapshot(id, name string) (int64, error) {
	unlock, err := d.lock(context.Background(), id)
	if err != nil {
		return 0, err
	}
	defer unlock()
	var size int64
	err = d.withImage(id, false, func(img *qcow2.Image, sv *stagedVolume) error {
		info, err := d.takeSnapshot(img, sv, name)
		size = info.VirtualSize
		return err
	})
	return size, err
}

// dropTempSnapshot deletes a clone grant's snapshot. Busy, it is left for
// the next expiry sweep.
func (d *Driver) dropTempSnapshot(id, name string) bool {
	unlock, err := d.lock(context.Background(), id)
	if err != nil {
		return false
	}
	defer unlock()
	err = d.withImage(id, false, func(img *qcow2.Image, _ *stagedVolume) error {
		if err := img.DeleteSnapshot(name); err != nil && !errors.Is(err, qcow2.ErrSnapshotNotFound) {
			return err
		}
		return img.Flush()
	})
	if err != nil && !errors.Is(err, errNotFound) {
		klog.ErrorS(err, "Dropping a clone grant's snapshot failed", "volumeID", id, "snapshot", name)
		return false
	}
	return true
}

// dropLeftoverTempSnapshots deletes the clone grants' snapshots a killed
// driver left in its volumes: at start no grant is live.
func (d *Driver) dropLeftoverTempSnapshots() {
	ids, err := d.store.list("volumes")
	if err != nil {
		klog.ErrorS(err, "Listing volumes for leftover clone grant snapshots failed")
		return
	}
	for _, id := range ids {
		var names []string
		_ = d.withImage(id, true, func(img *qcow2.Image, _ *stagedVolume) error {
			for _, s := range img.Snapshots() {
				if strings.HasPrefix(s.Name, tempSnapshotPrefix) {
					names = append(names, s.Name)
				}
			}
			return nil
		})
		for _, n := range names {
			if d.dropTempSnapshot(id, n) {
				klog.InfoS("Dropped a clone grant's snapshot left by a previous run", "volumeID", id, "snapshot", n)
			}
		}
	}
}

// expire forgets expired grants and drops their temporary snapshots.
func (p *peerService) expire() {
	now := p.now()
	p.mu.Lock()
	var gone []*peerGrant
	for t, g := range p.grants {
		if now.After(g.expires) {
			gone = append(gone, g)
			delete(p.grants, t)
		}
	}
	p.mu.Unlock()
	for _, g := range gone {
		if g.temp && !p.d.dropTempSnapshot(g.volumeID, g.snapshot) {
			p.mu.Lock()
			p.grants["expired-"+g.snapshot] = g // retried at the next sweep
			p.mu.Unlock()
		}
	}
}

// done ends a clone grant once its snapshot has been read whole: the
// temporary snapshot need not wait for the expiry.
func (p *peerService) done(g *peerGrant) {
	if !g.temp {
		return
	}
	p.mu.Lock()
	g.expires = time.Time{}
	p.mu.Unlock()
	p.expire()
}

// dropAll forgets every grant when the service stops.
func (p *peerService) dropAll() {
	p.mu.Lock()
	for _, g := range p.grants {
		g.expires = time.Time{}
	}
	p.mu.Unlock()
	p.expire()
}

// authorize returns the grant r's token holds for the source r names.
func (p *peerService) authorize(r *http.Request) (*peerGrant, error) {
	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	p.mu.Lock()
	g := p.grants[token]
	p.mu.Unlock()
	want := grantRequest{SnapshotID: r.URL.Query().Get("snapshot"), VolumeID: r.URL.Query().Get("volume")}
	switch {
	case !ok || g == nil:
		return nil, newError(errPermission, "no such grant")
	case g.identity != identity(r):
		return nil, newError(errPermission, "the grant is not this certificate's")
	case g.req != want:
		return nil, newError(errPermission, "the grant is for another source")
	case p.now().After(g.expires):
		return nil, newError(errPermission, "the grant expired at %s", g.expires.Format(time.RFC3339))
	}
	return g, nil
}

func (p *peerService) handleRead(w http.ResponseWriter, r *http.Request) {
	g, err := p.authorize(r)
	if err != nil {
		klog.V(2).InfoS("Peer read refused", "peer", identity(r), "err", err.Error())
		peerError(w, err)
		return
	}
	release, err := p.d.lock(r.Context(), g.volumeID)
	if err != nil {
		peerError(w, err)
		return
	}
	unlock := sync.OnceFunc(release)
	defer unlock()
	started := false
	err = p.d.withImage(g.volumeID, true, func(img *qcow2.Image, _ *stagedVolume) error {
		v, err := img.OpenSnapshot(g.snapshot)
		if err != nil {
			return err
		}
		defer v.Close()
		src := newSnapshotReader(v, p.d.store.imagePath(g.volumeID))
		defer src.Close()
		w.Header().Set("Content-Type", "application/octet-stream")
		started = true
		return writeFrames(r.Context(), w, src, v.Size())
	})
	if err == nil {
		unlock()
		p.done(g)
		return
	}
	if !started {
		peerError(w, err)
		return
	}
	// The status is sent: drop the connection without the chunked body's
	// end, so the reader sees an error (unexpected EOF) and not a short
	// copy; the missing end frame and checksum would tell it too.
	klog.ErrorS(err, "Peer read failed", "peer", g.identity, "snapshot", g.snapshot)
	panic(http.ErrAbortHandler)
}

// writeFrames sends the runs of src that do not read as zeros, as frames
// of a 16-byte header (big-endian offset and length) and the data, and
// ends with a frame of length peerFrameEnd, whose offset is size, and the
// CRC-32C (Castagnoli) of all that came before it: TLS authenticates every
// byte on the wire, so the checksum is there for what TLS cannot see (a
// framing or offset bug on either side), and CRC-32C is computed by the
// CPU at many GB/s where SHA-256 would halve the copy's speed
// (docs/driver.md). Runs the allocation map shows as
// zeros are not read; 64 KiB blocks of zeros are not sent.
func writeFrames(ctx context.Context, w io.Writer, src *snapshotReader, size int64) error {
	h := crc32.New(castagnoli)
	// No buffer of our own: a frame's data goes from the pipe's buffer to
	// w (the HTTP response, which buffers small writes such as headers)
	// without another copy.
	fw := io.MultiWriter(w, h)
	// The image is read here, framed and written by the pipe's goroutine.
	p := startPipe(peerMaxFrame, func(off int64, b []byte) error { return writeDataRuns(fw, b, off) })
	if err := p.finish(readExtents(ctx, src, size, p)); err != nil {
		return err
	}
	if err := writeFrameHeader(fw, uint64(size), peerFrameEnd); err != nil {
		return err
	}
	_, err := w.Write(h.Sum(nil))
	return err
}

// readExtents sends what src's allocation map does not show as zeros
// into p, a buffer at a time.
func readExtents(ctx context.Context, src *snapshotReader, size int64, p *copyPipe) error {
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return err
		}
		// The map a window at a time: one call for the whole disk would
		// hold every extent of it at once.
		ext, err := src.view.Extents(off, min(size-off, extentWindow))
		if err != nil {
			return err
		}
		if len(ext) == 0 {
			return fmt.Errorf("no extent at %d", off)
		}
		for _, e := range ext {
			if err := sendExtent(src, e, p); err != nil {
				return err
			}
			off = e.Start + e.Length
		}
	}
	return nil
}

// extentWindow is how much of the allocation map readExtents asks for at
// a time.
const extentWindow = 1 << 30

// sendExtent reads the data of one extent into p's buffers.
func sendExtent(src *snapshotReader, e qcow2.Extent, p *copyPipe) error {
	if e.Zero {
		return nil
	}
	for off, end := e.Start, e.Start+e.Length; off < end; {
		buf := p.buffer()
		if buf == nil {
			return errPipeStopped
		}
		n := min(end-off, int64(len(buf)))
		if err := src.readExtent(buf[:n], e, off); err != nil {
			return fmt.Errorf("read at %d: %w", off, err)
		}
		p.send(off, buf[:n])
		off += n
	}
	return nil
}

// writeDataRuns frames the runs of p's 64 KiB blocks that are not zeros.
func writeDataRuns(w io.Writer, p []byte, off int64) error {
	start := -1
	flush := func(end int) error {
		if start < 0 {
			return nil
		}
		defer func() { start = -1 }()
		if err := writeFrameHeader(w, uint64(off)+uint64(start), uint64(end-start)); err != nil {
			return err
		}
		_, err := w.Write(p[start:end])
		return err
	}
	for i := 0; i < len(p); i += peerBlock {
		end := min(i+peerBlock, len(p))
		if allZero(p[i:end]) {
			if err := flush(i); err != nil {
				return err
			}
		} else if start < 0 {
			start = i
		}
	}
	return flush(len(p))
}

func allZero(p []byte) bool {
	for len(p) >= 8 {
		if binary.LittleEndian.Uint64(p) != 0 {
			return false
		}
		p = p[8:]
	}
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

func writeFrameHeader(w io.Writer, off, n uint64) error {
	var hdr [16]byte
	binary.BigEndian.PutUint64(hdr[:8], off)
	binary.BigEndian.PutUint64(hdr[8:], n)
	_, err := w.Write(hdr[:])
	return err
}
