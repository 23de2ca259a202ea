# shellcheck shell=bash
# A Kubernetes node with a real kubelet for the e2e scripts
# (hack/e2e-pods.sh): the node guest of hack/vm/node joined to the control
# plane of hack/lib/cluster.sh, and deploy/kubernetes on it. Sourced, not
# run; needs cluster.sh, and the caller's repo, cache, bin, K8S_VERSION,
# SNAPSHOTTER_VERSION and fail.
#
#   node_build              the builds (cached): control plane, kubelet and
#                           sidecars, the images, the node's disk; sets
#                           images, list, driver_image, busybox, disk
#   node_up NAME PORT_BASE  etcd (PORT_BASE, +1), kube-apiserver (+2),
#                           kube-scheduler (+3), kube-controller-manager,
#                           and the guest as node NAME (kubelet on +5,
#                           forwarded); sets work, logs, run, guest_pid
#                           (the caller's EXIT trap calls node_down)
#   node_down               asks the guest to power off, waits up to 10 s
#   node_finish NAME RC WHAT  the EXIT trap's work: on failure WHAT, the
#                           pods and the last events; node_down;
#                           cluster_finish (the guest's logs included)
#   node_ready              whether the node is Ready
#   node_deploy             the VolumeSnapshot CRDs, deploy/kubernetes with
#                           our image, its snapshot-controller

node_build() {
	K8S_CACHE_DIR=$cache hack/k8s-build.sh
	images=${IMAGES_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/csi-qcow2/images}
	IMAGES_CACHE_DIR=$images K8S_CACHE_DIR=$cache hack/build-images.sh --require-sidecars >/dev/null
	list=$images/images.list
	[ -s "$list" ] || fail "hack/build-images.sh wrote no $list"
	driver_image=$(awk '$1 ~ /csi-qcow2:/ {print $1; exit}' "$list")
	busybox=$(awk '$1 ~ /busybox/ {print $1; exit}' "$list")
	[ -n "$driver_image" ] && [ -n "$busybox" ] || fail "no csi-qcow2 or busybox image in $list"
	disk=$(hack/vm/node/build-rootfs.sh "$bin/kubelet-$K8S_VERSION" "$images")
}

node_up() {
	local node=$1 base=$2
	local api_port=$((base + 2)) kubelet_port=$((base + 5))
	work=$(mktemp -d /tmp/e2e-node.XXXXXX)
	logs=$work/logs
	run=$work/node
	mkdir -p "$logs" "$run"
	cluster_certs
	cluster_etcd "$base" $((base + 1))
	# The API server reaches kubelet by the node's name (its InternalIP is
	# the guest's own 10.0.2.15, not reachable from here): that name is
	# 127.0.0.1, where qemu forwards the kubelet port, in its /etc/hosts only.
	{ cat /etc/hosts; echo "127.0.0.1 $node"; } >"$work/hosts"
	CLUSTER_HOSTS=$work/hosts cluster_apiserver "$api_port" \
		--kubelet-preferred-address-types Hostname
	cluster_controller_manager --root-ca-file "$work/certs/ca.crt" \
		--service-account-private-key-file "$work/certs/sa.key"
	cluster_scheduler --secure-port $((base + 3))

	cp "$work/certs/ca.crt" "$run/ca.crt"
	cat >"$run/kubelet.kubeconfig" <<-EOF
		apiVersion: v1
		kind: Config
		clusters:
		- name: e2e
		  cluster: {server: "https://10.0.2.100:6443", certificate-authority: /etc/kubernetes/ca.crt}
		users:
		- name: kubelet
		  user: {token: $node_token}
		contexts:
		- name: e2e
		  context: {cluster: e2e, user: kubelet}
		current-context: e2e
	EOF
	printf 'NODE_NAME=%s\nAPI_ADDR=10.0.2.100:6443\nKUBELET_PORT=%s\n' "$node" "$kubelet_port" >"$run/node.env"
	API_PORT=$api_port KUBELET_PORT=$kubelet_port hack/vm/node/boot.sh "$disk" "$run" \
		>"$logs/guest-console.log" 2>&1 &
	guest_pid=$!
	# Stopped after the control plane, before etcd.
	cluster_pids=("${cluster_pids[@]:0:1}" "$guest_pid" "${cluster_pids[@]:1}")
}

node_down() {
	[ -n "${run:-}" ] && [ -d "$run" ] && touch "$run/stop"
	[ -n "${guest_pid:-}" ] || return 0
	for _ in $(seq 20); do kill -0 "$guest_pid" 2>/dev/null || break; sleep 0.5; done
}

node_finish() {
	local name=$1 rc=$2 what=$3
	if [ "$rc" -ne 0 ]; then
		echo "$name: failed in $what"
		kubectl get pods -A -o wide 2>/dev/null || true
		kubectl get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -n 30 || true
	fi
	node_down
	cluster_finish "$name" "$rc" ${run:+"$run"/*.log}
}

node_ready() {
	[ "$(kubectl get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

node_deploy() {
	local crds=$cache/src/external-snapshotter-$SNAPSHOTTER_VERSION/client/config/crd f
	for f in "$crds"/*snapshot.storage.k8s.io_*.yaml; do kubectl apply --server-side -f "$f" >/dev/null; done
	kubectl wait --for condition=established --timeout 60s crd/volumesnapshots.snapshot.storage.k8s.io \
		crd/volumesnapshotcontents.snapshot.storage.k8s.io crd/volumesnapshotclasses.snapshot.storage.k8s.io \
		crd/volumegroupsnapshots.groupsnapshot.storage.k8s.io crd/volumegroupsnapshotcontents.groupsnapshot.storage.k8s.io \
		crd/volumegroupsnapshotclasses.groupsnapshot.storage.k8s.io >/dev/null
	mkdir -p "$work/overlay"
	cat >"$work/overlay/kustomization.yaml" <<-EOF
		apiVersion: kustomize.config.k8s.io/v1beta1
		kind: Kustomization
		resources:
		  - $(realpath --relative-to="$work/overlay" "$repo/deploy/kubernetes")
		images:
		  - name: csi-qcow2
		    newName: ${driver_image%:*}
		    newTag: ${driver_image##*:}
	EOF
	kubectl kustomize --load-restrictor LoadRestrictionsNone "$work/overlay" >"$work/deploy.yaml"
	kubectl apply -f "$work/deploy.yaml" >/dev/null
	kubectl apply -k deploy/kubernetes/snapshot-controller >/dev/null
}
