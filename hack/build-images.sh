#!/usr/bin/env bash
# Builds the project's container images without Docker or a registry, as
# OCI image-layout tars with uncompressed layers (hack/ociimage) that
# `ctr -n k8s.io images import FILE` takes and names as below:
#
#   docker.io/library/csi-qcow2:$IMAGE_TAG   the driver, the image the Dockerfile
#                                            describes (IMAGE_TAG default dev)
#   registry.k8s.io/pause:3.10               containerd's sandbox image (hack/pause)
#   docker.io/library/busybox:<version>      Debian's busybox-static, a link per applet
#   registry.k8s.io/sig-storage/<name>:<tag> every sidecar deploy/ names (stripped)
#                                            whose binary hack/k8s-build.sh has built
#
# The driver is docker.io/library/csi-qcow2 because that is what a pod's
# "csi-qcow2:dev" means to kubelet and containerd: deploy/kubernetes needs
# only `kustomize edit set image csi-qcow2=csi-qcow2:dev` (or newTag: dev).
#
# Output, in $IMAGES_CACHE_DIR (default ~/.cache/csi-qcow2/images): one
# archive per image and images.list, a line per image, "NAME FILE", FILE
# relative to the list's directory (hack/vm/node reads it so). The list
# is also printed. Work files (the Debian root, binaries, keys) are under
# work/. An image whose inputs (binaries, packages, recipe, the writer)
# are unchanged is not rebuilt.
#
# The driver image is the Dockerfile's, built another way: the Debian
# packages are parsed out of its apt-get line and the go build -ldflags
# out of its build stage, so the two cannot drift. The root is
# `mmdebstrap --variant=minbase` (what debian:bookworm-slim is made from),
# with the slim image's dpkg path excludes (docs but copyright files, man
# pages, locales), no recommends, and apt's lists and caches dropped. The
# mirrors are the host apt's Debian ones, the only ones reachable here.
#
# With E2E_IMAGES=1 (hack/e2e-storage.sh), also the images Kubernetes' e2e
# storage tests run, under the names and tags its test/utils/image/
# manifest.go (k8s.io/kubernetes@$K8S_VERSION, read from the module cache)
# gives them, so no KUBE_TEST_REPO_LIST is needed:
#
#   registry.k8s.io/e2e-test-images/busybox:<BusyBox>  the busybox above
#   registry.k8s.io/e2e-test-images/agnhost:<Agnhost>  busybox + /agnhost,
#       built from the same module by `hack/k8s-build.sh e2e` (subPath)
#   registry.k8s.io/e2e-test-images/nginx:<Nginx>  the busybox again: the
#       storage tests only run sh scripts in it
#   registry.k8s.io/e2e-test-images/glibc-dns-testing:<GlibcDnsTesting>  the
#       driver image's Debian root: multiVolume's pods run GNU dd
#       (oflag=nocache) in it
#   registry.k8s.io/pause:<Pause>  the pause above, under the suite's tag
#   registry.k8s.io/sig-storage/hello-populator:<its manifest's tag>  our
#       hack/e2e-storage/hello-populator.go (built by k8s-build.sh e2e)
#
# Usage: hack/build-images.sh [--require-sidecars]
#   --require-sidecars  fail, instead of skipping, when the binary of a sidecar
#                       k8s-build.sh builds is missing (or REQUIRE_SIDECARS=1)
# Env: IMAGES_CACHE_DIR, IMAGE_TAG, K8S_CACHE_DIR (hack/k8s-build.sh's),
#   E2E_IMAGES=1 and K8S_VERSION (default v1.37.1) for the e2e images,
#   VERSION (driver.Version; default the Dockerfile's ARG), SOURCE_DATE_EPOCH
#   (every mtime; default 2024-01-01), DEBIAN_SOURCES (one-line "deb URI
#   SUITE main" entries, instead of the host's), DEBIAN_REFRESH=1 (fetch
#   the Debian root and busybox-static again, for updates).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${IMAGES_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/csi-qcow2/images}
k8sbin=${K8S_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/csi-qcow2/k8s}/bin
IMAGE_TAG=${IMAGE_TAG:-dev}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200}
require_sidecars=${REQUIRE_SIDECARS:-0}
case "${1:-}" in
--require-sidecars) require_sidecars=1 ;;
"") ;;
*) echo "usage: $0 [--require-sidecars]" >&2; exit 2 ;;
esac
mkdir -p "$cache/work/bin"
cache=$(cd "$cache" && pwd)
work=$cache/work
export PATH=$PATH:/usr/local/go/bin CGO_ENABLED=0 GOTOOLCHAIN=local
umask 022

