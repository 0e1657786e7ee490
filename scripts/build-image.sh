#!/usr/bin/env bash
# Builds the oxcd server image, or the operator image, on a machine whose Docker engine
# cannot pull images: FROM scratch with the release binary and the shared libraries it links.
#   scripts/build-image.sh [TAG]                 server image (default tag: oxcd:dev)
#   scripts/build-image.sh --operator [TAG]      operator image (default tag: oxcd-operator:dev)
#   OXCD=path/to/binary scripts/build-image.sh ...   use an already built binary
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bin=oxcd
dockerfile="$repo/server/image/Dockerfile"
default_tag=oxcd:dev
if [ "${1:-}" = "--operator" ]; then
    shift
    bin=oxcd-operator
    dockerfile="$repo/operator/image/Dockerfile"
    default_tag=oxcd-operator:dev
fi
tag="${1:-$default_tag}"
if [ -z "${OXCD:-}" ]; then
    cargo build --release --bin "$bin" --manifest-path "$repo/Cargo.toml"
    OXCD="$repo/target/release/$bin"
fi
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/usr/local/bin" "$root/tmp" "$ctx/data"
cp "$OXCD" "$root/usr/local/bin/$bin"
strip "$root/usr/local/bin/$bin" 2>/dev/null || true
# Every library the binary loads, at the same path, plus the dynamic loader.
for lib in $(ldd "$OXCD" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
# TLS roots for the operator's HTTPS calls (Kubernetes API, object stores).
if [ "$bin" = oxcd-operator ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$root/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
fi
chmod 1777 "$root/tmp"
cp "$dockerfile" "$ctx/Dockerfile"
docker build -q -t "$tag" "$ctx" >/dev/null
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag") bytes)"
