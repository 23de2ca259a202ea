#!/usr/bin/env bash
# Usage: hack/bench-driver.sh [-p PARTS] [-c COUNT] [-n CLONE_ITERS] [-t SECONDS] [-d DIR]
#
# Measures the driver's size-dependent operations and the memory of a
# served volume, each against a peer timed in the same run on an identical
# image, and prints ratios. PARTS (comma-separated, default all):
#
#   create  CreateVolume of an empty 1 GiB and 1 TiB volume (pkg/driver's
#           BenchmarkCreateVolume: the driver in process, fakes at the OS
#           boundary, image and metadata fsynced) against `qemu-img create`
#           and our `csi-qcow2 image create` (both a process each).
#   snap    CreateSnapshot and DeleteSnapshot RPCs with 1, 4 and 10 GiB
#           allocated (64 KiB clusters, qemu-img preallocation=metadata)
#           against `qemu-img snapshot -c/-d` and `csi-qcow2 image snapshot`
#           on an identical image (BenchmarkSnapshot). Goal: create < 1 s
#           at 10 GiB.
#   clone   CreateVolume from a volume (clone) and from a snapshot (restore)
#           of a volume with 1 and 4 GiB of written data (BenchmarkClone),
#           on two fresh 20 GiB XFS loop mounts (direct I/O to a sparse
#           file in DIR): reflink=1 (FICLONE) and reflink=0 (the sparse
#           copy). Peers: cp --reflink=never
#           --sparse=always, qemu-img convert (-l for restore) and, with
#           reflink, cp --reflink=always (+ qemu-img snapshot -a/-d for
#           restore). Every peer's output is fsynced inside its time, as
#           the driver's is. Needs root and mkfs.xfs; without them the
#           clone part runs on DIR's filesystem only.
#   rss     `csi-qcow2 image serve -e 8` and qemu-nbd (-f qcow2
#           --cache=writeback --aio=threads -e 8 --discard=unmap -t) each
#           serving a fresh 1 TiB qcow2 while fio's nbd engine runs 4 KiB
#           random 50/50 reads and writes over the whole 1 TiB at QD32 for
#           SECONDS (default 25); /proc/PID/status is sampled every 0.2 s.
#           Prints the peak VmHWM, RssAnon/RssFile at the end and IOPS, and
#           for ours the GC count and live heap (GODEBUG=gctrace=1).
#           Goal: ours <= 40 MiB.
#
# Go benchmarks run COUNT times (-c, default 5; the clone part once, with
# CLONE_ITERS iterations, -n, default 3) and the median ms/op is printed.
# Ratio = driver time / peer time: below 1 the driver is faster; on the
# image-cli rows it is our CLI's time / qemu-img's, process against process. With the
# defaults the whole script takes about 4 minutes on 2 busy cores; the
# figures include fsyncs, so a busy disk moves them: compare ratios of one
# run, not absolutes across runs.
#
# Options: -d directory for the work files (default: a temporary directory
# under /var/tmp, on disk rather than tmpfs). Set BENCH_KEEP=1 to keep the
# raw outputs (bench.out, rss.*).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
parts=create,snap,clone,rss count=5 cloneiters=3 runtime=25 dir=
while getopts 'p:c:n:t:d:h' opt; do
	case $opt in
	p) parts=$OPTARG ;;
	c) count=$OPTARG ;;
	n) cloneiters=$OPTARG ;;
	t) runtime=$OPTARG ;;
	d) dir=$OPTARG ;;
	h) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
	*) exit 2 ;;
	esac
done
want() { [[ ",$parts," == *",$1,"* ]]; }
for tool in go qemu-img qemu-nbd fio; do
	command -v "$tool" >/dev/null || { echo "bench-driver: $tool is missing (qemu-utils, fio)" >&2; exit 2; }
done

work=$(mktemp -d "${dir:-/var/tmp}/bench-driver.XXXXXX")
pids=() mounts=() loops=()
cleanup() {
	for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" || true; done
	for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
	if [ "${BENCH_KEEP:-}" = 1 ]; then
		rm -f "$work"/*.img "$work"/*.qcow2
		echo "bench-driver: outputs kept in $work"
	else
		rm -rf "$work"
	fi
}
trap cleanup EXIT

bin=$work/csi-qcow2
(cd "$repo" && CGO_ENABLED=0 go build -o "$bin" ./cmd/csi-qcow2)
(cd "$repo" && go test -c -o "$work/driver.test" ./pkg/driver)
out=$work/bench.out
: >"$out"
t0=$SECONDS

# gobench TMPDIR TAG REGEXP ARGS...: runs pkg/driver benchmarks with their
# images under TMPDIR; TAG (fs=...) is inserted after the benchmark's name.
gobench() {
	local tmp=$1 tag=$2 re=$3
	shift 3
	mkdir -p "$tmp"
	(cd "$repo/pkg/driver" && TMPDIR=$tmp CSI_QCOW2_BENCH_BIN=$bin \
		"$work/driver.test" -test.run '^$' -test.bench "$re" "$@") |
		awk -v tag="$tag" '/^Benchmark/ && tag != "" { sub(/\//, "/" tag "/") } { print; fflush() }' | tee -a "$out"
}

if want create; then
	echo "bench-driver: CreateVolume, $count x 3 iterations"
	gobench "$work/tmp" "" '^BenchmarkCreateVolume$' -test.benchtime 3x -test.count "$count"
fi
if want snap; then
	echo "bench-driver: CreateSnapshot/DeleteSnapshot, $count x 3 iterations"
	gobench "$work/tmp" "" '^BenchmarkSnapshot$' -test.benchtime 3x -test.count "$count"
fi

# xfs_mount NAME REFLINK: a fresh 20 GiB XFS on a loop device, mounted at
# mnt=$work/NAME (set here, not printed: the trap must see mounts). The
# loop device does direct I/O to its sparse backing file: with the host's
# page cache in between, every byte would be cached twice, 4 GiB copies
# evicted their own source, and which run came first decided the figures.
xfs_mount() {
	local img=$work/$1.img dev
	mnt=$work/$1
	truncate -s 20G "$img"
	mkfs.xfs -q -m reflink="$2" "$img"
	mkdir -p "$mnt"
	dev=$(losetup --direct-io=on -f --show "$img")
	loops+=("$dev")
	mount -o discard "$dev" "$mnt" # deleted copies leave the backing file
	mounts+=("$mnt")
}

if want clone; then
	if [ "$(id -u)" = 0 ] && command -v mkfs.xfs >/dev/null; then
		for rl in 1 0; do
			name=xfs-reflink$rl
			xfs_mount "$name" "$rl"
			echo "bench-driver: clone and restore on XFS reflink=$rl, $cloneiters iterations"
			gobench "$mnt/tmp" "fs=$name" '^BenchmarkClone$' -test.benchtime "${cloneiters}x"
			umount "$mnt"
			losetup -d "${loops[0]}"
			mounts=() loops=()
			rm -f "$work/$name.img"
		done
	else
		echo "bench-driver: not root or no mkfs.xfs: clone and restore on $work's filesystem only"
		gobench "$work/tmp" "fs=$(stat -f -c %T "$work")" '^BenchmarkClone$' -test.benchtime "${cloneiters}x"
	fi
fi

# rss SERVER: serves a fresh 1 TiB image with SERVER under fio's load and
# appends "SERVER hwm_kib anon_kib file_kib read_iops write_iops" to
# $work/rss.results.
rss() {
	local server=$1 img=$work/rss.$1.qcow2 sock=$work/rss.$1.sock pid
	qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" 1T
	case $server in
	ours) GODEBUG=gctrace=1 "$bin" image serve -e 8 -k "$sock" "$img" >/dev/null 2>"$work/rss.ours.gctrace" & ;;
	qemu-nbd) qemu-nbd -f qcow2 --cache=writeback --aio=threads -e 8 --discard=unmap -t -k "$sock" "$img" & ;;
	esac
	pid=$!
	pids+=("$pid")
	for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
	(while sleep 0.2; do
		awk '/^(VmRSS|VmHWM):/ { printf "%s %s ", $1, $2 } END { print "" }' "/proc/$pid/status" 2>/dev/null || exit 0
	done) >"$work/rss.$server.samples" &
	local sampler=$!
	fio --name=rss --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --size=1T \
		--rw=randrw --bs=4k --iodepth=32 --norandommap --randrepeat=0 \
		--time_based --runtime="$runtime" --output-format=terse --terse-version=3 >"$work/rss.$server.fio"
	local status
	status=$(awk '/^(VmHWM|RssAnon|RssFile):/ { printf "%s ", $2 }' "/proc/$pid/status")
	kill "$sampler" 2>/dev/null || true
	kill -KILL "$pid"
	wait "$pid" 2>/dev/null || true
	pids=()
	rm -f "$img"
	awk -F';' -v s="$server" -v st="$status" '/^3;/ { print s, st, $8, $49 }' "$work/rss.$server.fio" | tee -a "$work/rss.results" |
		awk '{ printf "bench-driver: %-8s peak VmHWM %.1f MiB, RssAnon %.1f MiB, RssFile %.1f MiB; %d read + %d write IOPS\n", $1, $2 / 1024, $3 / 1024, $4 / 1024, $5, $6 }'
}

if want rss; then
	echo "bench-driver: RSS of a served 1 TiB image, 4k randrw QD32 over all of it, $runtime s each"
	: >"$work/rss.results"
	rss ours
	rss qemu-nbd
fi

echo
echo "bench-driver: done in $((SECONDS - t0)) s; median ms/op of $count runs (clone: 1 run of $cloneiters);"
echo "ratio = driver time / peer time (below 1: the driver is faster)"
printf '%-46s %24s  %-36s %12s %7s\n' workload driver peer "peer" ratio
awk '
	/^Benchmark/ {
		name = $1; sub(/^Benchmark/, "", name); sub(/-[0-9]+$/, "", name)
		key = name; sub(/\/impl=.*/, "", key)
		impl = name; sub(/.*\/impl=/, "", impl)
		for (i = 2; i < NF; i++) {
			if ($(i + 1) == "ms/op") ms[key, impl] = ms[key, impl] " " $i
			if ($(i + 1) == "shared") shared[key] = $i
		}
		if (!((key, impl) in seen)) { seen[key, impl] = 1; impls[key] = impls[key] " " impl }
		if (!(key in kseen)) { kseen[key] = 1; order[n++] = key }
	}
	function median(s,   a, k, i, j, t) {
		k = split(s, a, " ")
		for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
		return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
	}
	END {
		for (i = 0; i < n; i++) {
			k = order[i]; d = median(ms[k, "driver"])
			label = sprintf("%.1f ms", d)
			if (k in shared) label = label sprintf(" (shared %.2f)", shared[k])
			m = split(impls[k], list, " "); first = 1
			for (j = 1; j <= m; j++) {
				if (list[j] == "driver") continue
				p = median(ms[k, list[j]]); ratio = p ? d / p : 0; peer = list[j]
				if (peer == "image-cli") { # a process, like qemu-img: compare those two
					q = median(ms[k, "qemu-img"]); ratio = q ? p / q : 0; peer = "image-cli (ratio: cli/qemu-img)"
				}
				printf "%-46s %24s  %-36s %9.1f ms %7.3g\n", first ? k : "", first ? label : "", peer, p, ratio
				first = 0
			}
			if (k ~ /^Snapshot\/allocated=10GiB\/create$/)
				goal = sprintf("goal: CreateSnapshot at 10 GiB allocated < 1 s: %.0f ms, %s", d, d < 1000 ? "met" : "NOT MET")
		}
		if (goal != "") print goal
	}' "$out"

if want rss; then
	echo
	echo "RSS under load (KiB); ratio = ours / qemu-nbd"
	awk '
		{ hwm[$1] = $2; anon[$1] = $3; file[$1] = $4; r[$1] = $5; w[$1] = $6 }
		END {
			printf "%-9s %12s %10s %10s %10s %10s\n", "server", "peak VmHWM", "RssAnon", "RssFile", "read IOPS", "write IOPS"
			split("ours qemu-nbd", servers, " ")
			for (i = 1; i <= 2; i++) {
				s = servers[i]
				if (s in hwm) printf "%-9s %12d %10d %10d %10d %10d\n", s, hwm[s], anon[s], file[s], r[s], w[s]
			}
			if (hwm["qemu-nbd"]) printf "peak ratio ours/qemu-nbd %.2f\n", hwm["ours"] / hwm["qemu-nbd"]
			printf "goal: ours <= 40 MiB: %.1f MiB, %s\n", hwm["ours"] / 1024, hwm["ours"] <= 40 * 1024 ? "met" : "NOT MET"
		}' "$work/rss.results"
	# gctrace lines: "... 9->9->4 MB, 9 MB goal, ...": heap at start, end, live.
	awk '/^gc / { n++; for (i = 1; i <= NF; i++) if ($i ~ /->.*->/) { split($i, h, "->"); live = h[3] } ; if (match($0, /[0-9]+ MB goal/)) goal = substr($0, RSTART, RLENGTH) }
		END { if (n) printf "ours: %d GC cycles in the run, last live heap %s MB, %s\n", n, live, goal }' "$work/rss.ours.gctrace"
fi
