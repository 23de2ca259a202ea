#!/usr/bin/env bash
# Runs the pkg/qcow2 benchmarks (a qcow2 image against a raw file in the same
# directory, same workload) and prints the qcow2/raw ratio of the time per
# operation for each workload: 1.00 is parity, 2.00 is twice as slow.
#
# Environment:
#   BENCH      benchmark regexp (default BenchmarkIO)
#   BENCHTIME  go test -benchtime (default 1s)
#   COUNT      go test -count (default 6, what benchstat needs for a 95% interval)
#   OUT        where to keep the raw go test output (default: a temp file)
#   BENCHSTAT  1 to also print benchstat's table with qcow2 and raw side by
#              side (needs the Go module proxy the first time)
#   TMPDIR     where the images live (their filesystem matters)
set -euo pipefail
cd "$(dirname "$0")/.."

bench=${BENCH:-BenchmarkIO}
benchtime=${BENCHTIME:-1s}
count=${COUNT:-6}
out=${OUT:-$(mktemp "${TMPDIR:-/tmp}/bench-qcow2.XXXXXX")}
benchstat_version=v0.0.0-20260908200009-22c9c6c9d4da

go test -run '^$' -bench "$bench" -benchtime "$benchtime" -count "$count" ./pkg/qcow2/ | tee "$out"

echo
echo "qcow2/raw time per operation (mean of $count runs; results in $out)"
awk '
/^Benchmark.*\/format=(qcow2|raw)/ {
	name = $1
	sub(/-[0-9]+$/, "", name)             # GOMAXPROCS suffix
	fmt = name; sub(/.*\/format=/, "", fmt)
	key = name; sub(/\/format=[a-z0-9]+$/, "", key)
	for (i = 2; i < NF; i++) if ($(i + 1) == "ns/op") { sum[key, fmt] += $i; n[key, fmt]++ }
	if (!(key in seen)) { seen[key] = 1; order[++nk] = key }
}
END {
	printf "%-60s %12s %12s %7s\n", "workload", "qcow2 ns/op", "raw ns/op", "ratio"
	for (k = 1; k <= nk; k++) {
		key = order[k]
		if (n[key, "qcow2"] == 0 || n[key, "raw"] == 0) continue
		q = sum[key, "qcow2"] / n[key, "qcow2"]; r = sum[key, "raw"] / n[key, "raw"]
		printf "%-60s %12.0f %12.0f %7.2f\n", key, q, r, q / r
	}
}' "$out"

if [[ "${BENCHSTAT:-0}" == 1 ]]; then
	echo
	go run "golang.org/x/perf/cmd/benchstat@$benchstat_version" -col /format "$out"
fi
