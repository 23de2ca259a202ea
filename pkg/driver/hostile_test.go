package driver

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// outsideFile is a file outside the data dir that a planted link points
// at, and a check that nothing wrote to it or removed it.
type outsideFile struct {
	path string
	data []byte
	mod  time.Time
}

func plantOutside(t *testing.T, e *testEnv, name string, data []byte) *outsideFile {
	t.Helper()
	p := filepath.Join(filepath.Dir(e.opts.DataDir), name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return &outsideFile{path: p, data: data, mod: fi.ModTime()}
}

func (o *outsideFile) untouched(t *testing.T) {
	t.Helper()
	b, err := os.ReadFile(o.path)
	if err != nil {
		t.Fatalf("the file outside the data dir: %v", err)
	}
	fi, _ := os.Stat(o.path)
	if !bytes.Equal(b, o.data) || !fi.ModTime().Equal(o.mod) {
		t.Fatalf("the file outside the data dir was written")
	}
}

// replaceWithLink replaces path with a symlink to target.
func replaceWithLink(t *testing.T, path, target string) {
	t.Helper()
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
}

// TestPlantedSymlinks: a symlink planted in place of a volume's image or
// metadata is refused with FailedPrecondition by every call that would open
// it, and the file it points at (a valid image or metadata, so following
// the link would have worked) is never read into a reply, written or
// removed. Deleting the volume removes the link, not its target.
func TestPlantedSymlinks(t *testing.T) {
	ctx := context.Background()
	type call struct {
		name string
		run  func(e *testEnv, id string) error
	}
	calls := []call{
		{"NodeStageVolume", func(e *testEnv, id string) error {
			_, err := e.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
				VolumeId: id, StagingTargetPath: e.stagingPath(id), VolumeCapability: rwo})
			return err
		}},
		{"CreateSnapshot", func(e *testEnv, id string) error {
			_, err := e.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s-" + id, SourceVolumeId: id})
			return err
		}},
		{"CreateVolume from it", func(e *testEnv, id string) error {
			req := createReq("clone-"+id, 4<<20, nil)
			req.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
				Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
			_, err := e.ctrl.CreateVolume(ctx, req)
			return err
		}},
	}
	for _, tc := range []struct {
		name  string
		plant func(t *testing.T, e *testEnv, id string) *outsideFile
		also  []call // calls that only the metadata link breaks
	}{
		{"image", func(t *testing.T, e *testEnv, id string) *outsideFile {
			p := e.d.store.imagePath(id)
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			o := plantOutside(t, e, "outside.qcow2", b)
			replaceWithLink(t, p, o.path)
			return o
		}, nil},
		{"metadata", func(t *testing.T, e *testEnv, id string) *outsideFile {
			p, _ := e.d.store.metaPath("volumes", id)
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			o := plantOutside(t, e, "outside.json", b)
			replaceWithLink(t, p, o.path)
			return o
		}, []call{{"ControllerGetVolume", func(e *testEnv, id string) error {
			_, err := e.ctrl.ControllerGetVolume(ctx, &csi.ControllerGetVolumeRequest{VolumeId: id})
			return err
		}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newTestEnv(t)
			id := e.mustCreate(t, createReq("v", 4<<20, nil)).GetVolumeId()
			o := tc.plant(t, e, id)
			for _, c := range append(calls, tc.also...) {
				err := c.run(e, id)
				if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "symlink") {
					t.Errorf("%s with a planted %s link: %v, want FailedPrecondition naming the symlink", c.name, tc.name, err)
				}
			}
			if e.attacher.count() != 0 {
				t.Errorf("a device was attached")
			}
			o.untouched(t)
			if _, err := e.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
				t.Fatalf("DeleteVolume: %v", err)
			}
			o.untouched(t)
		})
	}
}

