#!/usr/bin/env bash
# Usage: hack/vm/e2e-map.sh
#
# End-to-end test of `csi-qcow2 image map` on a real /dev/nbdX inside the
# hack/vm guest, with qcow2 files on the host shared into the guest (-d).
#
#  1. Builds a static csi-qcow2 (CGO_ENABLED=0) and creates three qcow2
#     images on the host: clean.qcow2 (128 MiB, lazy refcounts),
#     ext4.qcow2 (256 MiB) and xfs.qcow2 (384 MiB; mkfs.xfs wants 300 MB).
#  2. Guest boot 1:
#     clean path: map clean.qcow2 (checking that every thread of the map
#       process is PR_SET_IO_FLUSHER), mkfs.ext4, mount, copy files, unmount,
#       SIGTERM map: it must detach and exit 0;
#     crash path: for ext4.qcow2 and then xfs.qcow2: map, mkfs, mount, copy
#       files, checksum them, fsync them and their directory, and SIGKILL
#       map right after the fsync.
#  3. Host: clean.qcow2 passes `image check` and `qemu-img check` with no
#     leak and its dirty bit is clear. The crashed images pass both checks
#     with leaks allowed (exit 0 or 3), and the ext4 one, read by QEMU
#     (qemu-img convert), journal replayed by e2fsck, holds the fsynced
#     files (debugfs cat, sha256).
#  4. Guest boot 2: map both crashed images again, mount them (journal
#     replay), verify the checksums, unmount, e2fsck -fn / xfs_repair -n,
#     SIGTERM map; then on the host both images check again.
#
# Prints what each step showed; exits non-zero on any failure.
# Environment: VM_TIMEOUT (per boot, default 300) and run-guest.sh's.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
share=$work/share
mkdir -p "$share/src"
t0=$(date +%s.%N)
failures=0

say() { echo "e2e-map: $*"; }
fail() { echo "e2e-map: FAIL: $*"; failures=$((failures + 1)); }
elapsed() { printf '%.1f' "$(echo "$(date +%s.%N) - $1" | bc)"; }
for tool in qemu-img e2fsck debugfs bc; do
	command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] ||
		{ echo "e2e-map: $tool is missing (qemu-utils, e2fsprogs, bc)" >&2; exit 2; }
done
export PATH=$PATH:/usr/sbin:/sbin

say "building a static csi-qcow2"
bin=$work/csi-qcow2
(cd "$repo" && CGO_ENABLED=0 go build -o "$bin" ./cmd/csi-qcow2)

say "creating images and source files on the host"
"$bin" image create -q -o lazy_refcounts=on "$share/clean.qcow2" 128M
"$bin" image create -q "$share/ext4.qcow2" 256M
"$bin" image create -q "$share/xfs.qcow2" 384M
head -c $((3 << 20)) /dev/urandom >"$share/src/big.bin"
head -c $((1 << 20 | 12345)) /dev/urandom >"$share/src/odd.bin"
head -c 40000 /dev/urandom >"$share/src/small.bin"
seq 1 20000 >"$share/src/numbers.txt"
(cd "$share/src" && sha256sum -- *) >"$share/src.sums"