log() { echo "build-images: $*" >&2; }
die() { log "$*"; exit 1; }
sha() { sha256sum "$@" | cut -d' ' -f1; }
list=()

# gobuild OUT PKG LDFLAGS: a static, reproducible binary (no VCS stamp: the
# Dockerfile's build context has no .git either).
gobuild() {
	(cd "$repo" && go build -trimpath -buildvcs=false -ldflags "$3" -o "$1" "$2")
}

# image NAME KEY STAGE_FN -- OCIIMAGE_ARGS...: writes NAME's archive unless
# the one there was built from KEY. STAGE_FN runs first (it makes the
# layer sources the arguments name); KEY covers what the layers hold.
image() {
	local name=$1 key=$2 stage=$3 file
	shift 4
	file=$(basename "${name%:*}")_${name##*:}.tar
	key=$(printf '%s\n' "$key" "$ociimage_key" "$@" | sha)
	if [ -f "$cache/$file" ] && [ "$(cat "$work/$file.key" 2>/dev/null)" = "$key" ]; then
		log "$name: up to date ($file)"
	else
		local t0=$SECONDS
		"$stage"
		"$work/bin/ociimage" -o "$cache/$file" -name "$name" "$@"
		echo "$key" >"$work/$file.key"
		log "$name: built $file, $(du -h "$cache/$file" | cut -f1), $((SECONDS - t0)) s"
	fi
	list+=("$name $file")
}

# static_go BIN: refuse a binary the interpreter-less images cannot run.
static_go() {
	go version -m "$1" 2>/dev/null | grep -q 'CGO_ENABLED=0' || die "$1 is not a static Go binary (CGO_ENABLED=0)"
}

# --- the Debian root of the driver image -----------------------------------

# dockerfile_packages: the words of the Dockerfile's apt-get install line.
dockerfile_packages() {
	sed -n '/^[^#]*apt-get install/{s/.*apt-get install//;s/&&.*//;s/\\$//;p}' "$repo/Dockerfile" |
		tr ' \t' '\n\n' | grep -v '^-' | grep . || true
}

# debian_sources: "deb URI SUITE main" for the host apt's bookworm,
# bookworm-updates and bookworm-security entries (deb822 and one-line).
debian_sources() {
	if [ -n "${DEBIAN_SOURCES:-}" ]; then
		printf '%s\n' "$DEBIAN_SOURCES"
		return
	fi
	local f
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		case "$f" in
		*.sources) awk '
			function flush(  i, n, s) { if (types ~ /(^| )deb( |$)/) { n = split(suites, s, " "); for (i = 1; i <= n; i++) print uri, s[i] } types = uris = suites = "" }
			/^[[:space:]]*$/ { flush(); next }
			/^Types:/ { sub(/^Types:[[:space:]]*/, ""); types = $0 }
			/^URIs:/ { uri = $2 }
			/^Suites:/ { sub(/^Suites:[[:space:]]*/, ""); suites = $0 }
			END { flush() }' "$f" ;;
		*) awk '$1 == "deb" { sub(/\[[^]]*\][[:space:]]*/, ""); print $2, $3 }' "$f" ;;
		esac
	done | awk '$2 ~ /^bookworm(-updates|-security)?$/ { print "deb", $1, $2, "main" }' | sort -u
}

ensure_tool() { # ensure_tool CMD PACKAGE
	command -v "$1" >/dev/null && return
	[ "$(id -u)" = 0 ] || die "$1 is missing: apt-get install $2"
	log "installing $2"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null ||
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }
}

