//go:build linux

package imagecli

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// The guest test attaches real /dev/nbdX with `image map`: it needs root
// and the nbd module, so it runs only with IMAGECLI_GUEST=1, inside the VM
// of hack/vm (hack/vm/test-imagecli.sh). map runs as a child process, this
// test binary re-executed (imagecliHelperEnv), so that it can be SIGKILLed.

const imagecliHelperEnv = "IMAGECLI_HELPER"

// TestHelperImageCLI is not a test: it is `csi-qcow2 image ARGS...` in a
// child process, with the arguments after "--".
func TestHelperImageCLI(t *testing.T) {
	if os.Getenv(imagecliHelperEnv) != "1" {
		t.Skip("helper process only")
	}
	args := os.Args
	for len(args) > 0 && args[0] != "--" {
		args = args[1:]
	}
	if len(args) == 0 {
		t.Fatal("no -- in the helper's arguments")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	code := Run(ctx, args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func TestGuestMapDisconnect(t *testing.T) {
	if os.Getenv("IMAGECLI_GUEST") != "1" {
		t.Skip("needs root and /dev/nbdX: run hack/vm/test-imagecli.sh (sets IMAGECLI_GUEST=1 in a VM)")
	}
	t.Run("KilledMap", func(t *testing.T) {
		m := guestMap(t, guestImage(t, 64<<20))
		// The pid file names the task that sent the connect: a thread of map.
		task := guestSysfs(t, m.dev, "pid")
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/task/%s", m.cmd.Process.Pid, task)); err != nil {
			t.Fatalf("%s/pid %q is not a thread of map (pid %d): %v", m.dev, task, m.cmd.Process.Pid, err)
		}
		m.kill(t)
		if got := guestSysfs(t, m.dev, "pid"); got != task || guestSysfs(t, m.dev, "size") == "0" {
			t.Fatalf("after SIGKILL %s/pid is %q, size %s: want %s, still connected", m.dev, got, guestSysfs(t, m.dev, "size"), task)
		}
		guestRun(t, 0, "released: the process that attached it", "map", "-d", m.dev)
		guestDisconnected(t, m.dev)
		guestRun(t, 1, "is not connected: nothing to disconnect", "map", "-d", m.dev)
	})
	t.Run("KilledMapMounted", func(t *testing.T) {
		m := guestMap(t, guestImage(t, 64<<20))
		dir := t.TempDir()
		guestCmd(t, "/usr/sbin/mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", m.dev)
		guestCmd(t, "mount", m.dev, dir)
		m.kill(t)
		guestRun(t, 1, "is mounted or held exclusively", "map", "-d", m.dev)
		if guestSysfs(t, m.dev, "pid") == "" {
			t.Fatal("a mounted device was disconnected")
		}
		guestCmd(t, "umount", dir) // on a dead device: its I/O errors are expected
		guestRun(t, 0, "released", "map", "-d", m.dev)
		guestDisconnected(t, m.dev)
	})
	t.Run("LiveMap", func(t *testing.T) {
		m := guestMap(t, guestImage(t, 64<<20))
		guestRun(t, 0, "flushed and disconnected", "map", "-d", m.dev)
		done := make(chan error, 1)
		go func() { done <- m.cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("map exited with %v after map -d, want 0; stderr:\n%s", err, m.stderr.String())
			}
		case <-time.After(20 * time.Second):
			m.cmd.Process.Kill()
			t.Fatal("map still running 20 s after map -d")
		}
		guestDisconnected(t, m.dev)
	})
	t.Run("Errors", func(t *testing.T) {
		guestRun(t, 1, "no such nbd device", "map", "-d", "/dev/nbd1000")
		guestRun(t, 1, "must be an nbd device", "map", "-d", "/dev/vda")
	})
}

func guestImage(t *testing.T, size int64) string {
	t.Helper()
	path := t.TempDir() + "/disk.qcow2"
	img, err := qcow2.Create(path, qcow2.CreateOptions{Size: size})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

type guestMapProc struct {
	cmd    *exec.Cmd
	dev    string
	stderr *bytes.Buffer
}

// guestMap starts `image map FILE` in a child and waits for its device.
func guestMap(t *testing.T, path string) *guestMapProc {
	t.Helper()
	cmd := helperCommand("map", path)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	m := &guestMapProc{cmd: cmd, stderr: &bytes.Buffer{}}
	cmd.Stderr = m.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		sc.Scan()
		line <- sc.Text()
	}()
	select {
	case m.dev = <-line:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("map printed no device in 30 s; stderr:\n%s", m.stderr.String())
	}
	if !strings.HasPrefix(m.dev, "/dev/nbd") {
		cmd.Process.Kill()
		t.Fatalf("map printed %q; stderr:\n%s", m.dev, m.stderr.String())
	}
	t.Logf("%s mapped on %s by pid %d", path, m.dev, cmd.Process.Pid)
	return m
}

// kill SIGKILLs map and reaps it.
func (m *guestMapProc) kill(t *testing.T) {
	t.Helper()
	if err := m.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	m.cmd.Wait()
}

func helperCommand(args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], append([]string{"-test.run=^TestHelperImageCLI$", "--"}, args...)...)
	cmd.Env = append(os.Environ(), imagecliHelperEnv+"=1")
	return cmd
}

// guestRun runs `image ARGS...` in a child and checks its exit code and
// that its stderr holds want.
func guestRun(t *testing.T, code int, want string, args ...string) {
	t.Helper()
	cmd := helperCommand(args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	got := cmd.ProcessState.ExitCode()
	if got != code || !strings.Contains(stderr.String(), want) {
		t.Fatalf("image %s: exit %d (%v), stderr %q; want exit %d and %q", strings.Join(args, " "), got, err, stderr.String(), code, want)
	}
	t.Logf("image %s: exit %d in %v: %s", strings.Join(args, " "), got, time.Since(start).Round(time.Millisecond), strings.TrimSpace(stderr.String()))
}

func guestCmd(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// guestSysfs reads /sys/block/nbdN/NAME, "" if it is absent.
func guestSysfs(t *testing.T, dev, name string) string {
	t.Helper()
	b, err := os.ReadFile("/sys/block/" + strings.TrimPrefix(dev, "/dev/") + "/" + name)
	if os.IsNotExist(err) {
		return ""
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// guestDisconnected: no pid file, size 0.
func guestDisconnected(t *testing.T, dev string) {
	t.Helper()
	if pid := guestSysfs(t, dev, "pid"); pid != "" {
		t.Errorf("%s/pid still %s: still connected", dev, pid)
	}
	if size := guestSysfs(t, dev, "size"); size != "0" {
		t.Errorf("%s/size is %s, want 0", dev, size)
	}
}
