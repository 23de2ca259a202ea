#!/usr/bin/env bash
# csi-qcow2 against a real Kubernetes control plane, driven by kubectl only.
#
# Real: etcd, kube-apiserver, kube-controller-manager (PV binder, expander,
# PVC/PV protection), csi-provisioner and csi-snapshotter in node-deployment
# mode, snapshot-controller with distributed snapshotting, csi-resizer, and
# the driver on a local data dir, all on 127.0.0.1 (binaries from
# hack/k8s-build.sh, cached). Not here: kubelet and a container runtime, so
# no pod runs. What kubelet and node-driver-registrar would do for the node
# is done with kubectl (a Node with the topology label, its CSINode), and
# the scheduler's choice is the PVC's selected-node annotation.
#
# The manifests are the ones users get: deploy/kubernetes is rendered
# (kubectl kustomize), validated with a server-side dry run, then applied
# for real, and the sidecars act as its service accounts (impersonation), so
# its RBAC is what is exercised.
#
# Environment: E2E_PORT_BASE (default 23790; uses three ports from it),
# CSI_QCOW2_BIN (a prebuilt driver; default: go build ./cmd/csi-qcow2),
# KEEP=1 keeps the work dir. Needs qemu-img/qemu-io (hack/install-deps.sh).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
t0=$SECONDS
# shellcheck source=hack/lib/versions.sh
. "$repo/hack/lib/versions.sh"
base=${E2E_PORT_BASE:-23790}
etcd_port=$base etcd_peer=$((base + 1)) api_port=$((base + 2))
node=e2e-node

