package driver

import (
	"context"
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/klog/v2"
)

// ClusterObjects is what the orphan checker asks of the cluster: the
// handles of this driver's PersistentVolumes (spec.csi.volumeHandle) and
// VolumeSnapshotContents (the snapshot handle). It is an interface at the
// API boundary so that the checker's rules are tested with a fake; the
// real one (kube.go) lists through client-go. Each call returns a
// complete listing or an error: never a partial set.
type ClusterObjects interface {
	VolumeHandles(ctx context.Context) (map[string]struct{}, error)
	SnapshotHandles(ctx context.Context) (map[string]struct{}, error)
}

const (
	metricOrphans           = "csi_qcow2_orphans"
	metricOrphanCheckErrors = "csi_qcow2_orphan_check_errors_total"

	kindVolume   = "volume"
	kindSnapshot = "snapshot"
)

// orphanChecker finds volumes and snapshots in the data dir that no PV or
// VolumeSnapshotContent names any more, reports them (a gauge and a log
// line each), and deletes them only when --delete-orphans-after says so.
// Deleting a volume the cluster still needs is the one thing it must never
// do, so each rule below errs towards "not an orphan".
type orphanChecker struct {
	d       *Driver
	cluster ClusterObjects
	// grace: anything created more recently is never an orphan.
	grace time.Duration
	// deleteAfter: delete what was seen orphaned, without a break, for
	// this long; 0 never deletes.
	deleteAfter time.Duration
	now         func() time.Time

	// since is when each id was first seen orphaned in the current
	// unbroken run of checks. Only check touches it.
	since map[string]time.Time
	// listed: kinds whose first successful check was logged (once, so an
	// operator sees the checker reached the API server).
	listed map[string]bool

	orphans     *prometheus.GaugeVec
	checkErrors *prometheus.CounterVec
}

func newOrphanChecker(d *Driver, c ClusterObjects) *orphanChecker {
	return &orphanChecker{
		d: d, cluster: c,
		grace: d.opts.OrphanGrace, deleteAfter: d.opts.DeleteOrphansAfter,
		now:    time.Now,
		since:  map[string]time.Time{},
		listed: map[string]bool{},
		orphans: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: metricOrphans,
			Help: "Volumes or snapshots in the data dir that no PersistentVolume or VolumeSnapshotContent names, by kind, at the last check that could list them (absent until one could).",
		}, []string{"kind"}),
		checkErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricOrphanCheckErrors,
			Help: "Orphan checks that could not list PersistentVolumes or VolumeSnapshotContents (or the data dir), by kind: nothing is reported or deleted for that kind then.",
		}, []string{"kind"}),
	}
}

func (o *orphanChecker) collectors() []prometheus.Collector {
	return []prometheus.Collector{o.orphans, o.checkErrors}
}

