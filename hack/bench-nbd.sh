#!/usr/bin/env bash
# Usage: hack/bench-nbd.sh [-s SIZE] [-t SECONDS] [-r ROUNDS] [-d DIR]
#
# Benchmarks `csi-qcow2 image serve` against qemu-nbd serving identical
# qcow2 images, with the same client (fio's nbd engine, one connection):
#
#   qemu-nbd -f qcow2 --cache=writeback --aio=threads -e 8 --discard=unmap -t
#   csi-qcow2 image serve -e 8
#
# Each round creates fresh images (qemu-img create, 64 KiB clusters) for
# both servers and runs, alternating which server goes first:
#   seqwrite-1M-fresh   1 MiB sequential writes filling the fresh image, QD8
#   randread-4k-qd16    4 KiB random reads of the filled image, QD16
#   randread-4k-qd32    the same at QD32
#   seqread-1M          1 MiB sequential reads, QD8
#   randwrite-4k-prealloc  4 KiB random writes, QD16, every cluster allocated
#   randrw-4k-qd32      4 KiB random 50/50 reads and writes, QD32
#   randwrite-4k-fresh  4 KiB random writes, QD16, on another fresh image
# and prints per workload the median over rounds of each server's IOPS (4k)
# or MB/s (1M) and the ratio ours/qemu-nbd (above 1: ours is faster).
# Timed runs last SECONDS (default 4) after a 1 s ramp; with the defaults
# (1 GiB, 2 rounds) the whole script takes about 2.5 minutes. The host page
# cache serves both servers alike; numbers are noisy on a shared machine,
# ratios less so.
#
# Options: -s image size (default 1G), -t seconds per timed run, -r rounds,
# -d directory for the images (default: a temporary directory under /var/tmp,
# on disk rather than tmpfs). Set BENCH_KEEP=1 to keep the fio outputs.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
size=1G runtime=4 rounds=2 dir=
while getopts 's:t:r:d:h' opt; do
	case $opt in
	s) size=$OPTARG ;;
	t) runtime=$OPTARG ;;
	r) rounds=$OPTARG ;;
	d) dir=$OPTARG ;;
	h) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
	*) exit 2 ;;
	esac
done
for tool in fio qemu-nbd qemu-img; do
	command -v "$tool" >/dev/null || { echo "bench-nbd: $tool is missing (fio, qemu-utils)" >&2; exit 2; }
done

work=$(mktemp -d "${dir:-/var/tmp}/bench-nbd.XXXXXX")
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	[ "${BENCH_KEEP:-}" = 1 ] && echo "bench-nbd: outputs kept in $work" || rm -rf "$work"
}
trap cleanup EXIT

bin=$work/csi-qcow2
(cd "$repo" && CGO_ENABLED=0 go build -o "$bin" ./cmd/csi-qcow2)
results=$work/results
: >"$results"

# start SERVER IMAGE: serves IMAGE on $work/SERVER.sock; sets uri.
start() {
	local server=$1 img=$2 sock=$work/$1.sock
	rm -f "$sock"
	case $server in
	ours) "$bin" image serve -e 8 -k "$sock" "$img" >/dev/null & ;;
	qemu) qemu-nbd -f qcow2 --cache=writeback --aio=threads -e 8 --discard=unmap -t -k "$sock" "$img" & ;;
	esac
	pids+=($!)
	for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
	uri="nbd+unix:///?socket=$sock"
}

# stop_all: SIGKILL every server, wait, and delete the images. A clean
# stop would flush gigabytes of dirty page cache to disk for nothing (a
# minute and more per round on a busy disk); unlinked, they are dropped.
stop_all() {
	for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	pids=()
	rm -f "$work"/*.qcow2
}

# run_fio WORKLOAD SERVER URI FIO_ARGS...: one run; appends
# "WORKLOAD SERVER VALUE" to the results, VALUE in IOPS or MB/s.
run_fio() {
	local workload=$1 server=$2 uri=$3 out
	shift 3
	out=$work/$workload.$server.$round.terse
	fio --name="$workload" --ioengine=nbd --uri="$uri" --size="$size" \
		--output-format=terse --terse-version=3 "$@" >"$out"
	# terse v3: read bw KiB/s $7, read IOPS $8; write bw $48, write IOPS $49.
	# fio's nbd engine also prints "fio: connected to NBD server".
	awk -F';' -v w="$workload" -v s="$server" '
		!/^3;/ { next }
		w ~ /-1M/ { printf "%s %s %.0f\n", w, s, ($7 + $48) * 1024 / 1e6; next }
		{ printf "%s %s %.0f\n", w, s, $8 + $49 }' "$out" | tee -a "$results" |
		awk -v t=$SECONDS '{ printf "bench-nbd: %4ds  %-24s %-5s %s\n", t, $1, $2, $3 }'
}

timed=(--time_based --runtime="$runtime" --ramp_time=1)
random=(--norandommap --randrepeat=0)

t0=$SECONDS
for round in $(seq "$rounds"); do
	order=(ours qemu)
	[ $((round % 2)) = 0 ] && order=(qemu ours)
	echo "bench-nbd: round $round of $rounds (${order[*]} first)"
	declare -A uris=()
	for s in ours qemu; do
		qemu-img create -q -f qcow2 "$work/$s.qcow2" "$size"
		start "$s" "$work/$s.qcow2"
		uris[$s]=$uri
	done
	each() { # each WORKLOAD FIO_ARGS...: the workload on both servers
		local w=$1
		shift
		for s in "${order[@]}"; do run_fio "$w" "$s" "${uris[$s]}" "$@"; done
	}
	each seqwrite-1M-fresh --rw=write --bs=1M --iodepth=8
	each randread-4k-qd16 --rw=randread --bs=4k --iodepth=16 "${random[@]}" "${timed[@]}"
	each randread-4k-qd32 --rw=randread --bs=4k --iodepth=32 "${random[@]}" "${timed[@]}"
	each seqread-1M --rw=read --bs=1M --iodepth=8 "${timed[@]}"
	each randwrite-4k-prealloc --rw=randwrite --bs=4k --iodepth=16 "${random[@]}" "${timed[@]}"
	each randrw-4k-qd32 --rw=randrw --bs=4k --iodepth=32 "${random[@]}" "${timed[@]}"
	stop_all
	for s in "${order[@]}"; do
		qemu-img create -q -f qcow2 "$work/$s.fresh.qcow2" "$size"
		start "$s" "$work/$s.fresh.qcow2"
		run_fio randwrite-4k-fresh "$s" "$uri" --rw=randwrite --bs=4k --iodepth=16 "${random[@]}" "${timed[@]}"
		stop_all
	done
done

echo
echo "bench-nbd: $rounds rounds in $((SECONDS - t0)) s; median of each, IOPS (4k) or MB/s (1M); ratio = ours / qemu-nbd"
printf '%-24s %10s %10s %7s\n' workload ours qemu-nbd ratio
awk '
	{ v[$1 " " $2] = v[$1 " " $2] " " $3; if (!seen[$1]++) order[n++] = $1 }
	function median(s,   a, k, i, j, t) {
		k = split(s, a, " ")
		for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
		return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
	}
	END {
		for (i = 0; i < n; i++) {
			w = order[i]; o = median(v[w " ours"]); q = median(v[w " qemu"])
			printf "%-24s %10.0f %10.0f %7.2f\n", w, o, q, q ? o / q : 0
		}
	}' "$results"
