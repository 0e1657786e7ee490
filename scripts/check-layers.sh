#!/usr/bin/env bash
# The server's layers (docs/ARCHITECTURE.md, "Layers"): prints each import from a higher layer
# (or by a module no layer lists) and any import circle, and fails if there is one.
set -euo pipefail
cd "$(dirname "$0")/../server/src"
layer() { case $1 in
  error|pb|duration|version|features|listener|log|tls|tls/*|failpoint|metrics) echo 0 ;;
  schema|wal|mvcc|mvcc/*|snapshot|snapshot/bolt|snapshot/reader) echo 1 ;;
  membership|transport|raft_node) echo 2 ;;
  etcdserver|etcdserver/*|txn|lease|auth|auth/*|watch|corrupt) echo 3 ;;
  config|config/*|snapshot/etcd_dir|snapshot/restore) echo 3 ;;
  api|api/*|grpc_proxy|proxy) echo 4 ;;
  main|lib|fuzzing|benchmark|benchmark/*|snapshot/cli) echo 5 ;;
  *) echo 9 ;;
esac; }
# "<layer of importer> <layer of imported> <importer> <imported>" for every crate:: path;
# a path names a file (crate::snapshot::bolt) or an item of a module (crate::mvcc::Store).
deps() {
  grep -rno 'crate::[a-z_]*\(::[a-z_]*\)\?' --include=*.rs . |
  while IFS=: read -r f _ m; do
    s=${f#./}; s=${s%.rs}; s=${s%/mod}
    t=${m#crate::}; t=${t/::/\/}; t=${t%/}
    [ -e "$t.rs" ] || [ -e "$t/mod.rs" ] || t=${t%%/*}
    echo "$(layer "$s") $(layer "$t") $s $t"
  done | sort -u
}
up=$(deps | awk '$2 > $1 || $1 == 9 { print $3, "->", $4, "(layer", $1, "->", $2 ")" }')
circle=$(deps | cut -d" " -f3,4 | tsort 2>&1 >/dev/null || true)
[ -z "$up$circle" ] || { printf "%s\n" "$up" "$circle" | sed "/^$/d" >&2; exit 1; }
