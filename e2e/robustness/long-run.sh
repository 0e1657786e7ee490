#!/usr/bin/env bash
# The long run: every scenario of etcd's robustness suite, COUNT times each (default 5, each
# run with the suite's own random choices), against oxcd with its failpoints and against etcd
# 3.6 with gofail's, one after the other on this machine. Writes results-oxcd.tsv,
# results-etcd-3.6.tsv and table.md beside this script (the table goes into
# docs/CONFORMANCE.md); histories of failed runs stay under target/robustness-3.6/.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
COUNT="${1:-5}"
OXCD="$("$HERE/oxcd-failpoints.sh")"
ETCD="$("$REPO/e2e/etcd-ref/bin.sh" 3.6 etcd-failpoints)"
status=0
"$HERE/run.sh" --server "$OXCD" --count "$COUNT" --out "$REPO/target/robustness-3.6/long-oxcd" || status=1
"$HERE/run.sh" --server "$ETCD" --count "$COUNT" --out "$REPO/target/robustness-3.6/long-etcd" || status=1
cp "$REPO/target/robustness-3.6/long-oxcd/results.tsv" "$HERE/results-oxcd.tsv"
cp "$REPO/target/robustness-3.6/long-etcd/results.tsv" "$HERE/results-etcd-3.6.tsv"
python3 "$HERE/table.py" "$HERE/results-oxcd.tsv" "$HERE/results-etcd-3.6.tsv" \
  "$(git -C "$REPO" rev-parse --short HEAD)" > "$HERE/table.md"
cat "$HERE/table.md"
exit $status