step() { echo; echo "=== [$((SECONDS - t0))s] $*"; }
say() { echo "    $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

for t in qemu-img qemu-io openssl curl; do
	command -v $t >/dev/null || fail "$t not found (hack/install-deps.sh)"
done

step "build: control plane and sidecars (cached in $bin), the driver"
K8S_CACHE_DIR=$cache hack/k8s-build.sh
work=$(mktemp -d /tmp/e2e-k8s.XXXXXX)
data=$work/data
logs=$work/logs
mkdir -p "$data" "$logs"

# shellcheck source=hack/lib/cluster.sh
. hack/lib/cluster.sh
# shellcheck source=hack/lib/csi.sh
. hack/lib/csi.sh
on_exit() { cluster_finish e2e-k8s $?; }
trap on_exit EXIT

csi_driver_binary
say "built in $((SECONDS - t0)) s"

step "start etcd $ETCD_VERSION, kube-apiserver and kube-controller-manager $K8S_VERSION on 127.0.0.1"
cluster_certs
cluster_etcd "$etcd_port" "$etcd_peer"
cluster_apiserver "$api_port"
# One kubeconfig per identity: the admin (kubectl, the controller-manager)
# and, impersonated, the service accounts deploy/kubernetes defines.
csi_kubeconfigs
kubeconfig "$work/resizer.kubeconfig" "system:serviceaccount:$ns:csi-qcow2-resizer"
say "$(kubectl version | tr '\n' ' ')"
cluster_controller_manager \
	--controllers persistentvolume-binder-controller,persistentvolume-expander-controller,persistentvolumeclaim-protection-controller,persistentvolume-protection-controller

step "VolumeSnapshot CRDs (client/v8@$SNAPSHOTTER_VERSION config/crd)"
csi_crds

step "deploy/kubernetes: kubectl kustomize, server-side dry run, then apply"
csi_deploy
say "StorageClass: $(kubectl get storageclass csi-qcow2 -o jsonpath='{.provisioner} {.volumeBindingMode} allowVolumeExpansion={.allowVolumeExpansion} {.parameters}')"
say "VolumeSnapshotClass: $(kubectl get volumesnapshotclass csi-qcow2 -o jsonpath='{.driver} {.deletionPolicy}')"

step "the node, as kubelet and node-driver-registrar would register it"
csi_node "$node"

step "start the driver and the sidecars (as deploy/kubernetes configures them)"
sock=$work/csi/csi.sock
start csi-qcow2 "$work/csi-qcow2" --endpoint "unix://$sock" --node-id "$node" --data-dir "$data" \
	--max-volumes 16 --metrics-address "127.0.0.1:0"
wait_for 20 "the driver's socket" test -S "$sock"
csi_sidecars "$node" "$sock"
csi_snapshot_controller
# As resizer.yaml: the resizer talks to a driver of its own with an empty
# data dir, not to the node's.
rsock=$work/resizer-csi/csi.sock
start csi-qcow2-for-resizer "$work/csi-qcow2" --endpoint "unix://$rsock" \
	--node-id "$node" --data-dir "$work/resizer-data"
wait_for 20 "the resizer's driver socket" test -S "$rsock"
start csi-resizer "$bin/csi-resizer-$RESIZER_VERSION" \
	--kubeconfig "$work/resizer.kubeconfig" --csi-address "$rsock" --leader-election=false --v=3

step "PVC data (1Gi, selected-node $node) -> bound PV and a qcow2 file"
pvc data 1Gi | sed 's/^/    /'
bound data || fail "pvc/data not bound"
pv=$(kubectl get pvc data -o jsonpath='{.spec.volumeName}')
say "pvc/data Bound to $pv: $(kubectl get pv "$pv" -o jsonpath='{.spec.capacity.storage} {.spec.csi.driver} handle={.spec.csi.volumeHandle} fsType={.spec.csi.fsType} nodeAffinity={.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].key}={.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}')"
img=$(image_of data)
[ -f "$img" ] || fail "no image $img"
say "$(qimg info "$img" | grep -E '^(image|file format|virtual size)' | tr '\n' ' ')"
# No kubelet mounts it, so content goes in at the image: 1 MiB of 0xab.
qemu-io -f qcow2 -c 'write -P 0xab 0 1M' "$img" >/dev/null
say "wrote 1 MiB of 0xab at offset 0 (qemu-io)"

step "VolumeSnapshot snap of pvc/data -> readyToUse, an internal snapshot of the image"
csi_snapshot snap data
say "volumesnapshot/snap readyToUse, restoreSize $(kubectl get volumesnapshot snap -o jsonpath='{.status.restoreSize}'), content $vsc managed-by=$(kubectl get volumesnapshotcontent "$vsc" -o jsonpath='{.metadata.labels.snapshot\.storage\.kubernetes\.io/managed-by}'), handle $snap_handle"
qimg snapshot -l "$img" | sed 's/^/    /'
qimg snapshot -l "$img" | grep -q "$snap_handle" || fail "$snap_handle is not an internal snapshot of $img"
# Now change the volume, so that restore and clone are told apart.
qemu-io -f qcow2 -c 'write -P 0xcd 0 1M' "$img" >/dev/null
say "then wrote 1 MiB of 0xcd at offset 0 of pvc/data"

step "PVC restored (dataSource: the snapshot) and PVC clone (dataSource: pvc/data) -> bound, with the right content"
pvc restored 1Gi "  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: snap}" | sed 's/^/    /'
pvc clone 1Gi "  dataSource: {kind: PersistentVolumeClaim, name: data}" | sed 's/^/    /'
bound restored || fail "pvc/restored not bound"
bound clone || fail "pvc/clone not bound"
rimg=$(image_of restored)
cimg=$(image_of clone)
say "pvc/restored Bound: $(basename "$rimg"); pvc/clone Bound: $(basename "$cimg")"
qimg convert -l "$snap_handle" -O raw "$img" "$work/snap.raw"
qemu-img compare -q -f raw -F qcow2 "$work/snap.raw" "$rimg" || fail "restored image differs from the snapshot"
say "qemu-img compare: restored == snapshot view (csi-qcow2 image convert -l $snap_handle)"
qemu-io -r -f qcow2 -c 'read -P 0xab 0 1M' "$rimg" | grep -q 'read 1048576' || fail "restored lacks 0xab"
say "restored reads 0xab at offset 0 (the content at snapshot time)"
qemu-img compare -q -f qcow2 -F qcow2 "$img" "$cimg" || fail "clone differs from pvc/data"
qemu-io -r -f qcow2 -c 'read -P 0xcd 0 1M' "$cimg" | grep -q 'read 1048576' || fail "clone lacks 0xcd"
say "qemu-img compare: clone == pvc/data; reads 0xcd at offset 0"
[ -z "$(qimg snapshot -l "$rimg")$(qimg snapshot -l "$cimg")" ] || fail "restored or clone image carries internal snapshots"
say "neither the restored nor the clone image carries internal snapshots (csi-qcow2 image snapshot -l)"

step "expand pvc/data 1Gi -> 2Gi"
kubectl patch pvc data -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}' | sed 's/^/    /'
pv_size() { [ "$(kubectl get pv "$pv" -o jsonpath='{.spec.capacity.storage}')" = 2Gi ]; }
wait_for 120 "pv/$pv capacity 2Gi" pv_size
say "pv/$pv capacity: $(kubectl get pv "$pv" -o jsonpath='{.spec.capacity.storage}')"
say "pvc/data status.capacity: $(kubectl get pvc data -o jsonpath='{.status.capacity.storage}'), conditions: $(kubectl get pvc data -o jsonpath='{range .status.conditions[*]}{.type}={.status} {end}'), allocatedResourceStatuses: $(kubectl get pvc data -o jsonpath='{.status.allocatedResourceStatuses}')"
say "(NodeExpandVolume only: the resizer's node-only path updates the PV and leaves the filesystem resize to kubelet, which would call NodeExpandVolume and then set the PVC's capacity; there is no kubelet here.)"

