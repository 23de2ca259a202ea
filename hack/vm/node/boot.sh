#!/usr/bin/env bash
# Usage: hack/vm/node/boot.sh ROOT_DISK RUN_DIR
#
# Boots the Kubernetes node guest (Debian's kernel under qemu TCG) on a
# qcow2 overlay of ROOT_DISK (from build-rootfs.sh; the cached image is not
# written) and stays in the foreground until the guest powers off (the
# host creates RUN_DIR/stop) or qemu is killed. Console output on stdout.
#
# RUN_DIR is shared read-write over 9p (tag "run"): it must hold node.env
# (NODE_NAME, API_ADDR=10.0.2.100:6443, KUBELET_PORT), kubelet.kubeconfig
# and ca.crt; the guest writes its logs and "ready" there.
#
# Network: qemu user networking with restrict=on, so the guest reaches
# nothing but two forwards, both on this machine's loopback:
#   guest 10.0.2.100:6443 -> host 127.0.0.1:$API_PORT (the API server)
#   host 127.0.0.1:$KUBELET_PORT -> guest :$KUBELET_PORT (kubelet, for
#                                   kubectl logs/exec through the API server)
#
# Environment: API_PORT (required), KUBELET_PORT (default 10250),
# NODE_MEM (MiB, default 4096), NODE_SMP (default 2), VM_APPEND.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -eq 2 ] || { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2; exit 2; }
disk=$1 run=$(cd "$2" && pwd)
: "${API_PORT:?API_PORT is required}"
kport=${KUBELET_PORT:-10250}
command -v socat >/dev/null || { echo "boot: socat not found (hack/install-deps.sh)" >&2; exit 2; }
eval "$("$here/../prepare.sh")"

qemu-img create -q -f qcow2 -b "$disk" -F raw "$run/root.qcow2"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
install -m 0755 "$here/initramfs-init.sh" "$stage/init"
(cd "$stage" && echo init | cpio -o -H newc -R 0:0 --quiet) >"$run/init.cpio"
cat "$VM_BASE_INITRD" "$run/init.cpio" >"$run/initrd"

exec qemu-system-x86_64 -accel tcg -cpu qemu64,+rdrand -m "${NODE_MEM:-4096}" -smp "${NODE_SMP:-2}" \
	-nographic -no-reboot -kernel "$VM_KERNEL" -initrd "$run/initrd" \
	-append "console=ttyS0 quiet panic=-1 ${VM_APPEND:-}" \
	-drive "file=$run/root.qcow2,format=qcow2,if=virtio,cache=unsafe" \
	-virtfs "local,path=$run,mount_tag=run,security_model=none,id=run" \
	-netdev "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:$kport-:$kport,guestfwd=tcp:10.0.2.100:6443-cmd:socat - TCP:127.0.0.1:$API_PORT" \
	-device virtio-net-pci,netdev=n0
