package driver

import (
	"errors"
	"fmt"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// groupMember is one volume of a volume group snapshot while it is cut.
type groupMember struct {
	volumeID   string
	snapshotID string
	img        *qcow2.Image
	sv         *stagedVolume // nil unless this process serves the volume
	info       qcow2.SnapshotInfo
}

// cutTogether creates internal snapshot m.snapshotID in every member's
// image so that together they are crash consistent: what they hold is what
// the volumes would hold had they all lost power at one instant.
//
// Rule, enforced here: from before the first snapshot is cut until after
// the last one is, no member has a write in flight or accepts one.
//  1. Every mounted filesystem is frozen (FIFREEZE writes its dirty data
//     back through its device, so its gate must still be open).
//  2. Every staged member's write gate is closed; closing it waits out the
//     writes in flight. A volume that is not staged has no writer but us
//     (its image is open here under its file lock).
//  3. Each image is flushed and snapshotted, in the members' (sorted) order.
//  4. Gates open, then filesystems thaw (ext4's FITHAW writes its
//     superblock through the device and waits), in reverse order.
//
// So every write a member completed before its gate closed is in its
// snapshot, and every later one waits until all snapshots exist: a write
// an application issued after another was acknowledged, on any member, is
// never captured without that other one.
//
// Undo rule: if a member fails, the snapshots cut so far are deleted
// before anything is released, and the error names the volume. A failed
// undo leaves an internal snapshot without metadata; the retried create
// deletes it before cutting (cutMember), never adopts it.
func (d *Driver) cutTogether(ms []*groupMember) (err error) {
	var release []func()
	defer func() {
		for i := len(release) - 1; i >= 0; i-- {
			release[i]()
		}
	}()
	for _, m := range ms {
		thaw, err := d.freezeFS(m.sv)
		if err != nil {
			return fmt.Errorf("volume %s: %w", m.volumeID, err)
		}
		release = append(release, thaw)
	}
	for _, m := range ms {
		if m.sv != nil {
			m.sv.gate.Lock()
			release = append(release, m.sv.gate.Unlock)
		}
	}
	for i, m := range ms {
		if m.info, err = cutMember(m.img, m.snapshotID); err != nil {
			return errors.Join(fmt.Errorf("volume %s: %w", m.volumeID, err), undoCuts(ms[:i]))
		}
	}
	return nil
}

// cutMember flushes img and creates internal snapshot name, durably. A
// snapshot of that name that already exists was cut at another time (a
// crash before the group record, or a failed undo): it is replaced, since
// adopting it would break the group's consistency.
func cutMember(img *qcow2.Image, name string) (qcow2.SnapshotInfo, error) {
	if err := img.DeleteSnapshot(name); err != nil && !errors.Is(err, qcow2.ErrSnapshotNotFound) {
		return qcow2.SnapshotInfo{}, fmt.Errorf("removing stale snapshot %s: %w", name, err)
	}
	if err := img.Flush(); err != nil {
		return qcow2.SnapshotInfo{}, err
	}
	info, err := img.CreateSnapshot(name)
	if err != nil {
		return qcow2.SnapshotInfo{}, err
	}
	return info, img.Flush()
}

// undoCuts deletes the internal snapshots of ms, returning what failed.
func undoCuts(ms []*groupMember) error {
	var errs []error
	for _, m := range ms {
		err := m.img.DeleteSnapshot(m.snapshotID)
		if err == nil {
			err = m.img.Flush()
		}
		if err != nil && !errors.Is(err, qcow2.ErrSnapshotNotFound) {
			errs = append(errs, fmt.Errorf("undoing snapshot %s of volume %s: %w", m.snapshotID, m.volumeID, err))
		}
	}
	return errors.Join(errs...)
}
