#!/usr/bin/env bash
# Builds the Kubernetes control plane and the CSI sidecars that
# hack/e2e-k8s.sh runs, from the Go module proxy (there is no container
# registry here), into $K8S_CACHE_DIR/bin, one file per name and version:
#
#   etcd-v3.7.3 kube-apiserver-v1.37.1 kube-controller-manager-v1.37.1
#   kube-scheduler-v1.37.1 kubelet-v1.37.1 kubectl-v1.37.1 csi-provisioner-v6.3.0 csi-snapshotter-v8.7.0
#   snapshot-controller-v8.7.0 csi-resizer-v2.3.0
#
# and, asked for by name only (hack/k8s-build.sh e2e), e2e-storage.test-v1.37.1,
# agnhost-2.66.1 and hello-populator-<hash> (hack/e2e-storage.sh).
#
# A binary that is already there is not rebuilt, so only the first run pays
# (~25 min on 2 cores; GOCACHE and GOMODCACHE make a rebuild minutes).
# Every build happens in a scratch module under the cache, never in the
# project's go.mod. Recipes (why each is shaped so) are in ../shared/FACTS.md:
# k8s.io/kubernetes needs its ./staging replaces turned into versions; the
# provisioner and snapshotter have replace directives, so they are built
# inside a copy of their own module source.
#
# Usage: hack/k8s-build.sh [name...]   (default: etcd kube provisioner
# snapshotter resizer; e2e on request)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=hack/lib/versions.sh
. "$repo/hack/lib/versions.sh"
mkdir -p "$cache/bin" "$cache/src"
cache=$(cd "$cache" && pwd)
bin=$cache/bin
export GOFLAGS=-mod=mod
export CGO_ENABLED=0
export GOTOOLCHAIN=local


log() { echo "k8s-build: $*" >&2; }

have() { [ -x "$bin/$1" ]; }

