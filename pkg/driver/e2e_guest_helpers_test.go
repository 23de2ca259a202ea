package driver_test

// Helpers of the guest end-to-end tests (e2e_guest_test.go): the driver as
// a child process, a CSI client over its socket, files and mounts.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// e2eDriverEnv names the csi-qcow2 binary the guest e2e runs; without it
// the tests skip (they need root, /dev/nbdX and mkfs: hack/vm/e2e-driver.sh).
// e2eDriverArgsEnv adds flags to it, separated by spaces (e.g.
// --nbd-connections=2).
const (
	e2eDriverEnv     = "CSI_QCOW2_E2E_DRIVER"
	e2eDriverArgsEnv = "CSI_QCOW2_E2E_DRIVER_ARGS"
)

// e2e is one guest run: a work dir (data dir, socket, mount points), the
// driver process and clients to it.
type e2e struct {
	t    *testing.T
	bin  string
	dir  string
	data string
	sock string
	log  *os.File
	cmd  *exec.Cmd
	// dmesgAt is the kernel log's length when the test began.
	dmesgAt int
	conn    *grpc.ClientConn
	ctl     csi.ControllerClient
	node    csi.NodeClient
}

func newE2E(t *testing.T) *e2e {
	bin := os.Getenv(e2eDriverEnv)
	if bin == "" {
		t.Skipf("%s is not set: the guest e2e runs in hack/vm (hack/vm/e2e-driver.sh)", e2eDriverEnv)
	}
	dir := t.TempDir()
	e := &e2e{t: t, bin: bin, dir: dir, data: filepath.Join(dir, "data"), sock: filepath.Join(dir, "csi.sock")}
	log, err := os.Create(filepath.Join(dir, "driver.log"))
	if err != nil {
		t.Fatal(err)
	}
	e.log = log
	e.dmesgAt = len(dmesg(t))
	t.Cleanup(func() {
		e.stop()
		if t.Failed() {
			b, _ := os.ReadFile(log.Name())
			t.Logf("driver log:\n%s", b)
		}
		log.Close()
	})
	e.start()
	return e
}

// start runs the driver and connects to it.
func (e *e2e) start() {
	e.t.Helper()
	args := []string{"--endpoint", "unix://" + e.sock, "--node-id", "guest", "--data-dir", e.data,
		"--nbd-dead-conn-timeout", "60s"}
	e.cmd = exec.Command(e.bin, append(args, strings.Fields(os.Getenv(e2eDriverArgsEnv))...)...)
	e.cmd.Stdout, e.cmd.Stderr = e.log, e.log
	_ = os.Remove(e.sock) // a killed driver leaves its socket; wait for the new one
	if err := e.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	for i := 0; ; i++ {
		if _, err := os.Stat(e.sock); err == nil {
			break
		}
		if i > 300 {
			e.t.Fatal("the driver did not listen in 30 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix://"+e.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		e.t.Fatal(err)
	}
	e.conn, e.ctl, e.node = conn, csi.NewControllerClient(conn), csi.NewNodeClient(conn)
}

// stop ends the driver with SIGTERM (it flushes and exits; devices stay).
func (e *e2e) stop() {
	if e.cmd == nil {
		return
	}
	e.conn.Close()
	_ = e.cmd.Process.Signal(unix.SIGTERM)
	_ = e.cmd.Wait()
	e.cmd = nil
}

// kill ends the driver with SIGKILL, as a crash or an OOM kill would.
func (e *e2e) kill() {
	e.conn.Close()
	if err := e.cmd.Process.Kill(); err != nil {
		e.t.Fatal(err)
	}
	_ = e.cmd.Wait()
	e.cmd = nil
}

func (e *e2e) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	e.t.Cleanup(cancel)
	return ctx
}

func mountCap(fsType string) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fsType}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

// createVolume creates a volume of size bytes with fsType; src, if not nil,
// is its content source. It returns the volume id.
func (e *e2e) createVolume(name string, size int64, fsType string, src *csi.VolumeContentSource) string {
	e.t.Helper()
	r, err := e.ctl.CreateVolume(e.ctx(), &csi.CreateVolumeRequest{
		Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities:  []*csi.VolumeCapability{mountCap(fsType)},
		Parameters:          map[string]string{"csi.storage.k8s.io/fstype": fsType},
		VolumeContentSource: src,
	})
	if err != nil {
		e.t.Fatalf("CreateVolume %s: %v", name, err)
	}
	return r.GetVolume().GetVolumeId()
}

func (e *e2e) stagingPath(id string) string { return filepath.Join(e.dir, "staging", id) }
func (e *e2e) targetPath(id string) string  { return filepath.Join(e.dir, "target", id) }

// stagePublish stages the volume and publishes it; it returns the target.
func (e *e2e) stagePublish(id, fsType string) string {
	e.t.Helper()
	start := time.Now()
	if _, err := e.node.NodeStageVolume(e.ctx(), &csi.NodeStageVolumeRequest{
		VolumeId: id, StagingTargetPath: e.stagingPath(id), VolumeCapability: mountCap(fsType)}); err != nil {
		e.t.Fatalf("NodeStageVolume %s: %v", id, err)
	}
	if _, err := e.node.NodePublishVolume(e.ctx(), &csi.NodePublishVolumeRequest{
		VolumeId: id, StagingTargetPath: e.stagingPath(id), TargetPath: e.targetPath(id),
		VolumeCapability: mountCap(fsType)}); err != nil {
		e.t.Fatalf("NodePublishVolume %s: %v", id, err)
	}
	e.t.Logf("staged and published %s (%s) in %v: %s", id, fsType, time.Since(start).Round(time.Millisecond), mountLine(e.t, e.stagingPath(id)))
	return e.targetPath(id)
}

