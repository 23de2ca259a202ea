# shellcheck shell=bash
# deploy/kubernetes on the control plane of hack/lib/cluster.sh, without a
# kubelet: what hack/e2e-k8s.sh and hack/e2e-xnode.sh share. Sourced after
# cluster.sh (same caller variables: bin, cache, work, logs, the versions;
# say/fail), once the API server runs.
#
#   csi_kubeconfigs              node.kubeconfig and snapctl.kubeconfig in
#                                $work: the admin impersonating the node's
#                                and the snapshot-controller's service
#                                accounts, so their RBAC is what is tested
#   csi_crds                     the VolumeSnapshot CRDs, established
#   csi_deploy                   deploy/kubernetes and its snapshot-controller:
#                                kubectl kustomize, server-side dry run, apply
#   csi_node NAME                a Node (hostname and topology labels) and
#                                its CSINode, as kubelet and
#                                node-driver-registrar would register them
#   csi_sidecars NODE SOCK [SUFFIX]
#                                csi-provisioner and csi-snapshotter for NODE
#                                (--node-deployment), as node.yaml runs them;
#                                logs csi-provisioner$SUFFIX.log, ...
#   csi_snapshot_controller      with distributed snapshotting
#   pvc NAME SIZE [DATASOURCE-YAML]
#                                a PVC in default, selected-node $node,
#                                StorageClass ${class:-csi-qcow2}
#   image_of PVC [DATADIR]       the qcow2 file behind it (DATADIR: $data)
#   bound PVC [SECONDS]          wait until it is Bound
#   csi_driver_binary            the driver at $work/csi-qcow2; qimg ARGS
#                                runs its image CLI
#   csi_snapshot NAME PVC        a VolumeSnapshot of PVC in default, waited
#                                for readyToUse; sets vsc (its content) and
#                                snap_handle

driver_name=qcow2.csi-qcow2.io
topo_key=topology.qcow2.csi-qcow2.io/node
ns=csi-qcow2

csi_kubeconfigs() {
	kubeconfig "$work/node.kubeconfig" "system:serviceaccount:$ns:csi-qcow2-node"
	kubeconfig "$work/snapctl.kubeconfig" "system:serviceaccount:kube-system:snapshot-controller"
}

