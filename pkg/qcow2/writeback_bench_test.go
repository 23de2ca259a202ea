package qcow2_test

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// syncCountingOSFile counts the fdatasyncs an image issues on a real file.
type syncCountingOSFile struct {
	qcow2.OSFile
	syncs atomic.Int64
}

func (f *syncCountingOSFile) Sync() error {
	f.syncs.Add(1)
	return f.OSFile.Sync()
}

// BenchmarkWriteBackAlloc: 4 KiB writes, 16 in flight, each to a cluster
// never written before (in a random order), each followed by WriteBack as
// the driver's write path does (mode=none: without it). On a real file in
// the test's temporary directory, fdatasyncs included; it reports writes/s
// and fdatasyncs per write.
func BenchmarkWriteBackAlloc(b *testing.B) {
	const size, cs, bs = 16 << 30, 64 << 10, 4 << 10 // 2 MiB of L2 tables: all cached
	perm := rand.Perm(size / cs)
	for _, mode := range []string{"lazy", "strict", "none"} {
		b.Run("mode="+mode, func(b *testing.B) {
			if b.N > len(perm) {
				b.Fatalf("%d writes: more than the %d clusters", b.N, len(perm))
			}
			path := filepath.Join(b.TempDir(), "wb.qcow2")
			osf, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				b.Fatal(err)
			}
			f := &syncCountingOSFile{OSFile: qcow2.OSFile{File: osf}}
			img, err := qcow2.CreateFile(f, qcow2.CreateOptions{Size: size, ClusterSize: cs, LazyRefcounts: mode == "lazy"})
			if err != nil {
				b.Fatal(err)
			}
			defer img.Close()
			buf := benchData(bs)
			var next atomic.Int64
			syncs := f.syncs.Load()
			b.SetParallelism(max(1, 16/runtime.GOMAXPROCS(0))) // 16 goroutines
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					i := next.Add(1) - 1
					off := int64(perm[i])*cs + i%(cs/bs)*bs
					if _, err := img.WriteAt(buf, off); err != nil {
						b.Error(err)
						return
					}
					if mode == "none" {
						continue
					}
					if err := img.WriteBack(); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "writes/s")
			b.ReportMetric(float64(f.syncs.Load()-syncs)/float64(b.N), "fdatasyncs/write")
		})
	}
}
