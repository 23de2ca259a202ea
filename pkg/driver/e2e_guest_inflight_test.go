package driver_test

// TestGuestE2ERestartInFlight: the driver is SIGKILLed, round after round,
// while writers fsync records on mounted ext4 and xfs volumes, and is
// started again each time. Runs in the hack/vm guest (hack/vm/e2e-driver.sh).

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

// Environment of TestGuestE2ERestartInFlight: the number of kills (default
// defaultRestartRounds), the seed of the delays (logged, to replay a run),
// and a directory to copy the images into for qemu-img check on the host
// (hack/vm/e2e-driver.sh shares one).
const (
	restartRoundsEnv = "CSI_QCOW2_E2E_RESTART_ROUNDS"
	restartSeedEnv   = "CSI_QCOW2_E2E_RESTART_SEED"
	e2eOutEnv        = "CSI_QCOW2_E2E_OUT"
)

// A kill usually stalls the writers about 5 s: the requests the killed
// driver had read and not answered stay with the kernel until their timer
// (the block queue's io_timeout, which the driver sets to --nbd-io-timeout,
// 5 s, instead of the kernel's 30 s) fires and it resends them on the new
// socket; requests issued after the kill go out as soon as the new driver
// has reconnected. Three rounds take well under a minute.
const (
	defaultRestartRounds = 3
	resumeWait           = 90 * time.Second
)

// inflightVolume is one mounted volume and the writers on it.
type inflightVolume struct {
	id, fsType, dev string
	w               *recordWriter
	d               *directWriter
}

func (v *inflightVolume) stop() {
	v.w.stop()
	v.d.stop()
}

// verify reads back from dir, where the volume is mounted now, everything
// the writers were told is durable, and says how much that was.
func (v *inflightVolume) verify(t *testing.T, dir string) string {
	t.Helper()
	return fmt.Sprintf("%d records and %d O_DIRECT chunks", v.w.verify(t, dir), v.d.verify(t, dir))
}

// TestGuestE2ERestartInFlight: with an ext4 and an xfs volume staged and
// published, a writer on each creates files and overwrites slots of a log
// file, fsyncing every record, without pause, and another overwrites a file
// with O_DIRECT, so that writes are in the driver's hands at each kill. The driver is SIGKILLed at a
// random moment, stays dead for a random while (I/O queues up) and starts
// again: it must re-serve the images and hand the live /dev/nbdX new
// sockets before the dead-connection timeout, and the writers must carry
// on. Right before each kill a probe file is written with O_DIRECT, which
// the killed driver acknowledges, and fsynced only after the restart: a
// flush through the new driver must cover what the old one acknowledged.
// Afterwards: no write or fsync failed, both filesystems are still
// read-write, the kernel logged no I/O or filesystem error, every record
// and probe acknowledged durable reads back intact with the page cache
// dropped and again from a fresh read-only mount of the unstaged image
// after e2fsck -fn or xfs_repair -n, and the images pass image check (and
// qemu-img check on the host, from e2e-driver.sh).
func TestGuestE2ERestartInFlight(t *testing.T) {
	e := newE2E(t)
	rounds := envInt(t, restartRoundsEnv, defaultRestartRounds)
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv(restartSeedEnv); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("%s=%q: %v", restartSeedEnv, s, err)
		}
	}
	t.Logf("%d rounds, %s=%d", rounds, restartSeedEnv, seed)

	vols := e.startWriters(seed)
	defer func() {
		for _, v := range vols {
			v.stop()
		}
	}()
	logAt := len(dmesg(t))
	began := time.Now()
	survived, maxStall := e.killRounds(vols, rounds, rand.New(rand.NewPCG(seed, 0)))
	for _, v := range vols {
		v.stop()
		if err := errors.Join(v.w.err, v.d.err); err != nil {
			t.Errorf("%s writers: %v", v.fsType, err)
		}
		t.Logf("%s writers: %d records (%s) acknowledged durable, %d live at the end; %d O_DIRECT writes of %s; in %v",
			v.fsType, v.w.nacked, sizeStr(v.w.bytes), len(v.w.acked), v.d.writes, sizeStr(directChunk),
			time.Since(began).Round(time.Millisecond))
	}
	t.Logf("restart: survived %d/%d kills with writes in flight; max stall %.1f s", survived, rounds, maxStall.Seconds())

	for _, v := range vols {
		mountedRW(t, e.stagingPath(v.id))
		mountedRW(t, e.targetPath(v.id))
	}
	if bad := kernelErrors(dmesg(t)[logAt:]); len(bad) > 0 {
		t.Errorf("kernel log since the first kill:\n%s", joinLines(bad))
	}
	// What the writers were told is durable must be in the images, not
	// only in the page cache: drop it and read everything back.
	unix.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		t.Fatalf("drop caches: %v", err)
	}
	for _, v := range vols {
		t.Logf("%s: %s read back intact with the page cache dropped", v.fsType, v.verify(t, e.targetPath(v.id)))
	}
	for _, v := range vols {
		e.unpublishUnstage(v.id)
		e.checkFresh(v)
		e.checkImage(v.id)
		e.copyOut(v.id)
		if _, err := e.ctl.DeleteVolume(e.ctx(), &csi.DeleteVolumeRequest{VolumeId: v.id}); err != nil {
			t.Fatalf("DeleteVolume %s: %v", v.id, err)
		}
	}
	e.dataDirEmpty()
}

