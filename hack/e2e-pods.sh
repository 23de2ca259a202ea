#!/usr/bin/env bash
# csi-qcow2 on a real kubelet: the driver as its DaemonSet pod, PVCs used by
# running containers, driven by kubectl only, as a user would.
#
# The node is a qemu guest (hack/vm/node: Debian's kernel under TCG, with
# /dev/nbdX; containerd, runc and the CNI bridge from Debian, kubelet built
# from source) joined to a control plane on this machine's loopback (etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler; hack/lib/cluster.sh).
# The images are hack/build-images.sh's OCI archives, imported into the
# node's containerd (nothing is pulled). deploy/kubernetes and its
# snapshot-controller are applied unchanged but for our image's name.
#
# Prints one line per step and, last, "k8s-pods: N/N steps passed"; exits
# non-zero on the first failed step (the logs of every component, the
# guest's included, are printed and kept).
#
# Environment: E2E_PORT_BASE (default 23890; uses six ports from it),
# KEEP=1 keeps the work dir, NODE_MEM/NODE_SMP (the guest's size).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
t0=$SECONDS
# shellcheck source=hack/lib/versions.sh
. "$repo/hack/lib/versions.sh"
base=${E2E_PORT_BASE:-23890}
node=kube-node
driver_name=qcow2.csi-qcow2.io
ns=csi-qcow2
steps=0 passed=0

