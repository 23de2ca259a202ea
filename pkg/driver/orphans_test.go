package driver

import (
	"context"
	"errors"
	"io"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// fakeCluster is ClusterObjects with the handles a test says exist.
type fakeCluster struct {
	mu                  sync.Mutex
	volumes, snaps      map[string]struct{}
	volErr, snapErr     error
	volCalls, snapCalls int
}

var _ ClusterObjects = (*fakeCluster)(nil)

func newFakeCluster(handles ...string) *fakeCluster {
	f := &fakeCluster{volumes: map[string]struct{}{}, snaps: map[string]struct{}{}}
	for _, h := range handles {
		f.add(h)
	}
	return f
}

func (f *fakeCluster) add(h string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if validSnapshotID(h) {
		f.snaps[h] = struct{}{}
	} else {
		f.volumes[h] = struct{}{}
	}
}

func (f *fakeCluster) remove(h string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.volumes, h)
	delete(f.snaps, h)
}

func (f *fakeCluster) VolumeHandles(context.Context) (map[string]struct{}, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.volCalls++
	return copySet(f.volumes), f.volErr
}

func (f *fakeCluster) SnapshotHandles(context.Context) (map[string]struct{}, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.snapCalls++
	return copySet(f.snaps), f.snapErr
}

func copySet(s map[string]struct{}) map[string]struct{} {
	out := map[string]struct{}{}
	for k := range s {
		out[k] = struct{}{}
	}
	return out
}

// orphanEnv is a served driver with a checker over a fake cluster and a
// clock the test moves.
type orphanEnv struct {
	*testEnv
	cluster *fakeCluster
	o       *orphanChecker
	clock   time.Time
}

func newOrphanEnv(t *testing.T, grace, deleteAfter time.Duration) *orphanEnv {
	e := &orphanEnv{testEnv: newTestEnv(t), cluster: newFakeCluster(), clock: time.Now()}
	e.d.opts.OrphanGrace, e.d.opts.DeleteOrphansAfter = grace, deleteAfter
	e.o = newOrphanChecker(e.d, e.cluster)
	e.o.now = func() time.Time { return e.clock }
	return e
}

// checkAt runs one check at clock+offset from the start.
func (e *orphanEnv) checkAfter(d time.Duration) {
	e.clock = e.clock.Add(d)
	e.o.check(context.Background())
}

// gauge is csi_qcow2_orphans{kind}; -1 if the series is absent.
func (e *orphanEnv) gauge(t *testing.T, kind string) float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(e.o.orphans)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "kind" && l.GetValue() == kind {
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	return -1
}

func (e *orphanEnv) wantGauges(t *testing.T, volumes, snapshots float64) {
	t.Helper()
	if v, s := e.gauge(t, kindVolume), e.gauge(t, kindSnapshot); v != volumes || s != snapshots {
		t.Errorf("%s volume=%v snapshot=%v, want %v and %v (-1: absent)", metricOrphans, v, s, volumes, snapshots)
	}
}

func (e *orphanEnv) volumeExists(t *testing.T, id string) bool {
	t.Helper()
	return e.exists(t, "volumes", id)
}

func (e *orphanEnv) snapshotExists(t *testing.T, id string) bool {
	t.Helper()
	return e.exists(t, "snapshots", id)
}

// exists: the data dir has metadata for id.
func (e *orphanEnv) exists(t *testing.T, kind, id string) bool {
	t.Helper()
	err := e.d.store.read(kind, id, &struct{}{})
	if err != nil && !errors.Is(err, errNotFound) {
		t.Fatal(err)
	}
	return err == nil
}

func (e *orphanEnv) mustSnapshot(t *testing.T, name, volID string) string {
	t.Helper()
	resp, err := e.ctrl.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: volID})
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetSnapshot().GetSnapshotId()
}