func (e *e2e) unpublishUnstage(id string) {
	e.t.Helper()
	if _, err := e.node.NodeUnpublishVolume(e.ctx(), &csi.NodeUnpublishVolumeRequest{
		VolumeId: id, TargetPath: e.targetPath(id)}); err != nil {
		e.t.Fatalf("NodeUnpublishVolume %s: %v", id, err)
	}
	if _, err := e.node.NodeUnstageVolume(e.ctx(), &csi.NodeUnstageVolumeRequest{
		VolumeId: id, StagingTargetPath: e.stagingPath(id)}); err != nil {
		e.t.Fatalf("NodeUnstageVolume %s: %v", id, err)
	}
}

// checkImage runs `csi-qcow2 image check` on a detached volume's image.
func (e *e2e) checkImage(id string) {
	e.t.Helper()
	out, err := exec.Command(e.bin, "image", "check", filepath.Join(e.data, "volumes", id+".qcow2")).CombinedOutput()
	if err != nil {
		e.t.Errorf("image check %s: %v\n%s", id, err, out)
		return
	}
	e.t.Logf("image check %s: %s", id, strings.TrimSpace(strings.ReplaceAll(string(out), "\n", "; ")))
}

// stats is NodeGetVolumeStats: total bytes and total inodes.
func (e *e2e) stats(id, path string) (bytes, inodes int64) {
	e.t.Helper()
	r, err := e.node.NodeGetVolumeStats(e.ctx(), &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: path})
	if err != nil {
		e.t.Fatalf("NodeGetVolumeStats %s: %v", id, err)
	}
	for _, u := range r.GetUsage() {
		switch u.GetUnit() {
		case csi.VolumeUsage_BYTES:
			bytes = u.GetTotal()
		case csi.VolumeUsage_INODES:
			inodes = u.GetTotal()
		}
	}
	if bytes <= 0 || inodes <= 0 {
		e.t.Errorf("NodeGetVolumeStats %s = %v: want bytes and inodes", id, r.GetUsage())
	}
	return bytes, inodes
}

// files maps a file name to its content.
type files map[string][]byte

// writeFiles writes random files into dir without fsync: what reaches the
// image is up to the driver (the freeze of a snapshot) and the kernel.
func writeFiles(t *testing.T, dir string, sizes map[string]int) files {
	t.Helper()
	fs := files{}
	for name, n := range sizes {
		b := make([]byte, n)
		rand.Read(b)
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatalf("write %s: %v", name, err)
		}
		fs[name] = b
	}
	return fs
}

// checkFiles asserts that dir holds want and none of absent.
func checkFiles(t *testing.T, dir string, want files, absent files) {
	t.Helper()
	for name, b := range want {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Errorf("%s: %v", filepath.Join(dir, name), err)
		} else if !bytes.Equal(got, b) {
			t.Errorf("%s: sha256 %x, want %x", filepath.Join(dir, name), sha256.Sum256(got), sha256.Sum256(b))
		}
	}
	for name := range absent {
		if _, err := os.Stat(filepath.Join(dir, name)); !os.IsNotExist(err) {
			t.Errorf("%s exists (err %v); it was written after the snapshot", filepath.Join(dir, name), err)
		}
	}
}

// writeSync writes a file and fsyncs it and its directory.
func writeSync(path string, b []byte) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func statfsBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * st.Bsize
}

// mountLine is path's line of /proc/mounts, "" if it is not mounted.
func mountLine(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/mounts")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 3 && f[1] == path {
			return l
		}
	}
	return ""
}

// mountedRW asserts that path is mounted read-write.
func mountedRW(t *testing.T, path string) {
	t.Helper()
	l := mountLine(t, path)
	f := strings.Fields(l)
	if len(f) < 4 || !strings.HasPrefix(f[3]+",", "rw,") {
		t.Errorf("%s: mount %q, want mounted read-write", path, l)
	}
}

// dmesg returns the kernel log.
func dmesg(t *testing.T) []string {
	t.Helper()
	out, err := exec.Command("dmesg").Output()
	if err != nil {
		t.Fatalf("dmesg: %v", err)
	}
	return strings.Split(strings.TrimSpace(string(out)), "\n")
}

// kernelErrors are the lines of log that tell of I/O errors or a
// filesystem gone read-only or shut down.
func kernelErrors(log []string) []string {
	var bad []string
	for _, l := range log {
		for _, s := range []string{"I/O error", "error", "read-only", "Remounting", "shut down", "shutting down filesystem", "Buffer I/O", "timed out"} {
			if strings.Contains(l, s) {
				bad = append(bad, l)
				break
			}
		}
	}
	return bad
}

func mib(n int64) int64 { return n << 20 }

func sizeStr(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }
