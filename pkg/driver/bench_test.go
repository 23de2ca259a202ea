package driver

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/csi-qcow2/csi-qcow2/pkg/qcow2"
)

// Benchmarks of the controller RPCs whose cost may grow with a volume's
// size, each next to peers timed in the same run on identical images
// (sub-benchmarks impl=driver, impl=qemu-img, ...), so that
// hack/bench-driver.sh can print ratios. The driver is called in process
// (no gRPC) with the fakes at the OS boundary; its images live in
// b.TempDir(), so TMPDIR picks the filesystem (the script points it at XFS
// loop mounts with and without reflink for BenchmarkClone).
//
//	go test -run '^$' -bench 'BenchmarkCreateVolume|BenchmarkSnapshot' -benchtime 3x ./pkg/driver/
//
// Every figure is also reported as ms/op. With CSI_QCOW2_BENCH_BIN set to
// a csi-qcow2 binary, its `image create`/`image snapshot` are timed too
// (impl=image-cli): a process like qemu-img, so that ratio is like for
// like where the driver's in-process figure is not.

const benchBinEnv = "CSI_QCOW2_BENCH_BIN"

// BenchmarkCreateVolume times CreateVolume of an empty volume against
// qemu-img create of the same size and cluster size.
func BenchmarkCreateVolume(b *testing.B) {
	for _, size := range []int64{1 << 30, 1 << 40} {
		b.Run("size="+sizeName(size), func(b *testing.B) {
			dir := b.TempDir()
			d := newBareDriver(b, filepath.Join(dir, "data"))
			b.Run("impl=driver", func(b *testing.B) {
				i := 0
				for b.Loop() {
					id := mustCreateVolume(b, d, createReq(fmt.Sprint("v", i), size, nil))
					b.StopTimer()
					mustDeleteVolume(b, d, id)
					b.StartTimer()
					i++
				}
				reportMs(b)
			})
			peer := filepath.Join(dir, "peer.qcow2")
			each := func(b *testing.B, name string, args ...string) {
				b.Run("impl="+name, func(b *testing.B) {
					for b.Loop() {
						runBench(b, args...)
						b.StopTimer()
						os.Remove(peer)
						b.StartTimer()
					}
					reportMs(b)
				})
			}
			each(b, "qemu-img", "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", peer, fmt.Sprint(size))
			if bin := os.Getenv(benchBinEnv); bin != "" {
				each(b, "image-cli", bin, "image", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", peer, fmt.Sprint(size))
			}
		})
	}
}

// BenchmarkSnapshot times CreateSnapshot and DeleteSnapshot (the RPCs: the
// image is opened, snapshotted, flushed and closed, the metadata written)
// against `qemu-img snapshot -c/-d` on an identical image. Both images are
// made by qemu-img with preallocation=metadata, 64 KiB clusters: every
// cluster is allocated as with written data while the file stays sparse.
func BenchmarkSnapshot(b *testing.B) {
	benchTool(b, "qemu-img")
	for _, alloc := range []int64{1 << 30, 4 << 30, 10 << 30} {
		b.Run("allocated="+sizeName(alloc), func(b *testing.B) {
			dir := b.TempDir()
			d := newBareDriver(b, filepath.Join(dir, "data"))
			vol := mustCreateVolume(b, d, createReq("v", alloc, nil))
			prealloc := func(path string) {
				os.Remove(path)
				runBench(b, "qemu-img", "create", "-q", "-f", "qcow2", "-o",
					"cluster_size=65536,preallocation=metadata", path, fmt.Sprint(alloc))
			}
			prealloc(d.store.imagePath(vol))
			peer := filepath.Join(dir, "peer.qcow2")
			prealloc(peer)
			ctx := context.Background()
			create := func(b *testing.B) string {
				r, err := d.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: vol})
				if err != nil {
					b.Fatal(err)
				}
				return r.GetSnapshot().GetSnapshotId()
			}
			remove := func(b *testing.B, id string) {
				if _, err := d.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id}); err != nil {
					b.Fatal(err)
				}
			}
			b.Run("create/impl=driver", func(b *testing.B) {
				for b.Loop() {
					id := create(b)
					b.StopTimer()
					remove(b, id)
					b.StartTimer()
				}
				reportMs(b)
			})
			b.Run("delete/impl=driver", func(b *testing.B) {
				for b.Loop() {
					b.StopTimer()
					id := create(b)
					b.StartTimer()
					remove(b, id)
				}
				reportMs(b)
			})
			tools := [][]string{{"qemu-img", "qemu-img", "snapshot"}}
			if bin := os.Getenv(benchBinEnv); bin != "" {
				tools = append(tools, []string{"image-cli", bin, "image", "snapshot"})
			}
			for _, t := range tools {
				name, cmd := t[0], t[1:]
				snap := func(b *testing.B, op string) {
					runBench(b, append(cmd, "-q", op, "s", peer)...)
				}
				b.Run("create/impl="+name, func(b *testing.B) {
					for b.Loop() {
						snap(b, "-c")
						b.StopTimer()
						snap(b, "-d")
						b.StartTimer()
					}
					reportMs(b)
				})
				b.Run("delete/impl="+name, func(b *testing.B) {
					for b.Loop() {
						b.StopTimer()
						snap(b, "-c")
						b.StartTimer()
						snap(b, "-d")
					}
					reportMs(b)
				})
			}
		})
	}
}

// BenchmarkClone times CreateVolume with a volume source (clone) and with
// a snapshot source (restore) of a volume holding ALLOCATED bytes of
// written data, against peers copying the same image file: cp
// --reflink=never --sparse=always, qemu-img convert (of the snapshot, for
// restore) and, where the filesystem can reflink, cp --reflink=always
// (plus qemu-img snapshot -a and -d, for restore: the driver's reflink
// path step for step). Every peer's output is fsynced inside the timing,
// as the driver's is. The driver's figures also report "shared": the
// fraction of the new image's extents shared with another file (FIEMAP),
// 1 when the clone was a reflink, 0 when it was copied.
//
// The source is written through pkg/qcow2 with pseudo-random data (a
// 4 GiB source takes a while to set up); restore's snapshot is taken after
// the clone runs, and then 64 MiB of the volume are overwritten. The host
// is synced (untimed) after the fill and after every iteration.
func BenchmarkClone(b *testing.B) {
	benchTool(b, "qemu-img")
	for _, alloc := range []int64{1 << 30, 4 << 30} {
		b.Run("allocated="+sizeName(alloc), func(b *testing.B) {
			dir := b.TempDir()
			d := newBareDriver(b, filepath.Join(dir, "data"))
			src := mustCreateVolume(b, d, createReq("src", alloc, nil))
			fillVolume(b, d, src, 0, alloc, 1)
			srcPath := d.store.imagePath(src)
			reflinks := canReflink(b, dir)
			dst := filepath.Join(dir, "peer.qcow2")
			peer := func(b *testing.B, name string, cmds ...[]string) {
				b.Run("impl="+name, func(b *testing.B) {
					for b.Loop() {
						for _, c := range cmds {
							runBench(b, c...)
						}
						fsyncFile(b, dst)
						b.StopTimer()
						os.Remove(dst)
						settle()
						b.StartTimer()
					}
					reportMs(b)
				})
			}
			driver := func(b *testing.B, source *csi.VolumeContentSource) {
				b.Run("impl=driver", func(b *testing.B) {
					i, shared := 0, 0.0
					for b.Loop() {
						id := mustCreateVolume(b, d, withSource(createReq(fmt.Sprint("c", i), alloc, nil), source))
						b.StopTimer()
						s, t := fiemapShared(b, d.store.imagePath(id))
						shared += float64(s) / float64(t)
						mustDeleteVolume(b, d, id)
						settle()
						b.StartTimer()
						i++
					}
					reportMs(b)
					b.ReportMetric(shared/float64(i), "shared")
				})
			}
			convert := []string{"qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", "-o", "cluster_size=65536"}
			cpNever := []string{"cp", "--reflink=never", "--sparse=always", srcPath, dst}
			cpAlways := []string{"cp", "--reflink=always", srcPath, dst}

			b.Run("clone", func(b *testing.B) {
				driver(b, volumeSource(src))
				peer(b, "cp-reflink-never", cpNever)
				peer(b, "qemu-img-convert", append(convert, srcPath, dst))
				if reflinks {
					peer(b, "cp-reflink-always", cpAlways)
				}
			})

			snap, err := d.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: "snap", SourceVolumeId: src})
			if err != nil {
				b.Fatal(err)
			}
			snapID := snap.GetSnapshot().GetSnapshotId()
			defer d.DeleteSnapshot(context.Background(), &csi.DeleteSnapshotRequest{SnapshotId: snapID})
			fillVolume(b, d, src, 0, min(alloc, 64<<20), 2)

			b.Run("restore", func(b *testing.B) {
				driver(b, snapshotSource(snapID))
				peer(b, "cp-reflink-never", cpNever)
				peer(b, "qemu-img-convert", append(convert, "-l", "snapshot.name="+snapID, srcPath, dst))
				if reflinks {
					peer(b, "cp-reflink-always+qemu-img-snapshot", cpAlways,
						[]string{"qemu-img", "snapshot", "-a", snapID, dst},
						[]string{"qemu-img", "snapshot", "-d", snapID, dst})
				}
			})
		})
	}
}

