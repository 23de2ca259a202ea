package driver

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Cross-node restore and clone: a CreateVolume whose source is not on
// this node, with the StorageClass parameter crossNodeRestore=true, asks
// the peers (--peers) for a grant of it, then copies it in the background
// into <id>.qcow2.tmp from the peer that holds it (peer.go). CreateVolume
// answers Unavailable ("copy in progress, N of M bytes") until the copy is
// done, verified and renamed into place, so the provisioner retries; a
// retry joins the copy in flight instead of starting another. A failed
// copy is reported to the next call, which starts over. A copy is never
// resumed: a .tmp image left by a killed driver is removed at start
// (removeCopyLeftovers), never renamed.

// copyLogInterval is how often a copy in flight logs its progress.
const copyLogInterval = 5 * time.Second

// crossCopy is one copy in flight, keyed by the new volume's id.
type crossCopy struct {
	meta   volumeMeta
	peer   string
	total  int64
	copied atomic.Int64
	cancel context.CancelFunc
	done   chan struct{}
	err    error // set before done closes
}

// copies is the set of copies in flight.
type copies struct {
	mu  sync.Mutex // guards m and ctx; never held across I/O
	m   map[string]*crossCopy
	ctx context.Context // what copies run under: ServeOn's
	wg  sync.WaitGroup
}

func newCopies() *copies {
	return &copies{m: map[string]*crossCopy{}, ctx: context.Background()}
}

func (c *copies) get(id string) *crossCopy {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m[id]
}

func (c *copies) remove(id string, cc *crossCopy) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m[id] == cc {
		delete(c.m, id)
	}
}

func (c *copies) snapshot() []*crossCopy {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*crossCopy, 0, len(c.m))
	for _, cc := range c.m {
		out = append(out, cc)
	}
	return out
}

// crossNodeRestore reports whether the StorageClass opts in.
func crossNodeRestore(params map[string]string) bool {
	b, _ := strconv.ParseBool(params[paramCrossNodeRestore])
	return b
}

