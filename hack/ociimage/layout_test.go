package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fixtureDir stages a directory layer with the kinds of files a layer
// must keep, and a FIFO it must leave out.
func fixtureDir(t *testing.T) string {
	t.Helper()
	d := t.TempDir()
	mustWrite(t, filepath.Join(d, "bin/tool"), "#!/bin/sh\n", os.ModeSetuid|0o755)
	mustWrite(t, filepath.Join(d, "etc/conf"), "a=1\n", 0o640)
	if err := os.Link(filepath.Join(d, "bin/tool"), filepath.Join(d, "bin/a-tool")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../bin/tool", filepath.Join(d, "etc/tool")); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(d, "tmp"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(d, "tmp"), os.ModeSticky|0o777); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(d, "tmp/fifo"), 0o600); err != nil {
		t.Fatal(err)
	}
	return d
}

func mustWrite(t *testing.T, p, data string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil { // past the umask
		t.Fatal(err)
	}
}

type tarFile struct {
	hdr  tar.Header
	data string
}

// fixtureTar writes a tar the way mmdebstrap does ("./" names, owners,
// device nodes), with a hard link that sorts before its target.
func fixtureTar(t *testing.T, files []tarFile) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "src.tar")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(f)
	for _, tf := range files {
		h := tf.hdr
		h.Size = int64(len(tf.data))
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(tw, tf.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return p
}

var mtime = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func rootfsTar(t *testing.T) string {
	long := "./usr/share/" + strings.Repeat("long-name-", 12) + "file"
	return fixtureTar(t, []tarFile{
		{tar.Header{Typeflag: tar.TypeDir, Name: "./", Mode: 0o755, ModTime: mtime}, ""},
		{tar.Header{Typeflag: tar.TypeDir, Name: "./usr/", Mode: 0o755, ModTime: mtime, Uname: "root"}, ""},
		{tar.Header{Typeflag: tar.TypeDir, Name: "./usr/bin/", Mode: 0o755, ModTime: mtime}, ""},
		{tar.Header{Typeflag: tar.TypeReg, Name: "./usr/bin/perlbug", Mode: 0o755, ModTime: mtime}, "perl"},
		{tar.Header{Typeflag: tar.TypeLink, Name: "./usr/bin/perlb", Linkname: "./usr/bin/perlbug", ModTime: mtime}, ""},
		{tar.Header{Typeflag: tar.TypeReg, Name: "./var/mail", Mode: 0o2775, Uid: 0, Gid: 8, ModTime: mtime}, ""},
		{tar.Header{Typeflag: tar.TypeReg, Name: "./home/u/f", Mode: 0o600, Uid: 1000, Gid: 1000, ModTime: mtime}, "mine"},
		{tar.Header{Typeflag: tar.TypeChar, Name: "./dev/null", Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: mtime}, ""},
		{tar.Header{Typeflag: tar.TypeSymlink, Name: "./usr/bin/awk", Linkname: "/etc/alternatives/awk", ModTime: mtime}, ""},
		{tar.Header{Typeflag: tar.TypeReg, Name: long, Mode: 0o644, ModTime: mtime}, "long"},
	})
}

// readArchive returns the archive's files by name, in archive order.
func readArchive(t *testing.T, p string) (map[string][]byte, []string) {
	t.Helper()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	var order []string
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return files, order
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = b
		order = append(order, h.Name)
	}
}

func readLayer(t *testing.T, data []byte) []tarFile {
	t.Helper()
	var out []tarFile
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, tarFile{*h, string(b)})
	}
}

func blobOf(t *testing.T, files map[string][]byte, d descriptor) []byte {
	t.Helper()
	hexDigest, ok := strings.CutPrefix(d.Digest, "sha256:")
	if !ok {
		t.Fatalf("digest %q is not sha256", d.Digest)
	}
	b, ok := files["blobs/sha256/"+hexDigest]
	if !ok {
		t.Fatalf("no blob for %s", d.Digest)
	}
	sum := sha256.Sum256(b)
	if got := hex.EncodeToString(sum[:]); got != hexDigest {
		t.Errorf("blob %s hashes to %s", d.Digest, got)
	}
	if int64(len(b)) != d.Size {
		t.Errorf("blob %s: %d bytes, descriptor says %d", d.Digest, len(b), d.Size)
	}
	return b
}

