package qcow2_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// mapEntry is one entry of qemu-img map --output=json.
type mapEntry struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"`
	Present bool   `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset,omitempty"`
}

func (e mapEntry) String() string {
	off := "-"
	if e.Offset != nil {
		off = fmt.Sprint(*e.Offset)
	}
	return fmt.Sprintf("{%d+%d depth=%d present=%t zero=%t data=%t offset=%s}", e.Start, e.Length, e.Depth, e.Present, e.Zero, e.Data, off)
}

func qemuMap(t testing.TB, path string) []mapEntry {
	t.Helper()
	out := run(t, filepath.Dir(path), "qemu-img", "map", "-U", "--output=json", path)
	var m []mapEntry
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("qemu-img map %s: %v\n%s", path, err, out)
	}
	return m
}

func asMap(ext []qcow2.Extent) []mapEntry {
	m := make([]mapEntry, 0, len(ext))
	for _, x := range ext {
		e := mapEntry{Start: x.Start, Length: x.Length, Depth: x.Depth, Present: x.Present, Zero: x.Zero, Data: x.Data}
		if x.Offset >= 0 {
			e.Offset = &x.Offset
		}
		m = append(m, e)
	}
	return m
}

func requireSameMap(t testing.TB, what string, ours, theirs []mapEntry) {
	t.Helper()
	if !reflect.DeepEqual(ours, theirs) {
		t.Errorf("%s: extents differ from qemu-img map\nours: %v\nqemu: %v", what, ours, theirs)
	}
}

// TestInteropExtentsMatchQemuMap: Extents reports what qemu-img map
// --output=json reports, field for field (offsets too: both read the same
// file), for data, compressed (zlib and zstd), zero and preallocated zero
// clusters, unallocated runs, partial last clusters and backing chains of
// qcow2 and raw layers, some shorter than the top.
func TestInteropExtentsMatchQemuMap(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	type layer struct {
		opts string // qemu-img create -o; "raw" for a fully written raw file
		size int64
		io   []string // qemu-io commands
	}
	mixed := []string{"write -P 1 0 128k", "write -c -P 2 1M 64k", "write -c -P 3 1088k 64k",
		"write -z 2M 64k", "write -P 4 3M 64k", "write -z 3M 64k", "write -P 5 4M 4k"}
	for _, c := range []struct {
		name   string
		layers []layer // bottom first
	}{
		{"single-zlib", []layer{{"cluster_size=65536", 5 << 20, mixed}}},
		{"single-zstd-512", []layer{{"cluster_size=512,compression_type=zstd", 5<<20 + 1536, mixed}}},
		{"single-4k-partial", []layer{{"cluster_size=4096", 5<<20 + 1000, append(mixed, "write -P 6 5M 1000")}}},
		{"empty", []layer{{"cluster_size=65536", 3 << 20, nil}}},
		{"chain-3", []layer{
			{"cluster_size=65536", 5 << 20, mixed},
			{"cluster_size=4096", 5 << 20, []string{"write -P 7 64k 64k", "write -z -u 1M 64k", "write -P 8 2M 4k"}},
			{"cluster_size=65536", 6 << 20, []string{"write -z 0 64k", "write -P 9 3M 128k", "write -P 10 5M 64k"}},
		}},
		{"raw-backing", []layer{
			{"raw", 2 << 20, nil},
			{"cluster_size=65536", 3 << 20, []string{"write -P 1 1M 64k", "write -z 1536k 64k"}},
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			var path, prev, prevFmt string
			for i, l := range c.layers {
				path = filepath.Join(dir, fmt.Sprintf("l%d", i))
				if l.opts == "raw" {
					if err := os.WriteFile(path, fill(newRand(t), l.size), 0o600); err != nil {
						t.Fatal(err)
					}
					prev, prevFmt = path, "raw"
					continue
				}
				args := []string{"create", "-q", "-f", "qcow2", "-o", l.opts}
				if prev != "" {
					args = append(args, "-b", prev, "-F", prevFmt)
				}
				run(t, dir, "qemu-img", append(args, path, fmt.Sprint(l.size))...)
				for _, cmd := range l.io {
					run(t, dir, "qemu-io", "-f", "qcow2", "-c", cmd, path)
				}
				prev, prevFmt = path, "qcow2"
			}
			img := mustOpen(t, path, qcow2.OpenOptions{ReadOnly: true})
			defer img.Close()
			ext, err := img.Extents(0, math.MaxInt64)
			if err != nil {
				t.Fatal(err)
			}
			requireSameMap(t, "whole disk", asMap(ext), qemuMap(t, path))
			var sum int64
			for _, x := range ext {
				sum += x.Length
			}
			if sum != img.Size() {
				t.Errorf("extents cover %d bytes of %d", sum, img.Size())
			}
			// A window cut inside clusters, as qemu-img map -s -l cuts it.
			start, n := int64(70<<10+3), int64(3<<20+5)
			ext, err = img.Extents(start, n)
			if err != nil {
				t.Fatal(err)
			}
			out := run(t, dir, "qemu-img", "map", "-U", "--output=json", "-s", fmt.Sprint(start), "-l", fmt.Sprint(n), path)
			var want []mapEntry
			if err := json.Unmarshal([]byte(out), &want); err != nil {
				t.Fatal(err)
			}
			requireSameMap(t, "window", asMap(ext), want)
		})
	}
}

