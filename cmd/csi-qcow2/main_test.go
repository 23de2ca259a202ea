package main

import (
	"bufio"
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMain lets the tests run the real main in a child process: the test
// binary re-executes itself with CSI_QCOW2_RUN_MAIN=1.
func TestMain(m *testing.M) {
	if os.Getenv("CSI_QCOW2_RUN_MAIN") == "1" {
		main()
		return
	}
	os.Exit(m.Run())
}

func runMain(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "CSI_QCOW2_RUN_MAIN=1")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit):
		code = exit.ExitCode()
	default:
		t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

func TestMainDispatch(t *testing.T) {
	img := filepath.Join(t.TempDir(), "x.qcow2")
	tests := []struct {
		name      string
		args      []string
		code      int
		stdoutHas string
		stderrHas string
	}{
		{"help", []string{"--help"}, 0, "csi-qcow2 image COMMAND", ""},
		{"h", []string{"-h"}, 0, "--data-dir", ""},
		{"no arguments", nil, 2, "", "--node-id is required"},
		{"driver flags without data dir", []string{"--endpoint=unix:///csi/csi.sock", "--node-id=n1"}, 2, "", "--data-dir is required"},
		{"driver bad mode", []string{"--node-id=n1", "--data-dir=/tmp", "--mode=x"}, 2, "", "--mode"},
		{"driver unknown flag", []string{"--bogus"}, 2, "", "unknown flag"},
		{"help lists registration", []string{"--help"}, 0, "--plugin-registration-dir", ""},
		{"help lists healthz", []string{"--help"}, 0, "--healthz-address", ""},
		{"registration without path", []string{"--node-id=n1", "--data-dir=/tmp", "--plugin-registration-dir=/registration"}, 2, "",
			"--kubelet-registration-path is required with --plugin-registration-dir"},
		{"registration relative path", []string{"--node-id=n1", "--data-dir=/tmp", "--plugin-registration-dir=/registration",
			"--kubelet-registration-path=csi.sock"}, 2, "", "want the absolute path"},
		{"image help", []string{"image", "--help"}, 0, "Usage: csi-qcow2 image COMMAND", ""},
		{"image create help", []string{"image", "create", "--help"}, 0, "Usage: csi-qcow2 image create", ""},
		{"image unknown", []string{"image", "bogus"}, 1, "", `unknown command "bogus"`},
		{"image create", []string{"image", "create", img, "1M"}, 0, "Formatting '" + img + "', fmt=qcow2", ""},
		{"image info", []string{"image", "info", img}, 0, "virtual size: 1 MiB (1048576 bytes)", ""},
		{"image check", []string{"image", "check", img}, 0, "No errors were found on the image.", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdout, stderr, code := runMain(t, tt.args...)
			if code != tt.code || !strings.Contains(stdout, tt.stdoutHas) || !strings.Contains(stderr, tt.stderrHas) {
				t.Fatalf("exit %d (want %d)\nstdout:\n%s\nstderr:\n%s", code, tt.code, stdout, stderr)
			}
		})
	}
}

// TestServeStopsOnSignal: `image serve` in a real process ends cleanly on
// SIGTERM and on SIGINT: exit 0, socket removed, image closed (the dirty
// bit of a lazy-refcounts image cleared).
func TestServeStopsOnSignal(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			dir := t.TempDir()
			img, sock := filepath.Join(dir, "x.qcow2"), filepath.Join(dir, "nbd.sock")
			if _, stderr, code := runMain(t, "image", "create", "-o", "lazy_refcounts=on", img, "1M"); code != 0 {
				t.Fatalf("create: %s", stderr)
			}
			cmd := exec.Command(os.Args[0], "image", "serve", "-k", sock, img)
			cmd.Env = append(os.Environ(), "CSI_QCOW2_RUN_MAIN=1")
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			line, err := bufio.NewReader(stdout).ReadString('\n')
			if err != nil || !strings.HasPrefix(line, "nbd+unix:///?socket=") {
				cmd.Process.Kill()
				t.Fatalf("first line %q, %v; stderr:\n%s", line, err, stderr.String())
			}
			if !dirty(t, img) {
				t.Error("dirty bit clear while serving")
			}
			cmd.Process.Signal(sig)
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("serve after %v: %v; stderr:\n%s", sig, err, stderr.String())
				}
			case <-time.After(30 * time.Second):
				cmd.Process.Kill()
				t.Fatalf("serve still running 30 s after %v", sig)
			}
			if _, err := os.Lstat(sock); err == nil {
				t.Error("socket left behind")
			}
			if dirty(t, img) {
				t.Error("dirty bit set after serve exited")
			}
		})
	}
}

// dirty reads the dirty bit (incompatible feature bit 0) of a qcow2 header.
func dirty(t *testing.T, path string) bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 8)
	if _, err := f.ReadAt(b, 72); err != nil {
		t.Fatal(err)
	}
	return b[7]&1 != 0
}