// buildFixture builds the two layers and returns what the writer logged.
func buildFixture(t *testing.T, out string, layers ...string) string {
	t.Helper()
	var log bytes.Buffer
	code := run([]string{
		"-o", out, "-name", "registry.example.com/team/app:v1.2",
		"-layer", layers[0], "-layer", layers[1],
		"-entrypoint", `["/bin/tool","serve"]`, "-cmd", `["--help"]`,
		"-env", "PATH=/usr/bin:/bin", "-env", "A=b=c",
		"-user", "65532:65532", "-workdir", "/work", "-epoch", "86400",
	}, "", &log)
	if code != 0 {
		t.Fatalf("run exited %d: %s", code, log.String())
	}
	return log.String()
}

func TestArchiveParsesAndDigestsMatch(t *testing.T) {
	out := filepath.Join(t.TempDir(), "img.tar")
	buildFixture(t, out, rootfsTar(t), fixtureDir(t))
	files, order := readArchive(t, out)

	if got := string(files["oci-layout"]); got != layoutVersion {
		t.Errorf("oci-layout = %s", got)
	}
	if last := order[len(order)-2:]; !reflect.DeepEqual(last, []string{"index.json", "oci-layout"}) {
		t.Errorf("archive ends with %v", last)
	}
	var idx index
	if err := json.Unmarshal(files["index.json"], &idx); err != nil {
		t.Fatal(err)
	}
	if idx.SchemaVersion != 2 || idx.MediaType != mediaTypeIndex || len(idx.Manifests) != 1 {
		t.Fatalf("index = %+v", idx)
	}
	md := idx.Manifests[0]
	wantAnn := map[string]string{annotationImageName: "registry.example.com/team/app:v1.2", annotationRefName: "v1.2"}
	if !reflect.DeepEqual(md.Annotations, wantAnn) || md.MediaType != mediaTypeManifest {
		t.Errorf("manifest descriptor = %+v", md)
	}
	if md.Platform == nil || *md.Platform != (platform{Architecture: "amd64", OS: "linux"}) {
		t.Errorf("platform = %+v", md.Platform)
	}
	var man manifest
	if err := json.Unmarshal(blobOf(t, files, md), &man); err != nil {
		t.Fatal(err)
	}
	if man.SchemaVersion != 2 || man.Config.MediaType != mediaTypeConfig || len(man.Layers) != 2 {
		t.Fatalf("manifest = %+v", man)
	}
	var cfg imageConfig
	if err := json.Unmarshal(blobOf(t, files, man.Config), &cfg); err != nil {
		t.Fatal(err)
	}
	want := containerConfig{
		User: "65532:65532", Env: []string{"PATH=/usr/bin:/bin", "A=b=c"},
		Entrypoint: []string{"/bin/tool", "serve"}, Cmd: []string{"--help"}, WorkingDir: "/work",
	}
	if !reflect.DeepEqual(cfg.Config, want) || cfg.Architecture != "amd64" || cfg.OS != "linux" {
		t.Errorf("config = %+v", cfg)
	}
	if cfg.Created != "1970-01-02T00:00:00Z" || cfg.RootFS.Type != "layers" {
		t.Errorf("created %q rootfs %+v", cfg.Created, cfg.RootFS)
	}
	for i, l := range man.Layers {
		if l.MediaType != mediaTypeLayer {
			t.Errorf("layer %d media type %s", i, l.MediaType)
		}
		sum := sha256.Sum256(blobOf(t, files, l))
		if diffID := "sha256:" + hex.EncodeToString(sum[:]); cfg.RootFS.DiffIDs[i] != diffID {
			t.Errorf("diff_id %d = %s, layer hashes to %s", i, cfg.RootFS.DiffIDs[i], diffID)
		}
	}
	if n := len(files); n != 2+2+4 { // 2 dirs, index.json, oci-layout, 2 layers, config, manifest
		t.Errorf("%d files in the archive: %v", n, order)
	}
}

// short is what a test compares of a layer entry.
type short struct {
	Type     byte
	Name     string
	Link     string
	Mode     int64
	Uid, Gid int
	Data     string
}

