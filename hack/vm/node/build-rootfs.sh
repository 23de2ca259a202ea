#!/usr/bin/env bash
# Usage: hack/vm/node/build-rootfs.sh KUBELET IMAGES_DIR
#
# Builds the root disk of the Kubernetes node guest (a raw ext4 image) and
# prints its path. Contents: Debian bookworm (mmdebstrap, minbase) with
# containerd, runc, the CNI plugins, socat, iproute2, kmod and util-linux;
# KUBELET at /usr/local/bin/kubelet; the guest kernel's modules (the ones a
# node needs: filesystems, block, network, netfilter) with modules.dep, so
# modprobe works on the node and in privileged pods that mount /lib/modules;
# the configs and init beside this script; and the images of IMAGES_DIR
# (hack/build-images.sh: images.list and its OCI archives) already imported
# into containerd's k8s.io namespace. The import runs here, in a private
# containerd on the host: in the guest, under TCG, it took 90 s for the
# driver's image alone.
#
# Cached in $VM_CACHE_DIR (default ~/.cache/csi-qcow2/vm): the Debian tree
# by its package list (node-debian-KEY/, 1-3 min to build), the disk by
# every input (node-KEY.img). A run boots a qcow2 overlay of the disk, so
# the cached image is never written.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -eq 2 ] || { echo "usage: build-rootfs.sh KUBELET IMAGES_DIR" >&2; exit 2; }
kubelet=$1 images=$2
[ -x "$kubelet" ] || { echo "build-rootfs: no kubelet binary at $kubelet" >&2; exit 2; }
[ -f "$images/images.list" ] || { echo "build-rootfs: no $images/images.list" >&2; exit 2; }
eval "$("$here/../prepare.sh")"
cache=${VM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/csi-qcow2/vm}
kroot=$(dirname "$VM_KERNEL")/root
log() { echo "build-rootfs: $*" >&2; }

pkgs=(containerd runc containernetworking-plugins iproute2 kmod util-linux mount
	socat procps e2fsprogs xfsprogs)
size=${NODE_DISK_SIZE:-8G}

command -v mmdebstrap >/dev/null || {
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
}

# The mirrors the host's apt uses: the only ones reachable here.
sources() {
	local f
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -f "$f" ] && grep -E '^deb ' "$f"
	done
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		awk '/^URIs:/ {u=$2} /^Suites:/ {$1=""; s=$0} /^Components:/ {$1=""; c=$0}
			/^$/ {if (u) for (i=split(s, a, " "); i>0; i--) print "deb " u " " a[i] c; u=""}
			END {if (u) for (i=split(s, a, " "); i>0; i--) print "deb " u " " a[i] c}' "$f"
	done
}

dkey=$( (echo "${pkgs[*]}"; sources) | sha256sum | cut -c1-16)
debian=$cache/node-debian-$dkey
if [ ! -d "$debian" ]; then
	log "mmdebstrap bookworm minbase + ${pkgs[*]}"
	sources | mmdebstrap --variant=minbase --include="$(IFS=,; echo "${pkgs[*]}")" \
		--dpkgopt='path-exclude=/usr/share/{doc,man,locale,info}/*' \
		--aptopt='Acquire::Languages "none"' --format=directory bookworm "$debian.tmp" - >&2
	mv "$debian.tmp" "$debian"
	find "$cache" -maxdepth 1 -name 'node-debian-*' ! -name "$(basename "$debian")" -exec rm -rf {} +
fi

# preload ROOT: images.list's archives imported into ROOT/var/lib/containerd
# by a containerd of our own (its socket and state in a temp dir).
preload() {
	local root=$1 tmp name file pid
	tmp=$(mktemp -d)
	cat >"$tmp/config.toml" <<-EOF
		version = 2
		root = "$root/var/lib/containerd"
		state = "$tmp/state"
		disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.tracing"]
		[grpc]
		  address = "$tmp/sock"
		[ttrpc]
		  address = "$tmp/sock.ttrpc"
	EOF
	containerd --config "$tmp/config.toml" >"$tmp/log" 2>&1 &
	pid=$!
	for _ in $(seq 100); do [ -S "$tmp/sock" ] && break; sleep 0.1; done
	while read -r name file; do
		[ -n "$name" ] || continue
		ctr --address "$tmp/sock" -n k8s.io images import "$images/$(basename "$file")" >&2 ||
			{ kill "$pid"; cat "$tmp/log" >&2; return 1; }
	done <"$images/images.list"
	kill "$pid"
	wait "$pid" || true
	umount -R "$tmp/state" 2>/dev/null || true
	rm -rf "$tmp"
}

key=$( (echo "$dkey"; sha256sum "$kubelet" "$images/images.list" "$images"/*.tar "$here"/*.sh "$here"/*.toml "$here"/*.yaml "$here"/*.conflist
	echo "$VM_KERNEL $size") | sha256sum | cut -c1-16)
img=$cache/node-$key.img
if [ ! -s "$img" ]; then
	log "assembling the node disk"
	stage=$(mktemp -d "$cache/node-stage.XXXXXX")
	trap 'rm -rf "$stage"' EXIT
	cp -a "$debian/." "$stage/"
	install -m 0755 "$kubelet" "$stage/usr/local/bin/kubelet"
	install -m 0755 "$here/node-init.sh" "$stage/sbin/kube-node-init"
	install -D -m 0644 "$here/containerd.toml" "$stage/etc/containerd/config.toml"
	install -D -m 0644 "$here/kubelet.yaml" "$stage/etc/kubernetes/kubelet.yaml.in"
	install -D -m 0644 "$here/cni-bridge.conflist" "$stage/etc/cni/net.d/10-bridge.conflist"
	rm -f "$stage/etc/cni/net.d/"*.conf 2>/dev/null || true
	mods=$stage/lib/modules/$VM_KVER
	mkdir -p "$mods/kernel/drivers"
	cp "$kroot/lib/modules/$VM_KVER"/modules.{order,builtin,builtin.modinfo} "$mods/"
	for d in arch block crypto fs lib mm net virt; do
		cp -r "$kroot/lib/modules/$VM_KVER/kernel/$d" "$mods/kernel/"
	done
	for d in block virtio; do
		cp -r "$kroot/lib/modules/$VM_KVER/kernel/drivers/$d" "$mods/kernel/drivers/"
	done
	# Of the network drivers only the virtual ones (virtio_net, veth,
	# dummy, ...), not the hardware and wireless subtrees.
	mkdir -p "$mods/kernel/drivers/net"
	cp "$kroot/lib/modules/$VM_KVER/kernel/drivers/net/"*.ko "$mods/kernel/drivers/net/"
	chroot "$stage" depmod "$VM_KVER"
	preload "$stage"
	rm -f "$img.tmp"
	mke2fs -q -t ext4 -L kube-node -d "$stage" "$img.tmp" "$size" >&2
	mv "$img.tmp" "$img"
	find "$cache" -maxdepth 1 -name 'node-*.img' ! -name "$(basename "$img")" -delete
fi
echo "$img"
