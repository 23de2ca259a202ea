#!/usr/bin/env bash
# Usage: hack/bench-xnode.sh [-c COUNT] [-l LIMITS] [-d DIR]
#
# Runs pkg/driver's BenchmarkCrossNodeCopy (a cross-node restore of a 4 GiB
# snapshot holding 1 GiB of data, between two drivers on loopback over the
# mutual-TLS peer service) with the source's disk as it is, then with its
# reads capped at each speed in LIMITS (MB/s, comma-separated, default
# 250,500,1000), and prints a row per run: the sequential read of the
# source file (the faster of a buffered and an O_DIRECT read), the copy,
# copy/read (the goal is >= 0.8), a bare crypto/tls stream between the
# same peers, tls/read (the most copy/read can be here) and the copy's CPU
# per GiB.
#
# A cap is the kernel's block throttle on the disk under DIR, for the
# benchmark's process only: cgroup v1 blkio.throttle.read_bps_device, or
# cgroup v2 io.max rbps. It slows every read of the source, the baseline's
# and the holder's alike, as a node whose disk reads at that speed would;
# writes are not capped. Needs root; without a throttle it runs the first
# row only.
#
# COUNT (-c, default 3) iterations per run; DIR (-d) holds the images
# (default: a temporary directory under /var/tmp, on disk, removed after).
# About 1 minute per run on 2 idle cores. Both ends share the machine's
# cores: on this 2-core machine the TLS channel, not the disk, is what
# bounds the uncapped row.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
count=3 limits=250,500,1000 dir=
while getopts 'c:l:d:h' opt; do
	case $opt in
	c) count=$OPTARG ;;
	l) limits=$OPTARG ;;
	d) dir=$OPTARG ;;
	h) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
	*) exit 2 ;;
	esac
done
[[ $count =~ ^[1-9][0-9]*$ ]] || { echo "bench-xnode: -c wants a positive count, not ${count@Q}" >&2; exit 2; }
[[ $limits =~ ^([1-9][0-9]*)(,[1-9][0-9]*)*$|^$ ]] || { echo "bench-xnode: -l wants MB/s figures separated by commas, not ${limits@Q}" >&2; exit 2; }
tmp=
if [ -z "$dir" ]; then
	dir=$(mktemp -d /var/tmp/bench-xnode.XXXXXX)
	tmp=$dir
fi
mkdir -p "$dir"
cg='' procs=''
cleanup() {
	if [ -n "$cg" ]; then rmdir "$cg" 2>/dev/null || true; fi
	rm -f "$dir/driver.test"
	if [ -n "$tmp" ]; then rm -rf "$tmp"; fi
}
trap cleanup EXIT

bin=$dir/driver.test
(cd "$repo" && go test -c -o "$bin" ./pkg/driver)

# The whole disk under DIR: the throttle takes a disk, not a partition.
disk() {
	local src name parent
	src=$(df --output=source "$dir" | tail -1)
	name=$(lsblk -no KNAME "$src" 2>/dev/null | head -1) || return 1
	parent=$(lsblk -no PKNAME "/dev/$name" 2>/dev/null | head -1)
	[ -n "$parent" ] && name=$parent
	lsblk -dno MAJ:MIN "/dev/$name" | tr -d ' '
}

# throttle LIMIT: a cgroup whose reads of the disk are capped at LIMIT
# MB/s, in cg; procs is its cgroup.procs file.
throttle() {
	local dev bps=$(($1 * 1000000))
	dev=$(disk) || return 1
	if [ -d /sys/fs/cgroup/blkio ] && [ -w /sys/fs/cgroup/blkio ]; then
		cg=/sys/fs/cgroup/blkio/csi-qcow2-bench-$$
		mkdir -p "$cg"
		echo "$dev $bps" >"$cg/blkio.throttle.read_bps_device"
	elif grep -qw io /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
		echo +io >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
		cg=/sys/fs/cgroup/csi-qcow2-bench-$$
		mkdir -p "$cg"
		echo "$dev rbps=$bps" >"$cg/io.max"
	else
		return 1
	fi
	procs=$cg/cgroup.procs
}

# run PROCS: the benchmark, in the cgroup whose procs file is PROCS (or
# none), its result line as "unit value" pairs.
run() {
	local procs=$1
	(
		cd "$repo/pkg/driver"
		[ -n "$procs" ] && echo $BASHPID >"$procs"
		TMPDIR=$dir exec "$bin" -test.run '^$' -test.bench BenchmarkCrossNodeCopy -test.benchtime "${count}x"
	) 2>&1 | tee "$dir/bench.out" | awk '/^BenchmarkCrossNodeCopy/ { for (i = 3; i < NF; i += 2) print $(i + 1), $i }'
}

row() {
	awk -v cap="$1" '
		{ m[$1] = $2 }
		END {
			if (!("copy-MB/s" in m)) { print "bench-xnode: the benchmark printed no result" > "/dev/stderr"; exit 1 }
			printf "%-12s %10.0f %10.0f %10.2f %10.0f %10.2f %10.2f\n", cap, m["read-MB/s"], m["copy-MB/s"], m["copy/read"], m["tls-MB/s"], m["tls/read"], m["copy-cpu-s/GiB"]
		}'
}

printf '%-12s %10s %10s %10s %10s %10s %10s\n' "disk cap" "read MB/s" "copy MB/s" "copy/read" "tls MB/s" "tls/read" "cpu s/GiB"
run "" | row none || { tail -20 "$dir/bench.out" >&2; exit 1; }
IFS=, read -ra caps <<<"$limits"
for c in "${caps[@]}"; do
	if ! throttle "$c"; then
		echo "bench-xnode: no block throttle here (root, cgroup v1 blkio or v2 io): the capped rows are skipped" >&2
		break
	fi
	run "$procs" | row "$c MB/s" || { tail -20 "$dir/bench.out" >&2; exit 1; }
	rmdir "$cg" 2>/dev/null || true
	cg=
done