func layerEntriesOf(t *testing.T, out string, i int) []short {
	t.Helper()
	files, _ := readArchive(t, out)
	var idx index
	var man manifest
	if err := json.Unmarshal(files["index.json"], &idx); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(blobOf(t, files, idx.Manifests[0]), &man); err != nil {
		t.Fatal(err)
	}
	var got []short
	for _, f := range readLayer(t, blobOf(t, files, man.Layers[i])) {
		h := f.hdr
		if !h.ModTime.Equal(time.Unix(86400, 0)) || h.Uname != "" || h.Gname != "" || len(h.PAXRecords) > 1 {
			t.Errorf("%s: not normalized: mtime %v uname %q gname %q pax %v", h.Name, h.ModTime, h.Uname, h.Gname, h.PAXRecords)
		}
		got = append(got, short{h.Typeflag, h.Name, h.Linkname, h.Mode, h.Uid, h.Gid, f.data})
	}
	return got
}

func TestTarLayerKeepsOwnersAndLinks(t *testing.T) {
	out := filepath.Join(t.TempDir(), "img.tar")
	log := buildFixture(t, out, rootfsTar(t), fixtureDir(t))
	// One device node in the tar, one FIFO in the directory.
	if n := strings.Count(log, "(left out 1 device nodes/FIFOs)"); n != 2 {
		t.Errorf("log says left out 1 %d times, want 2:\n%s", n, log)
	}
	long := "usr/share/" + strings.Repeat("long-name-", 12) + "file"
	want := []short{
		{tar.TypeReg, "home/u/f", "", 0o600, 1000, 1000, "mine"},
		{tar.TypeDir, "usr/", "", 0o755, 0, 0, ""},
		{tar.TypeDir, "usr/bin/", "", 0o755, 0, 0, ""},
		{tar.TypeSymlink, "usr/bin/awk", "/etc/alternatives/awk", 0, 0, 0, ""},
		// The tar's link sorted first, so it now carries the bytes.
		{tar.TypeReg, "usr/bin/perlb", "", 0o755, 0, 0, "perl"},
		{tar.TypeLink, "usr/bin/perlbug", "usr/bin/perlb", 0o755, 0, 0, ""},
		{tar.TypeReg, long, "", 0o644, 0, 0, "long"},
		{tar.TypeReg, "var/mail", "", 0o2775, 0, 8, ""},
	}
	if got := layerEntriesOf(t, out, 0); !reflect.DeepEqual(got, want) {
		t.Errorf("layer 0:\n got %+v\nwant %+v", got, want)
	}
}

func TestDirLayerKeepsModesAndLinks(t *testing.T) {
	out := filepath.Join(t.TempDir(), "img.tar")
	buildFixture(t, out, rootfsTar(t), fixtureDir(t))
	want := []short{
		{tar.TypeDir, "bin/", "", 0o755, 0, 0, ""},
		{tar.TypeReg, "bin/a-tool", "", 0o4755, 0, 0, "#!/bin/sh\n"},
		{tar.TypeLink, "bin/tool", "bin/a-tool", 0o4755, 0, 0, ""},
		{tar.TypeDir, "etc/", "", 0o755, 0, 0, ""},
		{tar.TypeReg, "etc/conf", "", 0o640, 0, 0, "a=1\n"},
		{tar.TypeSymlink, "etc/tool", "../bin/tool", 0o777, 0, 0, ""},
		{tar.TypeDir, "tmp/", "", 0o1777, 0, 0, ""},
	}
	if got := layerEntriesOf(t, out, 1); !reflect.DeepEqual(got, want) {
		t.Errorf("layer 1:\n got %+v\nwant %+v", got, want)
	}
}

func TestSameInputsSameBytes(t *testing.T) {
	src, dir := rootfsTar(t), fixtureDir(t)
	a := filepath.Join(t.TempDir(), "a.tar")
	buildFixture(t, a, src, dir)
	// New mtimes and a new inode order must not matter.
	if err := os.Chtimes(filepath.Join(dir, "etc/conf"), time.Now(), time.Now()); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, filepath.Join(dir, "etc/conf.new"), "a=1\n", 0o640)
	if err := os.Rename(filepath.Join(dir, "etc/conf.new"), filepath.Join(dir, "etc/conf")); err != nil {
		t.Fatal(err)
	}
	b := filepath.Join(t.TempDir(), "b.tar")
	buildFixture(t, b, src, dir)
	da, _ := os.ReadFile(a)
	db, _ := os.ReadFile(b)
	if !bytes.Equal(da, db) {
		t.Errorf("two builds of the same inputs differ (%d and %d bytes)", len(da), len(db))
	}
	left, _ := os.ReadDir(filepath.Dir(b))
	if len(left) != 1 {
		t.Errorf("temporary files left next to the output: %v", left)
	}
}
