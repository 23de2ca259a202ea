# shellcheck shell=bash
# The pinned versions of what hack/k8s-build.sh builds from the Go module
# proxy, and the cache it builds them into: sourced by it and by the e2e
# scripts, so that a version is bumped in one place. The environment may
# override each.
K8S_VERSION=${K8S_VERSION:-v1.37.1}
ETCD_VERSION=${ETCD_VERSION:-v3.7.3}
PROVISIONER_VERSION=${PROVISIONER_VERSION:-v6.3.0}
SNAPSHOTTER_VERSION=${SNAPSHOTTER_VERSION:-v8.7.0}
RESIZER_VERSION=${RESIZER_VERSION:-v2.3.0}
export K8S_VERSION ETCD_VERSION PROVISIONER_VERSION SNAPSHOTTER_VERSION RESIZER_VERSION
cache=${K8S_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/csi-qcow2/k8s}
bin=$cache/bin