// TestPlantedSpecialFiles: a FIFO as metadata is refused, not waited on;
// an image naming a backing file is refused, not followed.
func TestPlantedSpecialFiles(t *testing.T) {
	ctx := context.Background()
	e := newTestEnv(t)
	id := e.mustCreate(t, createReq("fifo", 4<<20, nil)).GetVolumeId()
	p, _ := e.d.store.metaPath("volumes", id)
	os.Remove(p)
	if err := syscall.Mkfifo(p, 0o600); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := e.ctrl.ControllerGetVolume(cctx, &csi.ControllerGetVolumeRequest{VolumeId: id})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "FIFO") {
		t.Errorf("ControllerGetVolume with a FIFO as metadata: %v, want FailedPrecondition", err)
	}

	id = e.mustCreate(t, createReq("backed", 4<<20, nil)).GetVolumeId()
	o := plantOutside(t, e, "secret.raw", bytes.Repeat([]byte("secret"), 1000))
	os.Remove(e.d.store.imagePath(id))
	img, err := qcow2.Create(e.d.store.imagePath(id), qcow2.CreateOptions{Size: 4 << 20, BackingFile: o.path, BackingFormat: "raw"})
	if err != nil {
		t.Fatal(err)
	}
	img.Close()
	_, err = e.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
		VolumeId: id, StagingTargetPath: e.stagingPath(id), VolumeCapability: rwo})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "backing file") {
		t.Errorf("NodeStageVolume of an image with a backing file: %v, want FailedPrecondition", err)
	}
	o.untouched(t)
}

// TestDataDirSymlinks: a data dir whose volumes/, snapshots/ or staged/ is
// a symlink (to a directory outside) is refused at startup.
func TestDataDirSymlinks(t *testing.T) {
	for _, sub := range []string{"volumes", "snapshots", "staged"} {
		t.Run(sub, func(t *testing.T) {
			dir := t.TempDir()
			outside := filepath.Join(dir, "outside")
			data := filepath.Join(dir, "data")
			for _, d := range []string{outside, data} {
				if err := os.Mkdir(d, 0o700); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.Symlink(outside, filepath.Join(data, sub)); err != nil {
				t.Fatal(err)
			}
			opts := DefaultOptions()
			opts.Endpoint = "unix://" + dir + "/csi.sock"
			opts.NodeID = "node-1"
			opts.DataDir = data
			_, err := New(opts, newFakeMounter(), newFakeAttacher())
			if err == nil || !strings.Contains(err.Error(), "is a symlink") {
				t.Fatalf("New with %s a symlink: %v, want an error", sub, err)
			}
			if ents, _ := os.ReadDir(outside); len(ents) != 0 {
				t.Fatalf("files created outside the data dir: %v", ents)
			}
		})
	}
}

// TestFileModes: images and metadata are 0600, the data dir's directories
// 0700, and the CSI socket is not writable by others even under umask 0.
func TestFileModes(t *testing.T) {
	old := syscall.Umask(0)
	e := newTestEnv(t)
	syscall.Umask(old)
	ctx := context.Background()
	id := e.mustCreate(t, createReq("v", 4<<20, nil)).GetVolumeId()
	clone := createReq("clone", 4<<20, nil)
	clone.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
		Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
	cloneID := e.mustCreate(t, clone).GetVolumeId()
	if _, err := e.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: id}); err != nil {
		t.Fatal(err)
	}
	e.stage(t, id, rwo)
	defer e.unstage(t, id)
	err := filepath.Walk(e.opts.DataDir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		want := os.FileMode(0o600)
		if fi.IsDir() {
			want = 0o700
		}
		if p != e.opts.DataDir && fi.Mode().Perm() != want {
			t.Errorf("%s: mode %v, want %v", p, fi.Mode().Perm(), want)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{e.d.store.imagePath(id), e.d.store.imagePath(cloneID)} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("walk missed %s: %v", p, err)
		}
	}
	sock := strings.TrimPrefix(e.opts.Endpoint, "unix://")
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != socketMode || fi.Mode().Perm()&0o002 != 0 {
		t.Errorf("CSI socket %s: mode %v, want %v", sock, fi.Mode(), os.FileMode(socketMode)|os.ModeSocket)
	}
}