// TestOrphansReportedNeverDeletedByDefault: without --delete-orphans-after
// an orphan is reported (gauge, and a log line) at every check and stays,
// however long it stays orphaned; what the cluster names is no orphan.
func TestOrphansReportedNeverDeletedByDefault(t *testing.T) {
	e := newOrphanEnv(t, time.Hour, 0)
	kept := e.mustCreate(t, createReq("pvc-kept", 1<<20, nil)).GetVolumeId()
	orphan := e.mustCreate(t, createReq("pvc-orphan", 1<<20, nil)).GetVolumeId()
	keptSnap := e.mustSnapshot(t, "snap-kept", kept)
	orphanSnap := e.mustSnapshot(t, "snap-orphan", kept)
	e.cluster.add(kept)
	e.cluster.add(keptSnap)

	e.checkAfter(2 * time.Hour)
	e.wantGauges(t, 1, 1)
	if got := e.o.since; len(got) != 2 || got[orphan].IsZero() || got[orphanSnap].IsZero() {
		t.Errorf("orphans seen: %v, want %s and %s", got, orphan, orphanSnap)
	}
	for range 5 {
		e.checkAfter(30 * 24 * time.Hour)
	}
	e.wantGauges(t, 1, 1)
	if !e.volumeExists(t, orphan) || !e.snapshotExists(t, orphanSnap) || !e.volumeExists(t, kept) || !e.snapshotExists(t, keptSnap) {
		t.Error("something was deleted without --delete-orphans-after")
	}
}

// TestOrphansGrace: a volume or snapshot younger than the grace period is
// never an orphan (its CreateVolume may have just returned, its PV not yet
// created), nor one dated in the future.
func TestOrphansGrace(t *testing.T) {
	e := newOrphanEnv(t, time.Hour, time.Minute)
	vol := e.mustCreate(t, createReq("pvc-new", 1<<20, nil)).GetVolumeId()
	snap := e.mustSnapshot(t, "snap-new", vol)

	e.checkAfter(59 * time.Minute)
	e.wantGauges(t, 0, 0)
	e.clock = e.clock.Add(-3 * time.Hour) // the clock steps back
	e.o.check(context.Background())
	e.wantGauges(t, 0, 0)
	if !e.volumeExists(t, vol) || !e.snapshotExists(t, snap) {
		t.Fatal("deleted within the grace period")
	}
	e.checkAfter(3*time.Hour + 2*time.Minute)
	e.wantGauges(t, 1, 1)
}

// TestOrphansDeletedAfterDuration: with --delete-orphans-after, an orphan
// seen at every check for that long is deleted, through DeleteSnapshot's
// and DeleteVolume's paths (the internal snapshot goes from the image;
// the image and its metadata go); a check that finds it named again starts
// its time over.
func TestOrphansDeletedAfterDuration(t *testing.T) {
	e := newOrphanEnv(t, time.Hour, time.Hour)
	vol := e.mustCreate(t, createReq("pvc-gone", 1<<20, nil)).GetVolumeId()
	snap := e.mustSnapshot(t, "snap-gone", vol)
	back := e.mustCreate(t, createReq("pvc-back", 1<<20, nil)).GetVolumeId()

	e.checkAfter(2 * time.Hour) // all three orphaned from here
	e.wantGauges(t, 2, 1)
	e.checkAfter(30 * time.Minute)
	e.cluster.add(back) // its PV reappears (an API hiccup, a restore)...
	e.checkAfter(20 * time.Minute)
	e.cluster.remove(back) // ...and goes again
	e.wantGauges(t, 1, 1)
	e.checkAfter(9 * time.Minute) // 59 min after first seen
	if !e.volumeExists(t, vol) || !e.snapshotExists(t, snap) {
		t.Fatal("deleted before --delete-orphans-after ran out")
	}
	e.wantGauges(t, 2, 1)

	e.checkAfter(time.Minute) // one hour
	if e.snapshotExists(t, snap) || e.volumeExists(t, vol) {
		t.Fatalf("orphans still there an hour after first seen (snapshot %v, volume %v)", e.snapshotExists(t, snap), e.volumeExists(t, vol))
	}
	if _, err := qcow2.InUse(e.d.store.imagePath(vol)); err == nil {
		t.Error("the deleted volume's image is still there")
	}
	if !e.volumeExists(t, back) {
		t.Error("a volume whose run of orphaned checks was broken 40 min ago was deleted")
	}
	e.wantGauges(t, 1, 0)
	e.checkAfter(time.Hour)
	if e.volumeExists(t, back) {
		t.Error("still there an hour after it was last seen named")
	}
	e.wantGauges(t, 0, 0)
}