# The guest side. Every map process is started by gmap, which waits for
# the device path on its stdout.
cat >"$work/common.sh" <<'EOF'
fail() { echo "guest: FAIL: $*"; exit 1; }
say() { echo "guest: $*"; }
# gmap NAME ARGS...: map /work/NAME.qcow2; sets dev and pid.
gmap() {
	name=$1
	shift
	csi-qcow2 image map "$@" "/work/$name.qcow2" >"/tmp/$name.dev" 2>"/tmp/$name.err" &
	pid=$!
	i=0
	while [ ! -s "/tmp/$name.dev" ]; do
		kill -0 "$pid" 2>/dev/null || { cat "/tmp/$name.err"; fail "map $name exited before printing a device"; }
		i=$((i + 1))
		[ "$i" -lt 300 ] || fail "map $name printed nothing in 30 s"
		sleep 0.1
	done
	dev=$(cat "/tmp/$name.dev")
	say "$name.qcow2 mapped on $dev by pid $pid ($(cat "/sys/block/${dev#/dev/}/size") sectors, backend $(cat "/sys/block/${dev#/dev/}/backend" 2>/dev/null))"
}
# stopmap NAME PID DEV: SIGTERM map, which must detach and exit 0.
stopmap() {
	kill -TERM "$2"
	if wait "$2"; then rc=0; else rc=$?; fi
	[ -s "/tmp/$1.err" ] && sed "s/^/guest: map $1 stderr: /" "/tmp/$1.err"
	[ "$rc" = 0 ] || fail "map $1 exited $rc after SIGTERM"
	[ -e "/sys/block/${3#/dev/}/pid" ] && fail "$3 still connected after map exited"
	say "map $1 exited 0 after SIGTERM; $3 is disconnected"
}
EOF

cat >"$work/guest1.sh" <<'EOF'
#!/bin/sh
. /opt/common.sh
mkdir -p /mnt/clean /mnt/ext4 /mnt/xfs

# Clean path.
gmap clean
cpid=$pid cdev=$dev
awk '{ if (!and($9, 524288)) bad++ } END { exit bad > 0 }' /proc/"$cpid"/task/*/stat ||
	fail "not every thread of map is PR_SET_IO_FLUSHER (PF_MEMALLOC_NOIO)"
say "all $(ls /proc/"$cpid"/task | wc -l) threads of map are PR_SET_IO_FLUSHER"
mkfs.ext4 -q -F -b 4096 "$cdev" || fail "mkfs.ext4 $cdev"
mount "$cdev" /mnt/clean || fail "mount $cdev"
cp /work/src/* /mnt/clean/ || fail "copy into clean"
(cd /mnt/clean && sha256sum -c -s /work/src.sums) || fail "checksums on clean"
umount /mnt/clean || fail "umount clean"
stopmap clean "$cpid" "$cdev"

# Crash path: SIGKILL right after the fsync. With MODE inflight, an
# O_DIRECT writer of an unsynced file runs when map is killed, so that the
# image dies with writes in flight and metadata half updated.
crash() { # crash NAME MODE MKFS...
	name=$1 mode=$2
	shift 2
	gmap "$name" -c 2
	"$@" "$dev" || fail "$* $dev"
	mount "$dev" "/mnt/$name" || fail "mount $dev"
	files=$(cd /work/src && ls)
	cp /work/src/* "/mnt/$name/" || fail "copy into $name"
	(cd "/mnt/$name" && sha256sum -- $files) >"/work/$name.guest.sums"
	sync /mnt/"$name"/* "/mnt/$name" || fail "fsync on $name"
	how="right after the fsync"
	if [ "$mode" = inflight ]; then
		dd if=/dev/zero of="/mnt/$name/unsynced.bin" bs=64k count=4000 oflag=direct 2>/dev/null &
		writer=$!
		sleep 0.5
		kill -0 "$writer" 2>/dev/null || fail "the unsynced writer ended before the kill"
		how="after the fsync, with an O_DIRECT writer in flight"
	fi
	kill -KILL "$pid"
	say "$name: mkfs, mount, $(echo "$files" | wc -l) files copied and fsynced, map SIGKILLed $how"
	wait "$pid" 2>/dev/null
	cmp -s "/work/$name.guest.sums" /work/src.sums || fail "$name: checksums in the guest differ from the sources"
}
crash ext4 inflight mkfs.ext4 -q -F -b 4096
crash xfs now mkfs.xfs -q -f
# The filesystems stay mounted on dead devices: the kernel's I/O errors on
# them above and below are expected.
say "boot 1 done"
EOF

cat >"$work/guest2.sh" <<'EOF'
#!/bin/sh
. /opt/common.sh
for name in ext4 xfs; do
	mkdir -p "/mnt/$name"
	gmap "$name"
	eval "${name}_pid=$pid ${name}_dev=$dev"
	mount "$dev" "/mnt/$name" || fail "mount $dev after the crash"
	(cd "/mnt/$name" && sha256sum -c -s /work/src.sums) || fail "$name: fsynced files differ after the crash"
	say "$name: mounted after the crash (log replayed), all $(wc -l </work/src.sums) fsynced files intact"
	umount "/mnt/$name" || fail "umount $name"
done
e2fsck -fn "$ext4_dev" >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck -fn $ext4_dev"; }
say "ext4: e2fsck -fn clean"
xfs_repair -n "$xfs_dev" >/tmp/repair.out 2>&1 || { cat /tmp/repair.out; fail "xfs_repair -n $xfs_dev"; }
say "xfs: xfs_repair -n clean"
stopmap ext4 "$ext4_pid" "$ext4_dev"
stopmap xfs "$xfs_pid" "$xfs_dev"
say "boot 2 done"
EOF
chmod +x "$work/guest1.sh" "$work/guest2.sh"

boot() { # boot SCRIPT
	local b0 rc=0
	b0=$(date +%s.%N)
	"$here/run-guest.sh" -t "${VM_TIMEOUT:-300}" -d "$share" -f "$bin:/usr/bin/csi-qcow2" \
		-f "$work/common.sh:/opt/common.sh" "$1" || rc=$?
	say "$(basename "$1") exited $rc after $(elapsed "$b0") s"
	return "$rc"
}

# qcheck IMAGE ALLOWED_EXITS: image check and qemu-img check; prints leaks.
qcheck() {
	local img=$1 allowed=$2 rc out leaks
	rc=0
	out=$("$bin" image check --output=json "$img" 2>&1) || rc=$?
	case " $allowed " in *" $rc "*) ;; *) fail "csi-qcow2 image check $(basename "$img") exited $rc: $out" ;; esac
	rc=0
	out=$(qemu-img check --output=json "$img" 2>&1) || rc=$?
	case " $allowed " in *" $rc "*) ;; *) fail "qemu-img check $(basename "$img") exited $rc: $out" ;; esac
	leaks=$(echo "$out" | sed -n 's/.*"leaks": \([0-9]*\).*/\1/p')
	say "$(basename "$img"): image check and qemu-img check exit $rc, ${leaks:-0} leaked clusters, no corruption"
}

