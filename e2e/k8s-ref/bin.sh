#!/usr/bin/env bash
# The path of a real Kubernetes control-plane binary built from k8s.io/kubernetes, built on
# first use:
#   e2e/k8s-ref/bin.sh kube-apiserver | kube-controller-manager | kube-scheduler | kubectl
# The release is a Go module of ours (v1.37/: go.mod and go.sum pin k8s.io/kubernetes and every
# k8s.io/* staging module to one release; its `tool` lines name the four commands). Binaries are
# cached per release outside the checkout ($OXCD_CACHE, default ~/.cache/oxcd), so a second run,
# or a fresh clone on the same machine, builds nothing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ $# -eq 1 ] || { echo "usage: $0 kube-apiserver|kube-controller-manager|kube-scheduler|kubectl" >&2; exit 2; }
cmd="$1"
case "$cmd" in
    kube-apiserver|kube-controller-manager|kube-scheduler|kubectl) ;;
    *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
mod="$here/v1.37"
version="$(sed -n 's#^[[:space:]]*k8s.io/kubernetes \(v[^ ]*\).*#\1#p' "$mod/go.mod" | head -1)"
[ -n "$version" ] || { echo "go.mod of $mod pins no k8s.io/kubernetes" >&2; exit 2; }
out="${OXCD_CACHE:-$HOME/.cache/oxcd}/k8s-ref/$version"
bin="$out/$cmd"
if [ ! -x "$bin" ]; then
    mkdir -p "$out"
    echo "building $cmd $version (once; cached in $out)" >&2
    # -mod=readonly: exactly what go.sum pins; -trimpath: no paths of this machine. The version
    # stamp is what `make` would write (the apiserver's /version and kubectl's skew check read it).
    pkg=k8s.io/component-base/version
    major="$(echo "${version#v}" | cut -d. -f1)" minor="$(echo "$version" | cut -d. -f2)"
    ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    (cd "$mod" && GOFLAGS=-mod=readonly go build -trimpath -ldflags "$ldflags" -o "$bin.tmp" "k8s.io/kubernetes/cmd/$cmd") >&2
    mv "$bin.tmp" "$bin"
fi
echo "$bin"
