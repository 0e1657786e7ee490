#!/usr/bin/env bash
# Builds the oxcd server image, or the operator image, as an OCI image archive, with no
# Docker engine: FROM scratch with the release binary and the shared libraries it links
# (scripts/oci-image.py writes the OCI layout itself).
#   scripts/build-image.sh [TAG]                 server image (default tag: oxcd:dev)
#   scripts/build-image.sh --operator [TAG]      operator image (default tag: oxcd-operator:dev)
#   OXCD=path/to/binary scripts/build-image.sh ...   use an already built binary
#   OUT=path/to/archive.tar scripts/build-image.sh ...  where to write it
#       (default: target/images/<name>-<tag>.oci.tar)
# Load the archive with `docker load -i`, `kind load image-archive` or `ctr images import`.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bin=oxcd
kind=()
default_tag=oxcd:dev
if [ "${1:-}" = "--operator" ]; then
    shift
    bin=oxcd-operator
    kind=(--operator)
    default_tag=oxcd-operator:dev
fi
tag="${1:-$default_tag}"
if [ -z "${OXCD:-}" ]; then
    cargo build --release --bin "$bin" --manifest-path "$repo/Cargo.toml"
    OXCD="$repo/target/release/$bin"
fi
out="${OUT:-$repo/target/images/$(echo "$tag" | tr ':/' '--').oci.tar}"
mkdir -p "$(dirname "$out")"
# Stripped, as a copy: the binary under test stays as cargo built it.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$OXCD" "$work/$bin"
strip "$work/$bin" 2>/dev/null || true
python3 "$repo/scripts/oci-image.py" build "${kind[@]}" --binary "$work/$bin" --tag "$tag" --out "$out"