// TestOrphanSnapshotDeletedFromImage: deleting an orphaned snapshot takes
// the internal snapshot out of its (still named) volume's image.
func TestOrphanSnapshotDeletedFromImage(t *testing.T) {
	e := newOrphanEnv(t, 0, time.Minute)
	vol := e.mustCreate(t, createReq("pvc-src", 1<<20, nil)).GetVolumeId()
	snap := e.mustSnapshot(t, "snap-lost", vol)
	e.cluster.add(vol)
	e.checkAfter(time.Second)
	e.checkAfter(time.Minute)
	if e.snapshotExists(t, snap) {
		t.Fatal("orphaned snapshot not deleted")
	}
	img, err := qcow2.Open(e.d.store.imagePath(vol), qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if n := len(img.Snapshots()); n != 0 {
		t.Errorf("%d internal snapshots left in the image, want 0", n)
	}
	if !e.volumeExists(t, vol) {
		t.Error("the source volume, which a PV names, went too")
	}
}

// TestOrphanStagedNeverDeleted: a staged volume whose PV is gone is
// reported but never deleted, whether this process serves it or only a
// staged record says so; unstaged, it goes.
func TestOrphanStagedNeverDeleted(t *testing.T) {
	e := newOrphanEnv(t, 0, time.Minute)
	served := e.mustCreate(t, createReq("pvc-served", 1<<20, nil)).GetVolumeId()
	recorded := e.mustCreate(t, createReq("pvc-recorded", 1<<20, nil)).GetVolumeId()
	e.stage(t, served, rwo)
	if err := e.d.store.write("staged", recorded, &stagedMeta{VolumeID: recorded, StagingPath: "/elsewhere", DeviceIndex: 9}); err != nil {
		t.Fatal(err)
	}
	e.checkAfter(time.Second)
	for range 3 {
		e.checkAfter(time.Hour)
	}
	if !e.volumeExists(t, served) || !e.volumeExists(t, recorded) {
		t.Fatal("a staged volume was deleted")
	}
	e.wantGauges(t, 2, 0)
	e.unstage(t, served)
	e.checkAfter(time.Hour)
	if e.volumeExists(t, served) {
		t.Error("an orphan unstaged an hour ago (orphaned for hours) was not deleted")
	}
	if !e.volumeExists(t, recorded) {
		t.Error("the volume a staged record names was deleted")
	}
}

// TestOrphanBusyVolumeLeft: a volume an RPC holds is left for the next
// check.
func TestOrphanBusyVolumeLeft(t *testing.T) {
	e := newOrphanEnv(t, 0, time.Minute)
	vol := e.mustCreate(t, createReq("pvc-busy", 1<<20, nil)).GetVolumeId()
	e.checkAfter(time.Second)
	unlock, err := e.d.lock(context.Background(), vol)
	if err != nil {
		t.Fatal(err)
	}
	e.checkAfter(time.Hour)
	if !e.volumeExists(t, vol) {
		t.Fatal("deleted while an RPC held it")
	}
	unlock()
	e.checkAfter(time.Minute)
	if e.volumeExists(t, vol) {
		t.Error("not deleted once free")
	}
}

// TestOrphanListErrors: a listing that fails means "don't know": nothing
// of that kind is reported (the gauge goes), nothing deleted, the error
// counted, and the run an orphan must be seen for starts over.
func TestOrphanListErrors(t *testing.T) {
	e := newOrphanEnv(t, 0, time.Hour)
	vol := e.mustCreate(t, createReq("pvc-x", 1<<20, nil)).GetVolumeId()
	snap := e.mustSnapshot(t, "snap-x", vol)

	e.cluster.volErr = errors.New("apiserver: connection refused")
	e.cluster.snapErr = errors.New(`the server could not find the requested resource (volumesnapshotcontents)`)
	e.checkAfter(time.Second)
	e.wantGauges(t, -1, -1)
	if len(e.o.since) != 0 {
		t.Errorf("orphans seen on failed listings: %v", e.o.since)
	}

	e.cluster.volErr, e.cluster.snapErr = nil, nil
	e.checkAfter(time.Minute) // seen orphaned from here
	e.wantGauges(t, 1, 1)
	e.cluster.volErr = errors.New("apiserver: timeout")
	e.checkAfter(50 * time.Minute)
	e.wantGauges(t, -1, 1)
	e.cluster.volErr = nil
	e.checkAfter(20 * time.Minute) // 70 min after first seen, 20 after the error
	if !e.volumeExists(t, vol) {
		t.Error("deleted although a failed listing broke its run 20 minutes ago")
	}
	if e.snapshotExists(t, snap) {
		t.Error("the snapshot, seen orphaned at every check for 70 minutes, was not deleted")
	}
	if got := testutil.ToFloat64(e.o.checkErrors.WithLabelValues(kindVolume)); got != 2 {
		t.Errorf("%s{kind=volume} = %v, want 2", metricOrphanCheckErrors, got)
	}
	if got := testutil.ToFloat64(e.o.checkErrors.WithLabelValues(kindSnapshot)); got != 1 {
		t.Errorf("%s{kind=snapshot} = %v, want 1", metricOrphanCheckErrors, got)
	}
}

// TestOrphanCheckerServed: with a cluster, ServeOn's checker runs at start
// and its gauge is on /metrics.
func TestOrphanCheckerServed(t *testing.T) {
	e := newTestEnv(t)
	e.mustCreate(t, createReq("pvc-lone", 1<<20, nil))
	e.d.opts.OrphanGrace = 0
	e.d.cluster = newFakeCluster()
	m := newMetrics(e.d.store)
	ctx, cancel := context.WithCancel(context.Background())
	done := e.d.startOrphanChecker(ctx, m)
	defer func() { cancel(); <-done }()
	want := metricOrphans + `{kind="volume"} 1`
	var out string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		rec := httptest.NewRecorder()
		m.handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		b, _ := io.ReadAll(rec.Body)
		if out = string(b); strings.Contains(out, want) {
			return
		}
	}
	t.Fatalf("/metrics has no %q:\n%s", want, out)
}

