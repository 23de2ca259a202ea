package qcow2_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// requireTool skips the test when a QEMU tool is missing, except in CI
// (CI=true), where a missing oracle is a broken setup and fails the test.
func requireTool(t testing.TB, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is required in CI (apt-get install qemu-utils): %v", name, err)
		}
		t.Skipf("%s not installed (apt-get install qemu-utils): %v", name, err)
	}
}

// haveQemu is requireTool for tests whose qemu-img step is an extra: it
// reports false instead of skipping outside CI.
func haveQemu(t testing.TB) bool {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("qemu-img is required in CI (apt-get install qemu-utils): %v", err)
		}
		return false
	}
	return true
}

// run runs a command in dir and fails the test if it does not exit 0.
func run(t testing.TB, dir, name string, args ...string) string {
	t.Helper()
	out, code := runCode(t, dir, name, args...)
	if code != 0 {
		t.Fatalf("%s %s: exit %d\n%s", name, strings.Join(args, " "), code, out)
	}
	return out
}

// runCode runs a command and returns its combined output and exit code.
func runCode(t testing.TB, dir, name string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return out.String(), 0
	case errors.As(err, &exit) && exit.Exited():
		return out.String(), exit.ExitCode()
	case errors.As(err, &exit):
		return out.String(), -1 // killed by a signal
	default:
		t.Fatalf("%s %s: %v", name, strings.Join(args, " "), err)
		return "", 0
	}
}

// qemuCheckResult is `qemu-img check --output=json`; absent counts are zero.
type qemuCheckResult struct {
	Corruptions        int64 `json:"corruptions"`
	Leaks              int64 `json:"leaks"`
	CheckErrors        int64 `json:"check-errors"`
	CorruptionsFixed   int64 `json:"corruptions-fixed"`
	LeaksFixed         int64 `json:"leaks-fixed"`
	ImageEndOffset     int64 `json:"image-end-offset"`
	TotalClusters      int64 `json:"total-clusters"`
	AllocatedClusters  int64 `json:"allocated-clusters"`
	FragmentedClusters int64 `json:"fragmented-clusters"`
	CompressedClusters int64 `json:"compressed-clusters"`
}

func (r qemuCheckResult) clean() bool {
	return r.Corruptions == 0 && r.Leaks == 0 && r.CheckErrors == 0
}

// qemuCheck runs qemu-img check (optionally with -r leaks|all) and parses
// its JSON report. Exit codes 2 and 3 (corruptions, leaks) are results, not
// failures.
func qemuCheck(t testing.TB, path string, repair ...string) qemuCheckResult {
	t.Helper()
	args := []string{"check", "-f", "qcow2", "--output=json"}
	if len(repair) > 0 {
		args = append(args, "-r", repair[0])
	}
	out, code := runCode(t, filepath.Dir(path), "qemu-img", append(args, path)...)
	if code != 0 && code != 2 && code != 3 {
		t.Fatalf("qemu-img check %s: exit %d\n%s", path, code, out)
	}
	var r qemuCheckResult
	// With -r, qemu-img prints what it repaired before the JSON.
	js := out[strings.Index(out, "{"):]
	if err := json.Unmarshal([]byte(js), &r); err != nil {
		t.Fatalf("qemu-img check %s: %v\n%s", path, err, out)
	}
	return r
}

// requireQemuClean runs qemu-img check and fails unless it is clean.
func requireQemuClean(t testing.TB, path string) qemuCheckResult {
	t.Helper()
	r := qemuCheck(t, path)
	if !r.clean() {
		out, _ := runCode(t, filepath.Dir(path), "qemu-img", "check", "-f", "qcow2", path)
		t.Fatalf("qemu-img check %s: %+v\n%s", path, r, truncate(out, 4000))
	}
	return r
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "\n..."
	}
	return s
}

// qemuInfo is the part of `qemu-img info --output=json` the tests compare.
type qemuInfo struct {
	VirtualSize    int64 `json:"virtual-size"`
	ClusterSize    int   `json:"cluster-size"`
	DirtyFlag      bool  `json:"dirty-flag"`
	FormatSpecific struct {
		Data struct {
			Compat          string `json:"compat"`
			CompressionType string `json:"compression-type"`
			LazyRefcounts   bool   `json:"lazy-refcounts"`
			RefcountBits    int    `json:"refcount-bits"`
			Corrupt         bool   `json:"corrupt"`
		} `json:"data"`
	} `json:"format-specific"`
}

func qemuImgInfo(t testing.TB, path string) qemuInfo {
	t.Helper()
	out := run(t, filepath.Dir(path), "qemu-img", "info", "-U", "-f", "qcow2", "--output=json", path)
	var info qemuInfo
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("qemu-img info %s: %v\n%s", path, err, out)
	}
	return info
}

