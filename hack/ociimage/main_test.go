package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestBadInputsFailClearly(t *testing.T) {
	dir := t.TempDir()
	gz := filepath.Join(dir, "layer.tar.gz")
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write([]byte("not really a tar"))
	zw.Close()
	if err := os.WriteFile(gz, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	notTar := filepath.Join(dir, "notes.txt")
	if err := os.WriteFile(notTar, bytes.Repeat([]byte("hello\n"), 200), 0o644); err != nil {
		t.Fatal(err)
	}
	sockDir := filepath.Join(dir, "sock")
	if err := os.Mkdir(sockDir, 0o755); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", filepath.Join(sockDir, "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	climbing := fixtureTar(t, []tarFile{{tar.Header{Typeflag: tar.TypeReg, Name: "../etc/passwd", Mode: 0o644}, "x"}})
	dangling := fixtureTar(t, []tarFile{{tar.Header{Typeflag: tar.TypeLink, Name: "bin/sh", Linkname: "bin/bash"}, ""}})
	twice := fixtureTar(t, []tarFile{
		{tar.Header{Typeflag: tar.TypeReg, Name: "./a", Mode: 0o644}, "1"},
		{tar.Header{Typeflag: tar.TypeReg, Name: "a", Mode: 0o644}, "2"},
	})
	good := fixtureDir(t)

	tests := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"missing layer", []string{"-layer", filepath.Join(dir, "nope")}, 1, "no such file or directory"},
		{"gzip layer", []string{"-layer", gz}, 1, "gzip-compressed"},
		{"not a tar", []string{"-layer", notTar}, 1, "notes.txt"},
		{"socket in dir", []string{"-layer", sockDir}, 1, "unsupported file type"},
		{"path climbs out", []string{"-layer", climbing}, 1, "climbs out"},
		{"dangling hard link", []string{"-layer", dangling}, 1, "hard link bin/sh"},
		{"path twice", []string{"-layer", twice}, 1, `"a" is given twice`},
		{"short name", []string{"-layer", good, "-name", "busybox:1.35.0"}, 2, "no registry"},
		{"no tag", []string{"-layer", good, "-name", "docker.io/library/busybox"}, 2, "no tag"},
		{"bad entrypoint", []string{"-layer", good, "-entrypoint", "/bin/sh"}, 2, "JSON array"},
		{"bad env", []string{"-layer", good, "-env", "PATH"}, 2, "KEY=VALUE"},
		{"bad epoch", []string{"-layer", good, "-epoch", "yesterday"}, 2, "Unix seconds"},
		{"no layer", nil, 2, "-layer are required"},
		{"stray argument", []string{"-layer", good, "extra"}, 2, "unexpected arguments"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "img.tar")
			args := append([]string{"-o", out, "-name", "localhost/x:1"}, tc.args...)
			var stderr bytes.Buffer
			code := run(args, "", &stderr)
			if code != tc.code || !strings.Contains(stderr.String(), tc.want) {
				t.Errorf("exit %d, stderr %q; want exit %d and %q", code, stderr.String(), tc.code, tc.want)
			}
			if _, err := os.Stat(out); err == nil {
				t.Errorf("a failed run left %s", out)
			}
			if left, _ := os.ReadDir(filepath.Dir(out)); len(left) != 0 {
				t.Errorf("a failed run left %v", left)
			}
		})
	}
}

func TestValidateName(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"registry.k8s.io/pause:3.10", true},
		{"registry.k8s.io/sig-storage/csi-provisioner:v6.3.0", true},
		{"docker.io/library/busybox:1.35.0", true},
		{"localhost/csi-qcow2:dev", true},
		{"localhost:5000/csi-qcow2:dev", true},
		{"csi-qcow2:dev", false},
		{"library/busybox:1", false},
		{"docker.io/library/busybox", false},
		{"docker.io/library/busybox@sha256:00", false},
		{"docker.io/Library/busybox:1", false},
		{"docker.io/library/busybox:-1", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := validateName(tc.name); (err == nil) != tc.ok {
				t.Errorf("validateName(%q) = %v, want ok=%v", tc.name, err, tc.ok)
			}
		})
	}
}

// FuzzTarSource feeds arbitrary bytes to the tar source: an error is fine,
// a panic is not.
func FuzzTarSource(f *testing.F) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "./a", Size: 1, Mode: 0o644})
	tw.Write([]byte("x"))
	tw.WriteHeader(&tar.Header{Typeflag: tar.TypeLink, Name: "./b", Linkname: "./a"})
	tw.Close()
	f.Add(buf.Bytes())
	f.Fuzz(func(t *testing.T, data []byte) {
		p := filepath.Join(t.TempDir(), "f.tar")
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		l, err := tarEntries(p, time.Unix(0, 0))
		if err != nil {
			return
		}
		defer l.close()
		if err := sortEntries(l.entries); err != nil {
			return
		}
		_ = writeLayer(&bytes.Buffer{}, l.entries)
	})
}
