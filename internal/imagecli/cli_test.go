package imagecli

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// result is one Run of the CLI.
type result struct {
	stdout, stderr string
	code           int
}

func runCLI(t *testing.T, args ...string) result {
	t.Helper()
	return runCLIContext(t, context.Background(), args...)
}

func runCLIContext(t *testing.T, ctx context.Context, args ...string) result {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := Run(ctx, args, &stdout, &stderr)
	return result{stdout: stdout.String(), stderr: stderr.String(), code: code}
}

func (r result) expect(t *testing.T, code int, stdoutHas, stderrHas string) {
	t.Helper()
	if r.code != code || !strings.Contains(r.stdout, stdoutHas) || !strings.Contains(r.stderr, stderrHas) {
		t.Fatalf("exit %d (want %d)\nstdout (want %q):\n%s\nstderr (want %q):\n%s", r.code, code, stdoutHas, r.stdout, stderrHas, r.stderr)
	}
}

func TestHelp(t *testing.T) {
	tests := []struct {
		args []string
		want []string
	}{
		{[]string{"--help"}, []string{"Usage: csi-qcow2 image COMMAND", "create", "info", "check", "resize", "convert", "serve", "map", "extents", "SIZE is"}},
		{[]string{"-h"}, []string{"Usage: csi-qcow2 image COMMAND"}},
		{[]string{"help"}, []string{"Usage: csi-qcow2 image COMMAND"}},
		{[]string{"help", "check"}, []string{"Usage: csi-qcow2 image check", "--repair", "63"}},
		{[]string{"create", "--help"}, []string{"Usage: csi-qcow2 image create [-f FMT]", "-f, --format string", "-o, --options", "-b, --backing", "-F, --backing-format", "never overwrites", "cluster_size"}},
		{[]string{"create", "-h"}, []string{"Usage: csi-qcow2 image create"}},
		{[]string{"info", "--help"}, []string{"--output string", "st_blocks"}},
		{[]string{"check", "--help"}, []string{"-r, --repair", "Exit status", "2   corruptions remain", "3   only leaked"}},
		{[]string{"resize", "--help"}, []string{"--shrink", "[+|-]SIZE"}},
		{[]string{"convert", "--help"}, []string{"-O, --output-format", "sparse", "removed"}},
		{[]string{"create", "-f", "qcow2", "-o", "help"}, []string{"Supported qcow2 options:", "cluster_size=<size>"}},
		{[]string{"create", "-f", "raw", "-o", "?"}, []string{"Supported raw options:", "size=<size>"}},
		{[]string{"convert", "-O", "qcow2", "-o", "help"}, []string{"Supported qcow2 options:"}},
		{[]string{"serve", "--help"}, []string{"Usage: csi-qcow2 image serve", "-k, --socket", "-e, --shared", "--allow-remote", "mode 0600", "SIGTERM"}},
		{[]string{"map", "--help"}, []string{"Usage: csi-qcow2 image map", "--device", "-c, --connections", "PR_SET_IO_FLUSHER", "never time out"}},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			r := runCLI(t, tt.args...)
			if r.code != 0 || r.stderr != "" {
				t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
			}
			for _, w := range tt.want {
				if !strings.Contains(r.stdout, w) {
					t.Errorf("help lacks %q:\n%s", w, r.stdout)
				}
			}
		})
	}
}

func TestUsageErrors(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "x.img")
	if err := os.WriteFile(img, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args      []string
		stderrHas string
	}{
		{nil, "Usage: csi-qcow2 image COMMAND"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"help", "frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"create", "--bogus", "x", "1G"}, "unknown flag: --bogus"},
		{[]string{"create", "-z", "x", "1G"}, "unknown shorthand flag: 'z'"},
		{[]string{"create"}, "expected FILE [SIZE]"},
		{[]string{"create", "a", "1G", "extra"}, "expected FILE [SIZE]"},
		{[]string{"info"}, "expected FILE"},
		{[]string{"info", "--output=xml", img}, "--output must be human or json"},
		{[]string{"check", "-r", "some", img}, "-r must be leaks or all"},
		{[]string{"check", "--output", "yaml", img}, "--output must be human or json"},
		{[]string{"resize", img}, "expected FILE SIZE"},
		{[]string{"convert", img}, "expected SRC DST"},
		{[]string{"create", "-f"}, "flag needs an argument"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			r := runCLI(t, tt.args...)
			r.expect(t, 1, "", tt.stderrHas)
			if !strings.Contains(r.stderr, "Usage: ") {
				t.Errorf("no usage on stderr:\n%s", r.stderr)
			}
			if r.stdout != "" {
				t.Errorf("stdout not empty:\n%s", r.stdout)
			}
		})
	}
}

func TestIsNegativeNumber(t *testing.T) {
	for arg, want := range map[string]bool{"-1G": true, "-.5G": true, "-f": false, "--shrink": false, "-": false, "1G": false, "+1G": false} {
		if got := isNegativeNumber(arg); got != want {
			t.Errorf("isNegativeNumber(%q) = %v", arg, got)
		}
	}
}
