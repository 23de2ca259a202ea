#!/usr/bin/env bash
# Runs every `go test -fuzz` target in the module for a bounded time each
# (targets are discovered with `go test -list`, so a new one is picked up
# without editing this script), fails if any target finds a failing input,
# and ends with a table of execs and time per target.
#
# A failing input is written by go test to the package's
# testdata/fuzz/<Target>/ directory: commit it with the fix, and it becomes a
# seed that `go test ./...` replays from then on.
#
# Environment:
#   FUZZTIME  go test -fuzztime per target (default 8s: the ten targets and
#             their builds take ~1.5 min on 2 cores)
#   FUZZ      regexp selecting targets by name (default: all)
#   PKGS      packages to search (default ./...)
#   FUZZTIMEOUT  go test -timeout (default 1h; keep it above FUZZTIME, or
#             go test's default of 10m ends a 10m run as a failure)
#   FUZZPARALLEL go test -parallel: fuzzing workers (default GOMAXPROCS)
#   FUZZSAVE=1  copy the inputs that found new coverage (go test keeps them
#             in $GOCACHE/fuzz) into testdata/fuzz/<Target>/, to commit as
#             seeds that `go test ./...` replays (after a long run)
set -euo pipefail
cd "$(dirname "$0")/.."

fuzztime=${FUZZTIME:-8s}
select=${FUZZ:-.}
pkgs=${PKGS:-./...}
timeout=${FUZZTIMEOUT:-1h}
parallel=${FUZZPARALLEL:+-parallel=$FUZZPARALLEL}
log=$(mktemp "${TMPDIR:-/tmp}/fuzz.XXXXXX")
trap 'rm -f "$log"' EXIT

# Packages with a test file that declares a fuzz target (a cheap filter, so
# that only they are built for listing), then `go test -list`, which prints
# the matching names and "ok <pkg> <time>".
targets=()
while read -r pkg dir files; do
	(cd "$dir" && grep -qs '^func Fuzz' $files) || continue
	while read -r name; do
		[[ $name == Fuzz* && $name =~ $select ]] && targets+=("$pkg $name")
	done < <(go test -list '^Fuzz' "$pkg")
done < <(go list -f '{{.ImportPath}} {{.Dir}} {{join .TestGoFiles " "}} {{join .XTestGoFiles " "}}' $pkgs)

if [ ${#targets[@]} -eq 0 ]; then
	echo "fuzz.sh: no fuzz targets match ${select@Q}" >&2
	exit 1
fi

failed=()
flaked=()
summary=()
for t in "${targets[@]}"; do
	read -r pkg name <<<"$t"
	echo "=== $name ($pkg, $fuzztime)"
	start=$SECONDS
	# One target per run: -fuzz must match exactly one, and -run '^$' skips
	# the package's ordinary tests (go test ./... runs those).
	corpus=$(go list -f '{{.Dir}}' "$pkg")/testdata/fuzz/$name
	before=$(ls "$corpus" 2>/dev/null | sort || true)
	if go test -run '^$' -fuzz "^${name}\$" -fuzztime "$fuzztime" -timeout "$timeout" $parallel "$pkg" 2>&1 | tee "$log"; then
		status=ok
	elif [ "$(ls "$corpus" 2>/dev/null | sort || true)" = "$before" ] &&
		grep -qx '    context deadline exceeded' "$log"; then
		# go1.26's fuzz coordinator can report its own -fuzztime deadline
		# as a failure when a worker is mid-exec at that instant
		# (golang/go#75804, fixed in go1.27). A real failing input is
		# always written to testdata/fuzz/<Target>/; none was, so this is
		# the coordinator's race, not a finding.
		status=ok*
		flaked+=("$name")
	else
		status=FAIL
		failed+=("$name")
	fi
	if [ "${FUZZSAVE:-}" = 1 ] && [ -d "$(go env GOCACHE)/fuzz/$pkg/$name" ]; then
		mkdir -p "$corpus"
		cp -n "$(go env GOCACHE)/fuzz/$pkg/$name"/* "$corpus"/ 2>/dev/null || true
	fi
	# The last progress line has the totals: "fuzz: elapsed: 8s, execs: 1234 (154/sec), ...";
	# its rate is only the last interval's, so the mean is computed here.
	# "new interesting" counts the inputs that reached new coverage in this
	# run; "total" is the corpus (seeds, testdata and GOCACHE) with them.
	secs=0 execs= fresh= corpus=
	read -r elapsed execs fresh corpus < <(sed -n 's/^fuzz: elapsed: \([0-9hm]*[0-9]\)s, execs: \([0-9]*\) .*new interesting: \([0-9]*\) (total: \([0-9]*\)).*/\1 \2 \3 \4/p' "$log" | tail -n 1) || true
	if [ -n "$execs" ]; then # elapsed is 8, 1m0 or 1h0m0
		IFS=hm read -r -a hms <<<"$elapsed"
		for v in "${hms[@]}"; do secs=$((secs * 60 + v)); done
	fi
	summary+=("$(printf '%-24s %-4s %10s %8s %5s %6s %6ss  %s' "$name" "$status" "${execs:--}" \
		"$([ "$secs" -gt 0 ] && echo $((execs / secs)) || echo -)" "${fresh:--}" "${corpus:--}" $((SECONDS - start)) "$pkg")")
done

echo
# wall: the whole go test run (build, baseline coverage over the corpus, fuzzing)
# new: inputs that found new coverage in this run; corpus: the total after it
printf '%-24s %-4s %10s %8s %5s %6s %7s  %s\n' target res execs exec/s new corpus wall package
printf '%s\n' "${summary[@]}"
if [ ${#flaked[@]} -gt 0 ]; then
	echo "fuzz.sh: ok*: ${flaked[*]} ended with go's own \"context deadline exceeded\" at -fuzztime and wrote no failing input (golang/go#75804)"
fi
if [ ${#failed[@]} -gt 0 ]; then
	echo "fuzz.sh: failing inputs found by: ${failed[*]} (written under the package's testdata/fuzz/)" >&2
	exit 1
fi