build_rootfs() {
	local pkgs sources key out opts
	pkgs=$(dockerfile_packages | tr '\n' ',' | sed 's/,$//')
	[ -n "$pkgs" ] || die "no package list found on the Dockerfile's apt-get install line"
	sources=$(debian_sources)
	[ -n "$sources" ] || die "no Debian bookworm entries in /etc/apt/sources.list*; set DEBIAN_SOURCES"
	ensure_tool mmdebstrap mmdebstrap
	opts=(--variant=minbase --format=tar
		--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
		--aptopt='APT::Install-Recommends "false"'
		--aptopt='Acquire::Check-Valid-Until "false"'
		--dpkgopt='path-exclude=/usr/share/doc/*'
		--dpkgopt='path-include=/usr/share/doc/*/copyright'
		--dpkgopt='path-exclude=/usr/share/man/*'
		--dpkgopt='path-exclude=/usr/share/info/*'
		--dpkgopt='path-exclude=/usr/share/groff/*'
		--dpkgopt='path-exclude=/usr/share/lintian/*'
		--dpkgopt='path-exclude=/usr/share/linda/*'
		--dpkgopt='path-exclude=/usr/share/locale/*'
		--include="$pkgs")
	key=$(printf '%s\n' "${opts[@]}" "$sources" "$SOURCE_DATE_EPOCH" "$(mmdebstrap --version)" | sha)
	rootfs=$work/rootfs-${key:0:16}.tar
	if [ -f "$rootfs" ] && [ "${DEBIAN_REFRESH:-0}" != 1 ]; then
		log "Debian root up to date ($(basename "$rootfs"): $pkgs)"
		rootfs_key=$(sha "$rootfs")
		return
	fi
	log "mmdebstrap bookworm minbase + $pkgs"
	local mirrors=() line t0=$SECONDS
	while read -r line; do mirrors+=("$line"); done <<<"$sources"
	# The customize hook lists the packages for whoever reads the cache,
	# then drops what only the build needed: the aptopts file (it turns off
	# Release date checks), logs and caches that differ run to run.
	mmdebstrap "${opts[@]}" \
		--customize-hook='chroot "$1" dpkg-query -W -f "\${Package} \${Version}\n" >"'"$work/rootfs.tmp.packages"'"' \
		--customize-hook='rm -rf "$1"/etc/apt/apt.conf.d/99mmdebstrap "$1"/var/log/apt/* "$1"/var/log/dpkg.log "$1"/var/log/alternatives.log "$1"/var/cache/ldconfig/aux-cache "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old' \
		bookworm "$work/rootfs.tmp.tar" "${mirrors[@]}" >"$work/mmdebstrap.log" 2>&1 ||
		die "mmdebstrap failed; see $work/mmdebstrap.log"
	rm -f "$work"/rootfs-*.tar "$work"/rootfs-*.packages
	mv "$work/rootfs.tmp.packages" "${rootfs%.tar}.packages"
	mv "$work/rootfs.tmp.tar" "$rootfs"
	rootfs_key=$(sha "$rootfs")
	log "Debian root: $(du -h "$rootfs" | cut -f1), $(wc -l <"${rootfs%.tar}.packages") packages, $((SECONDS - t0)) s"
}

# --- the images ---------------------------------------------------------------

stage_driver() {
	rm -rf "$work/stage/driver"
	install -D -m 0755 "$work/bin/csi-qcow2" "$work/stage/driver/usr/local/bin/csi-qcow2"
}

