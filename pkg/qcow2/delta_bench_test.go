package qcow2_test

import (
	"bytes"
	"path/filepath"
	"testing"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// BenchmarkSnapshotDelta times SnapshotDelta of two snapshots of a 100 GiB
// disk (64 KiB clusters) between which 1 GiB was written: 16384 clusters,
// either scattered at random, so that every one of the 200 L2 tables was
// copied and must be compared entry by entry (the worst case), or one
// contiguous GiB (two tables differ, the rest are skipped unread). Base
// has one cluster in every L2 table's range, so every table exists in both.
// The image is reopened before timing, so its metadata cache starts cold
// and is smaller than the tables walked.
//
//	go test -run '^$' -bench BenchmarkSnapshotDelta -benchtime 20x ./pkg/qcow2/
func BenchmarkSnapshotDelta(b *testing.B) {
	const (
		size    = 100 << 30
		cluster = 64 << 10
		changed = 1 << 30
		span    = cluster / 8 * cluster // guest bytes per L2 table
	)
	for _, layout := range []string{"scattered", "contiguous"} {
		// Made once, outside b.Run, which calls its function once per b.N
		// it tries.
		path := filepath.Join(b.TempDir(), layout+".qcow2")
		img := mustCreate(b, path, qcow2.CreateOptions{Size: size, LazyRefcounts: true})
		data := bytes.Repeat([]byte{0x5a}, cluster)
		for off := int64(0); off < size; off += span {
			mustWrite(b, img, data, off)
		}
		mustSnapshot(b, img, "base")
		rng := newRand(b)
		picked := map[int64]bool{}
		for len(picked) < changed/cluster {
			c := int64(len(picked)) + 7<<10 // one GiB from 448 MiB: across a table boundary
			if layout == "scattered" {
				c = rng.Int64N(size / cluster)
			}
			if !picked[c] {
				picked[c] = true
				mustWrite(b, img, data, c*cluster)
			}
		}
		mustSnapshot(b, img, "target")
		if err := img.Close(); err != nil {
			b.Fatal(err)
		}
		b.Run(layout, func(b *testing.B) {
			img := mustOpen(b, path, qcow2.OpenOptions{ReadOnly: true})
			defer img.Close()
			var got int64
			for range b.N {
				delta, err := img.SnapshotDelta("base", "target", 0, size)
				if err != nil {
					b.Fatal(err)
				}
				got = 0
				for _, c := range delta {
					got += c.Length
				}
			}
			b.StopTimer()
			if got != changed {
				b.Fatalf("delta covers %d bytes, want %d", got, int64(changed))
			}
			b.ReportMetric(float64(got>>20), "MiB-changed")
		})
	}
}
