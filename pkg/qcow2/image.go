package qcow2

import (
	"encoding/binary"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
)

// Image is an open qcow2 image. All methods are safe for concurrent use.
//
// Locking: ioGate is held shared by every data I/O for its whole duration
// and exclusively by operations that must not race with in-flight I/O
// (applying deferred frees, resize, snapshots, close). mu guards all
// metadata; it is held while translating guest offsets and updating tables,
// never across guest data transfers to the host file.
type Image struct {
	f        File
	path     string
	readOnly bool
	opts     OpenOptions

	ioGate sync.RWMutex
	mu     sync.Mutex

	h           *header
	clusterBits uint
	clusterSize int64
	l2Bits      uint // log2 of entries per L2 table
	rcOrder     uint // log2 of refcount width in bits
	size        int64

	l1        []l1Entry
	l1Dirty   map[int64]bool // L1 indices changed in memory, written at flush
	rcTable   []rtEntry
	l2        *sliceCache
	rc        *sliceCache
	snapshots []snapshot
	backing   backingReader

	tableIndex map[int64]struct{} // see tableClusters

	freeHint int64 // no free cluster below this index
	// endCluster is the first cluster index past everything allocated or
	// ever written: nothing in the file at or past it was written by this
	// image (lazy links rely on it), so it never decreases, and it moves
	// before metadata is written past it.
	endCluster int64

	// inflight holds guest clusters whose allocating write is under way;
	// other writers of the same cluster wait for the channel to close.
	inflight map[int64]chan struct{}
	// pendingFree are host ranges whose refcount drops once the L2/L1
	// change that stopped referencing them is durable (see Flush).
	// freedSeq numbers them: pendingFree[0] is reference drop number
	// freedSeq, so concurrent flushes agree on which ones are durable.
	pendingFree []hostRange
	freedSeq    uint64

	// views counts open SnapshotViews per snapshot L1 offset: a viewed
	// snapshot cannot be deleted (snapshot_view.go).
	views map[int64]int
	// ctail is where WriteCompressed packs the next compressed cluster
	// (compress_write.go).
	ctail compressedTail

	// writeGen counts writes that an L2 entry may come to depend on (data
	// of allocating writes, new tables, refcount blocks; not lazy links,
	// nor refcount blocks of a lazy-refcount image: lazylink.go);
	// syncedGen is the value covered by the last completed fdatasync.
	writeGen, syncedGen uint64
	lazy                lazyLinks
	unsynced            atomic.Bool // any write since the last sync
	// syncErr is the first failed sync, wrapped in ErrSyncFailed; once
	// set, every sync returns it (see sync). Guarded by mu: every caller
	// of sync holds mu, or owns the image alone as Open does; written
	// with syncMu held too. syncMu serializes fdatasyncs, for the one
	// that runs without mu (syncExtension), whose failure extensionErr
	// holds until sync adopts it.
	syncErr      error
	syncMu       sync.Mutex
	extensionErr error

	corrupt bool
	closed  atomic.Bool

	nowait noWaitReader // the host file's page-cache-only reads, if it has them
}

// syncTracker notes every write to the host file, so a flush after which
// nothing was written can skip its fdatasync.
//
// Crash order: the note is made after the host call returns, never before.
// sync clears it before its fdatasync, so a write that lands while a sync
// runs is either complete before the clear (the fdatasync covers it) or
// noted after it (the next flush syncs). Noted first, a write still in
// flight could have its note cleared by a concurrent flush and land after
// that flush's fdatasync, and the next flush would skip the sync that
// covers it (TestFlushCoversWriteRacingEarlierFlush). Failed calls are
// noted too: part of the range may have been written.
type syncTracker struct {
	File
	unsynced *atomic.Bool
}

func (t syncTracker) WriteAt(p []byte, off int64) (int, error) {
	defer t.unsynced.Store(true)
	return t.File.WriteAt(p, off)
}

func (t syncTracker) ZeroRange(off, length int64) error {
	defer t.unsynced.Store(true)
	return t.File.ZeroRange(off, length)
}

func (t syncTracker) PunchHole(off, length int64) error {
	defer t.unsynced.Store(true)
	return t.File.PunchHole(off, length)
}

// hostRange is a byte range of the host file whose clusters each lose one
// reference when freed (one cluster, or the sectors of a compressed cluster).
type hostRange struct{ off, length int64 }

// Open opens an existing image file.
func Open(path string, opts OpenOptions) (*Image, error) {
	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	if opts.Lock {
		if err := lockImage(f, !opts.ReadOnly); err != nil {
			f.Close()
			return nil, fmt.Errorf("open %s: %w", path, err)
		}
	}
	img, err := openImage(OSFile{f}, path, opts)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return img, nil
}

// OpenFile opens an image on an already open host file (used by tests to
// inject faults). Backing files are resolved against opts.BackingRoot.
func OpenFile(f File, opts OpenOptions) (*Image, error) {
	return openImage(f, "", opts)
}

func openImage(f File, path string, opts OpenOptions) (*Image, error) {
	fileSize, err := f.Size()
	if err != nil {
		return nil, err
	}
	buf := make([]byte, min(fileSize, 1<<maxClusterBits))
	if err := readFull(f, buf, 0); err != nil {
		return nil, err
	}
	h, err := decodeHeader(buf)
	if err != nil {
		return nil, err
	}
	img := newImage(f, path, h, opts)
	img.endCluster = (fileSize + img.clusterSize - 1) >> img.clusterBits
	if err := img.loadTables(fileSize); err != nil {
		return nil, err
	}
	if err := img.openBacking(); err != nil {
		return nil, err
	}
	if !opts.ReadOnly {
		if err := img.prepareForWrite(); err != nil {
			img.closeBacking()
			return nil, err
		}
	}
	return img, nil
}

func newImage(f File, path string, h *header, opts OpenOptions) *Image {
	cacheSize := opts.CacheSize
	if cacheSize <= 0 {
		cacheSize = DefaultCacheSize
	}
	img := &Image{
		path: path, readOnly: opts.ReadOnly, opts: opts, h: h,
		clusterBits: uint(h.clusterBits), clusterSize: h.clusterSize(),
		l2Bits: uint(h.clusterBits) - 3, rcOrder: uint(h.refcountOrder),
		size:     int64(h.size),
		l1Dirty:  make(map[int64]bool),
		inflight: make(map[int64]chan struct{}),
	}
	img.nowait, _ = f.(noWaitReader)
	img.f = syncTracker{File: f, unsynced: &img.unsynced}
	f = img.f
	ss := min(img.clusterSize, metadataSliceSize)
	img.l2 = newSliceCache(f, ss, img.clusterBits, cacheSize*3/4)
	img.rc = newSliceCache(f, ss, img.clusterBits, cacheSize/4)
	img.l2.beforeWriteback = img.orderBeforeL2Write
	img.l2.checkWrite = img.checkMetadataWrite
	img.rc.checkWrite = img.checkMetadataWrite
	return img
}

// loadTables reads the L1 table, the refcount table and the snapshot table,
// each bounded by the header limits and by the file's size.
func (img *Image) loadTables(fileSize int64) error {
	h := img.h
	l1, err := readTable(img.f, int64(h.l1TableOffset), int64(h.l1Size), fileSize, "L1 table")
	if err != nil {
		return err
	}
	img.l1 = make([]l1Entry, len(l1))
	for i, v := range l1 {
		img.l1[i] = l1Entry(v)
	}
	n := int64(h.refcountTableClusters) << img.clusterBits / 8
	rt, err := readTable(img.f, int64(h.refcountTableOffset), n, fileSize, "refcount table")
	if err != nil {
		return err
	}
	img.rcTable = make([]rtEntry, len(rt))
	for i, v := range rt {
		img.rcTable[i] = rtEntry(v)
	}
	img.snapshots, err = readSnapshotTable(img.f, h, fileSize)
	return err
}

// readTable reads n big-endian uint64 entries at off, refusing tables that
// would extend past the end of the file.
func readTable(f File, off, n, fileSize int64, what string) ([]uint64, error) {
	if n == 0 {
		return nil, nil
	}
	if off+n*8 > fileSize {
		return nil, fmt.Errorf("%s at %#x (%d entries) extends past the end of the file: %w", what, off, n, ErrCorrupt)
	}
	buf := make([]byte, n*8)
	if err := readFull(f, buf, off); err != nil {
		return nil, err
	}
	t := make([]uint64, n)
	for i := range t {
		t[i] = binary.BigEndian.Uint64(buf[i*8:])
	}
	return t, nil
}

