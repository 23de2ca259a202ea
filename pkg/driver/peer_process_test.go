package driver

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// processEnv makes this test binary a driver process: with it set,
// TestMain runs Run with the driver's flags from the arguments instead of
// the tests, as cmd/csi-qcow2 would.
const processEnv = "CSI_QCOW2_TEST_DRIVER_PROCESS"

func TestMain(m *testing.M) {
	if os.Getenv(processEnv) == "1" {
		os.Exit(runDriverProcess(os.Args[1:]))
	}
	os.Exit(m.Run())
}

func runDriverProcess(args []string) int {
	opts := DefaultOptions()
	fs := pflag.NewFlagSet("driver", pflag.ContinueOnError)
	opts.AddFlags(fs)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if err := opts.Validate(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if err := Run(ctx, opts); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// driverProcess is one node: a driver process with its own data dir, CSI
// socket and peer service on a loopback port.
type driverProcess struct {
	t         *testing.T
	name, dir string
	args      []string
	cmd       *exec.Cmd
	peer      string // the peer service's address once it serves
	ctl       csi.ControllerClient
	conn      *grpc.ClientConn
	mu        sync.Mutex
	log       bytes.Buffer // every run's stderr
}

var peerServing = regexp.MustCompile(`"Serving the peer service over mutual TLS" address="([^"]+)"`)

// startDriverProcess starts node name with the peer files of ca, asking
// peers; it returns once the peer service serves.
func startDriverProcess(t *testing.T, ca *testCA, name, peers string) *driverProcess {
	cert, key, caFile := peerFiles(t, ca, name)
	dir := t.TempDir()
	p := &driverProcess{t: t, name: name, dir: dir, args: []string{
		"--endpoint", "unix://" + filepath.Join(dir, "csi.sock"), "--node-id", name,
		"--data-dir", filepath.Join(dir, "data"), "--peer-tls-cert", cert, "--peer-tls-key", key,
		"--peer-ca", caFile, "--peers", peers}}
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			p.mu.Lock()
			t.Logf("%s's log:\n%s", name, p.log.String())
			p.mu.Unlock()
		}
	})
	p.start("127.0.0.1:0")
	return p
}

