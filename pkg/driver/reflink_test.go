package driver

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"unsafe"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// TestCloneReflinkXFS runs CreateVolume's reflink path (FICLONE, then
// trimClone) for real: a clone and a restore on an XFS with reflink, on a
// loop mount made for the test. TestTrimClone covers trimClone on a plain
// copy; here the clone must share the source's data extents (FIEMAP says
// so, and the filesystem's used space hardly grows) and read back what the
// source held, with no snapshot left and a clean check.
//
// It needs root, mkfs.xfs and loop devices. Without them it skips, except
// with CI=true as root, where a missing mkfs.xfs (xfsprogs, installed by
// hack/install-deps.sh) or a failed loop mount fails it. Unprivileged it
// always skips: mounting is not something an unprivileged CI can do.
func TestCloneReflinkXFS(t *testing.T) {
	dir := xfsLoopMount(t, true)
	d := newBareDriver(t, filepath.Join(dir, "data"))
	ctx := context.Background()
	const size, data = 64 << 20, 32 << 20

	src := mustCreateVolume(t, d, createReq("src", size, nil))
	old := randomBytes(data, 1)
	writeVolume(t, d, src, old, 0)
	snap, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap", SourceVolumeId: src})
	if err != nil {
		t.Fatal(err)
	}
	cur := bytes.Clone(old)
	copy(cur[4<<20:], randomBytes(1<<20, 2)) // the snapshot keeps the old MiB
	writeVolume(t, d, src, cur[4<<20:5<<20], 4<<20)

	syncFS(t, dir)
	before := usedBytes(t, dir)
	clone := mustCreateVolume(t, d, withSource(createReq("clone", size, nil), volumeSource(src)))
	restored := mustCreateVolume(t, d, withSource(createReq("restored", size, nil), snapshotSource(snap.GetSnapshot().GetSnapshotId())))
	syncFS(t, dir)
	grew := usedBytes(t, dir) - before

	for _, tt := range []struct {
		id   string
		want []byte
	}{{clone, cur}, {restored, old}} {
		p := d.store.imagePath(tt.id)
		shared, total := fiemapShared(t, p)
		if shared < data*3/4 {
			t.Errorf("%s: %d of %d bytes share extents with the source, want at least %d: not a reflink", tt.id, shared, total, data*3/4)
		}
		img, err := qcow2.Open(p, qcow2.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, size)
		_, err = img.ReadAt(got, 0)
		if n := len(img.Snapshots()); n != 0 {
			t.Errorf("%s keeps %d snapshots", tt.id, n)
		}
		img.Close()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got[:data], tt.want) || !bytes.Equal(got[data:], make([]byte, size-data)) {
			t.Errorf("%s: content differs from its source", tt.id)
		}
		if r, err := qcow2.CheckFile(p, qcow2.CheckOptions{}); err != nil || !r.Clean() {
			t.Errorf("%s: check: %v %+v", tt.id, err, r)
		}
	}
	// Two copies would take 2 x 32 MiB; the clones rewrite only metadata
	// (refcounts, the header, the snapshot table), copied on write.
	if grew > data/2 {
		t.Errorf("the filesystem's used space grew by %d bytes for two clones of %d bytes of data", grew, data)
	}
	t.Logf("two clones of %d MiB of data: used space grew by %d KiB", data>>20, grew>>10)
}

// xfsLoopMount mounts a fresh 1 GiB XFS (reflink=1 or reflink=0) from a
// sparse file in a temporary directory and returns the mount point; it is
// unmounted at cleanup. See TestCloneReflinkXFS for when it skips.
func xfsLoopMount(tb testing.TB, reflink bool) string {
	tb.Helper()
	ci := os.Getenv("CI") == "true"
	if os.Geteuid() != 0 {
		tb.Skip("needs root to mount an XFS loop image")
	}
	if _, err := exec.LookPath("mkfs.xfs"); err != nil {
		if ci {
			tb.Fatalf("mkfs.xfs is required in CI (xfsprogs, hack/install-deps.sh): %v", err)
		}
		tb.Skipf("mkfs.xfs not installed (xfsprogs): %v", err)
	}
	dir := tb.TempDir()
	img, mnt := filepath.Join(dir, "xfs.img"), filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := os.Truncate(img, 1<<30); err != nil {
		tb.Fatal(err)
	}
	rl := "reflink=0"
	if reflink {
		rl = "reflink=1"
	}
	if out, err := exec.Command("mkfs.xfs", "-q", "-m", rl, img).CombinedOutput(); err != nil {
		tb.Fatalf("mkfs.xfs: %v\n%s", err, out)
	}
	if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		if ci {
			tb.Fatalf("mount -o loop (CI runs as root and must have loop devices): %v\n%s", err, out)
		}
		tb.Skipf("mount -o loop: %v\n%s", err, out)
	}
	tb.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			tb.Errorf("umount %s: %v\n%s", mnt, err, out)
		}
	})
	return mnt
}

