package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
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
		{"h", []string{"-h"}, 0, "CSI driver is coming", ""},
		{"no arguments", nil, 1, "", "the CSI driver is not implemented yet"},
		{"driver flags", []string{"--endpoint=unix:///csi/csi.sock", "--node-id=n1"}, 1, "", "not implemented yet"},
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