// start runs the process with its peer service on addr.
func (p *driverProcess) start(addr string) {
	p.t.Helper()
	p.cmd = exec.Command(os.Args[0], append(p.args, "--peer-address", addr)...)
	p.cmd.Env = append(os.Environ(), processEnv+"=1")
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		p.t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	serving := make(chan string, 1)
	go func() {
		s := bufio.NewScanner(stderr)
		for s.Scan() {
			p.mu.Lock()
			p.log.WriteString(p.name + ": " + s.Text() + "\n")
			p.mu.Unlock()
			if m := peerServing.FindStringSubmatch(s.Text()); m != nil {
				serving <- m[1]
			}
		}
	}()
	select {
	case p.peer = <-serving:
	case <-time.After(30 * time.Second):
		p.t.Fatalf("%s: no peer service in 30 s", p.name)
	}
	p.conn, err = grpc.NewClient("unix://"+filepath.Join(p.dir, "csi.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		p.t.Fatal(err)
	}
	p.ctl = csi.NewControllerClient(p.conn)
}

// kill ends the process with SIGKILL, as a node's crash or an OOM kill would.
func (p *driverProcess) kill() {
	if p.cmd == nil {
		return
	}
	p.conn.Close()
	_ = p.cmd.Process.Kill()
	_ = p.cmd.Wait()
	p.cmd = nil
}

// restart starts the process again on the same data dir and peer address.
func (p *driverProcess) restart() {
	p.t.Helper()
	p.kill()
	p.start(p.peer)
}

func (p *driverProcess) images() []string {
	left, _ := filepath.Glob(filepath.Join(p.dir, "data", "volumes", "*.qcow2*"))
	return left
}

// tmpImages are the images of copies in flight or left behind.
func (p *driverProcess) tmpImages() []string {
	left, _ := filepath.Glob(filepath.Join(p.dir, "data", "volumes", "*.tmp"))
	return left
}

// copyProgress matches CreateVolume's answer while a copy runs.
var copyProgress = regexp.MustCompile(`in progress, ([0-9]+) of [0-9]+ bytes`)

// whenCopying calls CreateVolume on p until its copy has written some
// bytes; it fails the test if the copy ends first.
func (p *driverProcess) whenCopying(req *csi.CreateVolumeRequest) {
	p.t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		_, err := p.ctl.CreateVolume(context.Background(), req)
		if m := copyProgress.FindStringSubmatch(status.Convert(err).Message()); m != nil && m[1] != "0" {
			return
		}
		if status.Code(err) != codes.Unavailable {
			p.t.Fatalf("%s: CreateVolume = %v; want a copy in progress", p.name, err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	p.t.Fatalf("%s: the copy wrote nothing in a minute", p.name)
}

// createUntil retries CreateVolume on p while it answers Unavailable and
// done says go on.
func (p *driverProcess) createUntil(req *csi.CreateVolumeRequest, done func(error) bool) (*csi.Volume, error) {
	p.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		resp, err := p.ctl.CreateVolume(context.Background(), req)
		if status.Code(err) != codes.Unavailable || done(err) || time.Now().After(deadline) {
			return resp.GetVolume(), err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func never(error) bool { return false }

func copyFailed(err error) bool { return err != nil && strings.Contains(err.Error(), "failed") }

// processSource is node a's source: a volume with 1 MiB of byte k+1 at
// every k*2 MiB, and a snapshot of it.
func processSource(t *testing.T, a *driverProcess, size int64) (vol, snap string) {
	t.Helper()
	r, err := a.ctl.CreateVolume(context.Background(), createReq("src", size, nil))
	if err != nil {
		t.Fatal(err)
	}
	vol = r.GetVolume().GetVolumeId()
	img, err := qcow2.Open(filepath.Join(a.dir, "data", "volumes", vol+imageExt), qcow2.OpenOptions{Lock: true})
	if err != nil {
		t.Fatal(err)
	}
	for k := int64(0); k*2<<20 < size; k++ {
		if _, err := img.WriteAt(bytes.Repeat([]byte{byte(k + 1)}, 1<<20), k*2<<20); err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	s, err := a.ctl.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: "snap", SourceVolumeId: vol})
	if err != nil {
		t.Fatal(err)
	}
	return vol, s.GetSnapshot().GetSnapshotId()
}

// checkProcessCopy reads volume id on p as processSource wrote it.
func checkProcessCopy(t *testing.T, p *driverProcess, id string, size int64) {
	t.Helper()
	img, err := qcow2.Open(filepath.Join(p.dir, "data", "volumes", id+imageExt), qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	buf := make([]byte, 2<<20)
	for k := int64(0); k*2<<20 < size; k++ {
		if _, err := img.ReadAt(buf, k*2<<20); err != nil {
			t.Fatal(err)
		}
		if buf[0] != byte(k+1) || buf[1<<20-1] != byte(k+1) || !allZero(buf[1<<20:]) {
			t.Fatalf("%s's copy at %d MiB differs from the source", p.name, k*2)
		}
	}
}

// killHolderMidCopy SIGKILLs a while b copies req from it: b's copy fails
// with its reason and leaves no image behind.
func killHolderMidCopy(t *testing.T, a, b *driverProcess, req *csi.CreateVolumeRequest) {
	t.Helper()
	b.whenCopying(req)
	a.kill()
	if _, err := b.createUntil(req, copyFailed); status.Code(err) != codes.Unavailable || !copyFailed(err) {
		t.Fatalf("CreateVolume(%s) once the holder is gone = %v; want Unavailable, copy failed", req.GetName(), err)
	}
	if left := b.tmpImages(); len(left) != 0 {
		t.Errorf("left in node b's data dir by the failed copy: %v", left)
	}
	if _, err := os.Stat(filepath.Join(b.dir, "data", "volumes", volumeIDFor(req.GetName())+imageExt)); err == nil {
		t.Errorf("node b has an image of %s after its copy failed", req.GetName())
	}
}

// copiedWhole retries req on b until its copy is done and checks the
// copy; it returns the new volume's id.
func copiedWhole(t *testing.T, b *driverProcess, req *csi.CreateVolumeRequest, size int64) string {
	t.Helper()
	v, err := b.createUntil(req, never)
	if err != nil {
		t.Fatalf("CreateVolume(%s) once both nodes are up: %v", req.GetName(), err)
	}
	checkProcessCopy(t, b, v.GetVolumeId(), size)
	return v.GetVolumeId()
}

// TestCrossNodeProcesses: two driver processes, each with its own data
// dir and its peer service on a loopback port, play two nodes. Node b
// restores and clones node a's snapshot and volume, and each side is
// SIGKILLed in the middle of a copy: the copy fails with its reason (or
// dies with its process) and leaves nothing in b's data dir, a clone's
// temporary snapshot is gone from a's image once a is back, and the
// provisioner's next retries copy the source whole.
func TestCrossNodeProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("starts driver processes and copies 512 MiB several times")
	}
	const size = 1 << 30
	ca := newTestCA(t, "peer-ca")
	a := startDriverProcess(t, ca, "node-a", "")
	b := startDriverProcess(t, ca, "node-b", a.peer)
	vol, snap := processSource(t, a, size)

	t.Log("the holder, node a, is killed mid-restore")
	restore := restoreReq("restored", snap, size)
	killHolderMidCopy(t, a, b, restore)
	a.restart()
	v := copiedWhole(t, b, restore, size)

	t.Log("the holder is killed mid-clone: its temporary snapshot is dropped when it is back")
	clone := cloneReq("cloned", vol, size)
	killHolderMidCopy(t, a, b, clone)
	a.restart()
	img, err := qcow2.Open(filepath.Join(a.dir, "data", "volumes", vol+imageExt), qcow2.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if s := img.Snapshots(); len(s) != 1 {
		t.Errorf("node a's volume has %d snapshots after its restart; want the one CreateSnapshot took", len(s))
	}
	img.Close()
	c := copiedWhole(t, b, clone, size)

	t.Log("the receiver, node b, is killed mid-restore")
	again := restoreReq("restored-2", snap, size)
	b.whenCopying(again)
	b.restart()
	if left := b.tmpImages(); len(left) != 0 {
		t.Errorf("node b kept a copy's image from before its restart: %v", left)
	}
	v2 := copiedWhole(t, b, again, size)
	for _, id := range []string{v, c, v2} {
		if _, err := b.ctl.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Error(err)
		}
	}
	if left := b.images(); len(left) != 0 {
		t.Errorf("left in node b's data dir after deleting every copy: %v", left)
	}
}