csi_crds() {
	local crds=$cache/src/external-snapshotter-$SNAPSHOTTER_VERSION/client/config/crd f
	[ -d "$crds" ] || fail "no CRDs at $crds"
	for f in "$crds"/*snapshot.storage.k8s.io_*.yaml; do
		kubectl apply --server-side -f "$f" | sed 's/^/    /'
	done
	kubectl wait --for condition=established --timeout 60s crd/volumesnapshots.snapshot.storage.k8s.io \
		crd/volumesnapshotcontents.snapshot.storage.k8s.io crd/volumesnapshotclasses.snapshot.storage.k8s.io \
		crd/volumegroupsnapshots.groupsnapshot.storage.k8s.io crd/volumegroupsnapshotcontents.groupsnapshot.storage.k8s.io \
		crd/volumegroupsnapshotclasses.groupsnapshot.storage.k8s.io >/dev/null
}

csi_deploy() {
	local k y
	for k in deploy/kubernetes deploy/kubernetes/snapshot-controller; do
		y=$work/$(basename "$k").yaml
		kubectl kustomize "$k" >"$y"
		say "$k renders $(grep -c '^kind:' "$y") objects: $(grep '^kind:' "$y" | awk '{print $2}' | sort | uniq -c | awk '{printf "%s %s, ", $1, $2}')"
	done
	# The namespaced objects' dry run needs their namespace to exist.
	kubectl apply -f deploy/kubernetes/namespace.yaml | sed 's/^/    /'
	kubectl apply --dry-run=server -k deploy/kubernetes | sed 's/^/    /'
	kubectl apply --dry-run=server -k deploy/kubernetes/snapshot-controller | sed 's/^/    /'
	say "then for real (nothing runs their pods: there is no kubelet or scheduler)"
	kubectl apply -k deploy/kubernetes | sed 's/^/    /'
	kubectl apply -k deploy/kubernetes/snapshot-controller | sed 's/^/    /'
}

csi_node() {
	kubectl apply -f - <<-EOF | sed 's/^/    /'
		apiVersion: v1
		kind: Node
		metadata:
		  name: $1
		  labels:
		    kubernetes.io/hostname: $1
		    kubernetes.io/os: linux
		    $topo_key: $1
		---
		apiVersion: storage.k8s.io/v1
		kind: CSINode
		metadata:
		  name: $1
		spec:
		  drivers:
		    - name: $driver_name
		      nodeID: $1
		      topologyKeys: [$topo_key]
	EOF
}

csi_sidecars() {
	local node=$1 sock=$2 sfx=${3:-}
	start "csi-provisioner$sfx" env NODE_NAME="$node" NAMESPACE=$ns "$bin/csi-provisioner-$PROVISIONER_VERSION" \
		--kubeconfig "$work/node.kubeconfig" --csi-address "$sock" \
		--node-deployment=true --leader-election=false --feature-gates=Topology=true \
		--strict-topology=true --immediate-topology=false --extra-create-metadata=true --default-fstype=ext4 \
		--enable-capacity=true --capacity-ownerref-level=-1 --capacity-poll-interval=10s --v=3
	start "csi-snapshotter$sfx" env NODE_NAME="$node" "$bin/csi-snapshotter-$SNAPSHOTTER_VERSION" \
		--kubeconfig "$work/node.kubeconfig" --csi-address "$sock" \
		--node-deployment=true --leader-election=false --v=3
}

csi_snapshot_controller() {
	start snapshot-controller "$bin/snapshot-controller-$SNAPSHOTTER_VERSION" \
		--kubeconfig "$work/snapctl.kubeconfig" --leader-election=false \
		--enable-distributed-snapshotting=true --v=3
}

pvc() {
	kubectl apply -f - <<-EOF
		apiVersion: v1
		kind: PersistentVolumeClaim
		metadata:
		  name: $1
		  namespace: default
		  annotations:
		    volume.kubernetes.io/selected-node: $node
		spec:
		  storageClassName: ${class:-csi-qcow2}
		  accessModes: [ReadWriteOnce]
		  resources:
		    requests:
		      storage: $2
		${3:-}
	EOF
}

image_of() {
	local pv h
	pv=$(kubectl get pvc "$1" -o jsonpath='{.spec.volumeName}')
	h=$(kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}')
	echo "${2:-$data}/volumes/$h.qcow2"
}

bound() { kubectl wait --for=jsonpath='{.status.phase}'=Bound --timeout="${2:-120}s" pvc/"$1" >/dev/null; }

# csi_driver_binary: the driver at $work/csi-qcow2 (a copy of
# CSI_QCOW2_BIN, or built from the clone); qimg runs its image CLI.
csi_driver_binary() {
	if [ -n "${CSI_QCOW2_BIN:-}" ]; then
		cp "$CSI_QCOW2_BIN" "$work/csi-qcow2"
	else
		CGO_ENABLED=0 go build -o "$work/csi-qcow2" ./cmd/csi-qcow2
	fi
}
qimg() { "$work/csi-qcow2" image "$@"; }

csi_snapshot() {
	kubectl apply -f - <<-EOF | sed 's/^/    /'
		apiVersion: snapshot.storage.k8s.io/v1
		kind: VolumeSnapshot
		metadata:
		  name: $1
		  namespace: default
		spec:
		  volumeSnapshotClassName: csi-qcow2
		  source:
		    persistentVolumeClaimName: $2
	EOF
	kubectl wait --for=jsonpath='{.status.readyToUse}'=true --timeout=120s volumesnapshot/"$1" >/dev/null ||
		fail "volumesnapshot/$1 not ready"
	vsc=$(kubectl get volumesnapshot "$1" -o jsonpath='{.status.boundVolumeSnapshotContentName}')
	snap_handle=$(kubectl get volumesnapshotcontent "$vsc" -o jsonpath='{.status.snapshotHandle}')
}
