#!/usr/bin/env bash
# Fuzzes every decoder a client or a peer reaches with libFuzzer (cargo-fuzz, nightly Rust):
# the targets in fuzz/fuzz_targets, each a function of oxcd::fuzzing. Every CI run already runs
# the same functions on mutated seeds for a few seconds each (cargo test, fuzzing::tests); this
# is the long run.
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 300)
# A crash leaves its input in fuzz/artifacts/<target>/; replay it with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
# and turn it into a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-300}"
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
for t in $(ls fuzz/fuzz_targets | sed 's/\.rs$//'); do
    echo "== $t: $secs s"
    cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=4096 2>&1 | tail -4
done
