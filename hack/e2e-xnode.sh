#!/usr/bin/env bash
# Cross-node restore and clone (docs/driver.md#cross-node-restore-and-clone)
# against a real Kubernetes control plane with two Node objects, driven by
# kubectl only: the two-node counterpart of hack/e2e-k8s.sh, whose control
# plane and manifests it shares (hack/lib/cluster.sh, hack/lib/csi.sh).
#
# Two nodes, node-a and node-b, each with what its DaemonSet pod would run:
# the driver on a data dir of its own, with the peer service on 127.0.0.1
# (mutual TLS, a CA and one certificate per node made here with openssl,
# DNS name csi-qcow2-peer; --peers lists both, a driver skips itself), and
# csi-provisioner and csi-snapshotter with --node-deployment for that node,
# acting as deploy/kubernetes' service accounts. One snapshot-controller.
# No kubelet: Node and CSINode are made with kubectl, and the scheduler's
# choice is the PVC's selected-node annotation.
#
# A volume and its snapshot on node-a are restored and cloned onto node-b
# through the StorageClass csi-qcow2-cross-node (crossNodeRestore: "true");
# the ordinary StorageClass refuses the same restore; everything deleted
# leaves both data dirs empty.
#
# Environment: E2E_PORT_BASE (default 24790; uses five ports from it),
# CSI_QCOW2_BIN (a prebuilt driver; default: go build ./cmd/csi-qcow2),
# KEEP=1 keeps the work dir. Needs qemu-img/qemu-io (hack/install-deps.sh).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
t0=$SECONDS
# shellcheck source=hack/lib/versions.sh
. "$repo/hack/lib/versions.sh"
base=${E2E_PORT_BASE:-24790}
etcd_port=$base etcd_peer=$((base + 1)) api_port=$((base + 2))
peer_a=127.0.0.1:$((base + 3)) peer_b=127.0.0.1:$((base + 4))
xclass=csi-qcow2-cross-node

