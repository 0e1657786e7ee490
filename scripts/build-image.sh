#!/usr/bin/env bash
# Builds the oxcd server image on a machine whose Docker engine cannot pull images:
# FROM scratch with the release binary and the shared libraries it links.
#   scripts/build-image.sh [TAG]         (default tag: oxcd:dev)
#   OXCD=path/to/oxcd scripts/build-image.sh   use an already built binary
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tag="${1:-oxcd:dev}"
if [ -z "${OXCD:-}" ]; then
    cargo build --release --bin oxcd --manifest-path "$repo/Cargo.toml"
    OXCD="$repo/target/release/oxcd"
fi
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/usr/local/bin" "$root/tmp" "$ctx/data"
cp "$OXCD" "$root/usr/local/bin/oxcd"
strip "$root/usr/local/bin/oxcd" 2>/dev/null || true
# Every library the binary loads, at the same path, plus the dynamic loader.
for lib in $(ldd "$OXCD" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
chmod 1777 "$root/tmp"
cp "$repo/server/image/Dockerfile" "$ctx/Dockerfile"
docker build -q -t "$tag" "$ctx" >/dev/null
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag") bytes)"
