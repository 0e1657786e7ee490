#!/usr/bin/env bash
# Builds oxcd with its failpoints (cargo feature `failpoints`) and prints the binary's path:
# target/release/oxcd-failpoints. target/release/oxcd is left as the build without them.
#
# Built as `cargo test --workspace --no-run` builds the server for the integration tests (one
# small test target), so that the dependencies keep the features `scripts/test.sh`'s `cargo
# test --workspace` compiled them with: a plain `cargo build -p oxcd` resolves them without the
# dev-dependencies' and the operator's features and compiles part of them again.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
cargo test --workspace --release --features oxcd/failpoints --no-run --test config_file >&2
cp target/release/oxcd target/release/oxcd-failpoints.tmp
mv target/release/oxcd-failpoints.tmp target/release/oxcd-failpoints
# Cargo keeps both builds of the crate, so this only puts the plain binary back in place.
cargo test --workspace --release --no-run --test config_file >&2
echo "$REPO/target/release/oxcd-failpoints"
