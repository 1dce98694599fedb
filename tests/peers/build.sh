#!/usr/bin/env bash
# Builds the real Kubernetes peers the tests compare against, from their published Go
# modules at the versions pinned in versions.env, into a cache laid out like envtest's:
#
#   $KUBESHIM_PEERS_DIR/k8s/<k8s version>-linux-amd64/{kube-apiserver,etcd,kubectl,kube-proxy,
#       kubelet,kube-controller-manager,kube-scheduler,agnhost,e2e.test}
#   $KUBESHIM_PEERS_DIR/coredns/<coredns version>-linux-amd64/coredns
#
# Each binary has a <name>.stamp beside it; a binary whose stamp matches is not rebuilt.
# With KUBEBUILDER_ASSETS set, kube-apiserver, etcd and kubectl are taken from there and
# not built. Prints one line per peer: name, version, build seconds (0 when cached), path.
#
# Usage: tests/peers/build.sh [--update]
#   --update  regenerate the go.mod/go.sum files of the wrapper modules from the pinned
#             versions (done automatically when a pin changed).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

GO=${GO:-}
if [[ -z $GO ]]; then
  if [[ -x /usr/local/go/bin/go ]]; then GO=/usr/local/go/bin/go; else GO=$(command -v go || true); fi
fi
[[ -n $GO ]] || { echo "build.sh: no Go toolchain found (set GO=/path/to/go)" >&2; exit 1; }

peers_dir=${KUBESHIM_PEERS_DIR:-$HOME/.cache/kubeshim/peers}
k8s_dir="$peers_dir/k8s/${KUBERNETES_VERSION#v}-linux-amd64"
coredns_dir="$peers_dir/coredns/${COREDNS_VERSION#v}-linux-amd64"
update=0
[[ ${1-} == --update ]] && update=1

# Builds share two cores with other work: keep them polite.
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-p=2 -trimpath"
export CGO_ENABLED=0 GOTOOLCHAIN=local
go_version=$("$GO" env GOVERSION)

# The wrapper module's go.mod must name the pinned version of the module it wraps.
pinned() { # <wrapper dir> <module> <version>
  grep -qE "^[[:space:]]*(require[[:space:]]+)?$2 $3([[:space:]]|\$)" "$1/go.mod" 2>/dev/null
}

# A fresh wrapper module: require <module>@<version> and record its main packages as tools.
init_module() { # <wrapper dir> <wrapper module path> <module>@<version> <tool package>...
  local dir=$1 path=$2 modver=$3; shift 3
  rm -f "$dir/go.mod" "$dir/go.sum"
  # go 1.26.0, not the local patch release, so any Go 1.26 builds it.
  (cd "$dir" && "$GO" mod init "$path" >/dev/null 2>&1 &&
    "$GO" mod edit -go=1.26.0 -require="$modver")
}

finish_module() { # <wrapper dir> <tool package>...
  local dir=$1; shift
  (cd "$dir" && for t in "$@"; do "$GO" mod edit -tool="$t"; done && "$GO" mod tidy)
}