// run checks at once, then every interval, until ctx is done.
func (o *orphanChecker) run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		o.check(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// check is one pass: snapshots first, so that an orphaned volume's orphaned
// snapshots can be gone before the volume's turn comes (DeleteVolume
// refuses a volume with snapshots).
func (o *orphanChecker) check(ctx context.Context) {
	o.checkKind(ctx, kindSnapshot, o.cluster.SnapshotHandles, o.snapshotCandidates, o.deleteSnapshot)
	o.checkKind(ctx, kindVolume, o.cluster.VolumeHandles, o.volumeCandidates, o.deleteVolume)
}

// candidate is a volume or snapshot of the data dir with what the rules
// need to know of it.
type candidate struct {
	id        string
	createdAt time.Time
	// Volumes only: the newest of their snapshots' creation times (a
	// volume snapshotted within the grace period is young too), how many
	// they have, and whether they are in use on this node.
	snapshottedAt time.Time
	snapshots     int
	staged        bool
	// Snapshots only: the volume whose image holds it.
	sourceVolumeID string
}

// newest is when the candidate was last created or snapshotted.
func (c candidate) newest() time.Time {
	if c.snapshottedAt.After(c.createdAt) {
		return c.snapshottedAt
	}
	return c.createdAt
}

func (o *orphanChecker) checkKind(ctx context.Context, kind string,
	list func(context.Context) (map[string]struct{}, error),
	candidates func() ([]candidate, error),
	del func(ctx context.Context, c candidate) error) {
	// The cluster is listed before the data dir: whatever is created in
	// between is younger than the grace period.
	handles, err := list(ctx)
	if err == nil {
		var cs []candidate
		if cs, err = candidates(); err == nil {
			o.judge(ctx, kind, handles, cs, del)
			return
		}
	}
	// A failed listing means "don't know", never "orphan": nothing of
	// this kind is reported or deleted, the gauge is withdrawn, and the
	// unbroken run every deletion waits for starts over.
	klog.ErrorS(err, "Orphan check could not list; nothing reported or deleted", "kind", kind)
	o.checkErrors.WithLabelValues(kind).Inc()
	o.orphans.DeleteLabelValues(kind)
	o.forget(kind, nil)
}

// judge applies the rules to one kind's candidates against a successful,
// complete listing of the cluster's handles.
func (o *orphanChecker) judge(ctx context.Context, kind string, handles map[string]struct{}, cs []candidate,
	del func(ctx context.Context, c candidate) error) {
	now := o.now()
	seen := map[string]bool{}
	n := 0
	for _, c := range cs {
		// An orphan only if absent from the listing.
		if _, ok := handles[c.id]; ok {
			continue
		}
		// Never an orphan within the grace period: a volume whose
		// CreateVolume is in flight, or just returned, has no PV yet (a
		// snapshot, no handle in its VolumeSnapshotContent), and one
		// just snapshotted is in use. A time in the future (a clock
		// step) counts as young too.
		if now.Sub(c.newest()) < o.grace {
			continue
		}
		n++
		seen[c.id] = true
		first, ok := o.since[c.id]
		if !ok {
			first = now
			o.since[c.id] = now
			klog.InfoS("Found an orphan: no "+clusterObjectOf(kind)+" names it", "kind", kind, "id", c.id,
				"createdAt", c.createdAt, "staged", c.staged, "snapshots", c.snapshots, "deleteAfter", o.deleteAfter)
		}
		// Deleted only when --delete-orphans-after asks, and only once
		// it has been seen orphaned at every check for that long.
		if o.deleteAfter <= 0 || now.Sub(first) < o.deleteAfter {
			continue
		}
		// A staged volume is in use: never deleted (deleteVolumeLocked
		// refuses it too, under the lock). A volume with snapshots holds
		// them (they are internal to its image): it waits until they
		// are gone, deleted as orphans themselves or by their owner
		// (DeleteVolume would refuse it).
		if c.staged || c.snapshots > 0 {
			continue
		}
		if err := del(ctx, c); err != nil {
			klog.ErrorS(err, "Deleting an orphan failed; tried again at the next check", "kind", kind, "id", c.id)
			continue
		}
		klog.InfoS("Deleted an orphan", "kind", kind, "id", c.id, "orphanedSince", first)
		n--
		delete(seen, c.id)
	}
	o.forget(kind, seen)
	o.orphans.WithLabelValues(kind).Set(float64(n))
	if !o.listed[kind] {
		o.listed[kind] = true
		klog.InfoS("Orphan check listed the cluster", "kind", kind, "clusterObjects", len(handles),
			"inDataDir", len(cs), "orphans", n)
	}
}

// forget drops the runs of kind's ids that were not seen orphaned now.
func (o *orphanChecker) forget(kind string, seen map[string]bool) {
	for id := range o.since {
		if idKind(id) == kind && !seen[id] {
			delete(o.since, id)
		}
	}
}

func idKind(id string) string {
	if validSnapshotID(id) {
		return kindSnapshot
	}
	return kindVolume
}

func clusterObjectOf(kind string) string {
	if kind == kindSnapshot {
		return "VolumeSnapshotContent"
	}
	return "PersistentVolume"
}

func (o *orphanChecker) volumeCandidates() ([]candidate, error) {
	ids, err := o.d.store.list("volumes")
	if err != nil {
		return nil, err
	}
	snaps, err := o.snapshotCandidates()
	if err != nil {
		return nil, err
	}
	var cs []candidate
	for _, id := range ids {
		m, err := o.d.store.readVolume(id)
		if err != nil {
			continue // deleted since the listing, or not ours to judge
		}
		c := candidate{id: id, createdAt: m.CreatedAt, staged: o.d.isStaged(id)}
		for _, s := range snaps {
			if s.sourceVolumeID == id {
				c.snapshots++
				if s.createdAt.After(c.snapshottedAt) {
					c.snapshottedAt = s.createdAt
				}
			}
		}
		cs = append(cs, c)
	}
	return cs, nil
}

func (o *orphanChecker) snapshotCandidates() ([]candidate, error) {
	ids, err := o.d.store.list("snapshots")
	if err != nil {
		return nil, err
	}
	var cs []candidate
	for _, id := range ids {
		if m, err := o.d.store.readSnapshot(id); err == nil {
			cs = append(cs, candidate{id: id, createdAt: m.CreatedAt, sourceVolumeID: m.SourceVolumeID})
		}
	}
	return cs, nil
}

// isStaged: served by this process, or recorded as staged (by a process
// whose recovery failed, or another one on the same data dir).
func (d *Driver) isStaged(id string) bool {
	if d.stagedVolume(id) != nil {
		return true
	}
	_, err := d.store.readStaged(id)
	return !errors.Is(err, errNotFound)
}

// deleteVolume deletes an orphaned volume through DeleteVolume's own path
// (deleteVolumeLocked), under the volume's lock, never by removing files
// here. A volume busy with an RPC is left for the next check; one whose
// metadata changed since it was judged (deleted and created again) is
// young again and left alone.
func (o *orphanChecker) deleteVolume(ctx context.Context, c candidate) error {
	unlock, err := o.d.lock(ctx, c.id)
	if err != nil {
		return err
	}
	defer unlock()
	m, err := o.d.store.readVolume(c.id)
	if errors.Is(err, errNotFound) {
		return nil
	} else if err != nil {
		return err
	}
	if !m.CreatedAt.Equal(c.createdAt) {
		return newError(errBusy, "volume %s was created again since it was judged", c.id)
	}
	return o.d.deleteVolumeLocked(c.id)
}

// deleteSnapshot deletes an orphaned snapshot through DeleteSnapshot's
// path, under the locks of the snapshot and its source volume.
func (o *orphanChecker) deleteSnapshot(ctx context.Context, c candidate) error {
	m, err := o.d.store.readSnapshot(c.id)
	if errors.Is(err, errNotFound) {
		return nil
	} else if err != nil {
		return err
	}
	unlock, err := o.d.lock(ctx, c.id, m.SourceVolumeID)
	if err != nil {
		return err
	}
	defer unlock()
	m, err = o.d.store.readSnapshot(c.id)
	if errors.Is(err, errNotFound) {
		return nil
	} else if err != nil {
		return err
	}
	if !m.CreatedAt.Equal(c.createdAt) {
		return newError(errBusy, "snapshot %s was created again since it was judged", c.id)
	}
	return o.d.deleteSnapshotLocked(m)
}
