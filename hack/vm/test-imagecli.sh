#!/usr/bin/env bash
# Usage: hack/vm/test-imagecli.sh [go test flags, e.g. -test.run 'TestGuestMapDisconnect/KilledMap']
#
# Runs internal/imagecli's guest tests (TestGuestMapDisconnect: `image map
# -d` releases the device a SIGKILLed map left connected, refuses it while
# it is mounted, flushes and disconnects a live map's device, and names a
# missing or non-nbd device) inside the hack/vm guest: builds the test
# binary statically, runs it with IMAGECLI_GUEST=1 and exits with its
# status. map runs as a child process: the test binary re-executed.
#
# Environment: VM_TIMEOUT (default 300) and the rest of run-guest.sh's.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

start=$(date +%s.%N)
(cd "$repo" && CGO_ENABLED=0 go test -c -o "$work/imagecli.test" ./internal/imagecli)
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-test.run '^TestGuest')
set +e
"$here/run-guest.sh" -t "${VM_TIMEOUT:-300}" -e IMAGECLI_GUEST=1 \
	"$work/imagecli.test" -test.v "${args[@]}"
rc=$?
set -e
echo "test-imagecli: exit $rc after $(echo "$(date +%s.%N) - $start" | bc 2>/dev/null || echo '?') s"
exit $rc
