# The two commands a newcomer needs:
#   make run    run the driver on a local data directory (./_out/data)
#   make test   run the whole test suite (what CI runs, via .ci/run)

GO      ?= go
BIN     := _out/csi-qcow2
DATADIR ?= $(CURDIR)/_out/data

.PHONY: build run test deps vet unit fuzz kill-rounds guest bench bench-nbd bench-driver bench-xnode

build:
	CGO_ENABLED=0 $(GO) build -o $(BIN) ./cmd/csi-qcow2

run: build
	mkdir -p $(DATADIR)
	$(BIN) --endpoint unix://$(CURDIR)/_out/csi.sock --node-id $$(hostname) --data-dir $(DATADIR)

# Everything: unit and interop tests (QEMU is the oracle, so CI=true makes
# missing tools a failure), every fuzz target for a few seconds, then the
# tests that need a real /dev/nbdX, in a qemu guest, then deploy/kubernetes
# against a real control plane (one node, then two for cross-node restore
# and clone), on a real kubelet, and a few specs of Kubernetes' storage e2e
# suite.
test: deps vet unit fuzz kill-rounds guest e2e-k8s e2e-xnode e2e-pods e2e-storage-ci

deps:
	hack/install-deps.sh

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }

unit:
	$(GO) test -count=1 ./...

# SIGKILL image serve mid-write, 20 rounds on two images: no corruption, no
# flushed write lost (hack/kill-rounds.sh; ROUNDS=N for more).
kill-rounds:
	hack/kill-rounds.sh

# Every go test -fuzz target for FUZZTIME each (default 8s; ~1.5 min on two
# cores); fails on any finding and prints execs per target (hack/fuzz.sh).
fuzz:
	hack/fuzz.sh

guest:
	hack/vm/test-nbdattach.sh
	hack/vm/csi-sanity-guest.sh
	hack/vm/e2e-driver.sh
	hack/vm/e2e-map.sh
	hack/vm/test-imagecli.sh

bench:
	hack/bench-qcow2.sh

# image serve against qemu-nbd on the same qcow2 images, fio's nbd engine
# (~2.5 min; not part of make test).
bench-nbd:
	hack/bench-nbd.sh

# The driver's CreateVolume, snapshot, clone and restore times against
# qemu-img and cp (clones on XFS loop mounts with and without reflink, as
# root), and a served 1 TiB volume's RSS against qemu-nbd (~4 min; not part
# of make test).
bench-driver:
	hack/bench-driver.sh

# A cross-node restore between two drivers on loopback against a sequential
# read of its source, with the source's disk as it is and capped at a few
# read speeds (blkio, as root; ~5 min; not part of make test).
bench-xnode:
	hack/bench-xnode.sh

# deploy/kubernetes against a real control plane and the CSI sidecars, built
# from source and cached in ~/.cache/csi-qcow2/k8s (outside the clone) by hack/k8s-build.sh: ~35 min of
# builds the first time on 2 busy cores, ~25 s once cached.
.PHONY: e2e-k8s
e2e-k8s:
	hack/e2e-k8s.sh

# Cross-node restore and clone on that control plane with two Node objects:
# two drivers with their peer service (mutual TLS on loopback) and per-node
# sidecars; a snapshot and a volume on node-a restored and cloned onto
# node-b through a crossNodeRestore StorageClass (hack/e2e-xnode.sh, ~25 s
# once cached).
.PHONY: e2e-xnode
e2e-xnode:
	hack/e2e-xnode.sh

# deploy/kubernetes on a real kubelet: a node guest (qemu TCG, /dev/nbdX)
# with containerd and kubelet joined to a control plane on loopback; the
# driver runs as its DaemonSet pod, PVCs in running Pods (hack/e2e-pods.sh).
.PHONY: e2e-pods
e2e-pods:
	hack/e2e-pods.sh

# Kubernetes' external storage e2e suite (k8s.io/kubernetes test/e2e/storage/
# external, hack/e2e-storage/driver.yaml) on the node of e2e-pods: the full
# run (~2 h under TCG; FOCUS=regexp narrows it, hack/e2e-storage.sh), and
# the six specs make test runs (provisioning, snapshottable, volume-expand,
# volumeMode).
.PHONY: e2e-storage e2e-storage-ci
e2e-storage:
	hack/e2e-storage.sh
e2e-storage-ci:
	SUBSET=ci hack/e2e-storage.sh