driver_image() {
	local version ldflags
	version=${VERSION:-$(sed -n 's/^ARG VERSION=//p' "$repo/Dockerfile")}
	ldflags=$(sed -n 's/^[^#]*-ldflags "\([^"]*\)".*/\1/p' "$repo/Dockerfile")
	[ -n "$version" ] && [ -n "$ldflags" ] || die "no ARG VERSION= or -ldflags \"...\" in the Dockerfile"
	ldflags=${ldflags//'${VERSION}'/$version}
	build_rootfs
	gobuild "$work/bin/csi-qcow2" ./cmd/csi-qcow2 "$ldflags"
	image "docker.io/library/csi-qcow2:$IMAGE_TAG" "$rootfs_key $(sha "$work/bin/csi-qcow2")" stage_driver -- \
		-layer "$rootfs" -layer "$work/stage/driver" \
		-env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		-user 65532:65532 -entrypoint '["/usr/local/bin/csi-qcow2"]'
}

stage_pause() {
	rm -rf "$work/stage/pause"
	install -D -m 0755 "$work/bin/pause" "$work/stage/pause/pause"
}

pause_image() {
	gobuild "$work/bin/pause" ./hack/pause "-s -w"
	# As upstream's: /pause, run as 65535.
	image registry.k8s.io/pause:3.10 "$(sha "$work/bin/pause")" stage_pause -- \
		-layer "$work/stage/pause" -user 65535:65535 -entrypoint '["/pause"]'
}

# stage_etc DIR: the /etc/passwd, /etc/group and /tmp a small image has
# (distroless's users: root, nobody, nonroot 65532).
stage_etc() {
	mkdir -p "$1/etc" "$1/tmp"
	chmod 1777 "$1/tmp"
	printf '%s\n' root:x:0:0:root:/root:/bin/sh nobody:x:65534:65534:nobody:/nonexistent:/bin/false \
		nonroot:x:65532:65532:nonroot:/home/nonroot:/bin/false >"$1/etc/passwd"
	printf '%s\n' root:x:0: nobody:x:65534: nonroot:x:65532: >"$1/etc/group"
}

stage_busybox() {
	local s=$work/stage/busybox applet
	rm -rf "$s"
	install -D -m 0755 "$busybox" "$s/bin/busybox"
	for applet in $("$busybox" --list); do
		[ "$applet" = busybox ] || ln "$s/bin/busybox" "$s/bin/$applet"
	done
	stage_etc "$s"
	mkdir -p "$s/root" "$s/home" "$s/var" "$s/usr/sbin"
	chmod 0700 "$s/root"
}

busybox_image() {
	local deb version
	mkdir -p "$work/debs"
	deb=$(ls -t "$work"/debs/busybox-static_*.deb 2>/dev/null | head -n1 || true)
	if [ -z "$deb" ] || [ "${DEBIAN_REFRESH:-0}" = 1 ]; then
		rm -f "$work"/debs/busybox-static_*.deb
		(cd "$work/debs" && { apt-get download -qq busybox-static 2>/dev/null ||
			{ [ "$(id -u)" = 0 ] && apt-get update -qq && apt-get download -qq busybox-static; }; }) ||
			die "apt-get download busybox-static failed"
		deb=$(ls "$work"/debs/busybox-static_*.deb)
	fi
	rm -rf "$work/busybox-deb"
	dpkg-deb -x "$deb" "$work/busybox-deb"
	busybox=$work/busybox-deb/bin/busybox
	version=$(dpkg-deb -f "$deb" Version)
	version=${version#*:}
	version=${BUSYBOX_TAG:-${version%%-*}}
	image "docker.io/library/busybox:$version" "$(sha "$deb")" stage_busybox -- \
		-layer "$work/stage/busybox" \
		-env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin -cmd '["sh"]'
}

stage_sidecar() {
	local s=$work/stage/sidecar
	rm -rf "$s"
	mkdir -p "$s"
	# Symbols and DWARF out (what -s -w would have left out): a third less
	# for the guest to import; stack traces keep their function names.
	if command -v strip >/dev/null; then strip -o "$s/$sidecar" "$sidecar_bin"; else cp "$sidecar_bin" "$s/$sidecar"; fi
	chmod 0755 "$s/$sidecar"
	stage_etc "$s"
}

# The sidecars hack/k8s-build.sh can build; --require-sidecars requires
# these. node-driver-registrar and livenessprobe (deploy/kubernetes/
# upstream-sidecars) cannot be fetched here, so they are built only if a
# binary appears.
buildable_sidecars="csi-provisioner csi-snapshotter snapshot-controller csi-resizer"

# sidecar_images: every registry.k8s.io/sig-storage image deploy/ names,
# from $k8sbin/<name>-<tag>. Upstream's are distroless/static with
# the binary at /<name> as ENTRYPOINT, run as root (no USER); so are these.
sidecar_images() {
	local ref
	for ref in $(grep -rhoE 'image: *registry\.k8s\.io/sig-storage/[a-z0-9-]+:[A-Za-z0-9._-]+' "$repo/deploy" |
		sed 's/image: *//' | sort -u); do
		sidecar=$(basename "${ref%:*}")
		sidecar_bin=$k8sbin/$sidecar-${ref##*:}
		if [ ! -x "$sidecar_bin" ]; then
			case " $buildable_sidecars " in
			*" $sidecar "*)
				[ "$require_sidecars" = 1 ] && die "$ref: no $sidecar_bin (hack/k8s-build.sh builds it)"
				log "$ref: skipped, no $sidecar_bin yet (hack/k8s-build.sh builds it)" ;;
			*) log "$ref: skipped, no $sidecar_bin (its source is not on this module proxy)" ;;
			esac
			continue
		fi
		static_go "$sidecar_bin"
		image "$ref" "$(sha "$sidecar_bin") strip" stage_sidecar -- \
			-layer "$work/stage/sidecar" -entrypoint "[\"/$sidecar\"]"
	done
}

# --- the e2e suite's images (E2E_IMAGES=1) -----------------------------------

# e2e_tag ID: the tag manifest.go's initImageConfigs gives image ID.
e2e_tag() {
	local tag
	tag=$(sed -n 's/^[[:space:]]*configs\['"$1"'\] = Config{list\.[A-Za-z0-9]*, "[^"]*", "\([^"]*\)"}.*/\1/p' "$e2e_manifest")
	[ -n "$tag" ] || die "no configs[$1] in $e2e_manifest"
	echo "$tag"
}

stage_agnhost() {
	local s=$work/stage/agnhost
	stage_busybox
	rm -rf "$s"
	cp -a "$work/stage/busybox" "$s"
	install -m 0755 "$agnhost_bin" "$s/agnhost"
	ln -s agnhost "$s/agnhost-2"
	mkdir -p "$s/uploads"
}

stage_hello_populator() {
	local s=$work/stage/hello-populator
	rm -rf "$s"
	mkdir -p "$s"
	install -m 0755 "$pop_bin" "$s/hello-populator"
}

e2e_images() {
	local v=${K8S_VERSION:-v1.37.1} dir reg=registry.k8s.io/e2e-test-images id deb
	dir=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
	e2e_manifest=$dir/test/utils/image/manifest.go
	[ -f "$e2e_manifest" ] || die "no test/utils/image/manifest.go in k8s.io/kubernetes@$v"
	deb=$(ls "$work"/debs/busybox-static_*.deb)
	local name tag
	for id in BusyBox Nginx; do
		name=busybox
		case $id in Nginx) name=nginx ;; esac
		tag=$(e2e_tag $id)
		image "$reg/$name:$tag" "$(sha "$deb")" stage_busybox -- \
			-layer "$work/stage/busybox" \
			-env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin -cmd '["sh"]'
	done
	# The multiVolume tests write with GNU dd's oflag=nocache in this one,
	# which busybox's dd refuses: the driver image's Debian root (coreutils,
	# util-linux's blockdev), a glibc userland as upstream's is.
	tag=$(e2e_tag GlibcDnsTesting)
	image "$reg/glibc-dns-testing:$tag" "$rootfs_key" : -- \
		-layer "$rootfs" \
		-env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin -cmd '["sh"]'
	tag=$(e2e_tag Agnhost)
	agnhost_bin=$k8sbin/agnhost-$tag
	[ -x "$agnhost_bin" ] || die "no $agnhost_bin: run hack/k8s-build.sh e2e"
	static_go "$agnhost_bin"
	image "$reg/agnhost:$tag" "$(sha "$deb" "$agnhost_bin")" stage_agnhost -- \
		-layer "$work/stage/agnhost" \
		-env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		-entrypoint '["/agnhost"]' -cmd '["pause"]'
	# "any volume data source" deploys hello-populator; ours is
	# hack/e2e-storage/hello-populator.go (k8s-build.sh e2e builds it),
	# under the name and tag of the suite's manifest.
	local pop_name pop_bin
	pop_name=$(sed -n 's/^[[:space:]]*image: \(.*hello-populator:.*\)$/\1/p' "$dir/test/e2e/testing-manifests/storage-csi/any-volume-datasource/hello-populator-deploy.yaml" | head -1)
	[ -n "$pop_name" ] || die "no hello-populator image in the suite's hello-populator-deploy.yaml"
	pop_bin=$k8sbin/hello-populator-$(sha256sum "$repo/hack/e2e-storage/hello-populator.go" | cut -c1-16)
	[ -x "$pop_bin" ] || die "no $pop_bin: run hack/k8s-build.sh e2e"
	static_go "$pop_bin"
	image "$pop_name" "$(sha "$pop_bin")" stage_hello_populator -- \
		-layer "$work/stage/hello-populator" -entrypoint '["/hello-populator"]'
	tag=$(e2e_tag Pause)
	image "registry.k8s.io/pause:$tag" "$(sha "$work/bin/pause")" stage_pause -- \
		-layer "$work/stage/pause" -user 65535:65535 -entrypoint '["/pause"]'
}

gobuild "$work/bin/ociimage" ./hack/ociimage ""
ociimage_key=$(sha "$work/bin/ociimage")
pause_image
busybox_image
driver_image
sidecar_images
[ "${E2E_IMAGES:-0}" != 1 ] || e2e_images
printf '%s\n' "${list[@]}" >"$cache/images.list.tmp"
mv "$cache/images.list.tmp" "$cache/images.list"
log "wrote $cache/images.list"
cat "$cache/images.list"
