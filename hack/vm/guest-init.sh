#!/bin/sh
# /init of the test guest (see run-guest.sh). Mounts the pseudo filesystems,
# loads the modules listed in /etc/modules, mounts the host share (9p tag
# "hostshare") on /work when there is one, runs /guest/cmd with the
# environment in /guest/env, then prints GUEST-EXIT=<status> on the console
# and powers off. run-guest.sh turns that line into its own exit status.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /root
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ip link set lo up 2>/dev/null

VM_NBD_ARGS=
VM_SHARE=0
[ -f /guest/config ] && . /guest/config

kver=$(uname -r)
while read -r m; do
	args=
	[ "$m" = nbd ] && args=$VM_NBD_ARGS
	# shellcheck disable=SC2086 # args is a word list on purpose
	insmod "/lib/modules/$kver/$m.ko" $args 2>/tmp/insmod.err ||
		grep -q 'File exists' /tmp/insmod.err ||
		echo "init: insmod $m: $(cat /tmp/insmod.err)"
done </etc/modules

workdir=/tmp
if [ "$VM_SHARE" = 1 ]; then
	if mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 hostshare /work; then
		workdir=/work
	else
		echo "init: cannot mount the host share on /work"
	fi
fi

rc=125
if [ -f /guest/cmd ]; then
	(
		cd "$workdir" || exit 125
		set -a
		[ -f /guest/env ] && . /guest/env
		set +a
		. /guest/cmd
	) </dev/null
	rc=$?
else
	echo "init: no /guest/cmd"
fi

sync
[ "$workdir" = /work ] && umount /work
echo "GUEST-EXIT=$rc"
poweroff -f
# Not reached unless poweroff failed; with -no-reboot a reboot also ends qemu.
echo o >/proc/sysrq-trigger
sleep 5
