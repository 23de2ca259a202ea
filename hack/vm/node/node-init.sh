#!/bin/bash
# PID 1 of the Kubernetes node guest (hack/vm/node/boot.sh): a Debian root
# with containerd, runc, the CNI plugins and kubelet, on /dev/vda.
#
# The host shares the run's directory over 9p ("run": node.env,
# kubelet.kubeconfig and ca.crt in; containerd.log, kubelet.log and
# node-init.log out); the images are on the disk, imported at its build
# (build-rootfs.sh). It brings up the network (qemu user
# networking: 10.0.2.15, the API server forwarded to API_ADDR by the host),
# makes the cluster's service IP 10.96.0.1:443 reach the API server for
# pods (kube-proxy's job in a real cluster: here one TCP forwarder), starts
# containerd and kubelet, and powers off when the host creates run/stop.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
run=/run/kube-node
log() { echo "node-init: [$(cut -d' ' -f1 /proc/uptime)s] $*" | tee -a "$run/node-init.log" >/dev/console; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /dev/pts /dev/shm "$run"
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -o remount,rw /
# kubelet's pods and the driver's Bidirectional mounts need shared
# propagation from the root down.
mount --make-rshared /
for m in 9pnet_virtio 9p; do modprobe "$m"; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 run "$run"
. "$run/node.env"
log "booted; kernel $(uname -r)"

for m in overlay bridge veth virtio_net; do modprobe "$m" || log "modprobe $m failed"; done
echo "+cpu +cpuset +memory +pids +io" >/sys/fs/cgroup/cgroup.subtree_control
sysctl -qw net.ipv4.ip_forward=1
hostname "$NODE_NAME"
echo "$NODE_NAME" >/etc/hostname
printf '127.0.0.1 localhost\n10.0.2.15 %s\n' "$NODE_NAME" >/etc/hosts
ip link set lo up
ip addr add 10.96.0.1/32 dev lo
for _ in $(seq 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
: >/etc/resolv.conf

# The service IP of the API server, for pods (their traffic reaches this
# root namespace through the CNI bridge).
socat TCP-LISTEN:443,bind=10.96.0.1,fork,reuseaddr "TCP:${API_ADDR%:*}:${API_ADDR##*:}" \
	>>"$run/socat.log" 2>&1 &

containerd --config /etc/containerd/config.toml >>"$run/containerd.log" 2>&1 &
for _ in $(seq 300); do [ -S /run/containerd/containerd.sock ] && break; sleep 0.1; done
log "containerd up"
log "images: $(ctr -n k8s.io images ls -q | grep -v '^sha256:' | tr '\n' ' ')"

mkdir -p /var/lib/kubelet /etc/kubernetes
cp "$run/kubelet.kubeconfig" "$run/ca.crt" /etc/kubernetes/
sed "s/^port: .*/port: ${KUBELET_PORT:-10250}/" /etc/kubernetes/kubelet.yaml.in >/etc/kubernetes/kubelet.yaml
kubelet --config=/etc/kubernetes/kubelet.yaml --kubeconfig=/etc/kubernetes/kubelet.kubeconfig \
	--hostname-override="$NODE_NAME" --node-ip=10.0.2.15 --v="${KUBELET_V:-2}" \
	>>"$run/kubelet.log" 2>&1 &
kubelet_pid=$!
log "kubelet started"
echo ready >"$run/ready"

until [ -e "$run/stop" ]; do sleep 1; done
log "stopping"
kill "$kubelet_pid" 2>/dev/null
sleep 2
pkill containerd-shim
pkill containerd
sleep 1
sync
umount "$run"
echo o >/proc/sysrq-trigger
sleep 60
