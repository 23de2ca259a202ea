# csi-qcow2 image: the driver and its `csi-qcow2 image` tool.
#
#   docker build -t csi-qcow2:v0.1.0 .
#
# This is the documented build. The project builds this same image without
# Docker (no container engine or registry there) with hack/build-images.sh:
# it reads the package list of the apt-get line below and the go build
# -ldflags out of this file, so keep each on one line (the -ldflags quoted,
# with ${VERSION}). Its root is mmdebstrap --variant=minbase, which is what
# debian:bookworm-slim is made from.

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=0.1.0
RUN CGO_ENABLED=0 go build -trimpath \
	-ldflags "-s -w -X github.com/csi-qcow2/csi-qcow2/pkg/driver.Version=${VERSION}" \
	-o /out/csi-qcow2 ./cmd/csi-qcow2

FROM debian:bookworm-slim
# What the node plugin runs: mount/umount, blkid and fsfreeze (util-linux,
# mount), mkfs.ext4/resize2fs/e2fsck (e2fsprogs), mkfs.xfs/xfs_growfs
# (xfsprogs), modprobe for the nbd module (kmod).
RUN apt-get update \
	&& apt-get install -y --no-install-recommends util-linux mount e2fsprogs xfsprogs kmod \
	&& rm -rf /var/lib/apt/lists/*
COPY --from=build /out/csi-qcow2 /usr/local/bin/csi-qcow2
# Non-root by default: the instance next to csi-resizer (no volumes) runs
# as this user. The node plugin cannot: attaching /dev/nbdX, mounting and
# freezing filesystems need root and privileged: true (deploy/kubernetes/node.yaml
# sets both, overriding this).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/csi-qcow2"]
