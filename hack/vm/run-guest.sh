#!/usr/bin/env bash
# Usage: hack/vm/run-guest.sh [options] GUEST_CMD [ARGS...]
#
# Boots a throwaway Linux guest (Debian's kernel under qemu TCG, initramfs
# only, no network) that has the nbd, loop, ext4, xfs and 9p modules loaded
# and mke2fs/mkfs.ext4, mkfs.xfs, resize2fs, xfs_growfs, e2fsck, xfs_repair,
# fsfreeze, blkid and blockdev on PATH, runs GUEST_CMD ARGS... as root in it,
# and exits with GUEST_CMD's exit status. Guest console output goes to stdout.
#
# GUEST_CMD is copied into the guest as /guest/run when it is a host file (a
# shell script or a static binary, e.g. a `CGO_ENABLED=0 go test -c` binary);
# otherwise it names a command inside the guest (`sh -c '...'`).
#
# Options:
#   -f SRC[:DST]   put host file or directory SRC into the guest at DST
#                  (default /opt/<basename of SRC>); repeatable
#   -d DIR         share host directory DIR read-write over 9p at /work and
#                  run GUEST_CMD there (without -d it runs in /tmp, a tmpfs);
#                  what the guest writes there is on the host after the run
#   -b IMAGE       attach IMAGE as a raw virtio disk (/dev/vda, /dev/vdb, ...)
#   -e NAME=VALUE  set an environment variable for GUEST_CMD; repeatable
#   -t SECONDS     time limit for the whole run (default: $VM_TIMEOUT or 600)
#   -m MIB         guest memory (default: $VM_MEM or 2048)
#   -c CPUS        guest CPUs (default: $VM_SMP or 1; TCG is faster with 1)
#   -h             this help
#
# Environment:
#   VM_CACHE_DIR   kernel and base initramfs cache (default ~/.cache/csi-qcow2/vm)
#   VM_KERNEL_PKG  Debian kernel package (default: linux-image-amd64's dep)
#   VM_NBD_ARGS    nbd module parameters (default: nbds_max=16)
#   VM_APPEND      extra kernel command line (e.g. loglevel=7)
#   VM_TIMEOUT VM_MEM VM_SMP   defaults for -t -m -c
#
# Exit status: GUEST_CMD's (the guest prints GUEST-EXIT=<n> last), 124 when
# the time limit ran out, 125 when the guest died without reporting one.
#
# Example:
#   CGO_ENABLED=0 go test -c -o /tmp/nbd.test ./pkg/nbdattach
#   hack/vm/run-guest.sh -e NBDATTACH_GUEST=1 /tmp/nbd.test -test.v
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

timeout_s=${VM_TIMEOUT:-600} mem=${VM_MEM:-2048} smp=${VM_SMP:-1}
share= files=() disks=() envs=()
while getopts 'f:d:b:e:t:m:c:h' opt; do
	case $opt in
	f) files+=("$OPTARG") ;;
	d) share=$OPTARG ;;
	b) disks+=("$OPTARG") ;;
	e) envs+=("$OPTARG") ;;
	t) timeout_s=$OPTARG ;;
	m) mem=$OPTARG ;;
	c) smp=$OPTARG ;;
	h) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { usage >&2; exit 2; }

eval "$("$here/prepare.sh")"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$here/build-payload.sh" "$work/payload" "$share" "${#disks[@]}" \
	"${files[@]/#/file=}" "${envs[@]/#/env=}" -- "$@"
cat "$VM_BASE_INITRD" "$work/payload" >"$work/initrd"

qemu=(qemu-system-x86_64 -accel tcg -cpu qemu64,+rdrand -m "$mem" -smp "$smp"
	-nic none -nographic -no-reboot -kernel "$VM_KERNEL" -initrd "$work/initrd"
	-append "console=ttyS0 quiet panic=-1 ${VM_APPEND:-}")
if [ -n "$share" ]; then
	qemu+=(-virtfs "local,path=$(cd "$share" && pwd),mount_tag=hostshare,security_model=none,id=hostshare")
fi
for d in "${disks[@]}"; do qemu+=(-drive "file=$d,format=raw,if=virtio"); done

set +e
timeout -k 5 "$timeout_s" "${qemu[@]}" </dev/null 2>&1 |
	sed -u 's/\r$//' | tee "$work/console"
status=${PIPESTATUS[0]}
set -e

if [ "$status" = 124 ] || [ "$status" = 137 ]; then
	echo "run-guest: time limit of ${timeout_s}s ran out" >&2
	exit 124
fi
rc=$(sed -n 's/^GUEST-EXIT=\([0-9]\{1,3\}\)$/\1/p' "$work/console" | tail -1)
if [ -z "$rc" ]; then
	echo "run-guest: the guest ended without GUEST-EXIT (qemu status $status)" >&2
	exit 125
fi
exit "$rc"