// newBareDriver is a driver over dataDir with the fakes at the OS boundary,
// called directly rather than over gRPC.
func newBareDriver(tb testing.TB, dataDir string) *Driver {
	tb.Helper()
	opts := DefaultOptions()
	opts.Endpoint = "unix://" + filepath.Join(dataDir, "csi.sock")
	opts.NodeID = "node-1"
	opts.DataDir = dataDir
	d, err := New(opts, newFakeMounter(), newFakeAttacher())
	if err != nil {
		tb.Fatal(err)
	}
	return d
}

func mustCreateVolume(tb testing.TB, d *Driver, req *csi.CreateVolumeRequest) string {
	tb.Helper()
	resp, err := d.CreateVolume(context.Background(), req)
	if err != nil {
		tb.Fatalf("CreateVolume(%s): %v", req.GetName(), err)
	}
	return resp.GetVolume().GetVolumeId()
}

func withSource(req *csi.CreateVolumeRequest, src *csi.VolumeContentSource) *csi.CreateVolumeRequest {
	req.VolumeContentSource = src
	return req
}

func volumeSource(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
		Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
}

func snapshotSource(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}
}

// writeVolume writes b at off into volume id's image, which nobody else
// has open, and closes it (flushed).
func writeVolume(tb testing.TB, d *Driver, id string, b []byte, off int64) {
	tb.Helper()
	img, err := qcow2.Open(d.store.imagePath(id), qcow2.OpenOptions{})
	if err != nil {
		tb.Fatal(err)
	}
	const chunk = 1 << 20
	for i := 0; i < len(b); i += chunk {
		if _, err := img.WriteAt(b[i:min(i+chunk, len(b))], off+int64(i)); err != nil {
			img.Close()
			tb.Fatal(err)
		}
	}
	if err := img.Close(); err != nil {
		tb.Fatal(err)
	}
}

// randomBytes is n bytes of a seeded pseudo-random stream.
func randomBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	r.Read(b)
	return b
}

func syncFS(tb testing.TB, path string) {
	tb.Helper()
	f, err := os.Open(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		tb.Fatal(err)
	}
}

func usedBytes(tb testing.TB, path string) int64 {
	tb.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		tb.Fatal(err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

// FIEMAP (linux/fiemap.h): struct fiemap is a 32-byte header followed by
// fm_extent_count 56-byte struct fiemap_extent.
const (
	fsIocFiemap        = 0xC020660B // _IOWR('f', 11, struct fiemap)
	fiemapFlagSync     = 0x1
	fiemapExtentLast   = 0x1
	fiemapExtentShared = 0x2000
	fiemapHeaderLen    = 32
	fiemapExtentLen    = 56
)

// fiemapShared returns how many bytes of path's extents are shared with
// another file (FIEMAP_EXTENT_SHARED), and how many are mapped at all.
func fiemapShared(tb testing.TB, path string) (shared, total int64) {
	tb.Helper()
	f, err := os.Open(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	const count = 256
	buf := make([]uint64, (fiemapHeaderLen+count*fiemapExtentLen)/8)
	raw := unsafe.Slice((*byte)(unsafe.Pointer(&buf[0])), len(buf)*8)
	le := func(off int) uint64 { return *(*uint64)(unsafe.Pointer(&raw[off])) }
	u32 := func(off int) uint32 { return *(*uint32)(unsafe.Pointer(&raw[off])) }
	for start := uint64(0); ; {
		clear(buf)
		buf[0], buf[1] = start, ^uint64(0) // fm_start, fm_length
		*(*uint32)(unsafe.Pointer(&raw[16])) = fiemapFlagSync
		*(*uint32)(unsafe.Pointer(&raw[24])) = count // fm_extent_count
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
			tb.Fatalf("FIEMAP %s: %v", path, errno)
		}
		n := int(u32(20)) // fm_mapped_extents
		if n == 0 {
			return shared, total
		}
		for i := range n {
			e := fiemapHeaderLen + i*fiemapExtentLen
			logical, length, flags := le(e), le(e+16), u32(e+40)
			total += int64(length)
			if flags&fiemapExtentShared != 0 {
				shared += int64(length)
			}
			start = logical + length
			if flags&fiemapExtentLast != 0 {
				return shared, total
			}
		}
	}
}