// startWriters creates, stages and publishes an ext4 and an xfs volume and
// starts a record writer on each.
func (e *e2e) startWriters(seed uint64) []*inflightVolume {
	e.t.Helper()
	var vols []*inflightVolume
	for i, fs := range []struct {
		fsType string
		size   int64
	}{{"ext4", mib(128)}, {"xfs", mib(320)}} {
		id := e.createVolume("e2e-inflight-"+fs.fsType, fs.size, fs.fsType, nil)
		dir := e.stagePublish(id, fs.fsType)
		w, err := startRecordWriter(dir, seed+uint64(i))
		if err != nil {
			e.t.Fatal(err)
		}
		d, err := startDirectWriter(dir, seed+uint64(i))
		if err != nil {
			w.stop()
			e.t.Fatal(err)
		}
		dev := strings.Fields(mountLine(e.t, e.stagingPath(id)))[0]
		vols = append(vols, &inflightVolume{id: id, fsType: fs.fsType, dev: dev, w: w, d: d})
	}
	return vols
}

// killRounds SIGKILLs the driver rounds times, each after a random while of
// writing, with a probe written just before; it starts the driver again
// after a random dead time and waits for the writers to resume. It returns
// how many kills the writers survived and their longest stall.
func (e *e2e) killRounds(vols []*inflightVolume, rounds int, rng *rand.Rand) (survived int, maxStall time.Duration) {
	t := e.t
	for round := 1; round <= rounds; round++ {
		time.Sleep(500*time.Millisecond + time.Duration(rng.Int64N(int64(1500*time.Millisecond))))
		if err := writersFailed(vols); err != nil {
			t.Errorf("before kill %d: %v", round, err)
			return survived, maxStall
		}
		inflight := make([]string, len(vols))
		probes := make([]*probe, len(vols))
		for i, v := range vols {
			probes[i] = writeProbe(t, e.targetPath(v.id), fmt.Sprintf("probe-%d", round), v.w)
		}
		for i, v := range vols {
			inflight[i] = v.fsType + " " + deviceInflight(v.dev)
		}
		killed := time.Now()
		e.kill()
		dead := time.Duration(rng.Int64N(int64(time.Second)))
		time.Sleep(dead)
		restarted := time.Now()
		e.start()
		stall, err := waitResumed(vols, killed, restarted)
		maxStall = max(maxStall, stall)
		if err != nil {
			t.Errorf("kill %d: %v", round, err)
			return survived, maxStall
		}
		for _, p := range probes {
			p.sync(t)
		}
		survived++
		t.Logf("kill %d: /sys/block inflight (reads writes) just before: %s; dead %v; writers resumed %v after the restart, stalled %v",
			round, strings.Join(inflight, ", "), dead.Round(time.Millisecond),
			resumedAfter(vols, restarted).Round(time.Millisecond), stall.Round(time.Millisecond))
	}
	return survived, maxStall
}

