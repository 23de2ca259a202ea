# shellcheck shell=bash
# A Kubernetes control plane on this machine's loopback, for the e2e
# scripts (hack/e2e-k8s.sh, hack/e2e-pods.sh): sourced, not run.
#
# The caller sets: bin (the hack/k8s-build.sh binaries), work (a fresh
# directory), logs, K8S_VERSION, ETCD_VERSION, and calls fail/say. The
# binaries run in the background, each logging to $logs/NAME.log;
# cluster_stop (call it from an EXIT trap) ends them in reverse order.
#
#   cluster_certs                a CA, the API server's serving certificate
#                                (for 127.0.0.1, the service IP 10.96.0.1,
#                                the node guest's 10.0.2.100), service-account
#                                keys, and tokens: $token (admin) and
#                                $node_token (for kubelets)
#   cluster_etcd PORT PEER_PORT  etcd on 127.0.0.1
#   cluster_apiserver PORT [ARGS...]
#                                kube-apiserver on 127.0.0.1:PORT; with
#                                CLUSTER_HOSTS=FILE it runs in a mount
#                                namespace of its own that sees FILE as
#                                /etc/hosts (how it finds a node by name)
#   kubeconfig FILE [AS]         the admin's, impersonating AS if given
#   cluster_controller_manager [ARGS...]   (admin kubeconfig)
#   cluster_scheduler [ARGS...]
#   wait_for SECONDS WHAT CMD...  until CMD succeeds, else fail
#   cluster_finish NAME RC [LOG...]
#                                the end of a run (from the EXIT trap): on
#                                failure the tail of every log, then
#                                cluster_stop; the work dir is kept on
#                                failure or with KEEP=1

cluster_pids=()
start() { # start NAME CMD...: CMD in the background, log in $logs/NAME.log
	local name=$1
	shift
	"$@" >"$logs/$name.log" 2>&1 &
	cluster_pids+=($!)
}

cluster_stop() {
	local i
	# Reverse start order: whatever runs on the cluster first, etcd last
	# (an API server without etcd hangs on SIGTERM).
	for ((i = ${#cluster_pids[@]} - 1; i >= 0; i--)); do
		kill "${cluster_pids[i]}" 2>/dev/null || true
		for _ in $(seq 50); do kill -0 "${cluster_pids[i]}" 2>/dev/null || break; sleep 0.1; done
		kill -9 "${cluster_pids[i]}" 2>/dev/null || true
	done
	wait 2>/dev/null || true
}

cluster_finish() {
	local name=$1 rc=$2 f
	shift 2
	if [ "$rc" -ne 0 ]; then
		echo
		echo "$name failed (rc=$rc); last lines of each log:"
		for f in "$logs"/*.log "$@"; do
			[ -f "$f" ] || continue
			echo "--- $(basename "$f")"
			tail -n 20 "$f"
		done
	fi
	cluster_stop
	if [ "${KEEP:-}" = 1 ] || [ "$rc" -ne 0 ]; then
		echo "work dir kept: $work"
	else
		rm -rf "$work"
	fi
	echo "$name: wall time $((SECONDS - t0)) s"
}

wait_for() {
	local secs=$1 what=$2
	shift 2
	local end=$((SECONDS + secs))
	until "$@" >/dev/null 2>&1; do
		[ $SECONDS -lt $end ] || fail "timed out after ${secs}s waiting for $what"
		sleep 0.5
	done
}

cluster_certs() {
	local c=$work/certs
	mkdir -p "$c"
	openssl req -x509 -newkey rsa:2048 -nodes -keyout "$c/ca.key" -out "$c/ca.crt" \
		-days 2 -subj /CN=e2e-ca 2>/dev/null
	openssl req -newkey rsa:2048 -nodes -keyout "$c/apiserver.key" -out "$c/apiserver.csr" \
		-subj /CN=kube-apiserver 2>/dev/null
	printf 'subjectAltName=%s\n' "IP:127.0.0.1,IP:10.96.0.1,IP:10.0.2.100,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" >"$c/san.ext"
	openssl x509 -req -in "$c/apiserver.csr" -CA "$c/ca.crt" -CAkey "$c/ca.key" -CAcreateserial \
		-days 2 -extfile "$c/san.ext" -out "$c/apiserver.crt" 2>/dev/null
	openssl genrsa -out "$c/sa.key" 2048 2>/dev/null
	openssl rsa -in "$c/sa.key" -pubout -out "$c/sa.pub" 2>/dev/null
	token=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
	node_token=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
	{
		echo "$token,e2e-admin,e2e-admin,system:masters"
		echo "$node_token,system:node:kubelet,kubelet,\"system:nodes,system:masters\""
	} >"$c/tokens.csv"
}

cluster_etcd() {
	local port=$1 peer=$2
	mkdir -p "$work/etcd"
	start etcd "$bin/etcd-$ETCD_VERSION" --name e2e --data-dir "$work/etcd" --unsafe-no-fsync \
		--listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
		--listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
		--initial-cluster "e2e=http://127.0.0.1:$peer"
	wait_for 30 "etcd" curl -sf "http://127.0.0.1:$port/health"
	cluster_etcd_port=$port
}

cluster_apiserver() {
	local port=$1
	shift
	local c=$work/certs wrap=()
	if [ -n "${CLUSTER_HOSTS:-}" ]; then
		wrap=(unshare -m --propagation private sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$CLUSTER_HOSTS")
	fi
	start kube-apiserver "${wrap[@]}" "$bin/kube-apiserver-$K8S_VERSION" \
		--etcd-servers "http://127.0.0.1:$cluster_etcd_port" \
		--bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$port" \
		--endpoint-reconciler-type none --cert-dir "$c" \
		--tls-cert-file "$c/apiserver.crt" --tls-private-key-file "$c/apiserver.key" \
		--token-auth-file "$c/tokens.csv" --authorization-mode RBAC \
		--service-account-key-file "$c/sa.pub" \
		--service-account-signing-key-file "$c/sa.key" \
		--service-account-issuer https://kubernetes.default.svc.cluster.local \
		--service-cluster-ip-range 10.96.0.0/24 --allow-privileged=true "$@"
	cluster_api_port=$port
	kubeconfig "$work/admin.kubeconfig"
	export KUBECONFIG=$work/admin.kubeconfig
	wait_for 60 "kube-apiserver /readyz" kubectl get --raw /readyz
}

kubectl() { "$bin/kubectl-$K8S_VERSION" "$@"; }

kubeconfig() {
	cat >"$1" <<-EOF
		apiVersion: v1
		kind: Config
		clusters:
		- name: e2e
		  cluster:
		    server: https://127.0.0.1:$cluster_api_port
		    certificate-authority: $work/certs/ca.crt
		users:
		- name: e2e
		  user:
		    token: $token
		${2:+    as: $2}
		contexts:
		- name: e2e
		  context: {cluster: e2e, user: e2e}
		current-context: e2e
	EOF
}

cluster_controller_manager() {
	start kube-controller-manager "$bin/kube-controller-manager-$K8S_VERSION" \
		--kubeconfig "$work/admin.kubeconfig" --secure-port 0 --leader-elect=false "$@"
}

cluster_scheduler() {
	start kube-scheduler "$bin/kube-scheduler-$K8S_VERSION" \
		--kubeconfig "$work/admin.kubeconfig" --leader-elect=false "$@"
}
