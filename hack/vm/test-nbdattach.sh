#!/usr/bin/env bash
# Usage: hack/vm/test-nbdattach.sh [go test flags, e.g. -test.run 'TestGuest/netlink']
#
# Runs pkg/nbdattach's guest tests (TestGuest: real /dev/nbdX through
# netlink and through the ioctls, O_DIRECT and buffered I/O, FLUSH on fsync,
# ext4 and xfs with live resize and online grow, reconfigure, reconnect
# after a "restart", detach) inside the hack/vm guest: builds the test
# binary statically, boots the guest with 2 CPUs (so that both nbd queues
# carry I/O), runs it with NBDATTACH_GUEST=1 and exits with its status.
#
# Environment: VM_TIMEOUT (default 300) and the rest of run-guest.sh's.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

start=$(date +%s.%N)
(cd "$repo" && CGO_ENABLED=0 go test -c -o "$work/nbdattach.test" ./pkg/nbdattach)
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-test.run '^TestGuest$')
set +e
"$here/run-guest.sh" -c 2 -t "${VM_TIMEOUT:-300}" -e NBDATTACH_GUEST=1 \
	"$work/nbdattach.test" -test.v "${args[@]}"
rc=$?
set -e
echo "test-nbdattach: exit $rc after $(echo "$(date +%s.%N) - $start" | bc 2>/dev/null || echo '?') s"
exit $rc