step "CSIStorageCapacity for the node"
has_capacity() { [ -n "$(kubectl get csistoragecapacities -n $ns -o name)" ]; }
wait_for 60 "CSIStorageCapacity objects in $ns" has_capacity
kubectl get csistoragecapacities -n $ns \
	-o jsonpath='{range .items[*]}{.metadata.name} storageClass={.storageClassName} capacity={.capacity} node={.nodeTopology.matchLabels}{"\n"}{end}' | sed 's/^/    /'

step "metrics of the driver"
maddr=$(sed -n 's/.*"Serving metrics" address="\([^"]*\)".*/\1/p' "$logs/csi-qcow2.log" | head -1)
[ -n "$maddr" ] || fail "no metrics address in the driver's log"
curl -sf "http://$maddr/metrics" >"$work/metrics.txt"
grep -E '^csi_qcow2_(volumes |operations_total\{grpc_code="OK",method="(CreateVolume|CreateSnapshot)"|volume_snapshots)' "$work/metrics.txt" | sed 's/^/    /'

step "delete everything -> nothing left in the data dir"
kubectl delete pvc restored clone --wait=false | sed 's/^/    /'
kubectl delete volumesnapshot snap --wait=false | sed 's/^/    /'
kubectl delete pvc data --wait=false | sed 's/^/    /'
no_pvs() { [ -z "$(kubectl get pv -o name)" ] && [ -z "$(kubectl get volumesnapshotcontent -o name)" ]; }
wait_for 180 "PVs and VolumeSnapshotContents to go" no_pvs
empty_data() { [ -z "$(find "$data" -mindepth 2)" ]; }
wait_for 30 "an empty data dir" empty_data
say "PVs: none; VolumeSnapshotContents: none; data dir: $(find "$data" -mindepth 1 -maxdepth 1 -printf '%f/ ')and nothing in them"
kubectl delete -k deploy/kubernetes/snapshot-controller --wait=false >/dev/null
kubectl delete -k deploy/kubernetes --wait=false >/dev/null

step "PASS"
