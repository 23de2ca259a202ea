#!/usr/bin/env bash
# Usage: hack/vm/build-payload.sh OUT SHARE NDISKS [file=SRC[:DST]]... \
#          [env=NAME=VALUE]... -- GUEST_CMD [ARGS...]
#
# Writes the per-run initramfs archive OUT (uncompressed newc cpio) that
# run-guest.sh appends to the cached base archive; the kernel unpacks both,
# the later one on top. It holds /guest/config (read by /init), /guest/env,
# /guest/cmd, /guest/run when GUEST_CMD is a host file, and the -f files.
set -euo pipefail

out=$1 share=$2 ndisks=$3
shift 3
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/guest"

# quote WORD: WORD as one single-quoted shell word.
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

while [ $# -gt 0 ] && [ "$1" != -- ]; do
	case $1 in
	file=*)
		spec=${1#file=} src=${spec%%:*} dst=/opt/$(basename "${spec%%:*}")
		[ "$spec" != "$src" ] && dst=${spec#*:}
		[ -e "$src" ] || { echo "build-payload: no such file: $src" >&2; exit 2; }
		mkdir -p "$stage$(dirname "$dst")"
		cp -a "$src" "$stage$dst"
		;;
	env=*)
		kv=${1#env=}
		case ${kv%%=*} in '' | *[!A-Za-z0-9_]*)
			echo "build-payload: bad variable: $kv" >&2; exit 2 ;;
		esac
		echo "${kv%%=*}=$(quote "${kv#*=}")" >>"$stage/guest/env"
		;;
	*) echo "build-payload: bad argument: $1" >&2; exit 2 ;;
	esac
	shift
done
[ "${1:-}" = -- ] && shift
[ $# -ge 1 ] || { echo "build-payload: no guest command" >&2; exit 2; }

cmd=$1
shift
if [ -f "$cmd" ]; then
	cp "$cmd" "$stage/guest/run"
	chmod 0755 "$stage/guest/run"
	cmd=/guest/run
fi
line=$(quote "$cmd")
for a in "$@"; do line="$line $(quote "$a")"; done
echo "$line" >"$stage/guest/cmd"

{
	echo "VM_SHARE=$([ -n "$share" ] && echo 1 || echo 0)"
	echo "VM_DISKS=$ndisks"
	echo "VM_NBD_ARGS=$(quote "${VM_NBD_ARGS:-nbds_max=16}")"
} >"$stage/guest/config"

(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$out"
