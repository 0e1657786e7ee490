#!/usr/bin/env bash
# Runs etcd's robustness suite (go.etcd.io/etcd/tests/v3/robustness, built from the Go module
# pinned in v3.6/) against a server binary: traffic, injected faults, and every history checked
# with Porcupine and etcd's watch guarantees. See README.md beside this file.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
MOD="$HERE/v3.6"

SERVER="$REPO/target/release/oxcd"
SCENARIOS=()
COUNT=1
TIMEOUT=600
OUT=""
CACHE="$REPO/target/robustness-3.6"
FIXED_SEED=0
ETCDCTL=""

usage() {
  cat <<'EOF'
usage: e2e/robustness/run.sh [options]
  --server PATH      server binary run as `etcd` (default: target/release/oxcd;
                     `e2e/etcd-ref/bin.sh 3.6 etcd` runs the reference etcd 3.6)
  --scenario NAME    a test of the suite: TestRobustnessRegression/Issue15220,
                     TestRobustnessExploratory/KubernetesHighTraffic/ClusterOfSize3, ...
                     (a go test -run pattern, anchored per level); repeatable.
                     Default: every scenario of both tests (see --list)
  --list             print the scenarios and exit
  --count N          run each scenario N times (default 1)
  --fixed-seed       GODEBUG=randautoseed=0: the suite's math/rand choices (the failpoint an
                     exploratory scenario picks, traffic keys and timings) start from seed 1
                     every run; cluster options drawn from math/rand/v2 still vary
  --timeout SECONDS  per run (default 600)
  --out DIR          results.tsv, summary.txt, logs/, histories/ (default:
                     target/robustness-3.6/out-<server name>)
  --etcdctl PATH     etcdctl in the bin dir (default: etcdctl 3.6 from e2e/etcd-ref)
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --server) SERVER="$2"; shift 2 ;;
    --scenario) SCENARIOS+=("$2"); shift 2 ;;
    --list) LIST=1; shift ;;
    --count) COUNT="$2"; shift 2 ;;
    --fixed-seed) FIXED_SEED=1; shift ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --etcdctl) ETCDCTL="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done

log() { echo "[robustness] $*" >&2; }