// createFromPeer is CreateVolume for a source another node holds.
func (d *Driver) createFromPeer(ctx context.Context, req *csi.CreateVolumeRequest, params createParams) (*csi.CreateVolumeResponse, error) {
	cs := req.GetVolumeContentSource()
	gr := grantRequest{SnapshotID: cs.GetSnapshot().GetSnapshotId(), VolumeID: cs.GetVolume().GetVolumeId()}
	id := volumeIDFor(req.GetName())
	unlock, err := d.lock(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	want := volumeMeta{ID: id, Name: req.GetName(), Params: params, SourceSnapshotID: gr.SnapshotID, SourceVolumeID: gr.VolumeID}
	if have, err := d.store.readVolume(id); err == nil {
		want.CapacityBytes = have.CapacityBytes
		if !sameVolume(have, &want, req.GetCapacityRange()) {
			return nil, newError(errAlreadyExists, "volume %q exists with a different size, parameters or source", req.GetName())
		}
		return &csi.CreateVolumeResponse{Volume: d.csiVolume(have)}, nil
	} else if !errors.Is(err, errNotFound) {
		return nil, err
	}
	if cc := d.copies.get(id); cc != nil {
		want.CapacityBytes = cc.meta.CapacityBytes
		if !sameVolume(&cc.meta, &want, req.GetCapacityRange()) {
			return nil, newError(errAlreadyExists, "volume %q is being copied with a different size, parameters or source", req.GetName())
		}
		select {
		case <-cc.done:
			d.copies.remove(id, cc)
			if cc.err != nil {
				return nil, newError(errUnavailable, "copy of volume %s from peer %s failed, the next call starts over: %v", id, cc.peer, cc.err)
			}
			return nil, newError(errUnavailable, "copy of volume %s from peer %s is done but not recorded", id, cc.peer)
		default:
			return nil, cc.inProgress(id)
		}
	}
	peer, g, err := d.findGrant(ctx, gr)
	if err != nil {
		return nil, err
	}
	if want.CapacityBytes, err = roundCapacity(req.GetCapacityRange(), g.SizeBytes); err != nil {
		return nil, err
	}
	want.CreatedAt = time.Now().UTC()
	cc := d.startCopy(want, gr, peer, g)
	return nil, cc.inProgress(id)
}

func (cc *crossCopy) inProgress(id string) error {
	return newError(errUnavailable, "copy of volume %s from peer %s in progress, %d of %d bytes", id, cc.peer, cc.copied.Load(), cc.total)
}

// startCopy runs the copy in the background under ServeOn's context.
func (d *Driver) startCopy(m volumeMeta, gr grantRequest, peer string, g *grantResponse) *crossCopy {
	c := d.copies
	c.mu.Lock()
	ctx, cancel := context.WithCancel(c.ctx)
	cc := &crossCopy{meta: m, peer: peer, total: g.SizeBytes, cancel: cancel, done: make(chan struct{})}
	c.m[m.ID] = cc
	c.wg.Add(1)
	c.mu.Unlock()
	klog.InfoS("Cross-node copy started", "volumeID", m.ID, "peer", peer, "sizeBytes", g.SizeBytes,
		"sourceSnapshotID", gr.SnapshotID, "sourceVolumeID", gr.VolumeID)
	go func() {
		defer c.wg.Done()
		defer cancel()
		start := time.Now()
		cc.err = d.runCopy(ctx, cc, gr, g)
		if cc.err != nil {
			klog.ErrorS(cc.err, "Cross-node copy failed", "volumeID", m.ID, "peer", peer, "copiedBytes", cc.copied.Load())
		} else {
			klog.InfoS("Cross-node copy done", "volumeID", m.ID, "peer", peer, "copiedBytes", cc.copied.Load(),
				"seconds", time.Since(start).Seconds())
			c.remove(m.ID, cc)
		}
		close(cc.done)
	}()
	return cc
}

// cancelCopy stops volume id's copy, if one runs, and waits for it.
func (d *Driver) cancelCopy(id string) {
	if cc := d.copies.get(id); cc != nil {
		cc.cancel()
		<-cc.done
		d.copies.remove(id, cc)
	}
}

// runCopy copies into the .tmp image, verifies it and renames it into
// place, then writes the metadata: the commit point, as in CreateVolume.
// Whatever fails, nothing is left.
func (d *Driver) runCopy(ctx context.Context, cc *crossCopy, gr grantRequest, g *grantResponse) error {
	final := d.store.imagePath(cc.meta.ID)
	tmp := final + ".tmp"
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	err := d.copyFromPeer(ctx, cc, gr, g, tmp)
	if err == nil {
		err = ctx.Err()
	}
	if err == nil {
		err = os.Rename(tmp, final)
	}
	if err == nil {
		err = syncDir(d.store.dir("volumes"))
	}
	if err == nil {
		if err = d.store.write("volumes", cc.meta.ID, &cc.meta); err != nil {
			_ = removeDurably(final)
		}
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// copyFromPeer reads the grant's frames into a new image at tmp.
func (d *Driver) copyFromPeer(ctx context.Context, cc *crossCopy, gr grantRequest, g *grantResponse, tmp string) error {
	f, direct, err := createDirectFile(tmp)
	if err != nil {
		return err
	}
	dst, err := qcow2.CreateFile(f, createOptions(&cc.meta))
	if err != nil {
		f.Close()
		return err
	}
	defer dst.Close()
	var w io.WriterAt = dst
	if !direct {
		wb, err := newWriteBehind(tmp, dst)
		if err != nil {
			return err
		}
		defer wb.Close()
		w = wb
	}
	body, err := d.peerRead(ctx, cc.peer, gr, g.Token)
	if err != nil {
		return err
	}
	defer body.Close()
	stop := make(chan struct{})
	defer close(stop)
	go cc.logProgress(stop)
	if err := readFrames(body, w, g.SizeBytes, &cc.copied); err != nil {
		return fmt.Errorf("copy from peer %s: %w", cc.peer, err)
	}
	if err := dst.Flush(); err != nil {
		return err
	}
	return dst.Close()
}

// writeBehind is the new image of a copy on a filesystem that refuses
// O_DIRECT (directio.go), with its data pushed out of the page cache as
// the copy goes: every writeBehindBytes it asks the kernel
// (POSIX_FADV_DONTNEED on a second descriptor of the file) to start
// writing the dirty pages back and to drop the ones already written. The
// copy of a large volume then neither evicts the node's other cached data
// nor leaves all its data for the fsync at the end to write, and it keeps
// reusing a few MiB of page cache instead of touching fresh memory. It is
// advice only: an error is ignored, and durability is the Flush (fsync)
// before the rename, as without it (runCopy).
type writeBehind struct {
	io.WriterAt
	f     *os.File
	since int64
}

const writeBehindBytes = 32 << 20

func newWriteBehind(path string, w io.WriterAt) (*writeBehind, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	return &writeBehind{WriterAt: w, f: f}, nil
}

func (w *writeBehind) WriteAt(p []byte, off int64) (int, error) {
	n, err := w.WriterAt.WriteAt(p, off)
	if w.since += int64(n); w.since >= writeBehindBytes {
		w.since = 0
		_ = unix.Fadvise(int(w.f.Fd()), 0, 0, unix.FADV_DONTNEED)
	}
	return n, err
}

func (w *writeBehind) Close() error { return w.f.Close() }

func (cc *crossCopy) logProgress(stop <-chan struct{}) {
	t := time.NewTicker(copyLogInterval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			klog.InfoS("Cross-node copy", "volumeID", cc.meta.ID, "peer", cc.peer, "copiedBytes", cc.copied.Load(), "sizeBytes", cc.total)
		}
	}
}

// errBadStream: what a peer sent does not parse or verify.
var errBadStream = errors.New("peer stream")

// readFrames writes writeFrames' data runs into dst and checks the end
// frame: the size granted and the CRC-32C of all the frames. copied counts
// the data bytes written. The network is read (and decrypted) here; the
// pipe's goroutine sums each frame, header and data, in stream order, and
// writes dst: the checksum is off the network's path, which is the
// receiver's busiest.
func readFrames(r io.Reader, dst io.WriterAt, size int64, copied *atomic.Int64) error {
	h := crc32.New(castagnoli)
	p := startPipe(peerMaxFrame, func(off int64, b []byte) error {
		writeFrameHeader(h, uint64(off), uint64(len(b)))
		h.Write(b)
		if _, err := dst.WriteAt(b, off); err != nil {
			return fmt.Errorf("write at %d: %w", off, err)
		}
		copied.Add(int64(len(b)))
		return nil
	})
	if err := p.finish(readDataFrames(r, p, size)); err != nil {
		return err
	}
	writeFrameHeader(h, uint64(size), peerFrameEnd)
	want := h.Sum(nil)
	var got [crc32.Size]byte
	if _, err := io.ReadFull(r, got[:]); err != nil {
		return fmt.Errorf("%w: checksum: %v", errBadStream, err)
	}
	if !bytes.Equal(got[:], want) {
		return fmt.Errorf("%w: CRC-32C mismatch: sent %x, received %x", errBadStream, got, want)
	}
	return nil
}

// readDataFrames sends the data frames up to the end frame into p.
func readDataFrames(r io.Reader, p *copyPipe, size int64) error {
	var hdr [16]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return fmt.Errorf("%w: frame header: %v", errBadStream, err)
		}
		off, n := binary.BigEndian.Uint64(hdr[:8]), binary.BigEndian.Uint64(hdr[8:])
		if n == peerFrameEnd {
			if off != uint64(size) {
				return fmt.Errorf("%w: size %d, granted %d", errBadStream, off, size)
			}
			return nil
		}
		if n == 0 || n > peerMaxFrame || off > uint64(size) || n > uint64(size)-off {
			return fmt.Errorf("%w: frame [%d, +%d) empty, over %d bytes or outside the %d granted", errBadStream, off, n, peerMaxFrame, size)
		}
		buf := p.buffer()
		if buf == nil {
			return errPipeStopped
		}
		if _, err := io.ReadFull(r, buf[:n]); err != nil {
			return fmt.Errorf("%w: data at %d: %v", errBadStream, off, err)
		}
		p.send(int64(off), buf[:n])
	}
}

