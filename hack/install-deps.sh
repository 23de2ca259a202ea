#!/usr/bin/env bash
# Installs the Debian packages the test suite uses (QEMU as the oracle,
# NBD clients, fio, filesystem tools, the guest's kernel tooling, and for
# the Kubernetes node guest: socat for its port forward, mmdebstrap for its
# root and the images, containerd and runc for hack/test-images.sh). Runs
# apt-get only when something is missing, so warm runs cost nothing.
set -euo pipefail

pkgs=(qemu-utils libnbd-bin fio qemu-system-x86 e2fsprogs xfsprogs
	busybox-static cpio xz-utils bc util-linux openssl curl
	socat mmdebstrap containerd runc)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
	exit 0
fi
echo "install-deps: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
