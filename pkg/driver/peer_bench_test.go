package driver

import (
	"context"
	"crypto/tls"
	"io"
	"math/rand/v2"
	"os"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// BenchmarkCrossNodeCopy times a cross-node restore of a 4 GiB snapshot
// holding 1 GiB of data (1 MiB of random bytes every 4 MiB, 64 KiB
// clusters) between two drivers on loopback, mutual TLS and all, against
// a sequential read (1 MiB reads) of the source image file, timed in the
// same iteration right before it. Both start with the source file out of
// the page cache (POSIX_FADV_DONTNEED), as a snapshot on another node
// mostly is: the read is the file's read speed from its disk, the copy
// reads it from there too. The same read from the page cache is reported
// beside them (hot-read-MB/s). Speeds are in MB/s of data; copy/read is
// the ratio the goal (0.8) is about.
//
// Two more figures say where the copy's time goes on a machine whose
// cores both ends share: tls-MB/s is 1 GiB sent over a bare crypto/tls
// connection between the same two peer certificates on loopback (no
// disk, no HTTP, no framing: the most the mandated channel moves here),
// and copy/tls the copy's share of it; copy-cpu-s/GiB is the CPU time
// (user and system, both ends) the copy took per GiB of data.
//
//	go test -run '^$' -bench BenchmarkCrossNodeCopy -benchtime 3x ./pkg/driver/
func BenchmarkCrossNodeCopy(b *testing.B) {
	const size, every, run = 4 << 30, 4 << 20, 1 << 20
	ca := newTestCA(b, "peer-ca")
	a := newPeerEnv(b, ca, "node-a", "")
	n := newPeerEnv(b, ca, "node-b", a.d.peerAddress().String())
	vol := a.mustCreate(b, createReq("src", size, nil)).GetVolumeId()
	path := a.d.store.imagePath(vol)
	img, err := qcow2.Open(path, qcow2.OpenOptions{Lock: true})
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, run)
	rng := rand.New(rand.NewPCG(1, 2))
	for off := int64(0); off < size; off += every {
		for i := range buf {
			buf[i] = byte(rng.Uint32() | 1)
		}
		if _, err := img.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	if err := img.Close(); err != nil {
		b.Fatal(err)
	}
	snap := mustSnapshot(b, a, "snap", vol)
	const data = size / every * run
	var readTime, hotTime, copyTime, tlsTime, copyCPU time.Duration
	i := 0
	for b.Loop() {
		tlsTime += tlsStream(b, a, n, data)
		dropCache(b, path)
		start := time.Now()
		readFile(b, path)
		readTime += time.Since(start)
		start = time.Now()
		readFile(b, path)
		hotTime += time.Since(start)
		dropCache(b, path)
		start, cpu := time.Now(), cpuTime()
		id := copyOnce(b, n, restoreReq("r", snap, size))
		copyTime += time.Since(start)
		copyCPU += cpuTime() - cpu
		b.StopTimer()
		if _, err := n.ctrl.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		i++
	}
	mbps := func(d time.Duration) float64 { return float64(data*i) / 1e6 / d.Seconds() }
	b.ReportMetric(mbps(readTime), "read-MB/s")
	b.ReportMetric(mbps(hotTime), "hot-read-MB/s")
	b.ReportMetric(mbps(copyTime), "copy-MB/s")
	b.ReportMetric(readTime.Seconds()/copyTime.Seconds(), "copy/read")
	b.ReportMetric(mbps(tlsTime), "tls-MB/s")
	b.ReportMetric(tlsTime.Seconds()/copyTime.Seconds(), "copy/tls")
	b.ReportMetric(copyCPU.Seconds()/float64(i)/(float64(data)/(1<<30)), "copy-cpu-s/GiB")
	b.Logf("sequential read of the source file %.0f MB/s from disk (%.0f MB/s from the page cache), cross-node copy %.0f MB/s of data: ratio %.2f; a bare TLS stream between the peers %.0f MB/s (copy/tls %.2f); the copy's CPU %.2f s per GiB",
		mbps(readTime), mbps(hotTime), mbps(copyTime), readTime.Seconds()/copyTime.Seconds(),
		mbps(tlsTime), tlsTime.Seconds()/copyTime.Seconds(), copyCPU.Seconds()/float64(i)/(float64(data)/(1<<30)))
}

// tlsStream times n bytes sent from a's peer listener configuration to
// b's peer client configuration over crypto/tls on loopback, in 4 MiB
// writes, nothing else done with them.
func tlsStream(tb testing.TB, a, b *testEnv, n int64) time.Duration {
	tb.Helper()
	ccfg, err := b.d.peer.tls.clientConfig(b.opts.PeerServerName)
	if err != nil {
		tb.Fatal(err)
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", a.d.peer.tls.serverConfig())
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	errc := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			errc <- err
			return
		}
		defer c.Close()
		buf := make([]byte, 4<<20)
		for sent := int64(0); sent < n && err == nil; sent += int64(len(buf)) {
			_, err = c.Write(buf[:min(n-sent, int64(len(buf)))])
		}
		errc <- err
	}()
	c, err := tls.Dial("tcp", l.Addr().String(), ccfg)
	if err != nil {
		tb.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	got, err := io.CopyBuffer(io.Discard, io.LimitReader(c, n), make([]byte, 4<<20))
	d := time.Since(start)
	if err != nil || got != n {
		tb.Fatalf("TLS stream: %d of %d bytes: %v", got, n, err)
	}
	if err := <-errc; err != nil {
		tb.Fatal(err)
	}
	return d
}

// cpuTime is the CPU time, user and system, this process has used.
func cpuTime() time.Duration {
	var r unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &r); err != nil {
		return 0
	}
	return time.Duration(r.Utime.Nano() + r.Stime.Nano())
}

// dropCache writes path's dirty pages and drops its cached ones.
func dropCache(b *testing.B, path string) {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		b.Fatal(err)
	}
}

func readFile(b *testing.B, path string) {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if _, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{f}, make([]byte, 1<<20)); err != nil {
		b.Fatal(err)
	}
}

// copyOnce starts the copy and waits for it, without the provisioner's
// retry delay.
func copyOnce(b *testing.B, e *testEnv, req *csi.CreateVolumeRequest) string {
	_, err := e.ctrl.CreateVolume(context.Background(), req)
	id := volumeIDFor(req.GetName())
	if status.Code(err) == codes.Unavailable {
		if cc := e.d.copies.get(id); cc != nil {
			<-cc.done
		}
		_, err = e.ctrl.CreateVolume(context.Background(), req)
	}
	if err != nil {
		b.Fatal(err)
	}
	return id
}
