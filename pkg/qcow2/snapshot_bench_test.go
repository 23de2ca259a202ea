package qcow2_test

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// BenchmarkSnapshot times CreateSnapshot and DeleteSnapshot against the
// amount of allocated data. The images are made by qemu-img with
// preallocation=metadata: every cluster is allocated (L2 entries and
// refcounts, as with written data) while the file stays sparse, so 10 GiB
// allocated costs no 10 GiB of writes to set up.
//
//	go test -run '^$' -bench BenchmarkSnapshot -benchtime 5x ./pkg/qcow2/
func BenchmarkSnapshot(b *testing.B) {
	requireTool(b, "qemu-img")
	for _, alloc := range []int64{1 << 30, 10 << 30, 100 << 30} {
		b.Run(fmt.Sprintf("allocated=%dGiB", alloc>>30), func(b *testing.B) {
			dir := b.TempDir()
			path := filepath.Join(dir, "bench.qcow2")
			run(b, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path, fmt.Sprint(alloc))
			img := mustOpen(b, path, qcow2.OpenOptions{})
			defer img.Close()
			clusters := alloc >> 16
			b.Run("create", func(b *testing.B) {
				for i := 0; i < b.N; i++ {
					if _, err := img.CreateSnapshot("bench"); err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					if err := img.DeleteSnapshot("bench"); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(clusters), "ns/cluster")
			})
			b.Run("delete", func(b *testing.B) {
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					if _, err := img.CreateSnapshot("bench"); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
					if err := img.DeleteSnapshot("bench"); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(clusters), "ns/cluster")
			})
		})
	}
}
