#!/usr/bin/env bash
# Kubernetes' external storage e2e suite (test/e2e/storage/external of
# k8s.io/kubernetes, the tests csi-driver-host-path, aws-ebs and TopoLVM run)
# against csi-qcow2 on the real-kubelet node of hack/e2e-pods.sh.
#
# The node and the control plane are hack/lib/node.sh's (node_build,
# node_up, node_deploy), with the suite's images added to the node's disk
# (hack/build-images.sh with E2E_IMAGES=1, under the names the suite's
# manifest gives them: nothing is pulled). The suite is `hack/k8s-build.sh
# e2e`'s e2e-storage.test (only the external storage tests registered),
# driven by hack/e2e-storage/driver.yaml. Its own caches keep the node disk
# of hack/e2e-pods.sh untouched: IMAGES_CACHE_DIR and VM_CACHE_DIR default
# to images-e2e and vm-e2e beside the usual ones, seeded (hard links) with
# what is content-addressed there (the Debian roots, the kernel).
#
# Prints ginkgo's output, then one line per (test suite, pattern) with its
# passed / failed / skipped counts, the failures' first lines, and exits
# non-zero if a spec failed. The reports (JUnit and ginkgo JSON) are in the
# work dir's main/ and volume-expand/: volume-expand runs in a pass of its
# own (see expand_definition below for why).
#
# Environment:
#   FOCUS    regexp, ANDed after 'External.Storage.*qcow2.csi-qcow2.io.*'
#            (e.g. 'provisioning.*should provision storage with defaults')
#   SUBSET=ci  instead of FOCUS: the few specs make test runs (below)
#   SKIP     ginkgo skip regexp (default '\[Disruptive\]|\[Serial\]')
#   TIMEOUT  ginkgo's -ginkgo.timeout (default 3h)
#   E2E_ARGS more e2e-storage.test flags
#   LIST=1   no cluster: only list what FOCUS and SKIP select (a dry run;
#            "passed" there means selected), and what is not registered
#   E2E_PORT_BASE (default 25890; six ports from it), KEEP=1 keeps the
#   work dir, NODE_MEM/NODE_SMP (the guest's size)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
t0=$SECONDS
# shellcheck source=hack/lib/versions.sh
. "$repo/hack/lib/versions.sh"
top=${XDG_CACHE_HOME:-$HOME/.cache}/csi-qcow2
base=${E2E_PORT_BASE:-25890}
node=kube-node
driver_name=qcow2.csi-qcow2.io
ns=csi-qcow2
# SUBSET=ci: what make test runs (CI's budget has no room for the full
# run, ~2 h under TCG): one or two specs of each of provisioning,
# snapshottable, volume-expand and volumeMode, ~10 min.
ci_focus='(\[Testpattern: Dynamic PV \(default fs\)\] provisioning should provision correct filesystem size when restoring snapshot to larger size pvc'
ci_focus+='|\[Testpattern: Dynamic PV \(block volmode\)\] provisioning should provision storage with pvc data source$'
ci_focus+='|\[Testpattern: Dynamic Snapshot \(delete policy\)\] snapshottable .*after modifying source data, check deletion \(persistent\)'
ci_focus+='|\[Testpattern: Dynamic PV \(default fs\)\(allowExpansion\)\] volume-expand should resize volume when PVC is edited while pod is using it'
ci_focus+='|\[Testpattern: Dynamic PV \(block volmode\)\(allowExpansion\)\] volume-expand Verify if offline PVC expansion works'
ci_focus+='|\[Testpattern: Dynamic PV \(block volmode\)\] volumeMode should not mount / map unused volumes in a pod)'
case ${SUBSET:-} in
'') ;;
ci) [ -z "${FOCUS:-}" ] || { echo "FAIL: SUBSET=ci and FOCUS both given" >&2; exit 1; }
	FOCUS=$ci_focus ;;
*) echo "FAIL: SUBSET=${SUBSET@Q}: want ci or nothing" >&2; exit 1 ;;
esac
focus="External.Storage.*${driver_name//./\\.}.*${FOCUS:-}"
skip=${SKIP:-'\[Disruptive\]|\[Serial\]'}
step_title=setup

