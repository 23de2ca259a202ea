#!/usr/bin/env bash
# Proves the archives of hack/build-images.sh import and run: starts a
# private containerd (Debian's 1.6 and runc, installed if missing; its own
# root, state, socket and config under a temp dir, never the system's),
# imports every archive of images.list with `ctr -n k8s.io images import`
# as the node guest does, checks that `ctr images ls` names exactly the
# listed images, then runs each kind of image with `ctr run --rm`:
#
#   busybox      echo
#   csi-qcow2    --help exits 0; runs as 65532; mkfs.xfs, mkfs.ext4,
#                blkid, modprobe, mount answer for their version
#   pause        starts, exits 0 on SIGTERM
#   sidecars     --help exits 0 (each one that was built)
#
# Needs root (containerd, overlay mounts). The shims' sockets still go
# under /run/containerd/s, a path containerd 1.6 fixes, named by a hash
# of this containerd's socket, so they cannot meet the system's; runc's
# state goes under the temp dir too (ctr run --runc-root).
#
# Usage: hack/test-images.sh [IMAGES_DIR]   (default: build-images.sh's cache)
set -euo pipefail

dir=${1:-${IMAGES_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/csi-qcow2/images}}
list=$dir/images.list
[ -f "$list" ] || { echo "test-images: no $list; run hack/build-images.sh" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "test-images: needs root (containerd)" >&2; exit 1; }

log() { echo "test-images: $*"; }
fail=0
bad() { log "FAIL: $*"; fail=1; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }

if ! command -v containerd >/dev/null || ! command -v runc >/dev/null; then
	log "installing containerd runc"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq containerd runc >/dev/null
fi

[ -e /run/containerd ] && had_run_dir=1 || had_run_dir=0
tmp=$(mktemp -d /tmp/csi-qcow2-test-images.XXXXXX)
sock=$tmp/containerd.sock
cat >"$tmp/config.toml" <<EOF
version = 2
root = "$tmp/root"
state = "$tmp/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$tmp/opt"
EOF
containerd --config "$tmp/config.toml" >"$tmp/containerd.log" 2>&1 &
containerd_pid=$!
cleanup() {
	local c
	for c in $(ctr_ task ls -q 2>/dev/null); do ctr_ task kill -s SIGKILL "$c" >/dev/null 2>&1 || true; done
	kill "$containerd_pid" 2>/dev/null && wait "$containerd_pid" 2>/dev/null || true
	umount -R "$tmp/state" "$tmp/root" 2>/dev/null || true
	rm -rf "$tmp"
	[ "$had_run_dir" = 1 ] || rmdir /run/containerd/s /run/containerd 2>/dev/null || true
}
trap cleanup EXIT
ctr_() { ctr --address "$sock" --namespace k8s.io "$@"; }
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
ctr_ version >/dev/null || { cat "$tmp/containerd.log"; exit 1; }
log "containerd $(containerd --version | cut -d' ' -f3), runc $(runc --version | sed -n 's/^runc version //p'), in $tmp"

# --- import ------------------------------------------------------------------
want=()
while read -r name file; do
	[ -n "$name" ] || continue
	t0=$EPOCHREALTIME
	if ctr_ images import "$dir/$file" >"$tmp/import.log" 2>&1; then
		log "imported $name ($file, $(du -h "$dir/$file" | cut -f1)) in $(since "$t0") s"
	else
		bad "import $file: $(cat "$tmp/import.log")"
	fi
	want+=("$name")
done <"$list"
got=$(ctr_ images ls -q | sort)
if [ "$got" = "$(printf '%s\n' "${want[@]}" | sort)" ]; then
	log "ctr images ls: exactly the ${#want[@]} listed names"
else
	bad "ctr images ls names"$'\n'"$got"$'\n'"want"$'\n'"$(printf '%s\n' "${want[@]}" | sort)"
fi

# --- run -----------------------------------------------------------------------
n=0
# run IMAGE ARGS...: ctr run --rm, full argv (ctr replaces the entrypoint).
run() {
	local img=$1
	shift
	n=$((n + 1))
	ctr_ run --rm --fifo-dir "$tmp/fifo" --runc-root "$tmp/runc" "$img" "t$n" "$@"
}
find_image() { printf '%s\n' "${want[@]}" | grep -E "$1" | head -n1 || true; }

check() { # check WHAT EXPECTED-OUTPUT-REGEX IMAGE ARGS...: prints $SHOW lines of output (3)
	local what=$1 re=$2 out t0=$EPOCHREALTIME
	shift 2
	if out=$(run "$@" 2>&1) && grep -qE "$re" <<<"$out"; then
		log "ok: $what ($(since "$t0") s)"
		head -n "${SHOW:-3}" <<<"$out" | sed 's/^/    /'
	else
		bad "$what: $out"
	fi
}

img=$(find_image '/busybox:')
[ -z "$img" ] || check "busybox echo" '^hello from busybox$' "$img" echo hello from busybox

img=$(find_image '/csi-qcow2:')
if [ -n "$img" ]; then
	check "csi-qcow2 --help exits 0" 'Usage|usage' "$img" /usr/local/bin/csi-qcow2 --help
	check "csi-qcow2 runs as 65532:65532" '^uid=65532 gid=65532' "$img" id
	# What the node plugin runs (the Dockerfile's package list), a line each.
	SHOW=20 check "csi-qcow2 tools" '^resize2fs$' "$img" sh -c '
		for c in "mkfs.xfs -V" "mkfs.ext4 -V" "e2fsck -V" "xfs_growfs -V" "blkid -V" "mount --version" \
			"umount --version" "fsfreeze --version" "modprobe --version"; do
			out=$($c 2>&1) || { echo "FAILED: $c: $out"; exit 1; }
			echo "$out" | head -n1
		done
		command -v resize2fs >/dev/null && echo resize2fs'
fi

img=$(find_image '/pause:')
if [ -n "$img" ]; then
	n=$((n + 1))
	t0=$EPOCHREALTIME
	ctr_ run --rm --fifo-dir "$tmp/fifo" --runc-root "$tmp/runc" "$img" "t$n" >"$tmp/pause.out" 2>&1 &
	pid=$!
	for _ in $(seq 50); do
		[ "$(ctr_ task ls 2>/dev/null | awk -v t="t$n" '$1 == t { print $3 }')" = RUNNING ] && break
		sleep 0.1
	done
	sleep 0.5
	if ! kill -0 "$pid" 2>/dev/null; then
		bad "pause did not stay up: $(cat "$tmp/pause.out")"
	else
		ctr_ task kill -s SIGTERM "t$n"
		if wait "$pid"; then
			log "ok: pause ran, exited 0 on SIGTERM ($(since "$t0") s): $(tr '\n' ' ' <"$tmp/pause.out")"
		else
			bad "pause exited $? on SIGTERM: $(cat "$tmp/pause.out")"
		fi
	fi
fi

for img in "${want[@]}"; do
	case "$img" in
	registry.k8s.io/sig-storage/*)
		b=${img##*/}
		b=${b%:*}
		check "$b --help" 'Usage|usage|-help' "$img" "/$b" --help
		;;
	esac
done

[ "$fail" = 0 ] && log "all passed" || log "some checks FAILED"
exit "$fail"