// TestOrphanVolumeWithSnapshots: a volume whose PV is gone but whose
// snapshot a VolumeSnapshotContent still names is reported, never
// deleted (its image holds the snapshot); and a volume snapshotted within
// the grace period is young, however old it is.
func TestOrphanVolumeWithSnapshots(t *testing.T) {
	e := newOrphanEnv(t, time.Hour, time.Minute)
	vol := e.mustCreate(t, createReq("pvc-old", 1<<20, nil)).GetVolumeId()
	m, err := e.d.store.readVolume(vol)
	if err != nil {
		t.Fatal(err)
	}
	m.CreatedAt = e.clock.Add(-24 * time.Hour)
	if err := e.d.store.write("volumes", vol, m); err != nil {
		t.Fatal(err)
	}
	snap := e.mustSnapshot(t, "snap-kept", vol)
	e.cluster.add(snap)

	e.checkAfter(30 * time.Minute)
	e.wantGauges(t, 0, 0) // snapshotted 30 min ago: young
	e.checkAfter(time.Hour)
	e.wantGauges(t, 1, 0)
	for range 3 {
		e.checkAfter(24 * time.Hour)
	}
	if !e.volumeExists(t, vol) || !e.snapshotExists(t, snap) {
		t.Fatal("a volume holding a snapshot the cluster names was deleted")
	}
	e.cluster.remove(snap) // the snapshot goes too: both are orphans now
	e.checkAfter(time.Minute)
	e.checkAfter(time.Minute)
	if e.snapshotExists(t, snap) || e.volumeExists(t, vol) {
		t.Errorf("after a minute of both orphaned: snapshot %v, volume %v; want both deleted, the snapshot first", e.snapshotExists(t, snap), e.volumeExists(t, vol))
	}
}