say() { echo "    $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
# step N TITLE: a step begins; pass: it ended well (one line each).
step() { steps=$((steps + 1)); step_t=$SECONDS; step_title=$*; echo "--- [$((SECONDS - t0))s] step $steps: $*"; }
pass() { passed=$((passed + 1)); echo "k8s-pods: step $steps ok ($((SECONDS - step_t)) s): $step_title${1:+: $1}"; }

for t in openssl curl socat qemu-system-x86_64 qemu-img; do
	command -v $t >/dev/null || fail "$t not found (hack/install-deps.sh)"
done

# shellcheck source=hack/lib/cluster.sh
. hack/lib/cluster.sh
# shellcheck source=hack/lib/node.sh
. hack/lib/node.sh

echo "=== [0s] builds: control plane, kubelet and sidecars (cached), images, the node's disk"
node_build
echo "    builds done in $((SECONDS - t0)) s; driver image $driver_image"

on_exit() { node_finish e2e-pods $? "step $steps ($step_title)"; }
trap on_exit EXIT

echo "=== [$((SECONDS - t0))s] control plane on 127.0.0.1, the node guest"
node_up "$node" "$base"

step "the node boots and registers: kubelet, containerd, our images"
wait_for 600 "node $node Ready" node_ready "$node"
say "$(grep -h 'images:\|kubelet started' "$run/node-init.log" | tr '\n' ';')"
pass "$(kubectl get node "$node" -o jsonpath='{.status.nodeInfo.kubeletVersion} {.status.nodeInfo.containerRuntimeVersion} {.status.nodeInfo.kernelVersion}')"

step "deploy/kubernetes (image: $driver_image) and its snapshot-controller: the DaemonSet pod runs and registers"
node_deploy
kubectl -n $ns rollout status ds/csi-qcow2-node --timeout=600s >/dev/null ||
	fail "the DaemonSet's pod did not become ready"
has_driver() { kubectl get csinode "$node" -o jsonpath='{.spec.drivers[*].name}' | grep -qw "$driver_name"; }
wait_for 120 "CSINode $node to list $driver_name" has_driver
has_capacity() { [ -n "$(kubectl get csistoragecapacities -n $ns -o name)" ]; }
wait_for 180 "CSIStorageCapacity in $ns" has_capacity
kubectl -n kube-system rollout status deploy/snapshot-controller --timeout=600s >/dev/null ||
	fail "snapshot-controller did not become ready"
kubectl -n $ns rollout status deploy/csi-qcow2-resizer --timeout=600s >/dev/null ||
	fail "csi-qcow2-resizer did not become ready"
pass "CSINode $(kubectl get csinode "$node" -o jsonpath='{.spec.drivers[0].name} nodeID={.spec.drivers[0].nodeID} topology={.spec.drivers[0].topologyKeys}'); CSIStorageCapacity $(kubectl get csistoragecapacities -n $ns -o jsonpath='{.items[0].capacity}')"

# pvc NAME SIZE [STORAGECLASS] [EXTRA-SPEC-YAML]
pvc() {
	kubectl apply -f - >/dev/null <<-EOF
		apiVersion: v1
		kind: PersistentVolumeClaim
		metadata: {name: $1, namespace: default}
		spec:
		  storageClassName: ${3:-csi-qcow2}
		  accessModes: [ReadWriteOnce]
		  resources: {requests: {storage: $2}}
		${4:-}
	EOF
}
# pod NAME PVC SCRIPT [block]: a busybox pod with PVC at /data (or the
# raw device at /dev/xvda), fsGroup 2000, running SCRIPT. PVC "A,B" is
# two PVCs, at /a and /b.
pod() {
	local vol="volumeMounts: [{name: v, mountPath: /data}]" vols="{name: v, persistentVolumeClaim: {claimName: $2}}"
	[ "${4:-}" = block ] && vol="volumeDevices: [{name: v, devicePath: /dev/xvda}]"
	if [[ $2 == *,* ]]; then
		vol="volumeMounts: [{name: a, mountPath: /a}, {name: b, mountPath: /b}]"
		vols="{name: a, persistentVolumeClaim: {claimName: ${2%,*}}}, {name: b, persistentVolumeClaim: {claimName: ${2#*,}}}"
	fi
	kubectl apply -f - >/dev/null <<-EOF
		apiVersion: v1
		kind: Pod
		metadata: {name: $1, namespace: default}
		spec:
		  securityContext: {fsGroup: 2000}
		  terminationGracePeriodSeconds: 2
		  containers:
		  - name: app
		    image: $busybox
		    imagePullPolicy: Never
		    command: ["sh", "-c", $(printf '%s' "$3" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')]
		    $vol
		  volumes: [$vols]
	EOF
}
# storageclass NAME PARAMETERS: one of ours, as a user would add it.
storageclass() {
	kubectl apply -f - >/dev/null <<-EOF
		apiVersion: storage.k8s.io/v1
		kind: StorageClass
		metadata: {name: $1}
		provisioner: $driver_name
		volumeBindingMode: WaitForFirstConsumer
		allowVolumeExpansion: true
		parameters: $2
	EOF
}
running() { kubectl wait --for=condition=Ready --timeout="${2:-600}s" pod/"$1" >/dev/null; }
kx() { kubectl exec "$1" -- sh -c "$2"; }

step "an ext4 PVC and an xfs PVC in running Pods: write files, fsync, fsGroup applied"
storageclass csi-qcow2-xfs '{csi.storage.k8s.io/fstype: xfs}'
pvc data-ext4 1Gi
pvc data-xfs 512Mi csi-qcow2-xfs
writer='i=0; while :; do i=$((i+1)); echo "rec $i $(date +%s)" >/data/rec.tmp && dd if=/data/rec.tmp of=/data/log bs=64 count=1 seek=$((i-1)) conv=notrunc,fsync 2>/dev/null || { echo "WRITE-ERROR at $i"; exit 1; }; echo "$i" >/data/last.tmp; mv /data/last.tmp /data/last; sleep 0.2; done'
pod app-ext4 data-ext4 'echo hello-ext4 >/data/hello && sync /data/hello && sleep 1000000'
pod app-xfs data-xfs 'echo hello-xfs >/data/hello && sync /data/hello && sleep 1000000'
running app-ext4 || fail "app-ext4 not running"
running app-xfs || fail "app-xfs not running"
for p in ext4 xfs; do
	[ "$(kx app-$p 'cat /data/hello')" = "hello-$p" ] || fail "app-$p cannot read back /data/hello"
	fs=$(kx app-$p 'grep " /data " /proc/mounts | cut -d" " -f3')
	[ "$fs" = "$p" ] || fail "app-$p: /data is $fs, not $p"
	g=$(kx app-$p 'stat -c %g /data')
	[ "$g" = 2000 ] || fail "app-$p: /data has group $g, not the fsGroup 2000"
	kx app-$p 'dd if=/dev/urandom of=/data/blob bs=1M count=8 conv=fsync 2>/dev/null && md5sum /data/blob' >"$work/blob-$p.md5"
done
pass "ext4 and xfs mounted at /data, group 2000, files written and fsynced"

step "VolumeSnapshot of the ext4 PVC while its Pod writes; a restore PVC sees the snapshot's files, not later ones"
kubectl delete pod app-ext4 --wait=true >/dev/null
pod app-ext4 data-ext4 "$writer"
running app-ext4 || fail "the writer pod is not running"
writing() { [ "$(kx app-ext4 'cat /data/last 2>/dev/null')" -ge "$1" ]; }
wait_for 120 "the writer's first records" writing 10
kx app-ext4 'echo before >/data/before && sync /data/before'
kubectl apply -f - >/dev/null <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: snap, namespace: default}
spec:
  volumeSnapshotClassName: csi-qcow2
  source: {persistentVolumeClaimName: data-ext4}
EOF
kubectl wait --for=jsonpath='{.status.readyToUse}'=true --timeout=180s volumesnapshot/snap >/dev/null ||
	fail "volumesnapshot/snap not ready"
kx app-ext4 'echo after >/data/after && sync /data/after'
pvc restored 1Gi csi-qcow2 "  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: snap}"
pod app-restored restored 'sleep 1000000'
running app-restored || fail "app-restored not running"
kx app-restored 'test -f /data/before' || fail "the restored volume lacks /data/before"
[ "$(kx app-restored 'test -e /data/after && echo yes || echo no')" = no ] ||
	fail "the restored volume has /data/after, written after the snapshot"
# records N POD: the first bad one of the first N records of POD's
# /data/log (64-byte slots, "rec I TIME" and zeros), empty when all are
# what the writer wrote. One pass in the pod: a dd per record took minutes
# under TCG.
records() {
	kx "$2" "head -c $(($1 * 64)) /data/log | tr -d '\\000' |
		awk -v n=$1 '\$1 != \"rec\" || \$2 != NR { print NR; exit } END { if (NR < n) print \"only \" NR }'"
}
n=$(kx app-restored 'cat /data/last')
bad=$(records "$n" app-restored)
[ -z "$bad" ] || fail "records of the restored writer log are wrong: $bad"
pass "restored: before present, after absent, the writer's $n records up to the snapshot intact"

step "a clone PVC (dataSource: the ext4 PVC) in a new Pod sees the source's files"
pvc clone 1Gi csi-qcow2 "  dataSource: {kind: PersistentVolumeClaim, name: data-ext4}"
pod app-clone clone 'sleep 1000000'
running app-clone || fail "app-clone not running"
kx app-clone 'test -f /data/before && test -f /data/after && test -s /data/log' ||
	fail "the clone lacks the source's files"
[ "$(kx app-clone 'md5sum /data/blob')" = "$(cat "$work/blob-ext4.md5")" ] || fail "the clone's /data/blob differs"
pass "before, after, log and an 8 MiB blob (md5 equal) in the clone"

step "expand the ext4 PVC 1Gi -> 2Gi online: status.capacity and df in the Pod"
kubectl patch pvc data-ext4 -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}' >/dev/null
grown() { [ "$(kubectl get pvc data-ext4 -o jsonpath='{.status.capacity.storage}')" = 2Gi ]; }
wait_for 300 "pvc/data-ext4 status.capacity 2Gi" grown
df_k=$(kx app-ext4 'df -k /data | tail -1' | awk '{print $2}')
[ "$df_k" -gt $((1800 * 1024)) ] || fail "df in the Pod shows ${df_k} KiB, not ~2 GiB"
pass "status.capacity 2Gi, df shows $((df_k / 1024)) MiB"

step "a block-mode PVC: dd a pattern in one Pod, read it back from a second after the first is deleted"
pvc data-block 256Mi csi-qcow2 "  volumeMode: Block"
pod app-block data-block 'dd if=/dev/urandom of=/tmp/p bs=1M count=16 2>/dev/null && dd if=/tmp/p of=/dev/xvda bs=1M conv=fsync 2>/dev/null && md5sum </tmp/p >/tmp/sum && sleep 1000000' block
running app-block || fail "app-block not running"
wait_for 60 "the pattern written" kx app-block 'test -s /tmp/sum'
sum1=$(kx app-block 'cat /tmp/sum')
kubectl delete pod app-block --wait=true >/dev/null
pod app-block2 data-block 'sleep 1000000' block
running app-block2 || fail "app-block2 not running"
sum2=$(kx app-block2 'dd if=/dev/xvda bs=1M count=16 2>/dev/null | md5sum')
[ "$sum1" = "$sum2" ] || fail "the second Pod reads another pattern ($sum2, wrote $sum1)"
pass "16 MiB pattern read back intact ($sum1)"

step "a VolumeGroupSnapshot of two PVCs one Pod writes (label selector): both restored, a new Pod sees them crash consistent"
pvc grp-a 256Mi
pvc grp-b 256Mi
kubectl label pvc grp-a grp-b group=g1 >/dev/null
# Round i goes to /a/seq, fsynced, and only then to /b/seq: a crash
# consistent pair of snapshots holds rounds (i, i) or (i, i-1) of them.
seq_writer='echo ga >/a/hello && echo gb >/b/hello && sync && i=0 && while :; do i=$((i+1)); for f in /a/seq /b/seq; do printf "%015d\n" $i | dd of=$f bs=16 count=1 conv=notrunc,fsync 2>/dev/null || exit 1; done; done'
pod app-grp grp-a,grp-b "$seq_writer"
running app-grp || fail "app-grp not running"
rounds() { [ "$(kx app-grp 'cat /b/seq 2>/dev/null || echo 0')" -ge "$1" ]; }
wait_for 120 "the group writer's first rounds" rounds 20
kubectl apply -f - >/dev/null <<EOF
apiVersion: groupsnapshot.storage.k8s.io/v1
kind: VolumeGroupSnapshot
metadata: {name: gsnap, namespace: default}
spec:
  volumeGroupSnapshotClassName: csi-qcow2
  source: {selector: {matchLabels: {group: g1}}}
EOF
# The per-node csi-snapshotter v8.7.0 sees group classes and contents
# through its node-labelled informer only, and snapshot-controller labels
# neither (docs/driver.md): do as a user must.
kubectl label volumegroupsnapshotclass csi-qcow2 snapshot.storage.kubernetes.io/managed-by="$node" >/dev/null
gcontent() { kubectl get volumegroupsnapshotcontent -o jsonpath='{range .items[?(@.spec.volumeGroupSnapshotRef.name=="gsnap")]}{.metadata.name}{end}'; }
has_gcontent() { [ -n "$(gcontent)" ]; }
wait_for 120 "the VolumeGroupSnapshotContent of gsnap" has_gcontent
kubectl label volumegroupsnapshotcontent "$(gcontent)" snapshot.storage.kubernetes.io/managed-by="$node" >/dev/null
kubectl wait --for=jsonpath='{.status.readyToUse}'=true --timeout=180s volumegroupsnapshot/gsnap >/dev/null ||
	fail "volumegroupsnapshot/gsnap not ready: $(kubectl get volumegroupsnapshot gsnap -o jsonpath='{.status.error.message}')"
# member PVC: the group's VolumeSnapshot of PVC (owned by gsnap).
member() {
	kubectl get volumesnapshot -o jsonpath='{range .items[*]}{.metadata.ownerReferences[0].name} {.spec.source.persistentVolumeClaimName} {.metadata.name}{"\n"}{end}' |
		awk -v p="$1" '$1 == "gsnap" && $2 == p {print $3}'
}
snap_a=$(member grp-a) snap_b=$(member grp-b)
[ -n "$snap_a" ] && [ -n "$snap_b" ] || fail "gsnap has no VolumeSnapshot of each PVC: '$snap_a' '$snap_b'"
for v in "$snap_a" "$snap_b"; do
	kubectl wait --for=jsonpath='{.status.readyToUse}'=true --timeout=120s volumesnapshot/"$v" >/dev/null ||
		fail "volumesnapshot/$v not ready"
	# The members' contents too, or their finalizer outlives them.
	kubectl label volumesnapshotcontent "$(kubectl get volumesnapshot "$v" -o jsonpath='{.status.boundVolumeSnapshotContentName}')" \
		snapshot.storage.kubernetes.io/managed-by="$node" >/dev/null
done
handles=$(kubectl get volumegroupsnapshotcontent "$(gcontent)" -o jsonpath='{.status.volumeGroupSnapshotHandle}: {.status.volumeSnapshotInfoList[*].snapshotHandle}')
kubectl delete pod app-grp --wait=true >/dev/null
pvc grp-ra 256Mi csi-qcow2 "  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: $snap_a}"
pvc grp-rb 256Mi csi-qcow2 "  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: $snap_b}"
pod app-grp-r grp-ra,grp-rb 'sleep 1000000'
running app-grp-r || fail "app-grp-r not running"
[ "$(kx app-grp-r 'cat /a/hello /b/hello' | tr '\n' ' ')" = "ga gb " ] || fail "the restored volumes lack /a/hello or /b/hello"
ra=$(kx app-grp-r 'cat /a/seq') rb=$(kx app-grp-r 'cat /b/seq')
ra=$((10#$ra)) rb=$((10#$rb))
[ "$rb" = "$ra" ] || [ "$rb" = $((ra - 1)) ] || fail "the group holds round $ra of /a and $rb of /b: not crash consistent"
pass "group $handles; restored /a at round $ra, /b at round $rb"

step "kubectl delete the driver's pod while an app Pod writes with fsync"
last0=$(kx app-ext4 'cat /data/last')
old=$(kubectl -n $ns get pod -l app.kubernetes.io/component=node -o jsonpath='{.items[0].metadata.name}')
kubectl -n $ns delete pod "$old" --wait=true >/dev/null
kubectl -n $ns rollout status ds/csi-qcow2-node --timeout=600s >/dev/null || fail "no new driver pod"
new=$(kubectl -n $ns get pod -l app.kubernetes.io/component=node -o jsonpath='{.items[0].metadata.name}')
[ "$new" != "$old" ] || fail "the driver pod was not replaced"
lastA=$(kx app-ext4 'cat /data/last')
more() { [ "$(kx app-ext4 'cat /data/last')" -gt $((lastA + 10)) ]; }
wait_for 180 "the writer to go on after the new driver pod" more
kx app-ext4 'touch /data/rw-check && rm /data/rw-check' || fail "the filesystem is not writable"
restarts=$(kubectl get pod app-ext4 -o jsonpath='{.status.containerStatuses[0].restartCount}')
[ "$restarts" = 0 ] || fail "the writer exited (restarts $restarts): $(kubectl logs app-ext4 --previous 2>&1 | tail -2)"
kubectl delete pod app-ext4 --wait=true >/dev/null
pod app-ext4 data-ext4 'sleep 1000000'
running app-ext4 || fail "app-ext4 not running again"
n=$(kx app-ext4 'cat /data/last')
bad=$(records "$n" app-ext4)
[ -z "$bad" ] || fail "fsynced records lost or wrong: $bad"
# The new pod's first orphan check listed the PVs through client-go with
# the manifests' RBAC (clusterObjects: our PVs, at least one); every volume
# here has its PV (and is younger than the grace period), so none is an
# orphan.
orphan_check() { kubectl -n $ns logs "$new" -c csi-qcow2 2>/dev/null | grep 'Orphan check listed the cluster' | grep 'kind="volume"'; }
wait_for 60 "the new driver pod's first orphan check" orphan_check
oc=$(orphan_check)
pvs=$(sed -n 's/.* clusterObjects=\([0-9]*\) .*/\1/p' <<<"$oc")
[ "${pvs:-0}" -ge 1 ] || fail "the orphan check listed no PV of ours: $oc"
case $oc in *' orphans=0'*) ;; *) fail "the orphan check found orphans among volumes with PVs: $oc" ;; esac
pass "driver pod $old -> $new; the writer went $last0 -> $n records, no I/O error, all $n fsynced records intact, fs read-write; orphan check: ${oc#*kind=}"

step "refused and unschedulable PVCs get clear events"
storageclass csi-qcow2-bad '{noSuchParameter: "1"}'
pvc bad-param 64Mi csi-qcow2-bad
pod app-bad-param bad-param 'sleep 1'
# event OBJECT REASON: the messages of OBJECT's events of REASON.
event() { kubectl get events --field-selector "involvedObject.name=$1,reason=$2" -o jsonpath='{.items[*].message}'; }
ev_has() { event "$1" "$2" | grep -q "$3"; }
wait_for 180 "a ProvisioningFailed event naming noSuchParameter" ev_has bad-param ProvisioningFailed noSuchParameter
pvc too-big 100Ti
pod app-too-big too-big 'sleep 1'
wait_for 180 "a FailedScheduling event about storage capacity" ev_has app-too-big FailedScheduling 'enough free storage'
[ "$(kubectl get pvc too-big -o jsonpath='{.status.phase}')" = Pending ] || fail "pvc/too-big is not Pending"
pass "bad-param: $(event bad-param ProvisioningFailed | grep -o 'desc = [^(]*' | head -1); too-big: Pending, $(event app-too-big FailedScheduling | cut -c1-80)"

step "delete everything: volumes unpublished and unstaged, no /dev/nbdX connected, data dir empty"
kubectl delete pod --all --wait=true >/dev/null
kubectl delete volumegroupsnapshot --all --wait=false >/dev/null
kubectl delete volumesnapshot --all --wait=false >/dev/null
kubectl delete pvc --all --wait=false >/dev/null
no_pvs() { [ -z "$(kubectl get pv,volumesnapshotcontent,volumegroupsnapshotcontent -o name)" ]; }
wait_for 300 "PVs, VolumeSnapshotContents and VolumeGroupSnapshotContents to go" no_pvs
drv=$(kubectl -n $ns get pod -l app.kubernetes.io/component=node -o jsonpath='{.items[0].metadata.name}')
dx() { kubectl -n $ns exec "$drv" -c csi-qcow2 -- sh -c "$1"; }
connected=$(dx 'for p in /sys/block/nbd*/pid; do [ -e "$p" ] && echo "$p"; done; true')
[ -z "$connected" ] || fail "nbd devices still connected: $connected"
left=$(dx 'find /var/lib/csi-qcow2 -type f; find /var/lib/kubelet/pods -path "*csi*" -name mount -type d 2>/dev/null; true')
[ -z "$left" ] || fail "left behind: $left"
staged=$(dx 'grep -c "/var/lib/kubelet/plugins/kubernetes.io/csi" /proc/mounts || true')
[ "$staged" = 0 ] || fail "$staged staging mounts left"
dx 'dmesg' >"$work/dmesg.txt"
[ -s "$work/dmesg.txt" ] || fail "cannot read the node's kernel log"
! grep -E 'EXT4-fs error|XFS .*(error|Corruption)|Remounting filesystem read-only|Aborting journal' "$work/dmesg.txt" ||
	fail "the node's kernel log shows filesystem errors (above)"
nbd_io_errors=$(grep -c 'I/O error, dev nbd' "$work/dmesg.txt" || true)
kubectl delete -f "$work/deploy.yaml" --wait=true --timeout=120s >/dev/null
kubectl delete -k deploy/kubernetes/snapshot-controller --wait=true --timeout=120s >/dev/null
pass "no PV, no (group) snapshot content, no connected nbd device, no staging mount, nothing in the data dir, no filesystem error in dmesg ($nbd_io_errors nbd I/O error lines)"

echo "k8s-pods: $passed/$steps steps passed"
[ "$passed" = "$steps" ]