// peerClient is an HTTP/1.1 client (peerProtocols) with the peer TLS files as they are now.
func (d *Driver) peerClient() (*http.Client, error) {
	if d.peer == nil {
		return nil, newError(errFailedPrecondition, "crossNodeRestore: the peer service is off on node %s (--peer-address)", d.opts.NodeID)
	}
	cfg, err := d.peer.tls.clientConfig(d.opts.PeerServerName)
	if err != nil {
		return nil, err
	}
	tr := &http.Transport{TLSClientConfig: cfg, TLSHandshakeTimeout: 10 * time.Second, Protocols: peerProtocols(),
		ReadBufferSize: 256 << 10}
	return &http.Client{Transport: tr}, nil
}

// peerAddrs resolves --peers: every address of each host.
func (d *Driver) peerAddrs(ctx context.Context) ([]string, error) {
	var out []string
	for _, p := range peerList(d.opts.Peers) {
		host, port, err := net.SplitHostPort(p)
		if err != nil {
			return nil, err
		}
		ips, err := net.DefaultResolver.LookupHost(ctx, host)
		if err != nil {
			return nil, newError(errUnavailable, "peers: %v", err)
		}
		for _, ip := range ips {
			out = append(out, net.JoinHostPort(ip, port))
		}
	}
	return out, nil
}