say() { echo "    $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
phase() { echo "=== [$((SECONDS - t0))s] $*"; }

for t in openssl curl socat qemu-system-x86_64 qemu-img python3; do
	command -v $t >/dev/null || fail "$t not found (hack/install-deps.sh)"
done

# seed FROM TO NAME...: hard links of FROM's content-addressed entries
# (written by rename, never in place) into the cache TO, if TO lacks them.
seed() {
	local from=$1 to=$2 n
	shift 2
	mkdir -p "$to"
	for n in "$@"; do
		for f in "$from"/$n; do
			[ -e "$f" ] && [ ! -e "$to/${f#"$from"/}" ] || continue
			mkdir -p "$(dirname "$to/${f#"$from"/}")"
			cp -al "$f" "$to/${f#"$from"/}" 2>/dev/null || true
		done
	done
}
export E2E_IMAGES=1
export IMAGES_CACHE_DIR=${IMAGES_CACHE_DIR:-$top/images-e2e}
export VM_CACHE_DIR=${VM_CACHE_DIR:-$top/vm-e2e}
seed "$top/images" "$IMAGES_CACHE_DIR" 'work/rootfs-*' 'work/debs'
seed "$top/vm" "$VM_CACHE_DIR" kernel kernel-pkg 'base-*.cpio' 'node-debian-*'

# shellcheck source=hack/lib/cluster.sh
. hack/lib/cluster.sh
# shellcheck source=hack/lib/node.sh
. hack/lib/node.sh

suite=$bin/e2e-storage.test-$K8S_VERSION

# The volume-expand suite is registered only for a driver that claims
# controllerExpansion (volume_expand.go's SkipUnsupportedTests: "does not
# support volume expansion"); to the suite the capability means "a PVC can
# grow", and nodeExpansion is read by no suite. Ours grows without
# ControllerExpandVolume: csi-resizer's trivial resizer records the new size
# and kubelet's NodeExpandVolume grows the image, device and filesystem.
# driver.yaml claims what the driver offers (controllerExpansion: false), so
# volume-expand runs in a second pass, on a copy of it with that one line
# flipped, focused on exactly the volume-expand specs FOCUS and SKIP select
# there (a dry run), so that nothing else runs twice.
# expand_definition DIR: writes that copy into DIR and prints its path.
expand_definition() {
	local def=$1/driver-expand.yaml
	sed 's/^\(    controllerExpansion:\) false$/\1 true/' hack/e2e-storage/driver.yaml >"$def"
	grep -q '^    controllerExpansion: true$' "$def" || fail "driver.yaml has no 'controllerExpansion: false' line to flip"
	echo "$def"
}
# expand_focus DEF DIR: prints the focus of the volume-expand pass.
expand_focus() {
	local def=$1 out=$2/expand-dry
	mkdir -p "$out"
	"$suite" -ginkgo.dry-run -ginkgo.no-color -repo-root "$repo" -storage.testdriver "$def" \
		-ginkgo.focus "$focus" -ginkgo.skip "$skip" -ginkgo.json-report "$out/dry.json" >"$out/dry.log" 2>&1 ||
		{ cat "$out/dry.log" >&2; fail "dry run of the volume-expand pass failed"; }
	hack/e2e-storage/select.py "$out/dry.json" volume-expand
}

if [ "${LIST:-}" = 1 ]; then
	# What FOCUS and SKIP select, per suite and pattern, without a cluster.
	K8S_CACHE_DIR=$cache hack/k8s-build.sh e2e
	out=$(mktemp -d)
	trap 'rm -rf "$out"' EXIT
	DEBUG_STORAGE_TESTSUITE=1 "$suite" -ginkgo.dry-run -ginkgo.no-color -ginkgo.v \
		-repo-root "$repo" -storage.testdriver "$repo/hack/e2e-storage/driver.yaml" \
		-ginkgo.focus "$focus" -ginkgo.skip "$skip" -ginkgo.json-report "$out/dry.json" >"$out/dry.log" 2>&1 ||
		{ cat "$out/dry.log"; fail "e2e-storage.test -ginkgo.dry-run failed"; }
	grep '^External Storage' "$out/dry.log" || true
	hack/e2e-storage/summary.py "$out/dry.json" "$focus" "$skip" "$out/dry.log" | sed 's/^suite  *passed/suite selected/'
	def=$(expand_definition "$out")
	efocus=$(expand_focus "$def" "$out")
	if [ -n "$efocus" ]; then
		echo "volume-expand pass (driver.yaml with controllerExpansion: true):"
		hack/e2e-storage/summary.py "$out/expand-dry/dry.json" "$efocus" "" | sed 's/^suite  *passed/suite selected/'
	fi
	exit 0
fi

phase "builds: e2e-storage.test and agnhost, control plane, kubelet and sidecars (cached), images, the node's disk"
b=$SECONDS
K8S_CACHE_DIR=$cache hack/k8s-build.sh e2e
say "e2e builds: $((SECONDS - b)) s"
node_build
say "builds done in $((SECONDS - t0)) s; driver image $driver_image"

on_exit() { node_finish e2e-storage $? "$step_title"; }
trap on_exit EXIT

phase "control plane on 127.0.0.1, the node guest"
node_up "$node" "$base"
step_title="node Ready"
wait_for 300 "node $node Ready" node_ready "$node"
phase "node $node Ready"

step_title="deploy/kubernetes"
node_deploy
kubectl -n $ns rollout status ds/csi-qcow2-node --timeout=300s >/dev/null ||
	fail "the DaemonSet's pod did not become ready"
has_driver() { kubectl get csinode "$node" -o jsonpath='{.spec.drivers[*].name}' | grep -qw "$driver_name"; }
wait_for 120 "CSINode $node to list $driver_name" has_driver
kubectl -n kube-system rollout status deploy/snapshot-controller --timeout=300s >/dev/null ||
	fail "snapshot-controller did not become ready"
kubectl -n $ns rollout status deploy/csi-qcow2-resizer --timeout=300s >/dev/null ||
	fail "csi-qcow2-resizer did not become ready"
phase "driver deployed (image $driver_image)"

# Our csi-snapshotter runs per node (--node-deployment) and so handles only
# the VolumeSnapshotContents, VolumeGroupSnapshotClasses and
# VolumeGroupSnapshotContents labelled snapshot.storage.kubernetes.io/
# managed-by=<its node>. snapshot-controller v8.7.0 labels the
# VolumeSnapshotContents it makes for a VolumeSnapshot, but not the ones
# the suite makes by hand (pre-provisioned snapshots) nor either group
# object (docs/driver.md). A user labels them; the suite cannot be told to,
# so this loop does it for the objects of our driver that lack the label,
# every 2 s, for as long as the suite runs.
managed_by=snapshot.storage.kubernetes.io/managed-by
label_unmanaged() {
	local kind field name driver
	for kind in volumesnapshotcontent:.spec.driver volumegroupsnapshotclass:.driver volumegroupsnapshotcontent:.spec.driver; do
		field=${kind#*:} kind=${kind%%:*}
		kubectl get "$kind" -l "!$managed_by" -o jsonpath="{range .items[*]}{.metadata.name} {$field}{\"\\n\"}{end}" 2>/dev/null |
			while read -r name driver; do
				[ "$driver" = "$driver_name" ] || continue
				kubectl label "$kind" "$name" "$managed_by=$node" >/dev/null 2>&1 &&
					echo "labeller: $kind/$name $managed_by=$node" >>"$logs/labeller.log"
			done
	done
}
( while sleep 2; do label_unmanaged; done ) &
labeller=$!
on_exit() {
	local rc=$?
	kill "$labeller" 2>/dev/null || true
	node_finish e2e-storage $rc "$step_title"
}

# run_suite NAME DEFINITION FOCUS SKIP: one e2e-storage.test run, its
# reports in $work/NAME/, its output in $logs/NAME.log; returns its status.
run_suite() {
	local name=$1 def=$2 focus=$3 skip=$4 report=$work/$1 rc=0 s=$SECONDS
	mkdir -p "$report"
	phase "$name: e2e-storage.test -ginkgo.focus='${focus:0:300}' -ginkgo.skip='$skip'"
	# shellcheck disable=SC2086 # E2E_ARGS is a list of flags
	DEBUG_STORAGE_TESTSUITE=1 "$suite" \
		-kubeconfig "$work/admin.kubeconfig" -provider local \
		-kubectl-path "$bin/kubectl-$K8S_VERSION" \
		-repo-root "$repo" -storage.testdriver "$def" \
		-report-dir "$report" -ginkgo.json-report "$report/ginkgo.json" \
		-ginkgo.focus "$focus" -ginkgo.skip "$skip" \
		-ginkgo.timeout "${TIMEOUT:-3h}" -ginkgo.no-color -ginkgo.v \
		${E2E_ARGS:-} 2>&1 | tee "$logs/$name.log" || rc=$?
	phase "$name: e2e-storage.test exited $rc after $((SECONDS - s)) s"
	if grep -q '^Will run 0 of ' "$logs/$name.log"; then
		echo "FAIL: $name: ginkgo's focus selected no spec (the suite would report them all as skipped)" >&2
		rc=1
	fi
	hack/e2e-storage/summary.py "$report/ginkgo.json" "$focus" "$skip" "$logs/$name.log" || rc=1
	return $rc
}

step_title="e2e-storage.test"
rc=0
run_suite main "$repo/hack/e2e-storage/driver.yaml" "$focus" "$skip" || rc=$?
step_title="e2e-storage.test, volume-expand pass"
def=$(expand_definition "$work")
efocus=$(expand_focus "$def" "$work")
if [ -n "$efocus" ]; then
	run_suite volume-expand "$def" "$efocus" "" || rc=1
else
	phase "volume-expand: FOCUS and SKIP select none of its specs"
fi
step_title="e2e-storage.test: failed specs (above)"
[ "$rc" = 0 ]
