#!/bin/sh
# /init of the Kubernetes node guest's initramfs (hack/vm/node/boot.sh):
# loads what it takes to mount the node's root disk (/dev/vda, ext4) and
# hands over to the node's own init there. The base initramfs of
# hack/vm/prepare.sh provides busybox and the modules.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
kver=$(uname -r)
# /etc/modules lists the base initramfs's modules in load order; nbd is
# left to the node (the driver's DaemonSet loads it, as on any node).
while read -r m; do
	[ "$m" = nbd ] || insmod "/lib/modules/$kver/$m.ko" 2>/dev/null
done </etc/modules
mkdir -p /newroot
i=0
until mount -t ext4 /dev/vda /newroot 2>/dev/null; do
	i=$((i + 1))
	[ $i -lt 50 ] || { echo "node-init: cannot mount /dev/vda"; poweroff -f; }
	sleep 0.1
done
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/kube-node-init
