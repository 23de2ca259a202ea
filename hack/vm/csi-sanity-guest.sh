#!/usr/bin/env bash
# Usage: hack/vm/csi-sanity-guest.sh [csi-sanity flags, e.g. -ginkgo.focus=Node]
#
# The full csi-sanity v5.6.0 suite, node specs included, against the real
# driver inside the hack/vm guest: real /dev/nbdX (netlink attach), real
# mkfs.ext4 and mount(8). Builds a static csi-qcow2 and the csi-sanity
# binary (GOBIN=_out/bin), boots the guest, starts the driver there on a
# data dir in the guest's tmpfs, runs csi-sanity against its socket with
# staging and target dirs under /tmp, and exits with csi-sanity's status.
# The driver's log is printed when csi-sanity fails.
#
# Every skip must be a capability the driver does not claim; see the
# README's "The driver" section for the list.
#
# Environment: VM_TIMEOUT (default 300) and the rest of run-guest.sh's.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s.%N)

(cd "$repo" && CGO_ENABLED=0 go build -o "$work/csi-qcow2" ./cmd/csi-qcow2)
(cd "$repo" && GOBIN="$repo/_out/bin" CGO_ENABLED=0 \
	go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@v5.6.0)

cat >"$work/guest.sh" <<'EOF'
#!/bin/sh
# The driver runs on a data dir in the guest's tmpfs; csi-sanity talks to
# its socket. 64 MiB volumes (mkfs.ext4 is quick), grown to 128 MiB.
mkdir -p /tmp/data
/opt/csi-qcow2 --endpoint unix:///tmp/csi.sock --node-id guest --data-dir /tmp/data \
	>/tmp/driver.log 2>&1 &
drv=$!
i=0
while [ ! -S /tmp/csi.sock ]; do
	i=$((i + 1))
	if [ "$i" -gt 100 ] || ! kill -0 "$drv" 2>/dev/null; then
		cat /tmp/driver.log
		echo "csi-sanity-guest: the driver did not start"
		exit 1
	fi
	sleep 0.1
done
/opt/csi-sanity --csi.endpoint=unix:///tmp/csi.sock \
	--csi.stagingdir=/tmp/csi-staging --csi.mountdir=/tmp/csi-mount \
	--csi.testvolumesize=67108864 --csi.testvolumeexpandsize=134217728 \
	--csi.testnodevolumeattachlimit -ginkgo.no-color "$@"
rc=$?
kill -TERM "$drv"
wait "$drv"
if [ "$rc" != 0 ]; then
	echo "---- driver log ----"
	cat /tmp/driver.log
	echo "---- dmesg ----"
	dmesg | tail -40
fi
left=$(find /tmp/data -name '*.qcow2' -o -name '*.json' | wc -l)
echo "csi-sanity-guest: csi-sanity exit $rc; $left files left in the data dir; nbd devices still connected: $(ls /sys/block/nbd*/pid 2>/dev/null | wc -l)"
exit "$rc"
EOF
chmod +x "$work/guest.sh"

set +e
"$here/run-guest.sh" -t "${VM_TIMEOUT:-300}" -f "$work/csi-qcow2:/opt/csi-qcow2" \
	-f "$repo/_out/bin/csi-sanity:/opt/csi-sanity" "$work/guest.sh" "$@"
rc=$?
set -e
echo "csi-sanity-guest: exit $rc after $(printf '%.1f' "$(echo "$(date +%s.%N) - $start" | bc)") s"
exit $rc