step_names=() step_starts=()
step() {
	step_names+=("$*")
	step_starts+=("$SECONDS")
	echo
	echo "=== [$((SECONDS - t0))s] $*"
}
say() { echo "    $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

for t in qemu-img qemu-io openssl curl; do
	command -v $t >/dev/null || fail "$t not found (hack/install-deps.sh)"
done

step "build: control plane and sidecars (cached in $bin), the driver"
K8S_CACHE_DIR=$cache hack/k8s-build.sh
work=$(mktemp -d /tmp/e2e-xnode.XXXXXX)
logs=$work/logs
data_a=$work/node-a/data data_b=$work/node-b/data
mkdir -p "$logs" "$data_a" "$data_b"

# shellcheck source=hack/lib/cluster.sh
. hack/lib/cluster.sh
# shellcheck source=hack/lib/csi.sh
. hack/lib/csi.sh
on_exit() { cluster_finish e2e-xnode $?; }
trap on_exit EXIT

csi_driver_binary
say "built in $((SECONDS - t0)) s"

step "start etcd $ETCD_VERSION, kube-apiserver and kube-controller-manager $K8S_VERSION on 127.0.0.1"
cluster_certs
cluster_etcd "$etcd_port" "$etcd_peer"
cluster_apiserver "$api_port"
csi_kubeconfigs
cluster_controller_manager \
	--controllers persistentvolume-binder-controller,persistentvolumeclaim-protection-controller,persistentvolume-protection-controller

step "VolumeSnapshot CRDs, deploy/kubernetes (kustomize, server-side dry run, apply), StorageClass $xclass"
csi_crds
csi_deploy
# As docs/driver.md shows it.
kubectl apply -f - <<EOF | sed 's/^/    /'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: $xclass
provisioner: $driver_name
volumeBindingMode: WaitForFirstConsumer
allowVolumeExpansion: true
parameters:
  csi.storage.k8s.io/fstype: ext4
  crossNodeRestore: "true"
EOF
for sc in csi-qcow2 $xclass; do
	say "StorageClass $sc: $(kubectl get storageclass "$sc" -o jsonpath='{.provisioner} {.volumeBindingMode} {.parameters}')"
done

step "two nodes, node-a and node-b: Node and CSINode, peer certificates, a driver and sidecars each"
# The peer CA and one certificate per node, for server and client auth,
# with the DNS name the drivers expect (--peer-server-name's default), as
# the Secret csi-qcow2-peer-tls of node.yaml would carry.
pc=$work/peer-certs
mkdir -p "$pc"
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pc/ca.key" -out "$pc/ca.crt" \
	-days 2 -subj /CN=e2e-peer-ca 2>/dev/null
printf '%s\n' subjectAltName=DNS:csi-qcow2-peer extendedKeyUsage=serverAuth,clientAuth \
	keyUsage=critical,digitalSignature,keyEncipherment >"$pc/peer.ext"
peers=$peer_a,$peer_b
for n in node-a node-b; do
	openssl req -newkey rsa:2048 -nodes -keyout "$pc/$n.key" -out "$pc/$n.csr" -subj "/CN=$n" 2>/dev/null
	openssl x509 -req -in "$pc/$n.csr" -CA "$pc/ca.crt" -CAkey "$pc/ca.key" -CAcreateserial \
		-days 2 -extfile "$pc/peer.ext" -out "$pc/$n.crt" 2>/dev/null
	openssl verify -purpose sslserver -CAfile "$pc/ca.crt" "$pc/$n.crt" >/dev/null
	openssl verify -purpose sslclient -CAfile "$pc/ca.crt" "$pc/$n.crt" >/dev/null
	csi_node $n
	if [ $n = node-a ]; then addr=$peer_a; else addr=$peer_b; fi
	sock=$work/$n/csi/csi.sock
	start csi-qcow2-$n "$work/csi-qcow2" --endpoint "unix://$sock" --node-id $n --data-dir "$work/$n/data" \
		--max-volumes 16 --metrics-address 127.0.0.1:0 --v=2 \
		--peer-address "$addr" --peer-tls-cert "$pc/$n.crt" --peer-tls-key "$pc/$n.key" --peer-ca "$pc/ca.crt" \
		--peers "$peers"
	wait_for 20 "$n's driver socket" test -S "$sock"
	csi_sidecars $n "$sock" -$n
	say "$n: driver (data dir $work/$n/data, peer service $addr, --peers $peers) and its csi-provisioner, csi-snapshotter"
done
csi_snapshot_controller
metrics_of() { sed -n 's/.*"Serving metrics" address="\([^"]*\)".*/\1/p' "$logs/csi-qcow2-$1.log" | head -1; }
peer_up() { grep -q 'Serving the peer service over mutual TLS' "$logs/csi-qcow2-$1.log" && [ -n "$(metrics_of "$1")" ]; }
wait_for 20 "node-a's peer service" peer_up node-a
wait_for 20 "node-b's peer service" peer_up node-b
maddr_b=$(metrics_of node-b)

pv_node() { # the node of PVC $1's PV's nodeAffinity
	local pv
	pv=$(kubectl get pvc "$1" -o jsonpath='{.spec.volumeName}')
	kubectl get pv "$pv" -o jsonpath="{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[?(@.key==\"$topo_key\")].values[0]}"
}
handle_of() { kubectl get pv "$(kubectl get pvc "$1" -o jsonpath='{.spec.volumeName}')" -o jsonpath='{.spec.csi.volumeHandle}'; }
# on_node_b PVC: its image is in node-b's data dir and not in node-a's;
# sets handle.
on_node_b() {
	handle=$(handle_of "$1")
	[ -f "$data_b/volumes/$handle.qcow2" ] || fail "no image of pvc/$1 ($handle) on node-b"
	[ ! -e "$data_a/volumes/$handle.qcow2" ] || fail "the image of pvc/$1 ($handle) is on node-a too"
}

step "PVC src (256Mi, selected-node node-a) -> Bound on node-a; 47 MiB of data with holes in its first 64 MiB; VolumeSnapshot snap; then src changed"
node=node-a pvc src 256Mi | sed 's/^/    /'
bound src || fail "pvc/src not bound"
[ "$(pv_node src)" = node-a ] || fail "pvc/src's PV is on $(pv_node src), not node-a"
img=$(image_of src "$data_a")
[ -f "$img" ] || fail "no image $img on node-a"
# No kubelet mounts it, so content goes in at the image: in each 4 MiB of
# the first 64 MiB, 3 MiB of one byte value and a 1 MiB hole; then zeros
# written over a data run (zero clusters).
cmds=()
for i in $(seq 0 15); do cmds+=(-c "write -P $((i + 1)) $((i * 4))M 3M"); done
qemu-io -f qcow2 "${cmds[@]}" -c 'write -z 9M 1M' "$img" >/dev/null
say "pvc/src on node-a: $(basename "$img"), $(qemu-img info --output json "$img" | sed -n 's/.*"actual-size": \([0-9]*\).*/\1/p') bytes on disk after 16 runs of 3 MiB and 1 MiB of zeros over one (47 MiB of data, qemu-io)"
csi_snapshot snap src
say "volumesnapshot/snap readyToUse, content $vsc (node label $(kubectl get volumesnapshotcontent "$vsc" -o jsonpath='{.metadata.labels.snapshot\.storage\.kubernetes\.io/managed-by}')), handle $snap_handle"
qimg snapshot -l "$img" | grep -q "$snap_handle" || fail "$snap_handle is not an internal snapshot of $img"
qimg convert -l "$snap_handle" -O raw "$img" "$work/snap.raw"
qemu-io -f qcow2 -c 'write -P 0xcd 0 1M' -c 'write -P 0xce 3M 1M' -c 'write -z 4M 1M' "$img" >/dev/null
say "then src changed: 0xcd over data at 0, 0xce into the hole at 3M, zeros over data at 4M"
qemu-img compare -q -f raw -F qcow2 "$work/snap.raw" "$img" && fail "src still equals the snapshot"

step "PVC restored (dataSource: snap, selected-node node-b, StorageClass $xclass) -> Bound on node-b, a copy of the snapshot"
t_restore=$SECONDS
node=node-b class=$xclass pvc restored 256Mi \
	"  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: snap}" | sed 's/^/    /'
# Until Bound, watch node-b's metrics for the copy in flight (the gauge
# exists only while a copy runs: a 48 MiB copy on loopback may be too
# quick to be seen).
seen=
end=$((SECONDS + 120))
until [ "$(kubectl get pvc restored -o jsonpath='{.status.phase}')" = Bound ]; do
	[ $SECONDS -lt $end ] || fail "pvc/restored not bound after 120 s"
	m=$(curl -sf "http://$maddr_b/metrics" | grep '^csi_qcow2_cross_node_copied_bytes' || true)
	[ -z "$m" ] || seen=$m
	sleep 0.2
done
say "pvc/restored Bound $((SECONDS - t_restore)) s after it was made"
[ "$(pv_node restored)" = node-b ] || fail "pvc/restored's PV is on $(pv_node restored), not node-b"
say "its PV's nodeAffinity: $topo_key in [$(pv_node restored)]"
on_node_b restored
rh=$handle rimg=$data_b/volumes/$rh.qcow2
say "image $rh.qcow2 in node-b's data dir, not in node-a's"
qemu-img compare -q -f raw -F qcow2 "$work/snap.raw" "$rimg" || fail "restored image differs from the snapshot"
say "qemu-img compare: restored == snapshot view (csi-qcow2 image convert -l $snap_handle)"
say "restored image: $(qemu-img info --output json "$rimg" | sed -n 's/.*"actual-size": \([0-9]*\).*/\1/p') bytes on disk (sparse copy)"
grep 'Cross-node copy' "$logs/csi-qcow2-node-b.log" | grep "$rh" | sed 's/^/    node-b: /'
grep -q "Cross-node copy done.*$rh" "$logs/csi-qcow2-node-b.log" || fail "no 'Cross-node copy done' line for $rh in node-b's log"
grep -q "Peer grant\".*snapshot=\"$snap_handle\"" "$logs/csi-qcow2-node-a.log" || fail "no peer grant of $snap_handle in node-a's log"
say "node-a granted $snap_handle: $(grep "Peer grant\".*$snap_handle" "$logs/csi-qcow2-node-a.log" | head -1 | sed 's/.*\] //')"
say "csi-provisioner-node-b's log lines with the driver's answer 'copy ... in progress': $(grep -c 'in progress' "$logs/csi-provisioner-node-b.log" || true)"
say "csi_qcow2_cross_node_copied_bytes while in flight: ${seen:-(not seen: the copy was done between two scrapes)}"
[ -z "$(find "$data_b/volumes" -name '*.tmp')" ] || fail "a .tmp image is left on node-b"