update_k8s() {
  local dir="$here/k8s" gomod
  echo "build.sh: generating $dir/go.mod for k8s.io/kubernetes $KUBERNETES_VERSION" >&2
  init_module "$dir" kubeshim.test/peers/k8s "k8s.io/kubernetes@$KUBERNETES_VERSION"
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with
  # ./staging/src/k8s.io/<name>; each is published as k8s.io/<name> v0.<minor>.<patch>.
  gomod=$("$GO" mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  local staging_version="v0.${KUBERNETES_VERSION#v1.}" args=() m
  for m in $(sed -n 's|^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/src/.*|\1|p' "$gomod"); do
    args+=("-replace=$m=$m@$staging_version")
  done
  (cd "$dir" && "$GO" mod edit "${args[@]}")
  finish_module "$dir" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-proxy \
    k8s.io/kubernetes/cmd/kubectl k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/test/images/agnhost
}

update_etcd() {
  echo "build.sh: generating $here/etcd/go.mod for go.etcd.io/etcd/server/v3 $ETCD_VERSION" >&2
  init_module "$here/etcd" kubeshim.test/peers/etcd "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  finish_module "$here/etcd" go.etcd.io/etcd/server/v3
}

update_coredns() {
  echo "build.sh: generating $here/coredns/go.mod for github.com/coredns/coredns $COREDNS_VERSION" >&2
  init_module "$here/coredns" kubeshim.test/peers/coredns "github.com/coredns/coredns@$COREDNS_VERSION"
  finish_module "$here/coredns" github.com/coredns/coredns
}

if ((update)) || ! pinned "$here/k8s" k8s.io/kubernetes "$KUBERNETES_VERSION"; then update_k8s; fi
if ((update)) || ! pinned "$here/etcd" go.etcd.io/etcd/server/v3 "$ETCD_VERSION"; then update_etcd; fi
if ((update)) || ! pinned "$here/coredns" github.com/coredns/coredns "$COREDNS_VERSION"; then update_coredns; fi

# Seconds each binary took to build in this run (0: its stamp matched, nothing built).
declare -A took

# build <wrapper dir> <package> <out> <version> [extra -ldflags]
build() {
  local dir=$1 pkg=$2 out=$3 version=$4 extra=${5-}
  local stamp="$version $go_version $(sha256sum "$dir/go.sum" | cut -c1-16)"
  took[$(basename "$out")]=0
  if [[ -x $out && -f $out.stamp && $(cat "$out.stamp") == "$stamp" ]]; then
    return 0
  fi
  mkdir -p "$(dirname "$out")"
  echo "build.sh: building $(basename "$out") $version ..." >&2
  local start=$SECONDS
  if [[ $pkg == ./* ]]; then  # a test package of the wrapper module: its test binary
    (cd "$dir" && nice -n 10 "$GO" test -c -vet=off -mod=readonly -ldflags "-s -w $extra" -o "$out.tmp" "$pkg")
  else
    (cd "$dir" && nice -n 10 "$GO" build -mod=readonly -ldflags "-s -w $extra" -o "$out.tmp" "$pkg")
  fi
  mv -f "$out.tmp" "$out"
  echo "$stamp" >"$out.stamp"
  took[$(basename "$out")]=$((SECONDS - start))
  echo "build.sh: built $(basename "$out") in $((SECONDS - start))s" >&2
}

# What hack/lib/version.sh stamps into release binaries (the API server reports it on /version).
major=${KUBERNETES_VERSION#v}; major=${major%%.*}
minor=${KUBERNETES_VERSION#v*.}; minor=${minor%%.*}
k8s_ldflags=""
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

if [[ -n ${KUBEBUILDER_ASSETS-} ]]; then
  assets=$KUBEBUILDER_ASSETS
  for b in kube-apiserver etcd kubectl; do
    [[ -x $assets/$b ]] || { echo "build.sh: KUBEBUILDER_ASSETS=$assets has no executable $b" >&2; exit 1; }
  done
else
  assets=$k8s_dir
  build "$here/etcd" go.etcd.io/etcd/server/v3 "$k8s_dir/etcd" "$ETCD_VERSION"
  build "$here/k8s" k8s.io/kubernetes/cmd/kubectl "$k8s_dir/kubectl" "$KUBERNETES_VERSION" "$k8s_ldflags"
  build "$here/k8s" k8s.io/kubernetes/cmd/kube-apiserver "$k8s_dir/kube-apiserver" "$KUBERNETES_VERSION" "$k8s_ldflags"
fi
build "$here/k8s" k8s.io/kubernetes/cmd/kube-proxy "$k8s_dir/kube-proxy" "$KUBERNETES_VERSION" "$k8s_ldflags"
# The node (tests/peers/node.py): kubelet, the two controllers, and agnhost, the test
# server the node tests and Kubernetes' e2e tests run in their pods.
for cmd in kubelet kube-controller-manager kube-scheduler; do
  build "$here/k8s" "k8s.io/kubernetes/cmd/$cmd" "$k8s_dir/$cmd" "$KUBERNETES_VERSION" "$k8s_ldflags"
done
build "$here/k8s" k8s.io/kubernetes/test/images/agnhost "$k8s_dir/agnhost" "$KUBERNETES_VERSION"
# The serving certificate agnhost's image carries for `agnhost porter` (its Dockerfile's ADD).
k8s_module=$(cd "$here/k8s" && "$GO" list -mod=readonly -m -f '{{.Dir}}' k8s.io/kubernetes)
for f in localhost.crt localhost.key; do
  install -m 0644 "$k8s_module/test/images/agnhost/porter/$f" "$k8s_dir/agnhost-$f"
done
# Kubernetes' e2e tests, sig-network's only (k8s/e2e/e2e_test.go), as e2e.test.
build "$here/k8s" ./e2e "$k8s_dir/e2e.test" "$KUBERNETES_VERSION" "$k8s_ldflags"
build "$here/coredns" github.com/coredns/coredns "$coredns_dir/coredns" "$COREDNS_VERSION"

# One line per peer, with the version the binary itself reports and its build time.
first() { head -n1 | tr -s ' '; }
line() { # <name> <version output> <path>
  printf '%-23s %-24s %4ss  %s\n' "$1" "$2" "${took[$(basename "$3")]:-0}" "$3"
}
line etcd "$("$assets/etcd" --version | first)" "$assets/etcd"
line kube-apiserver "$("$assets/kube-apiserver" --version | first)" "$assets/kube-apiserver"
line kubectl "$("$assets/kubectl" version --client | first)" "$assets/kubectl"
for b in kube-proxy kubelet kube-controller-manager kube-scheduler; do
  line "$b" "$("$k8s_dir/$b" --version | first)" "$k8s_dir/$b"
done
line agnhost "agnhost $KUBERNETES_VERSION" "$k8s_dir/agnhost"
line e2e.test "$("$k8s_dir/e2e.test" --version 2>/dev/null | first)" "$k8s_dir/e2e.test"
line coredns "$("$coredns_dir/coredns" -version | first)" "$coredns_dir/coredns"