// writersFailed returns the first writer's error.
func writersFailed(vols []*inflightVolume) error {
	for _, v := range vols {
		if err := v.w.failed(); err != nil {
			return fmt.Errorf("%s writer: %w", v.fsType, err)
		}
	}
	return nil
}

// waitResumed waits until every writer has had a record acknowledged after
// the restart, and returns the longest gap between acknowledgements
// around the kill.
func waitResumed(vols []*inflightVolume, killed, restarted time.Time) (time.Duration, error) {
	deadline := restarted.Add(resumeWait)
	for {
		if err := writersFailed(vols); err != nil {
			return time.Since(killed), err
		}
		all := true
		for _, v := range vols {
			if _, ok := v.w.ackAfter(restarted); !ok {
				all = false
			}
		}
		if all {
			break
		}
		if time.Now().After(deadline) {
			return time.Since(killed), fmt.Errorf("writers still stalled %v after the restart", resumeWait)
		}
		time.Sleep(20 * time.Millisecond)
	}
	var stall time.Duration
	for _, v := range vols {
		stall = max(stall, v.w.longestGap(killed, restarted))
	}
	return stall, nil
}

// resumedAfter is how long after restarted the last writer to resume got
// its first acknowledgement.
func resumedAfter(vols []*inflightVolume, restarted time.Time) time.Duration {
	var d time.Duration
	for _, v := range vols {
		if at, ok := v.w.ackAfter(restarted); ok {
			d = max(d, at.Sub(restarted))
		}
	}
	return d
}

// deviceInflight is /sys/block/nbdN/inflight: requests the block layer has
// issued to the driver and not seen completed, "reads writes".
func deviceInflight(dev string) string {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "inflight"))
	if err != nil {
		return "?"
	}
	return strings.Join(strings.Fields(string(b)), " ")
}

// checkFresh maps a detached volume's image read-only with `image map -r`,
// checks the filesystem (e2fsck -fn, xfs_repair -n), mounts it read-only
// and reads every acknowledged record back from a mount that has never
// seen them.
func (e *e2e) checkFresh(v *inflightVolume) {
	e.t.Helper()
	cmd, dev := e.imageMap("-r", filepath.Join(e.data, "volumes", v.id+".qcow2"))
	defer func() {
		_ = cmd.Process.Signal(unix.SIGTERM)
		if err := cmd.Wait(); err != nil {
			e.t.Errorf("image map -r %s: %v", v.id, err)
		}
	}()

	fsck := exec.Command("e2fsck", "-fn", dev)
	if v.fsType == "xfs" {
		fsck = exec.Command("xfs_repair", "-n", dev)
	}
	if b, err := fsck.CombinedOutput(); err != nil {
		e.t.Errorf("%s on %s: %v\n%s", strings.Join(fsck.Args, " "), v.id, err, b)
	}
	mnt := filepath.Join(e.dir, "fresh", v.id)
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		e.t.Fatal(err)
	}
	if err := unix.Mount(dev, mnt, v.fsType, unix.MS_RDONLY, ""); err != nil {
		e.t.Fatalf("mount -o ro %s (%s): %v", dev, v.id, err)
	}
	got := v.verify(e.t, mnt)
	if err := unix.Unmount(mnt, 0); err != nil {
		e.t.Errorf("umount %s: %v", mnt, err)
	}
	e.t.Logf("%s: %s -n clean, %s read back intact from a fresh read-only mount of the image (%s)",
		v.fsType, fsck.Args[0], got, dev)
}

// copyOut copies a detached volume's image into $CSI_QCOW2_E2E_OUT, if set,
// for qemu-img check on the host.
func (e *e2e) copyOut(id string) {
	e.t.Helper()
	dir := os.Getenv(e2eOutEnv)
	if dir == "" {
		return
	}
	src, err := os.Open(filepath.Join(e.data, "volumes", id+".qcow2"))
	if err != nil {
		e.t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.Create(filepath.Join(dir, id+".qcow2"))
	if err != nil {
		e.t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		e.t.Errorf("copy %s out: %v", id, err)
	}
	if err := dst.Close(); err != nil {
		e.t.Errorf("copy %s out: %v", id, err)
	}
}

func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		t.Fatalf("%s=%q: want a count", name, s)
	}
	return n
}
