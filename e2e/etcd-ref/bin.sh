#!/usr/bin/env bash
# The path of a real etcd binary built from etcd's own Go modules, built on first use:
#   e2e/etcd-ref/bin.sh 3.6 etcd      e2e/etcd-ref/bin.sh 3.7 etcdctl      ... etcdutl
# Each version is a Go module of ours (v3.6/, v3.7/: go.mod and go.sum pin the exact etcd
# release; its `tool` lines name the three commands). Binaries are cached per release outside
# the checkout ($OXCD_CACHE, default ~/.cache/oxcd), so a second run, or a fresh clone on the same
# machine, builds nothing. Debian's etcd 3.4 (/usr/bin/etcd) stays the reference for old clients.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ $# -eq 2 ] || { echo "usage: $0 3.6|3.7 etcd|etcdctl|etcdutl" >&2; exit 2; }
minor="$1" cmd="$2"
mod="$here/v$minor"
[ -f "$mod/go.mod" ] || { echo "no module for etcd $minor in $mod" >&2; exit 2; }
case "$cmd" in
    etcd) pkg=go.etcd.io/etcd/server/v3 ;;
    etcdctl) pkg=go.etcd.io/etcd/etcdctl/v3 ;;
    etcdutl) pkg=go.etcd.io/etcd/etcdutl/v3 ;;
    *) echo "unknown command $cmd (etcd, etcdctl or etcdutl)" >&2; exit 2 ;;
esac
# The pinned release, from go.mod (the three modules share one version).
version="$(sed -n 's#^[[:space:]]*go.etcd.io/etcd/server/v3 \(v[^ ]*\).*#\1#p' "$mod/go.mod" | head -1)"
[ -n "$version" ] || { echo "go.mod of $mod pins no go.etcd.io/etcd/server/v3" >&2; exit 2; }
out="${OXCD_CACHE:-$HOME/.cache/oxcd}/etcd-ref/$version"
bin="$out/$cmd"
if [ ! -x "$bin" ]; then
    mkdir -p "$out"
    echo "building $cmd $version (once; cached in $out)" >&2
    # -mod=readonly: the build uses exactly what go.sum pins. -trimpath keeps the binary free
    # of this machine's paths.
    (cd "$mod" && GOFLAGS=-mod=readonly go build -trimpath -o "$bin.tmp" "$pkg") >&2
    mv "$bin.tmp" "$bin"
fi
echo "$bin"