step "PVC clone (dataSource: pvc/src, selected-node node-b, StorageClass $xclass) -> Bound on node-b, a copy of src now"
t_clone=$SECONDS
node=node-b class=$xclass pvc clone 256Mi "  dataSource: {kind: PersistentVolumeClaim, name: src}" | sed 's/^/    /'
bound clone || fail "pvc/clone not bound"
say "pvc/clone Bound $((SECONDS - t_clone)) s after it was made"
[ "$(pv_node clone)" = node-b ] || fail "pvc/clone's PV is on $(pv_node clone), not node-b"
on_node_b clone
ch=$handle cimg=$data_b/volumes/$ch.qcow2
say "its PV's nodeAffinity: $topo_key in [node-b]; image $ch.qcow2 in node-b's data dir only"
qemu-img compare -q -f qcow2 -F qcow2 "$img" "$cimg" || fail "clone differs from pvc/src"
qemu-io -r -f qcow2 -c 'read -P 0xcd 0 1M' -c 'read -P 0xce 3M 1M' -c 'read -P 0 4M 1M' "$cimg" |
	grep -c 'read 1048576' | grep -qx 3 || fail "clone lacks src's changes"
say "qemu-img compare: clone == pvc/src (with its changes after the snapshot)"
grep 'Cross-node copy' "$logs/csi-qcow2-node-b.log" | grep "$ch" | sed 's/^/    node-b: /'
no_temp() { ! qimg snapshot -l "$img" | grep -q xnode-; }
wait_for 30 "node-a to drop the clone grant's temporary snapshot" no_temp
if [ "$(qimg snapshot -l "$img" | grep -c -E 'snap-|xnode-')" != 1 ] || ! qimg snapshot -l "$img" | grep -q "$snap_handle"; then
	fail "src's internal snapshots are not just $snap_handle: $(qimg snapshot -l "$img")"