// fillVolume writes n bytes of pseudo-random data at off into volume id.
func fillVolume(b *testing.B, d *Driver, id string, off, n int64, seed uint64) {
	b.Helper()
	img, err := qcow2.Open(d.store.imagePath(id), qcow2.OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	buf := randomBytes(1<<20, seed)
	for o := off; o < off+n; o += int64(len(buf)) {
		buf[0]++ // no two MiB alike
		if _, err := img.WriteAt(buf[:min(int64(len(buf)), off+n-o)], o); err != nil {
			img.Close()
			b.Fatal(err)
		}
	}
	if err := img.Close(); err != nil {
		b.Fatal(err)
	}
	settle()
}

// settle writes back every dirty page of the host (sync(2)), so that no
// run pays for an earlier one's writeback (deleted copies, other files on
// the disk under a loop mount).
func settle() { unix.Sync() }

// canReflink reports whether dir's filesystem clones files (FICLONE).
func canReflink(b *testing.B, dir string) bool {
	b.Helper()
	a, c := filepath.Join(dir, "reflink-probe-a"), filepath.Join(dir, "reflink-probe-b")
	defer os.Remove(a)
	defer os.Remove(c)
	if err := os.WriteFile(a, []byte("probe"), 0o600); err != nil {
		b.Fatal(err)
	}
	return exec.Command("cp", "--reflink=always", a, c).Run() == nil
}

func mustDeleteVolume(b *testing.B, d *Driver, id string) {
	b.Helper()
	if _, err := d.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		b.Fatal(err)
	}
}

func fsyncFile(b *testing.B, path string) {
	b.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
}

func runBench(b *testing.B, args ...string) {
	b.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		b.Fatalf("%v: %v\n%s", args, err, out)
	}
}

// benchTool skips the benchmark when a tool is missing (benchmarks are
// never part of CI's tests).
func benchTool(b *testing.B, name string) {
	b.Helper()
	if _, err := exec.LookPath(name); err != nil {
		b.Skipf("%s not installed: %v", name, err)
	}
}

func reportMs(b *testing.B) {
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1e6, "ms/op")
}

func sizeName(n int64) string {
	if n >= 1<<40 && n%(1<<40) == 0 {
		return fmt.Sprintf("%dTiB", n>>40)
	}
	return fmt.Sprintf("%dGiB", n>>30)
}
