package imagecli

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

func TestCreateQcow2(t *testing.T) {
	tests := []struct {
		name   string
		args   []string
		stdout string
		want   qcow2.Info
	}{
		{"defaults", []string{"FILE", "1G"},
			"Formatting '%s', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16\n",
			qcow2.Info{VirtualSize: 1 << 30, ClusterSize: 65536, RefcountBits: 16}},
		{"options", []string{"-o", "cluster_size=4k,refcount_bits=8", "-o", "lazy_refcounts=on", "FILE", "10M"},
			"Formatting '%s', fmt=qcow2 cluster_size=4096 extended_l2=off compression_type=zlib size=10485760 lazy_refcounts=on refcount_bits=8\n",
			qcow2.Info{VirtualSize: 10 << 20, ClusterSize: 4096, RefcountBits: 8, LazyRefcounts: true}},
		{"flag after FILE, odd size", []string{"FILE", "-f", "qcow2", "1000"},
			"Formatting '%s', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1000 lazy_refcounts=off refcount_bits=16\n",
			qcow2.Info{VirtualSize: 1024, ClusterSize: 65536, RefcountBits: 16}},
		{"size in -o", []string{"-o", "size=2M", "FILE"},
			"Formatting '%s', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=2097152 lazy_refcounts=off refcount_bits=16\n",
			qcow2.Info{VirtualSize: 2 << 20, ClusterSize: 65536, RefcountBits: 16}},
		{"zstd", []string{"-o", "compression_type=zstd", "FILE", "1M"},
			"Formatting '%s', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zstd size=1048576 lazy_refcounts=off refcount_bits=16\n",
			qcow2.Info{VirtualSize: 1 << 20, ClusterSize: 65536, RefcountBits: 16, CompressionType: "zstd"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := tempPath(t, "x.qcow2")
			args := []string{"create"}
			for _, a := range tt.args {
				if a == "FILE" {
					a = path
				}
				args = append(args, a)
			}
			r := runCLI(t, args...)
			r.expect(t, 0, "", "")
			if want := sprintf(tt.stdout, path); r.stdout != want {
				t.Fatalf("stdout\n%q\nwant\n%q", r.stdout, want)
			}
			got := imageInfoOf(t, path)
			if got.VirtualSize != tt.want.VirtualSize || got.ClusterSize != tt.want.ClusterSize ||
				got.RefcountBits != tt.want.RefcountBits || got.LazyRefcounts != tt.want.LazyRefcounts ||
				got.Version != 3 || got.Dirty || got.Corrupt || got.CompressionType != orZlib(tt.want.CompressionType) {
				t.Fatalf("info %+v, want %+v", got, tt.want)
			}
		})
	}
}

func orZlib(s string) string {
	if s == "" {
		return "zlib"
	}
	return s
}

func TestCreateRaw(t *testing.T) {
	path := tempPath(t, "x.raw")
	r := runCLI(t, "create", "-f", "raw", path, "1G")
	r.expect(t, 0, "Formatting '"+path+"', fmt=raw size=1073741824\n", "")
	fi, err := os.Stat(path)
	if err != nil || fi.Size() != 1<<30 {
		t.Fatalf("stat: %v %v", fi, err)
	}
	if used, ok := diskUsage(path); !ok || used > 1<<20 {
		t.Fatalf("raw image is not sparse: %d bytes used", used)
	}
}

func TestCreateQuiet(t *testing.T) {
	path := tempPath(t, "x.qcow2")
	r := runCLI(t, "create", "-q", path, "1M")
	r.expect(t, 0, "", "")
	if r.stdout != "" || !fileExists(path) {
		t.Fatalf("stdout %q, exists %v", r.stdout, fileExists(path))
	}
}