fi
qimg snapshot -l "$img" | sed 's/^/    src: /'
say "src on node-a carries only the user's snapshot (the clone's temporary xnode- snapshot is gone)"
[ -z "$(qimg snapshot -l "$rimg")$(qimg snapshot -l "$cimg")" ] || fail "restored or clone image carries internal snapshots"

step "bad input: the same restore on node-b with StorageClass csi-qcow2 (no crossNodeRestore) -> Pending, ProvisioningFailed"
node=node-b pvc bad 256Mi \
	"  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: snap}" | sed 's/^/    /'
failed_event() {
	kubectl get events -n default --field-selector involvedObject.name=bad,reason=ProvisioningFailed \
		-o jsonpath='{.items[*].message}' | grep -q .
}
wait_for 60 "a ProvisioningFailed event for pvc/bad" failed_event
msg=$(kubectl get events -n default --field-selector involvedObject.name=bad,reason=ProvisioningFailed -o jsonpath='{.items[0].message}')
say "event: $msg"
case $msg in
*"NotFound"*"$snap_handle does not exist on node node-b"*'crossNodeRestore: "true"'*) ;;
*) fail "unexpected ProvisioningFailed message: $msg" ;;
esac
sleep 2
[ "$(kubectl get pvc bad -o jsonpath='{.status.phase}')" = Pending ] || fail "pvc/bad is not Pending"
say "pvc/bad Pending; node-b's data dir holds only restored and clone: $(find "$data_b/volumes" -name '*.qcow2' | wc -l) images"
[ "$(find "$data_b/volumes" -name '*.qcow2' | wc -l)" = 2 ] || fail "node-b has other images than restored and clone"
kubectl delete pvc bad --timeout=60s | sed 's/^/    /'

step "delete everything -> no PV, no VolumeSnapshotContent, both data dirs empty"
kubectl delete pvc restored clone --wait=false | sed 's/^/    /'
kubectl delete volumesnapshot snap --wait=false | sed 's/^/    /'
kubectl delete pvc src --wait=false | sed 's/^/    /'
no_pvs() { [ -z "$(kubectl get pv -o name)" ] && [ -z "$(kubectl get volumesnapshotcontent -o name)" ]; }
wait_for 180 "PVs and VolumeSnapshotContents to go" no_pvs
empty_data() { [ -z "$(find "$data_a" "$data_b" -mindepth 2)" ]; }
wait_for 30 "empty data dirs" empty_data
say "PVs: none; VolumeSnapshotContents: none; node-a's and node-b's data dirs: $(find "$data_a" -mindepth 1 -maxdepth 1 -printf '%f/ ')and nothing in them"
kubectl delete storageclass $xclass --wait=false >/dev/null
kubectl delete -k deploy/kubernetes/snapshot-controller --wait=false >/dev/null
kubectl delete -k deploy/kubernetes --wait=false >/dev/null

step_starts+=("$SECONDS")
echo
echo "=== [$((SECONDS - t0))s] PASS; per step:"
for i in "${!step_names[@]}"; do
	printf '    %4d s  %s\n' $((step_starts[i + 1] - step_starts[i])) "${step_names[i]}"
done
echo "e2e-xnode: PASS"
