package qcow2

import "errors"

// noWaitReader is a host file that can read from the page cache alone,
// failing rather than waiting for the disk (OSFile: preadv2 RWF_NOWAIT).
type noWaitReader interface {
	ReadAtNoWait(p []byte, off int64) bool
}

// errNotCached is what the slice cache answers, in cachedOnly mode, for a
// slice it would have to read from the disk.
var errNotCached = errors.New("qcow2: metadata slice not cached")

// maxTryExtents bounds the runs one TryReadAt maps; a read that needs more
// takes the ordinary path.
const maxTryExtents = 4

// TryReadAt reads len(p) bytes at guest offset off, as ReadAt does, but
// only if it can without waiting: for the image's locks, for metadata that
// is not cached, or for data that is not in the host's page cache. It
// reports false, having read nothing that counts, when it would have had to
// wait or when anything is unusual (past the end, compressed clusters, a
// backing file, an error): the caller then uses ReadAt, which handles all
// of that. An NBD server uses it to answer reads on the goroutine that
// reads requests, without a hand-off to another thread.
func (img *Image) TryReadAt(p []byte, off int64) bool {
	if img.nowait == nil || img.closed.Load() || off < 0 || !img.ioGate.TryRLock() {
		return false
	}
	defer img.ioGate.RUnlock()
	var runs [maxTryExtents]mapping
	n, ok := img.tryMap(runs[:], off, int64(len(p)))
	if !ok {
		return false
	}
	// ioGate held shared: no cluster mapped here can be freed and reused
	// before the reads below are done (as in readAt).
	for _, m := range runs[:n] {
		q := p[:m.n]
		if m.kind == kindData {
			if !img.nowait.ReadAtNoWait(q, m.host) {
				return false
			}
		} else {
			clear(q)
		}
		p = p[m.n:]
	}
	return true
}

// tryMap maps [off, off+length) into runs from cached metadata only, and
// reports false if that needs a wait, the disk, or more runs than fit.
// Only host data and runs that read as zeros without a backing file count.
func (img *Image) tryMap(runs []mapping, off, length int64) (int, bool) {
	if !img.mu.TryLock() {
		return 0, false
	}
	defer img.mu.Unlock()
	if off > img.size || length > img.size-off {
		return 0, false
	}
	img.l2.cachedOnly = true
	defer func() { img.l2.cachedOnly = false }()
	n := 0
	for end := off + length; off < end; n++ {
		if n == len(runs) {
			return 0, false
		}
		m, err := img.mapRead(off, end-off)
		if err != nil || !(m.kind == kindData || img.readsZero(m.entry)) {
			return 0, false
		}
		runs[n] = m
		off += m.n
	}
	return n, true
}