// qemuCompare reports whether qemu reads the image exactly as the raw model.
func qemuCompare(t testing.TB, img string, model []byte) {
	t.Helper()
	raw := img + ".model.raw"
	if err := os.WriteFile(raw, model, 0o600); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(raw)
	out, code := runCode(t, filepath.Dir(img), "qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, raw)
	if code != 0 {
		t.Fatalf("qemu-img compare %s with the model: exit %d\n%s", img, code, out)
	}
}

// qemuConvertRaw returns the guest contents as qemu reads them.
func qemuConvertRaw(t testing.TB, img string, extra ...string) []byte {
	t.Helper()
	raw := img + ".convert.raw"
	args := append([]string{"convert", "-U", "-f", "qcow2", "-O", "raw"}, extra...)
	run(t, filepath.Dir(img), "qemu-img", append(args, img, raw)...)
	defer os.Remove(raw)
	p, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// rawImage is a qcow2 file edited byte by byte, to inject damage without
// going through either implementation.
type rawImage struct {
	t    testing.TB
	b    []byte
	path string
}

func loadRaw(t testing.TB, path string) *rawImage {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return &rawImage{t: t, b: b, path: path}
}

func (r *rawImage) save() {
	r.t.Helper()
	if err := os.WriteFile(r.path, r.b, 0o600); err != nil {
		r.t.Fatal(err)
	}
}

var be = binary.BigEndian

func (r *rawImage) u64(off int64) uint64 {
	if off+8 > int64(len(r.b)) {
		return 0
	}
	return be.Uint64(r.b[off:])
}

func (r *rawImage) putU64(off int64, v uint64) {
	if off+8 > int64(len(r.b)) {
		r.b = append(r.b, make([]byte, off+8-int64(len(r.b)))...)
	}
	be.PutUint64(r.b[off:], v)
}

func (r *rawImage) clusterBits() uint { return uint(be.Uint32(r.b[20:])) }
func (r *rawImage) cs() int64         { return 1 << r.clusterBits() }
func (r *rawImage) l1Offset() int64   { return int64(be.Uint64(r.b[40:])) }
func (r *rawImage) l1Size() int64     { return int64(be.Uint32(r.b[36:])) }
func (r *rawImage) rtOffset() int64   { return int64(be.Uint64(r.b[48:])) }
func (r *rawImage) rtClusters() int64 { return int64(be.Uint32(r.b[56:])) }

func (r *rawImage) refcountOrder() uint {
	if be.Uint32(r.b[4:]) < 3 {
		return 4
	}
	return uint(be.Uint32(r.b[96:]))
}

const offMask = 0x00fffffffffffe00

// refcountSlot locates the refcount of host cluster k: the byte offset of
// its refcount block entry, or -1 if no block covers it.
func (r *rawImage) refcountSlot(k int64) (blockOff int64, index int64) {
	perBlock := r.cs() * 8 >> r.refcountOrder()
	i := k / perBlock
	if i >= r.rtClusters()*r.cs()/8 {
		return -1, 0
	}
	b := int64(r.u64(r.rtOffset()+8*i) &^ 0x1ff)
	if b == 0 {
		return -1, 0
	}
	return b, k % perBlock
}

func (r *rawImage) refcount(k int64) uint64 {
	b, i := r.refcountSlot(k)
	if b < 0 {
		return 0
	}
	switch bits := int64(1) << r.refcountOrder(); {
	case bits < 8:
		return uint64(r.b[b+i*bits/8]>>(i*bits%8)) & (1<<bits - 1)
	case bits == 8:
		return uint64(r.b[b+i])
	case bits == 16:
		return uint64(be.Uint16(r.b[b+2*i:]))
	case bits == 32:
		return uint64(be.Uint32(r.b[b+4*i:]))
	default:
		return be.Uint64(r.b[b+8*i:])
	}
}

func (r *rawImage) setRefcount(k int64, v uint64) {
	r.t.Helper()
	b, i := r.refcountSlot(k)
	if b < 0 {
		r.t.Fatalf("no refcount block covers cluster %d", k)
	}
	switch bits := int64(1) << r.refcountOrder(); {
	case bits < 8:
		sh := i * bits % 8
		mask := byte(1<<bits-1) << sh
		r.b[b+i*bits/8] = r.b[b+i*bits/8]&^mask | byte(v)<<sh&mask
	case bits == 8:
		r.b[b+i] = byte(v)
	case bits == 16:
		be.PutUint16(r.b[b+2*i:], uint16(v))
	case bits == 32:
		be.PutUint32(r.b[b+4*i:], uint32(v))
	default:
		be.PutUint64(r.b[b+8*i:], v)
	}
}

// l2EntryOff is the file offset of the L2 entry for guest cluster g, or -1
// if its L2 table is not allocated.
func (r *rawImage) l2EntryOff(g int64) int64 {
	perL2 := r.cs() / 8
	l1i := g / perL2
	if l1i >= r.l1Size() {
		return -1
	}
	l2 := int64(r.u64(r.l1Offset()+8*l1i) & offMask)
	if l2 == 0 {
		return -1
	}
	return l2 + 8*(g%perL2)
}

// dataCluster returns the host cluster index of guest cluster g (0 if none).
func (r *rawImage) dataCluster(g int64) int64 {
	e := r.l2EntryOff(g)
	if e < 0 {
		return 0
	}
	return int64(r.u64(e)&offMask) >> r.clusterBits()
}

// leakClusters appends n clusters to the file and gives them refcount 1
// with nothing referencing them: leaks. (qemu-img check only compares
// refcounts of clusters inside the file, so the leaked clusters must be.)
func (r *rawImage) leakClusters(n int) {
	r.t.Helper()
	first := (int64(len(r.b)) + r.cs() - 1) / r.cs()
	r.b = append(r.b, make([]byte, first*r.cs()+int64(n)*r.cs()-int64(len(r.b)))...)
	for k := first; k < first+int64(n); k++ {
		if r.refcount(k) != 0 {
			r.t.Fatalf("cluster %d past the end of the file has refcount %d", k, r.refcount(k))
		}
		r.setRefcount(k, 1)
	}
}
