package nbdattach

import (
	"bytes"
	"context"
	"encoding/json"
	"testing"
	"time"
)

// BenchmarkFio measures the server with fio's nbd engine (libnbd) against
// the memory backend: 4 KiB random I/O at queue depth 32 on one connection.
// It reports fio's IOPS; ns/op is meaningless here. Run with
//
//	go test -run '^$' -bench Fio ./pkg/nbdattach
func BenchmarkFio(b *testing.B) {
	requireTool(b, "fio")
	for _, rw := range []string{"randwrite", "randread"} {
		b.Run(rw, func(b *testing.B) {
			sock, _ := serveCounting(b, mustExport(b, NewMemBackend(1<<30), ExportOptions{}))
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			out, err := toolCommand(b, ctx, "fio", "--name=bench", "--ioengine=nbd",
				"--uri="+nbdURI(sock), "--rw="+rw, "--bs=4k", "--iodepth=32",
				"--size=1g", "--time_based", "--runtime=5s", "--ramp_time=1s",
				"--output-format=json").Output()
			if err != nil {
				b.Fatalf("fio: %v\n%s", err, out)
			}
			var res struct {
				Jobs []struct {
					Read, Write struct {
						IOPS float64 `json:"iops"`
					}
				} `json:"jobs"`
			}
			// The nbd engine prints a line of its own before the JSON.
			if i := bytes.IndexByte(out, '{'); i > 0 {
				out = out[i:]
			}
			if err := json.Unmarshal(out, &res); err != nil || len(res.Jobs) != 1 {
				b.Fatalf("fio output: %v\n%s", err, out)
			}
			b.ReportMetric(res.Jobs[0].Read.IOPS+res.Jobs[0].Write.IOPS, "iops")
		})
	}
}