// prepareForWrite runs when an image is opened writable: refuse corrupt
// images, repair dirty ones, mark lazy-refcount images dirty, and drop
// autoclear bits we do not maintain.
func (img *Image) prepareForWrite() error {
	h := img.h
	if h.incompatible&incompatCorrupt != 0 {
		return fmt.Errorf("image is marked corrupt; open it read-only or repair it with check -r all: %w", ErrCorrupt)
	}
	rewrite := h.autoclear != 0
	if h.incompatible&incompatDirty != 0 {
		res, err := img.check(RepairAll, true)
		if err != nil {
			return fmt.Errorf("repairing dirty image: %w", err)
		}
		if res.Corruptions == 0 && res.Leaks == 0 {
			if err := img.trimFreeTail(); err != nil {
				return err
			}
		}
		h.incompatible &^= incompatDirty
		rewrite = true
	}
	if h.compatible&compatLazyRefcounts != 0 {
		h.incompatible |= incompatDirty
		rewrite = true
	}
	if !rewrite {
		return nil
	}
	if err := img.writeHeader(); err != nil {
		return err
	}
	if err := img.sync(); err != nil {
		return err
	}
	img.enableLazyLinks()
	return nil
}

// writeHeader rewrites cluster 0's header, extensions and backing name in
// one write. Callers order it with syncs around the tables it points at.
func (img *Image) writeHeader() error {
	buf, err := img.h.encode()
	if err != nil {
		return err
	}
	return writeFull(img.f, buf, 0)
}

// sync makes every completed write durable. The caller holds mu.
//
// A failed sync is sticky, as in QEMU's file-posix: after fdatasync fails,
// Linux may have marked the dirty pages clean or dropped them, so a later
// fdatasync that succeeds says nothing about the writes the failed one
// covered. Every later sync returns the first error instead, so Flush and
// Close keep failing and nothing whose crash order depends on a sync (L2
// entries, L1 entries, the clean header, deferred frees) reaches the disk.
// Guest writes are still accepted into the page cache, as QEMU accepts
// them: reads see them, and the guest learns from its failing FLUSH (most
// filesystems then stop or go read-only). An allocating write that needs an
// L2 slice written back fails, since that needs a sync. Reopening the image
// clears the error; what is on disk then is what a crash would have left.
func (img *Image) sync() error {
	if img.syncErr != nil {
		return img.syncErr
	}
	img.syncMu.Lock()
	defer img.syncMu.Unlock()
	if img.extensionErr != nil {
		img.syncErr = img.extensionErr
		return img.syncErr
	}
	img.unsynced.Store(false)
	if err := img.f.Sync(); err != nil {
		img.unsynced.Store(true)
		img.syncErr = fmt.Errorf("%w: %w", ErrSyncFailed, err)
		return img.syncErr
	}
	img.punchesSynced()
	return nil
}

// Size returns the virtual disk size in bytes.
func (img *Image) Size() int64 {
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.size
}

// Info describes the image.
func (img *Image) Info() Info {
	img.mu.Lock()
	defer img.mu.Unlock()
	h := img.h
	info := Info{
		VirtualSize:     img.size,
		ClusterSize:     int(img.clusterSize),
		Version:         int(h.version),
		Compat:          "1.1",
		RefcountBits:    1 << img.rcOrder,
		LazyRefcounts:   h.compatible&compatLazyRefcounts != 0,
		Corrupt:         h.incompatible&incompatCorrupt != 0,
		Dirty:           h.incompatible&incompatDirty != 0,
		CompressionType: "zlib",
		BackingFile:     h.backingFile,
		BackingFormat:   h.backingFormat,
		Snapshots:       img.snapshotInfos(),
	}
	if h.version == 2 {
		info.Compat = "0.10"
	}
	if h.compressionType == CompressionZstd {
		info.CompressionType = "zstd"
	}
	return info
}

func (img *Image) checkOpen(write bool) error {
	switch {
	case img.closed.Load():
		return ErrClosed
	case write && img.readOnly:
		return ErrReadOnly
	}
	return nil
}