# module_src M V DEST: a writable copy of module M@V's source in DEST.
module_src() {
	local m=$1 v=$2 dest=$3 dir
	if [ -f "$dest/go.mod" ]; then return; fi
	dir=$(go mod download -json "$m@$v" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
	[ -n "$dir" ] || { log "cannot download $m@$v"; return 1; }
	rm -rf "$dest.tmp"
	cp -r "$dir" "$dest.tmp"
	chmod -R u+w "$dest.tmp"
	mv "$dest.tmp" "$dest"
}

build_etcd() {
	local out=etcd-$ETCD_VERSION
	have "$out" && return
	log "building $out"
	local d=$cache/src/etcd-$ETCD_VERSION
	mkdir -p "$d"
	(
		cd "$d"
		[ -f go.mod ] || go mod init scratch/etcd >/dev/null 2>&1
		go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
		go build -trimpath -o "$bin/$out.tmp" go.etcd.io/etcd/server/v3
	)
	mv "$bin/$out.tmp" "$bin/$out"
}

# kube_module: cd into the scratch module that requires k8s.io/kubernetes
# (made on first use) and set ld, the -ldflags that stamp its version.
kube_module() {
	local d=$cache/src/kubernetes-$K8S_VERSION
	local staging=v0.${K8S_VERSION#v1.}
	mkdir -p "$d"
	cd "$d"
	if [ ! -f go.mod ]; then
		local gomod
		gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
		{
			echo "module scratch/kubernetes"
			echo
			echo "go 1.26"
			echo
			echo "require k8s.io/kubernetes $K8S_VERSION"
			echo
			# k8s.io/X => ./staging/src/k8s.io/X  becomes  k8s.io/X => k8s.io/X v0.N.P
			sed -n 's#^[[:space:]]*\(replace[[:space:]]\+\)\?\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\2#p' "$gomod" |
				while read -r m; do echo "replace $m => $m $staging"; done
		} >go.mod.tmp
		mv go.mod.tmp go.mod
	fi
	local major=${K8S_VERSION#v} minor
	minor=${major#*.}
	minor=${minor%%.*}
	major=${major%%.*}
	ld="-s -w"
	local p
	for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
		ld+=" -X $p.gitTreeState=clean -X $p.gitCommit=0000000000000000000000000000000000000000"
		ld+=" -X $p.buildDate=1970-01-01T00:00:00Z"
	done
}

build_kube() {
	local names=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl) n missing=0
	for n in "${names[@]}"; do have "$n-$K8S_VERSION" || missing=1; done
	[ $missing = 1 ] || return 0
	log "building ${names[*]} $K8S_VERSION"
	(
		kube_module
		local pkgs=()
		for n in "${names[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$n@$K8S_VERSION"); done
		go get "${pkgs[@]}"
		for n in "${names[@]}"; do
			have "$n-$K8S_VERSION" && continue
			log "  go build $n"
			go build -trimpath -ldflags "$ld" -o "$bin/$n-$K8S_VERSION.tmp" "k8s.io/kubernetes/cmd/$n"
			mv "$bin/$n-$K8S_VERSION.tmp" "$bin/$n-$K8S_VERSION"
		done
	)
}

# build_e2e (not in the default list): what hack/e2e-storage.sh runs.
#   e2e-storage.test-$K8S_VERSION  Kubernetes' e2e suite with only the
#       external storage tests registered (hack/e2e-storage/e2e_test.go),
#       compiled in the same scratch module as a package of its own,
#       e2estorage/; its imports enter go.mod at k8s.io/kubernetes's own
#       versions, which the other targets' builds share.
#   agnhost-<its VERSION file>  test/images/agnhost of the same module, for
#       the image the suite names (hack/build-images.sh with E2E_IMAGES=1).
#   hello-populator-<hash of its source>  hack/e2e-storage/hello-populator.go,
#       in the same module (package hellopopulator/), for the hello-populator
#       image (upstream's lib-volume-populator is not on the module proxy).
build_e2e() {
	local out=e2e-storage.test-$K8S_VERSION src=$repo/hack/e2e-storage/e2e_test.go
	local key
	key=$(sha256sum "$src" | cut -d' ' -f1)
	(
		kube_module
		if ! have "$out" || [ "$(cat "$bin/$out.key" 2>/dev/null)" != "$key" ]; then
			log "  go test -c e2estorage ($out)"
			mkdir -p e2estorage
			grep -v '^//go:build ignore$' "$src" >e2estorage/e2e_test.go
			go get "k8s.io/kubernetes/test/e2e@$K8S_VERSION"
			go test -c -vet=off -trimpath -ldflags "$ld" -o "$bin/$out.tmp" ./e2estorage
			mv "$bin/$out.tmp" "$bin/$out"
			echo "$key" >"$bin/$out.key"
		fi
		# hello-populator-<key of its source>: the populator the "any
		# volume data source" spec deploys (hack/build-images.sh).
		local pop=$repo/hack/e2e-storage/hello-populator.go popkey
		popkey=$(sha256sum "$pop" | cut -c1-16)
		if ! have "hello-populator-$popkey"; then
			log "  go build hello-populator-$popkey"
			mkdir -p hellopopulator
			grep -v '^//go:build ignore$' "$pop" >hellopopulator/main.go
			go build -trimpath -ldflags "$ld" -o "$bin/hello-populator-$popkey.tmp" ./hellopopulator
			mv "$bin/hello-populator-$popkey.tmp" "$bin/hello-populator-$popkey"
		fi
		local agnhost dir
		dir=$(go list -m -f '{{.Dir}}' k8s.io/kubernetes)
		agnhost=agnhost-$(cat "$dir/test/images/agnhost/VERSION")
		if ! have "$agnhost"; then
			log "  go build $agnhost"
			go build -trimpath -ldflags "$ld -X main.Version=${agnhost#agnhost-}" -o "$bin/$agnhost.tmp" k8s.io/kubernetes/test/images/agnhost
			mv "$bin/$agnhost.tmp" "$bin/$agnhost"
		fi
	)
}

build_provisioner() {
	local out=csi-provisioner-$PROVISIONER_VERSION
	have "$out" && return
	log "building $out"
	local d=$cache/src/external-provisioner-$PROVISIONER_VERSION
	module_src "github.com/kubernetes-csi/external-provisioner/v${PROVISIONER_VERSION:1:1}" "$PROVISIONER_VERSION" "$d"
	(cd "$d" && go build -trimpath -ldflags "-X main.version=$PROVISIONER_VERSION" -o "$bin/$out.tmp" ./cmd/csi-provisioner)
	mv "$bin/$out.tmp" "$bin/$out"
}

build_snapshotter() {
	have "csi-snapshotter-$SNAPSHOTTER_VERSION" && have "snapshot-controller-$SNAPSHOTTER_VERSION" && return
	log "building csi-snapshotter and snapshot-controller $SNAPSHOTTER_VERSION"
	local major=${SNAPSHOTTER_VERSION:1:1}
	local d=$cache/src/external-snapshotter-$SNAPSHOTTER_VERSION
	module_src "github.com/kubernetes-csi/external-snapshotter/v$major" "$SNAPSHOTTER_VERSION" "$d"
	# Its go.mod replaces client/vN with ./client, which the module zip
	# leaves out; the client module of the same version is that directory.
	if [ ! -f "$d/client/go.mod" ]; then
		rm -rf "$d/client"
		module_src "github.com/kubernetes-csi/external-snapshotter/client/v$major" "$SNAPSHOTTER_VERSION" "$d/client"
	fi
	local n
	for n in csi-snapshotter snapshot-controller; do
		have "$n-$SNAPSHOTTER_VERSION" && continue
		(cd "$d" && go build -trimpath -ldflags "-X main.version=$SNAPSHOTTER_VERSION" -o "$bin/$n-$SNAPSHOTTER_VERSION.tmp" "./cmd/$n")
		mv "$bin/$n-$SNAPSHOTTER_VERSION.tmp" "$bin/$n-$SNAPSHOTTER_VERSION"
	done
}

build_resizer() {
	local out=csi-resizer-$RESIZER_VERSION
	have "$out" && return
	log "building $out"
	local major=${RESIZER_VERSION:1:1}
	local d=$cache/src/external-resizer-$RESIZER_VERSION
	module_src "github.com/kubernetes-csi/external-resizer/v$major" "$RESIZER_VERSION" "$d"
	(cd "$d" && go build -trimpath -ldflags "-X main.version=$RESIZER_VERSION" -o "$bin/$out.tmp" ./cmd/csi-resizer)
	mv "$bin/$out.tmp" "$bin/$out"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(etcd kube provisioner snapshotter resizer)
for t in "${targets[@]}"; do
	start=$SECONDS
	"build_$t"
	log "$t ready ($((SECONDS - start)) s)"
done
