#!/usr/bin/env bash
# Starts a 3-member oxcd cluster on this machine, like etcd's Procfile:
# clients on 127.0.0.1:2379, :22379, :32379; peers on :2380, :22380, :32380.
# Data goes to ./infra1.oxcd, ./infra2.oxcd, ./infra3.oxcd in the current directory.
# Ctrl-C stops all three.
#   OXCD=path/to/oxcd  use that binary instead of building one
#   BASE=20000         shift every port by this much (to run beside another cluster)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${OXCD:-}" ]; then
    cargo build --release --bin oxcd --manifest-path "$repo/Cargo.toml"
    OXCD="$repo/target/release/oxcd"
fi
base=${BASE:-0}
port() { echo $(( $1 + base )); }
cluster="infra1=http://127.0.0.1:$(port 2380),infra2=http://127.0.0.1:$(port 22380),infra3=http://127.0.0.1:$(port 32380)"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' INT TERM EXIT
i=0
for c in 2379 22379 32379; do
    i=$((i + 1))
    p=$((c + 1))
    "$OXCD" --name "infra$i" \
        --listen-client-urls "http://127.0.0.1:$(port $c)" --advertise-client-urls "http://127.0.0.1:$(port $c)" \
        --listen-peer-urls "http://127.0.0.1:$(port $p)" --initial-advertise-peer-urls "http://127.0.0.1:$(port $p)" \
        --initial-cluster "$cluster" --initial-cluster-token oxcd-cluster-1 --initial-cluster-state new \
        "${@}" &
    pids+=($!)
done
echo "cluster running: ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:$(port 2379),127.0.0.1:$(port 22379),127.0.0.1:$(port 32379) member list"
wait