// TestInteropSnapshotExtents: a snapshot's extents are the image's as
// qemu-img map saw them when the snapshot was taken, whatever is written
// after (writes copy shared clusters elsewhere).
func TestInteropSnapshotExtents(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	dir := t.TempDir()
	path := filepath.Join(dir, "s.qcow2")
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", path, "4M")
	for _, cmd := range []string{"write -P 1 0 128k", "write -c -P 2 1M 64k", "write -z 2M 64k"} {
		run(t, dir, "qemu-io", "-f", "qcow2", "-c", cmd, path)
	}
	before := qemuMap(t, path)
	run(t, dir, "qemu-img", "snapshot", "-c", "s1", path)
	for _, cmd := range []string{"write -P 3 0 64k", "write -P 4 1M 64k", "write -P 5 3M 64k"} {
		run(t, dir, "qemu-io", "-f", "qcow2", "-c", cmd, path)
	}
	img := mustOpen(t, path, qcow2.OpenOptions{ReadOnly: true})
	defer img.Close()
	v, err := img.OpenSnapshot("s1")
	if err != nil {
		t.Fatal(err)
	}
	ext, err := v.Extents(0, v.Size())
	if err != nil {
		t.Fatal(err)
	}
	requireSameMap(t, "snapshot", asMap(ext), before)
	now, err := img.Extents(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	requireSameMap(t, "active", asMap(now), qemuMap(t, path))
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Extents(0, 1); !errors.Is(err, qcow2.ErrClosed) {
		t.Errorf("Extents after Close: err=%v, want ErrClosed", err)
	}
}

func TestExtentsArguments(t *testing.T) {
	img := mustCreate(t, filepath.Join(t.TempDir(), "a.qcow2"), qcow2.CreateOptions{Size: 1 << 20})
	defer img.Close()
	tests := []struct {
		name    string
		off, n  int64
		want    []qcow2.Extent
		wantErr error
	}{
		{"all", 0, math.MaxInt64, []qcow2.Extent{{Start: 0, Length: 1 << 20, Zero: true, Offset: -1}}, nil},
		{"window", 100, 1000, []qcow2.Extent{{Start: 100, Length: 1000, Zero: true, Offset: -1}}, nil},
		{"past the end", 2 << 20, 10, nil, nil},
		{"empty", 0, 0, nil, nil},
		{"negative offset", -1, 10, nil, qcow2.ErrInvalid},
		{"negative length", 0, -1, nil, qcow2.ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := img.Extents(tt.off, tt.n)
			if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil && err != nil) {
				t.Fatalf("err=%v, want %v", err, tt.wantErr)
			}
			if len(got) != 0 || len(tt.want) != 0 {
				if !reflect.DeepEqual(got, tt.want) {
					t.Fatalf("got %+v, want %+v", got, tt.want)
				}
			}
		})
	}
}
