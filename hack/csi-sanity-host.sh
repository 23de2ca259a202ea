#!/bin/sh
# csi-sanity v5.6.0 (the binary) against the real driver binary on this
# host: identity and controller specs. The node specs need /dev/nbdX and
# mount(8) as root; they run with fakes in `go test ./pkg/driver`
# (TestSanity) and belong in the qemu guest (hack/vm) for real devices.
set -eu
cd "$(dirname "$0")/.."
GO=${GO:-go}
BIN=$PWD/_out/bin
GOBIN=$BIN $GO install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@v5.6.0
CGO_ENABLED=0 $GO build -o _out/csi-qcow2 ./cmd/csi-qcow2
work=$(mktemp -d)
_out/csi-qcow2 --endpoint "unix://$work/csi.sock" --node-id "$(hostname)" --data-dir "$work/data" 2>"$work/driver.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in 1 2 3 4 5 6 7 8 9 10; do [ -S "$work/csi.sock" ] && break; sleep 0.5; done
"$BIN/csi-sanity" --csi.endpoint="unix://$work/csi.sock" --csi.testvolumesize=16777216 \
	--csi.mountdir="$work/mnt" --csi.stagingdir="$work/stg" \
	-ginkgo.skip='Node Service|NodeGetVolumeHealth'