dirty_bit() { od -An -tu1 -j79 -N1 "$1" | tr -d ' '; }

say "guest boot 1: clean path, then the crash path"
boot "$work/guest1.sh" || fail "guest boot 1"

say "host checks after boot 1"
qcheck "$share/clean.qcow2" 0
[ "$(dirty_bit "$share/clean.qcow2")" = 0 ] && say "clean.qcow2: dirty bit clear" ||
	fail "clean.qcow2: dirty bit set after map exited"
qcheck "$share/ext4.qcow2" "0 3"
qcheck "$share/xfs.qcow2" "0 3"

say "reading the crashed ext4 image with QEMU and e2fsprogs"
qemu-img convert -O raw "$share/ext4.qcow2" "$work/ext4.raw"
rc=0
e2fsck -fy -E journal_only "$work/ext4.raw" >"$work/e2fsck.out" 2>&1 || rc=$?
[ "$rc" -le 1 ] || { cat "$work/e2fsck.out"; fail "e2fsck journal replay exited $rc"; }
rc=0
e2fsck -fn "$work/ext4.raw" >"$work/e2fsck.out" 2>&1 || rc=$?
[ "$rc" = 0 ] || { cat "$work/e2fsck.out"; fail "e2fsck -fn on the converted image exited $rc"; }
intact=0
while read -r sum name; do
	got=$(debugfs -R "cat /$name" "$work/ext4.raw" 2>/dev/null | sha256sum | cut -d' ' -f1)
	if [ "$got" = "$sum" ]; then intact=$((intact + 1)); else fail "ext4 (host): $name differs"; fi
done <"$share/src.sums"
say "ext4 (host): journal replayed, e2fsck -fn clean, $intact fsynced files intact by debugfs"

say "guest boot 2: remount the crashed images and verify"
boot "$work/guest2.sh" || fail "guest boot 2"
qcheck "$share/ext4.qcow2" "0 3"
qcheck "$share/xfs.qcow2" "0 3"

if [ "$failures" -gt 0 ]; then
	say "$failures failures after $(elapsed "$t0") s"
	exit 1
fi
say "PASS after $(elapsed "$t0") s"
