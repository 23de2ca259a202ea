package driver_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestGuestE2ELeftoverReleased: a driver SIGKILLed after attaching a
// device but before writing its staged record (simulated: the record is
// removed after the kill) leaves /dev/nbdX connected with nothing to serve
// or detach it. The next driver releases it at start, and leaves alone
// the devices that are not its own: one a running `image map` serves and
// one a killed `image map` left.
func TestGuestE2ELeftoverReleased(t *testing.T) {
	e := newE2E(t)
	id := e.createVolume("e2e-leftover", mib(64), "ext4", nil)
	block := &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	if _, err := e.node.NodeStageVolume(e.ctx(), &csi.NodeStageVolumeRequest{
		VolumeId: id, StagingTargetPath: e.stagingPath(id), VolumeCapability: block}); err != nil {
		t.Fatalf("NodeStageVolume %s: %v", id, err)
	}
	record := filepath.Join(e.data, "staged", id+".json")
	var staged struct{ DeviceIndex int }
	b, err := os.ReadFile(record)
	if err == nil {
		err = json.Unmarshal(b, &staged)
	}
	if err != nil {
		t.Fatal(err)
	}
	dev := fmt.Sprintf("nbd%d", staged.DeviceIndex)

	live, liveDev := e.newImageMap("live")
	defer live.Process.Kill()
	killed, deadDev := e.newImageMap("dead")
	killed.Process.Kill()
	killed.Wait()

	e.kill()
	if err := os.Remove(record); err != nil {
		t.Fatal(err)
	}
	if sysBlock(t, dev, "pid") == "" || sysBlock(t, dev, "backend") != id {
		t.Fatalf("%s is not connected to %s after the kill", dev, id)
	}
	t.Logf("driver SIGKILLed with %s on /dev/%s, its staged record removed; image map serves %s, a killed one left %s", id, dev, liveDev, deadDev)

	start := time.Now()
	e.start()
	if _, err := e.ctl.ControllerGetCapabilities(e.ctx(), &csi.ControllerGetCapabilitiesRequest{}); err != nil {
		t.Fatal(err)
	}
	t.Logf("driver restarted and serving after %v", time.Since(start).Round(time.Millisecond))
	if pid := sysBlock(t, dev, "pid"); pid != "" {
		t.Errorf("/dev/%s still connected (pid %s) after the restart", dev, pid)
	}
	if size := sysBlock(t, dev, "size"); size != "0" {
		t.Errorf("/dev/%s size %s after the restart, want 0", dev, size)
	}
	for _, d := range []string{liveDev, deadDev} {
		if sysBlock(t, d, "pid") == "" {
			t.Errorf("%s, not the driver's, was disconnected", d)
		}
	}
	log, _ := os.ReadFile(e.log.Name())
	if !strings.Contains(string(log), "Released a leftover nbd device") {
		t.Errorf("the driver log does not say it released the device")
	}
	// The volume is free again: it can be deleted.
	if _, err := e.ctl.DeleteVolume(e.ctx(), &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatalf("DeleteVolume %s: %v", id, err)
	}
	for _, d := range []string{liveDev, deadDev} {
		if out, err := exec.Command(e.bin, "image", "map", "-d", "/dev/"+d).CombinedOutput(); err != nil {
			t.Errorf("image map -d /dev/%s: %v: %s", d, err, out)
		}
	}
	live.Wait()
}

// newImageMap starts `csi-qcow2 image map` on a new image; it returns the
// process and the device name (nbdN).
func (e *e2e) newImageMap(name string) (*exec.Cmd, string) {
	e.t.Helper()
	img := filepath.Join(e.dir, name+".qcow2")
	if out, err := exec.Command(e.bin, "image", "create", "-q", img, "16M").CombinedOutput(); err != nil {
		e.t.Fatalf("image create: %v: %s", err, out)
	}
	cmd, dev := e.imageMap(img)
	return cmd, strings.TrimPrefix(dev, "/dev/")
}

// imageMap starts `csi-qcow2 image map ARGS...` and returns the process
// and the device it printed, once the device is usable.
func (e *e2e) imageMap(args ...string) (*exec.Cmd, string) {
	e.t.Helper()
	cmd := exec.Command(e.bin, append([]string{"image", "map"}, args...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	cmd.Stderr = e.log
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	r := bufio.NewReader(out)
	line, err := r.ReadString('\n')
	if err != nil {
		e.t.Fatalf("image map %s: %v", strings.Join(args, " "), err)
	}
	go io.Copy(io.Discard, r)
	return cmd, strings.TrimSpace(line)
}

// sysBlock reads /sys/block/DEV/NAME, "" if absent.
func sysBlock(t *testing.T, dev, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", dev, name))
	if os.IsNotExist(err) {
		return ""
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}