# The scenarios of etcd 3.6.16's suite (scenarios/scenarios.go): four traffic profiles on one
# and three members (three with TLS between members through the suite's own peer proxy), and
# the regressions of etcd bugs the suite reproduces.
ALL_SCENARIOS=(
  TestRobustnessExploratory/EtcdHighTraffic/ClusterOfSize1
  TestRobustnessExploratory/EtcdTrafficDeleteLeases/ClusterOfSize1
  TestRobustnessExploratory/KubernetesHighTraffic/ClusterOfSize1
  TestRobustnessExploratory/KubernetesLowTraffic/ClusterOfSize1
  TestRobustnessExploratory/EtcdHighTraffic/ClusterOfSize3
  TestRobustnessExploratory/EtcdTrafficDeleteLeases/ClusterOfSize3
  TestRobustnessExploratory/KubernetesHighTraffic/ClusterOfSize3
  TestRobustnessExploratory/KubernetesLowTraffic/ClusterOfSize3
  TestRobustnessRegression/Issue14370
  TestRobustnessRegression/Issue14685
  TestRobustnessRegression/Issue13766
  TestRobustnessRegression/Issue15220
  TestRobustnessRegression/Issue17529
  TestRobustnessRegression/Issue17780
  TestRobustnessRegression/Issue19179
  TestRobustnessRegression/Issue18089
  TestRobustnessRegression/Issue15271
)
if [ "${LIST:-0}" = 1 ]; then printf '%s\n' "${ALL_SCENARIOS[@]}"; exit 0; fi
[ ${#SCENARIOS[@]} -gt 0 ] || SCENARIOS=("${ALL_SCENARIOS[@]}")

# ---------------------------------------------------------------- build
mkdir -p "$CACHE"
TEST_BIN="$CACHE/robustness.test"
if [ ! -x "$TEST_BIN" ] || [ "$MOD/go.sum" -nt "$TEST_BIN" ] || [ "$MOD/go.mod" -nt "$TEST_BIN" ]; then
  log "building $TEST_BIN (module $MOD)"
  t0=$(date +%s)
  ( cd "$MOD" && GOFLAGS=-mod=readonly go test -c -tags e2e \
      go.etcd.io/etcd/tests/v3/robustness -o "$TEST_BIN.tmp" ) >&2
  mv "$TEST_BIN.tmp" "$TEST_BIN"
  log "built in $(( $(date +%s) - t0 ))s"
fi
TESTS_MOD_DIR="$(cd "$MOD" && GOFLAGS=-mod=readonly go list -m -f '{{.Dir}}' go.etcd.io/etcd/tests/v3)"
CERT_DIR="$TESTS_MOD_DIR/fixtures"
[ -n "$ETCDCTL" ] || ETCDCTL="$("$REPO/e2e/etcd-ref/bin.sh" 3.6 etcdctl)"

# ---------------------------------------------------------------- inputs
case "$SERVER" in /*) ;; *) SERVER="$(pwd)/$SERVER" ;; esac
[ -x "$SERVER" ] || { echo "server binary not found or not executable: $SERVER" >&2; exit 2; }
[ -n "$OUT" ] || OUT="$CACHE/out-$(basename "$SERVER")"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -rf "$OUT/logs" "$OUT/bin" "$OUT/work" "$OUT/histories"
mkdir -p "$OUT/logs" "$OUT/bin" "$OUT/work" "$OUT/histories"
# The suite runs <bin-dir>/etcd; a copy keeps a rebuild from swapping it mid-run.
BIN="$OUT/bin"
cp "$SERVER" "$BIN/etcd"
ln -s "$ETCDCTL" "$BIN/etcdctl"
if "$SERVER" --version 2>/dev/null | grep -q '^oxcd'; then ln -s "$BIN/etcd" "$BIN/etcdutl"
else ln -s "$("$REPO/e2e/etcd-ref/bin.sh" 3.6 etcdutl)" "$BIN/etcdutl"; fi
log "server: $SERVER ($("$SERVER" --version 2>/dev/null | head -1))"

cleanup_strays() {
  local d pid exe
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    exe="$(readlink "$d/exe" 2>/dev/null || true)"
    [ "$exe" = "$BIN/etcd" ] && kill -9 "$pid" 2>/dev/null || true
  done
}

# The -run pattern for a scenario: each level anchored, so Issue1 does not match Issue13766.
pattern() { echo "$1" | awk -F/ '{ for (i = 1; i <= NF; i++) printf "%s^%s$", (i > 1 ? "/" : ""), $i }'; }

RESULTS="$OUT/results.tsv"
printf 'scenario\trun\tfailpoint\tresult\tseconds\n' > "$RESULTS"
npass=0; nfail=0
start=$(date +%s)
for scenario in "${SCENARIOS[@]}"; do
  for run in $(seq 1 "$COUNT"); do
   # A run that fails before its traffic starts is the framework's, not the server's (it reads
   # `etcd --version` through a pty and now and then gets no line back): tried again, twice.
   for attempt in 1 2 3; do
    safe="$(echo "$scenario" | tr '/' '_').$run"
    logf="$OUT/logs/$safe.log"
    wd="$OUT/work/$safe"
    mkdir -p "$wd/tmp" "$OUT/histories/$safe"
    env_seed=()
    [ "$FIXED_SEED" = 1 ] && env_seed=(GODEBUG=randautoseed=0)
    t0=$(date +%s)
    set +e
    ( cd "$wd" && env "${env_seed[@]}" TMPDIR="$wd/tmp" RESULTS_DIR="$OUT/histories/$safe" \
        timeout -k 10 $((TIMEOUT + 30)) "$TEST_BIN" -test.v -test.count=1 \
          -test.run "$(pattern "$scenario")" -test.timeout "${TIMEOUT}s" \
          -bin-dir "$BIN" -cert-dir "$CERT_DIR" ) > "$logf" 2>&1 < /dev/null
    rc=$?
    set -e
    secs=$(( $(date +%s) - t0 ))
    cleanup_strays
    # The leaf subtest names the failpoint an exploratory scenario picked.
    leaf="$(grep -E -- "--- (PASS|FAIL): ${scenario}(/| )" "$logf" | sed -E 's/.*--- (PASS|FAIL): ([^ ]+) .*/\2/' | awk '{ print length, $0 }' | sort -n | tail -1 | cut -d' ' -f2- || true)"
    failpoint="${leaf#"$scenario"}"; failpoint="${failpoint#/}"
    [ -n "$failpoint" ] || failpoint="$(grep -o '"failpoint": "[^"]*"' "$logf" | head -1 | cut -d'"' -f4 || true)"
    if [ $rc = 0 ] && grep -q -- "--- PASS: ${scenario}" "$logf" && ! grep -q -- "--- FAIL" "$logf"; then
      res=pass; npass=$((npass + 1))
      rm -rf "$OUT/histories/$safe"
    elif [ $rc = 0 ] && ! grep -q -- "--- PASS: ${scenario}" "$logf"; then
      res=missing; nfail=$((nfail + 1))
    else
      if [ $rc = 124 ] || [ $rc = 137 ] || grep -q "^panic: test timed out" "$logf"; then res=timeout; else res=fail; fi
      nfail=$((nfail + 1))
    fi
    rm -rf "$wd"
    if [ "$res" != pass ] && ! grep -q "Start traffic" "$logf" && [ "$attempt" -lt 3 ]; then
      mv "$logf" "$OUT/logs/$safe.setup$attempt.log"
      nfail=$((nfail - 1))
      continue
    fi
    break
   done
    printf '%-70s %-3s %-45s %-7s %5ss\n' "$scenario" "$run" "${failpoint:--}" "$res" "$secs"
    printf '%s\t%s\t%s\t%s\t%s\n' "$scenario" "$run" "${failpoint:--}" "$res" "$secs" >> "$RESULTS"
  done
done
rm -rf "$OUT/work"
elapsed=$(( $(date +%s) - start ))
{
  echo "robustness suite: etcd 3.6.16, server: $SERVER"
  echo "runs: $((npass + nfail)), wall time: ${elapsed}s"
  echo "$npass passed, $nfail failed"
} | tee "$OUT/summary.txt"
echo "results: $RESULTS; histories of failed runs: $OUT/histories"
[ "$nfail" -eq 0 ]
