#!/usr/bin/env bash
# Usage: hack/vm/build-initramfs.sh KERNEL_ROOT KVER OUT "MODULES" "TOOLS"
#
# Builds the base initramfs (an uncompressed newc cpio: the guest unpacks it
# faster than it would gunzip it under TCG) with:
#   - busybox-static and a link for each of its applets,
#   - /init (guest-init.sh),
#   - the kernel modules MODULES and what they depend on, flat under
#     /lib/modules/KVER/, listed in load order in /etc/modules,
#   - the dynamic tools TOOLS (mke2fs, mkfs.xfs, ...) with the shared
#     libraries ldd lists, shadowing the busybox applets of the same name.
# Called by prepare.sh, which caches the result.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
kroot=$1 kver=$2 out=$3
read -r -a modules <<<"$4"
read -r -a tools <<<"$5"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# ko_path NAME: the module file for NAME ('_' and '-' are interchangeable).
ko_path() {
	local n=$1 f
	f=$(find "$kroot/lib/modules/$kver/kernel" \( -name "$n.ko" -o \
		-name "${n//_/-}.ko" -o -name "$n.ko.xz" -o -name "${n//_/-}.ko.xz" \) | head -1)
	[ -n "$f" ] || { echo "build-initramfs: no module $n" >&2; return 1; }
	echo "$f"
}

ko_depends() {
	local f=$1
	case $f in *.xz) xz -dc "$f" ;; *) cat "$f" ;; esac |
		tr '\0' '\n' | sed -n 's/^depends=//p' | head -1 | tr ',' ' '
}

declare -A seen=()
order=()
# visit NAME: depth-first, so each module follows everything it depends on.
visit() {
	local n=${1//-/_} f d
	[ -n "${seen[$n]:-}" ] && return 0
	seen[$n]=1
	f=$(ko_path "$n")
	for d in $(ko_depends "$f"); do visit "$d"; done
	order+=("$n")
	case $f in
	*.xz) xz -dc "$f" >"$stage/lib/modules/$kver/$n.ko" ;;
	*) cp "$f" "$stage/lib/modules/$kver/$n.ko" ;;
	esac
}

mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,mnt,work,guest,lib/modules/$kver}
for m in "${modules[@]}"; do visit "$m"; done
printf '%s\n' "${order[@]}" >"$stage/etc/modules"

cp /bin/busybox "$stage/bin/busybox"
for a in $(/bin/busybox --list-full); do
	[ "$a" = bin/busybox ] && continue
	mkdir -p "$stage/$(dirname "$a")"
	ln -sf /bin/busybox "$stage/$a"
done

# copy_with_libs PATH: PATH and every library ldd lists, at the same paths.
copy_with_libs() {
	local p=$1 lib
	mkdir -p "$stage/$(dirname "$p")"
	rm -f "$stage/$p"
	cp -L "$p" "$stage/$p"
	for lib in $(ldd "$p" 2>/dev/null | grep -o '/[^ ]*'); do
		[ -e "$stage/$lib" ] && continue
		mkdir -p "$stage/$(dirname "$lib")"
		cp -L "$lib" "$stage/$lib"
	done
}
for t in "${tools[@]}"; do
	p=$(PATH=/usr/sbin:/sbin:/usr/bin:/bin command -v "$t") ||
		{ echo "build-initramfs: no tool $t" >&2; exit 1; }
	copy_with_libs "$p"
	# A busybox link of the same name elsewhere on PATH would win over the
	# real tool; point it at the real binary.
	for d in sbin bin usr/bin usr/sbin; do
		[ -L "$stage/$d/$t" ] && ln -sf "$p" "$stage/$d/$t"
	done
done
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$stage/etc/"

install -m 0755 "$here/guest-init.sh" "$stage/init"
echo "root:x:0:0:root:/root:/bin/sh" >"$stage/etc/passwd"
echo "root:x:0:" >"$stage/etc/group"

(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet) >"$out"