func TestCreateBacking(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	newQcow2(t, base, qcow2.CreateOptions{Size: 3 << 20}, nil)
	raw := filepath.Join(dir, "base.raw")
	mustWrite(t, raw, make([]byte, 5<<20))

	t.Run("size from qcow2 backing", func(t *testing.T) {
		over := filepath.Join(dir, "over1.qcow2")
		r := runCLI(t, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", over)
		r.expect(t, 0, "size=3145728 backing_file=base.qcow2 backing_fmt=qcow2 lazy_refcounts=off", "")
		info := imageInfoOf(t, over)
		if info.VirtualSize != 3<<20 || info.BackingFile != "base.qcow2" || info.BackingFormat != "qcow2" {
			t.Fatalf("info %+v", info)
		}
	})
	t.Run("raw backing with size, via -o", func(t *testing.T) {
		over := filepath.Join(dir, "over2.qcow2")
		r := runCLI(t, "create", "-o", "backing_file="+raw+",backing_fmt=raw", over, "8M")
		r.expect(t, 0, "backing_fmt=raw", "")
		info := imageInfoOf(t, over)
		if info.VirtualSize != 8<<20 || info.BackingFile != raw || info.BackingFormat != "raw" {
			t.Fatalf("info %+v", info)
		}
	})
}

// TestRelativePaths: a relative FILE with a backing file works for create,
// info and convert (pkg/qcow2 alone refuses some of these combinations).
func TestRelativePaths(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	if err := os.Mkdir("a", 0o700); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, filepath.Join("a", "base.raw"), pattern(1<<20, 3))
	runCLI(t, "create", "-q", "-b", "base.raw", "-F", "raw", filepath.Join("a", "rel.qcow2")).expect(t, 0, "", "")
	runCLI(t, "create", "-q", "-b", filepath.Join(dir, "a", "base.raw"), "-F", "raw", filepath.Join("a", "abs.qcow2")).expect(t, 0, "", "")
	t.Chdir("a")
	runCLI(t, "create", "-q", "-b", "base.raw", "-F", "raw", "cwd.qcow2").expect(t, 0, "", "")
	t.Chdir(dir)
	for _, name := range []string{"rel", "abs", "cwd"} {
		src := filepath.Join("a", name+".qcow2")
		runCLI(t, "info", src).expect(t, 0, "backing file format: raw", "")
		runCLI(t, "convert", src, name+".raw").expect(t, 0, "", "")
		if b, _ := os.ReadFile(name + ".raw"); !bytes.Equal(b, pattern(1<<20, 3)) {
			t.Fatalf("%s: flattened data differs", name)
		}
	}
}

func TestCreateErrors(t *testing.T) {
	dir := t.TempDir()
	existing := filepath.Join(dir, "existing.qcow2")
	mustWrite(t, existing, []byte("keep me"))
	base := filepath.Join(dir, "base.qcow2")
	newQcow2(t, base, qcow2.CreateOptions{Size: 1 << 20}, nil)
	out := filepath.Join(dir, "out.qcow2")

	tests := []struct {
		name      string
		args      []string
		stderrHas string
	}{
		{"existing file", []string{existing, "1G"}, "file already exists"},
		{"bad size", []string{out, "12x"}, "invalid size"},
		{"negative size", []string{out, "--", "-1"}, "invalid size"},
		{"no size", []string{out}, "needs a size"},
		{"unknown format", []string{"-f", "vmdk", out, "1G"}, "unknown file format 'vmdk'"},
		{"unknown option", []string{"-o", "foo=bar", out, "1G"}, "invalid parameter 'foo'"},
		{"cluster size not a power of two", []string{"-o", "cluster_size=3000", out, "1G"}, "qcow2: invalid argument"},
		{"refcount bits", []string{"-o", "refcount_bits=3", out, "1G"}, "qcow2: invalid argument"},
		{"size too large for qcow2", []string{out, "7E"}, "qcow2: invalid argument"},
		{"backing without format", []string{"-b", "base.qcow2", out}, "without backing format"},
		{"format without backing", []string{"-F", "qcow2", out, "1M"}, "without a backing file"},
		{"missing backing", []string{"-b", "nope.qcow2", "-F", "qcow2", out}, "could not open backing image"},
		{"backing of wrong format", []string{"-b", existing, "-F", "qcow2", out}, "qcow2: not a qcow2 image"},
		{"bad backing format", []string{"-b", "base.qcow2", "-F", "vmdk", out}, "unknown file format 'vmdk'"},
		{"raw with backing", []string{"-f", "raw", "-b", "base.qcow2", "-F", "qcow2", out, "1M"}, "raw images cannot have a backing file"},
		{"missing directory", []string{filepath.Join(dir, "no", "such", "x.qcow2"), "1M"}, "no such file or directory"},
		{"v2", []string{"-o", "compat=0.10", out, "1M"}, "unsupported"},
		{"v2 zstd", []string{"-o", "compat=0.10,compression_type=zstd", out, "1M"}, "only supported with compatibility level 1.1"},
		{"zstd v2", []string{"-o", "compression_type=zstd", "-o", "compat=v2", out, "1M"}, "only supported with compatibility level 1.1"},
		{"unknown compression", []string{"-o", "compression_type=lz4", out, "1M"}, "supported: zlib, zstd"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, append([]string{"create"}, tt.args...)...)
			r.expect(t, 1, "", "csi-qcow2 image: ")
			r.expect(t, 1, "", tt.stderrHas)
			if fileExists(out) {
				t.Fatalf("%s left behind", out)
			}
		})
	}
	if b, _ := os.ReadFile(existing); string(b) != "keep me" {
		t.Fatalf("existing file changed: %q", b)
	}
}
