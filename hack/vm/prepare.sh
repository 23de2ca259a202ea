#!/usr/bin/env bash
# Usage: hack/vm/prepare.sh
#
# Makes sure everything a guest boot needs is on the host and in the cache,
# then prints three shell assignments on stdout for run-guest.sh to eval:
#   VM_KERNEL=<ELF vmlinux, or the bzImage if extraction failed>
#   VM_BASE_INITRD=<base initramfs: busybox, modules, mkfs tools, /init>
#   VM_KVER=<kernel release>
#
# Cold: installs missing Debian packages (apt-get update first), downloads
# the kernel package that linux-image-amd64 depends on, extracts it, pulls
# the ELF vmlinux out of the XZ bzImage (PVH boot skips the slow in-guest
# decompression under TCG) and builds the base initramfs. Warm: all of that
# is found in the cache and nothing is downloaded.
#
# Environment:
#   VM_CACHE_DIR   cache directory (default: ~/.cache/csi-qcow2/vm, outside the
#                  clone so fresh clones on one machine share it)
#   VM_KERNEL_PKG  kernel package to use (default: what linux-image-amd64
#                  depends on; resolved once, then remembered in the cache)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${VM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/csi-qcow2/vm}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

log() { echo "prepare: $*" >&2; }

# Modules the guest loads, in dependency order after resolve_modules. The
# crc32c transform is requested by name at mount time (no modprobe in the
# guest), so it is listed explicitly.
want_modules=(nbd loop crc16 crc32c_generic mbcache jbd2 ext4 libcrc32c xfs
	virtio_ring virtio virtio_pci virtio_blk netfs fscache 9pnet
	9pnet_virtio 9p)

# Dynamic tools copied with their libraries; they shadow busybox applets.
want_tools=(mke2fs mkfs.ext4 e2fsck fsck.ext4 resize2fs tune2fs dumpe2fs
	mkfs.xfs xfs_growfs xfs_repair xfs_db fsfreeze blkid blockdev)

ensure_packages() {
	local missing=()
	command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
	dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
	command -v mke2fs >/dev/null || [ -x /usr/sbin/mke2fs ] || missing+=(e2fsprogs)
	[ -x /usr/sbin/mkfs.xfs ] || missing+=(xfsprogs)
	command -v cpio >/dev/null || missing+=(cpio)
	command -v xz >/dev/null || missing+=(xz-utils)
	command -v file >/dev/null || missing+=(file)
	[ ${#missing[@]} -eq 0 ] && return 0
	log "installing ${missing[*]}"
	apt-get update -qq >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}

kernel_pkg() {
	if [ -n "${VM_KERNEL_PKG:-}" ]; then
		echo "$VM_KERNEL_PKG"
	elif [ -s "$cache/kernel-pkg" ]; then
		cat "$cache/kernel-pkg"
	else
		local pkg
		pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
			awk '/Depends: linux-image-/ {print $2; exit}')
		if [ -z "$pkg" ]; then
			apt-get update -qq >&2
			pkg=$(apt-cache depends linux-image-amd64 |
				awk '/Depends: linux-image-/ {print $2; exit}')
		fi
		[ -n "$pkg" ] || { log "cannot resolve linux-image-amd64"; exit 1; }
		echo "$pkg" >"$cache/kernel-pkg"
		echo "$pkg"
	fi
}

# fetch_kernel PKG: extracts PKG under $cache/kernel/PKG/root once.
fetch_kernel() {
	local pkg=$1 dir=$cache/kernel/$1
	[ -f "$dir/.done" ] && return 0
	log "downloading $pkg"
	rm -rf "$dir" && mkdir -p "$dir"
	(cd "$dir" && apt-get download "$pkg" >&2 2>/dev/null) ||
		(apt-get update -qq >&2 && cd "$dir" && apt-get download "$pkg" >&2)
	dpkg-deb -x "$dir"/*.deb "$dir/root"
	rm -f "$dir"/*.deb
	touch "$dir/.done"
}

# extract_vmlinux BZIMAGE OUT: the ELF kernel inside an XZ bzImage. Returns
# non-zero when there is none (then the bzImage is booted, a few s slower).
extract_vmlinux() {
	local bz=$1 out=$2 off
	off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$bz" | head -1 | cut -d: -f1) || true
	[ -n "$off" ] || return 1
	# xz stops at the end of the stream; tail may then die of SIGPIPE, so
	# the pipeline's status says nothing: check the ELF magic instead.
	tail -c +$((off + 1)) "$bz" | xz -dc --single-stream >"$out.tmp" 2>/dev/null || true
	if [ "$(head -c 4 "$out.tmp" | od -An -c | tr -d ' ')" = '177ELF' ]; then
		mv "$out.tmp" "$out"
	else
		rm -f "$out.tmp"
		return 1
	fi
}

ensure_packages
# Guests may boot in parallel (CI runs several suites); one prepares the
# cache at a time, the others then find it ready.
exec 9>"$cache/.lock"
flock 9
pkg=$(kernel_pkg)
fetch_kernel "$pkg"
kroot=$cache/kernel/$pkg/root
kver=$(ls "$kroot/lib/modules" | head -1)
vmlinux=$cache/kernel/$pkg/vmlinux
if [ ! -s "$vmlinux" ] && ! extract_vmlinux "$kroot/boot/vmlinuz-$kver" "$vmlinux"; then
	log "no ELF vmlinux in the bzImage, booting the bzImage (slower)"
	vmlinux=$kroot/boot/vmlinuz-$kver
fi

# The base initramfs is rebuilt whenever its recipe or inputs change.
key=$( (cat "$here/prepare.sh" "$here/build-initramfs.sh" "$here/guest-init.sh"
	echo "$pkg ${want_modules[*]} ${want_tools[*]}"
	dpkg-query -W busybox-static e2fsprogs xfsprogs util-linux libc6 2>/dev/null) |
	sha256sum | cut -c1-16)
base=$cache/base-$key.cpio
if [ ! -s "$base" ]; then
	log "building base initramfs"
	"$here/build-initramfs.sh" "$kroot" "$kver" "$base.tmp" \
		"${want_modules[*]}" "${want_tools[*]}"
	mv "$base.tmp" "$base"
	find "$cache" -maxdepth 1 -name 'base-*.cpio' ! -name "base-$key.cpio" -delete
fi

printf 'VM_KERNEL=%q\nVM_BASE_INITRD=%q\nVM_KVER=%q\n' "$vmlinux" "$base" "$kver"
