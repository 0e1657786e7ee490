#!/usr/bin/env bash
# The path of a real etcd binary built from etcd's own Go modules, built on first use:
#   e2e/etcd-ref/bin.sh 3.6 etcd      e2e/etcd-ref/bin.sh 3.7 etcdctl      ... etcdutl
# Each version is a Go module of ours (v3.6/, v3.7/: go.mod and go.sum pin the exact etcd
# release; its `tool` lines name the three commands). Binaries are cached per release outside
# the checkout ($OXCD_CACHE, default ~/.cache/oxcd), so a second run, or a fresh clone on the same
# machine, builds nothing. Debian's etcd 3.4 (/usr/bin/etcd) stays the reference for old clients.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ $# -eq 2 ] || { echo "usage: $0 3.6|3.7 etcd|etcdctl|etcdutl|etcd-failpoints" >&2; exit 2; }
minor="$1" cmd="$2"
mod="$here/v$minor"
[ -f "$mod/go.mod" ] || { echo "no module for etcd $minor in $mod" >&2; exit 2; }
case "$cmd" in
    etcd) pkg=go.etcd.io/etcd/server/v3 ;;
    etcdctl) pkg=go.etcd.io/etcd/etcdctl/v3 ;;
    etcdutl) pkg=go.etcd.io/etcd/etcdutl/v3 ;;
    etcd-failpoints) pkg=go.etcd.io/etcd/server/v3 ;;
    *) echo "unknown command $cmd (etcd, etcdctl, etcdutl or etcd-failpoints)" >&2; exit 2 ;;
esac
# The pinned release, from go.mod (the three modules share one version).
version="$(sed -n 's#^[[:space:]]*go.etcd.io/etcd/server/v3 \(v[^ ]*\).*#\1#p' "$mod/go.mod" | head -1)"
[ -n "$version" ] || { echo "go.mod of $mod pins no go.etcd.io/etcd/server/v3" >&2; exit 2; }
out="${OXCD_CACHE:-$HOME/.cache/oxcd}/etcd-ref/$version"
bin="$out/$cmd"
# etcd-failpoints: the same server with etcd's gofail points enabled, as etcd's own
# `make gofail-enable` builds it for its robustness suite (3.6 has the beforeSendWatchResponse
# point the suite patches into older releases). v<minor>-failpoints/ pins gofail and replaces
# the server module with the enabled copy made here.
GOFAIL_VERSION=v0.2.0
if [ "$cmd" = etcd-failpoints ] && [ ! -x "$bin" ]; then
    fmod="$here/v$minor-failpoints"
    [ -f "$fmod/go.mod" ] || { echo "no module for etcd $minor with failpoints in $fmod" >&2; exit 2; }
    src="$out/failpoints-src"
    rm -rf "$src"
    mkdir -p "$src"
    cp "$fmod/go.mod" "$fmod/go.sum" "$src/"
    server_dir="$(cd "$mod" && GOFLAGS=-mod=readonly go list -m -f '{{.Dir}}' go.etcd.io/etcd/server/v3)"
    cp -r "$server_dir" "$src/server"
    chmod -R u+w "$src/server"
    echo "building etcd $version with gofail $GOFAIL_VERSION failpoints (once; cached in $out)" >&2
    (cd "$src/server" && GOFLAGS= go run "go.etcd.io/gofail@$GOFAIL_VERSION" enable \
        $(cd "$src/server" && grep -rl '// gofail:' --include='*.go' . | xargs -n1 dirname | sort -u)) >&2
    echo "require go.etcd.io/gofail $GOFAIL_VERSION" >> "$src/server/go.mod"
    (cd "$src" && GOFLAGS=-mod=readonly go build -trimpath -o "$bin.tmp" "$pkg") >&2
    mv "$bin.tmp" "$bin"
fi
if [ ! -x "$bin" ]; then
    mkdir -p "$out"
    echo "building $cmd $version (once; cached in $out)" >&2
    # -mod=readonly: the build uses exactly what go.sum pins. -trimpath keeps the binary free
    # of this machine's paths.
    (cd "$mod" && GOFLAGS=-mod=readonly go build -trimpath -o "$bin.tmp" "$pkg") >&2
    mv "$bin.tmp" "$bin"
fi
echo "$bin"
