package qcow2_test

import (
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Benchmarks compare a qcow2 image with a raw file in the same directory,
// for the same workload. Names carry key=value parts so that
// `benchstat -col /format` sets qcow2 beside raw; hack/bench-qcow2.sh runs
// them and prints the qcow2/raw ratios. Both sides go through the page
// cache (no fsync), so the ratios measure the engine's own overhead.

const (
	benchRegion  = 256 << 20 // the bytes a workload touches
	benchVirtual = 1 << 30
)

// target is a qcow2 image or a raw file.
type target interface {
	io.ReaderAt
	io.WriterAt
	Close() error
}

type rawFile struct{ *os.File }

// syncTarget is what both targets offer to push dirty pages out before timing,
// so that one benchmark's writeback does not throttle the next.
func syncTarget(b *testing.B, t target) {
	b.Helper()
	var err error
	switch t := t.(type) {
	case *qcow2.Image:
		err = t.Flush()
	case rawFile:
		err = t.Sync()
	}
	if err != nil {
		b.Fatal(err)
	}
}

// openTarget creates a qcow2 image or a sparse raw file of benchVirtual
// bytes; prealloc writes the whole region and reads it once (warm cache).
// The returned function closes and removes it.
func openTarget(b *testing.B, format, dir string, prealloc bool) (target, func()) {
	b.Helper()
	path := filepath.Join(dir, fmt.Sprintf("bench-%d.%s", rand.Uint64(), format))
	var t target
	switch format {
	case "qcow2":
		img, err := qcow2.Create(path, qcow2.CreateOptions{Size: benchVirtual})
		if err != nil {
			b.Fatal(err)
		}
		t = img
	case "raw":
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			b.Fatal(err)
		}
		if err := f.Truncate(benchVirtual); err != nil {
			b.Fatal(err)
		}
		t = rawFile{f}
	}
	if prealloc {
		buf := benchData(1 << 20)
		for off := int64(0); off < benchRegion; off += int64(len(buf)) {
			if _, err := t.WriteAt(buf, off); err != nil {
				b.Fatal(err)
			}
		}
		for off := int64(0); off < benchRegion; off += int64(len(buf)) {
			if _, err := t.ReadAt(buf, off); err != nil {
				b.Fatal(err)
			}
		}
	}
	syncTarget(b, t)
	done := false
	remove := func() {
		if !done {
			done = true
			t.Close()
			os.Remove(path)
		}
	}
	b.Cleanup(remove)
	return t, remove
}

func benchData(n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(i*7 + 1)
	}
	return p
}

type workload struct {
	name     string
	bs       int
	write    bool
	random   bool
	parallel bool
}

var workloads = []workload{
	{name: "seqwrite1M", bs: 1 << 20, write: true},
	{name: "seqread1M", bs: 1 << 20},
	{name: "randwrite4k", bs: 4096, write: true, random: true},
	{name: "randread4k", bs: 4096, random: true},
	{name: "randwrite4k-parallel", bs: 4096, write: true, random: true, parallel: true},
	{name: "randread4k-parallel", bs: 4096, random: true, parallel: true},
	{name: "seqwrite1M-parallel", bs: 1 << 20, write: true, parallel: true},
}

func BenchmarkIO(b *testing.B) {
	for _, w := range workloads {
		for _, state := range []string{"fresh", "prealloc"} {
			for _, format := range []string{"qcow2", "raw"} {
				b.Run(fmt.Sprintf("op=%s/state=%s/format=%s", w.name, state, format), func(b *testing.B) {
					benchWorkload(b, w, format, state == "prealloc")
				})
			}
		}
	}
}

func benchWorkload(b *testing.B, w workload, format string, prealloc bool) {
	dir := b.TempDir()
	t, remove := openTarget(b, format, dir, prealloc)
	b.SetBytes(int64(w.bs))
	blocks := int64(benchRegion / w.bs)
	// A fresh image stays fresh: once the region is used up, sequential
	// writers move on to a new file (outside the timer).
	var next atomic.Int64
	op := func(t target, buf []byte, rng *rand.Rand) error {
		var blk int64
		if w.random {
			blk = rng.Int64N(blocks)
		} else {
			blk = next.Add(1) - 1
		}
		off := blk % blocks * int64(w.bs)
		var err error
		if w.write {
			_, err = t.WriteAt(buf, off)
		} else {
			_, err = t.ReadAt(buf, off)
		}
		return err
	}
	if w.parallel {
		b.SetParallelism(4)
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			buf := benchData(w.bs)
			rng := rand.New(rand.NewPCG(rand.Uint64(), 1))
			for pb.Next() {
				if err := op(t, buf, rng); err != nil {
					b.Error(err)
					return
				}
			}
		})
		return
	}
	buf := benchData(w.bs)
	rng := rand.New(rand.NewPCG(1, 2))
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		if !prealloc && w.write && !w.random && next.Load() == blocks {
			b.StopTimer()
			remove()
			t, remove = openTarget(b, format, dir, false)
			next.Store(0)
			b.StartTimer()
		}
		if err := op(t, buf, rng); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkFlush measures Flush after a batch of 64 random 4k writes, the
// cost a guest's fsync pays.
func BenchmarkFlush(b *testing.B) {
	for _, state := range []string{"fresh", "prealloc"} {
		b.Run("state="+state, func(b *testing.B) {
			t, _ := openTarget(b, "qcow2", b.TempDir(), state == "prealloc")
			img := t.(*qcow2.Image)
			buf := benchData(4096)
			rng := rand.New(rand.NewPCG(3, 4))
			for b.Loop() {
				for range 64 {
					if _, err := img.WriteAt(buf, rng.Int64N(benchRegion/4096)*4096); err != nil {
						b.Fatal(err)
					}
				}
				if err := img.Flush(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