// findGrant asks each peer for a grant of the source; the first that has
// it wins. NotFound only if every peer answered that it has none.
func (d *Driver) findGrant(ctx context.Context, gr grantRequest) (string, *grantResponse, error) {
	client, err := d.peerClient()
	if err != nil {
		return "", nil, err
	}
	defer client.CloseIdleConnections()
	addrs, err := d.peerAddrs(ctx)
	if err != nil {
		return "", nil, err
	}
	self := d.peerAddress()
	var errs []error
	for _, a := range addrs {
		if self != nil && a == self.String() {
			continue
		}
		g, err := askGrant(ctx, client, a, gr)
		if err == nil {
			return a, g, nil
		}
		if !errors.Is(err, errNotFound) {
			errs = append(errs, fmt.Errorf("peer %s: %w", a, err))
		}
	}
	if len(errs) > 0 {
		return "", nil, errors.Join(errs...)
	}
	return "", nil, newError(errNotFound, "source %s%s is neither on node %s nor on any of %d peers", gr.SnapshotID, gr.VolumeID, d.opts.NodeID, len(addrs))
}

func askGrant(ctx context.Context, client *http.Client, addr string, gr grantRequest) (*grantResponse, error) {
	b, _ := json.Marshal(gr)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+addr+peerGrantPath, bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, newError(errUnavailable, "%v", err)
	}
	defer resp.Body.Close()
	if err := peerStatus(resp); err != nil {
		return nil, err
	}
	var g grantResponse
	if err := json.NewDecoder(io.LimitReader(resp.Body, 4096)).Decode(&g); err != nil {
		return nil, fmt.Errorf("%w: grant: %v", errBadStream, err)
	}
	if g.SizeBytes <= 0 || g.SizeBytes > maxCapacity {
		return nil, fmt.Errorf("%w: grant of %d bytes", errBadStream, g.SizeBytes)
	}
	return &g, nil
}

// peerRead opens the read stream of a grant.
func (d *Driver) peerRead(ctx context.Context, addr string, gr grantRequest, token string) (io.ReadCloser, error) {
	client, err := d.peerClient()
	if err != nil {
		return nil, err
	}
	q := url.Values{}
	if gr.SnapshotID != "" {
		q.Set("snapshot", gr.SnapshotID)
	} else {
		q.Set("volume", gr.VolumeID)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+addr+peerReadPath+"?"+q.Encode(), nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := client.Do(req)
	if err != nil {
		return nil, newError(errUnavailable, "%v", err)
	}
	if err := peerStatus(resp); err != nil {
		resp.Body.Close()
		return nil, err
	}
	return resp.Body, nil
}

// peerStatus turns a peer's error answer into an error of its kind.
func peerStatus(resp *http.Response) error {
	if resp.StatusCode == http.StatusOK {
		return nil
	}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	msg := strings.TrimSpace(string(b))
	kind := errUnavailable
	switch resp.StatusCode {
	case http.StatusNotFound:
		kind = errNotFound
	case http.StatusForbidden:
		kind = errPermission
	case http.StatusBadRequest:
		kind = errInvalid
	}
	return newError(kind, "peer: %s", msg)
}

// removeCopyLeftovers removes the .tmp images a killed driver left: at
// start no copy or CreateVolume runs, and a half copy is never resumed.
// Only a process with the controller service makes them; a node-only one
// leaves them alone (a controller sharing its data dir may be creating).
func (d *Driver) removeCopyLeftovers() {
	if !d.opts.Mode.controller() {
		return
	}
	tmps, _ := filepath.Glob(filepath.Join(d.store.dir("volumes"), "*.tmp"))
	for _, t := range tmps {
		if err := os.Remove(t); err == nil {
			klog.InfoS("Removed an image left half made", "path", t)
		}
	}
}

// start makes copies run under ctx (ServeOn's).
func (c *copies) start(ctx context.Context) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ctx = ctx
}

// wait waits for the copies, which stop with ServeOn's context.
func (c *copies) wait() { c.wg.Wait() }

// metricCopiedBytes is each copy in flight's progress.
const metricCopiedBytes = "csi_qcow2_cross_node_copied_bytes"

var copiedBytesDesc = prometheus.NewDesc(metricCopiedBytes,
	"Bytes of data a cross-node restore or clone in flight has copied, by new volume.", []string{"volume_id"}, nil)

// copyCollector reads the copies in flight at scrape time.
type copyCollector struct{ c *copies }

func (cc *copyCollector) Describe(ch chan<- *prometheus.Desc) { ch <- copiedBytesDesc }

func (cc *copyCollector) Collect(ch chan<- prometheus.Metric) {
	for _, c := range cc.c.snapshot() {
		ch <- prometheus.MustNewConstMetric(copiedBytesDesc, prometheus.GaugeValue, float64(c.copied.Load()), c.meta.ID)
	}
}
