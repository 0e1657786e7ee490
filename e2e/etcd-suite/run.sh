#!/usr/bin/env bash
# Runs etcd's own end-to-end test suite against a chosen server binary: etcd 3.4's
# (go.etcd.io/etcd/tests/e2e, as shipped by Debian's golang-etcd-server-dev) or, with
# --etcd 3.6, etcd 3.6's (go.etcd.io/etcd/tests/v3, packages e2e and common, from the Go
# module pinned in v3.6/). See README.md beside this file.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

ETCD_SRC=/usr/share/gocode/src/go.etcd.io/etcd
CERT_DIR="$ETCD_SRC/integration/fixtures"

SUITE=3.4
SERVER="$REPO/target/release/oxcd"
TESTS_FILE=""
TIMEOUT=120
OUT=""
CACHE=""
FILTER=""
RETRIES=0
REBUILD=0
KEEP=0
LAST_RELEASE=""
ETCDCTL=""
ETCDUTL=""
EXPECT_DEBUG=1

usage() {
  cat <<'EOF'
usage: e2e/etcd-suite/run.sh [options]
  --etcd 3.4|3.6       which etcd release's suite (default 3.4)
  --server PATH        server binary run as `etcd` (default: target/release/oxcd;
                       /usr/bin/etcd runs the reference etcd 3.4, and
                       `e2e/etcd-ref/bin.sh 3.6 etcd` the reference etcd 3.6)
  --tests FILE         test names to run, one per line ('#' comments and blank
                       lines ignored); default: every test in the suite minus the
                       default exclusions (see EXCLUDED in this script)
  --filter REGEX       only run tests (of the list) whose name matches REGEX (grep -E)
  --timeout SECONDS    per-test timeout (default 120)
  --retries N          rerun a failed test up to N times; a later pass is
                       recorded as "flaky" and counted as passed (default 0)
  --out DIR            output dir: results.tsv, summary.txt, logs/ (default:
                       target/etcd-e2e/out-<server name>)
  --cache DIR          build cache (default: target/etcd-e2e, target/etcd-e2e-3.6)
  --rebuild            rebuild the e2e test binary even if cached
  --last-release PATH  binary used as bin-dir/etcd-last-release (TestReleaseUpgrade*;
                       without it those tests skip themselves)
  --etcdctl PATH       etcdctl used by the tests (default: the suite's release,
                       /usr/bin/etcdctl or etcdctl 3.6 from e2e/etcd-ref)
  --etcdutl PATH       etcdutl used by the 3.6 suite (default: etcdutl 3.6 for an
                       etcd server; for oxcd the server binary itself, whose
                       `snapshot` subcommands are its offline tools)
  --keep               keep per-test work/tmp dirs
  --no-process-output  do not copy the spawned servers'/etcdctl's output into
                       the logs (EXPECT_DEBUG; on by default)
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --etcd) SUITE="$2"; shift 2 ;;
    --server) SERVER="$2"; shift 2 ;;
    --tests) TESTS_FILE="$2"; shift 2 ;;
    --filter) FILTER="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --retries) RETRIES="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --cache) CACHE="$2"; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    --last-release) LAST_RELEASE="$2"; shift 2 ;;
    --etcdctl) ETCDCTL="$2"; shift 2 ;;
    --etcdutl) ETCDUTL="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --no-process-output) EXPECT_DEBUG=; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done

case "$SUITE" in 3.4|3.6) ;; *) echo "--etcd: 3.4 or 3.6, not $SUITE" >&2; exit 2 ;; esac
[ -n "$CACHE" ] || { if [ "$SUITE" = 3.4 ]; then CACHE="$REPO/target/etcd-e2e"; else CACHE="$REPO/target/etcd-e2e-$SUITE"; fi; }

# Tests left out of the default list (an explicit --tests FILE runs what it names).
#   v2 API: oxcd serves only the v3 API; these drive ETCDCTL_API=2 etcdctl or
#   curl /v2/keys against a server started with --enable-v2.
#   bbolt editing: the test opens a member's member/snap/db with the bbolt
#   library and rewrites it, which assumes etcd's on-disk backend format.
if [ "$SUITE" = 3.4 ]; then
EXCLUDED_PATTERNS=(
  '^TestCtlV2'          # ctl_v2_test.go: etcdctl v2 (set/mk/rm/ls/watch/user/role/backup/cluster-health)
  '^TestV2Curl'         # v2_curl_test.go: curl against /v2/keys
  '^TestCtlV3Migrate$'  # writes keys with ETCDCTL_API=2, then `etcdctl migrate` of the v2 store in the data dir
  '^TestEtcdCorruptHash$' # rewrites member/snap/db with bbolt, expects the corruption check to catch it
)
else
EXCLUDED_PATTERNS=(
  # corrupt_test.go: opens a member's member/snap/db with bbolt and rewrites keys or the
  # consistent index, expecting the corruption checks to catch it (etcd's backend file).
  '^TestEtcdCorruptHash$'
  '^TestPeriodicCheckDetectsCorruption'
  '^TestCompactHashCheckDetectCorruption(WithFeatureGate)?$'
  # utl_migrate_test.go: etcdutl migrate rewrites the storage version inside bbolt.
  '^TestEtctlutlMigrate$'
)
fi

log() { echo "[etcd-suite] $*" >&2; }

# ---------------------------------------------------------------- packages
need_pkgs=()
command -v go >/dev/null 2>&1 || need_pkgs+=(golang-go)
if [ "$SUITE" = 3.4 ]; then
  [ -d "$ETCD_SRC/tests/e2e" ] || need_pkgs+=(golang-etcd-server-dev)
  [ -x /usr/bin/etcdctl ] || need_pkgs+=(etcd-client)
  [ -x /usr/bin/etcd ] || need_pkgs+=(etcd-server)
fi
command -v timeout >/dev/null 2>&1 || need_pkgs+=(coreutils)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# ---------------------------------------------------------------- build
# One test binary per Go package of the suite: PKGS names them, <pkg>.test in the cache.
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
if [ "$SUITE" = 3.4 ]; then
  PKGS=(e2e)
  if [ "$REBUILD" = 1 ] || [ ! -x "$CACHE/e2e.test" ]; then
    log "building $CACHE/e2e.test (GOPATH mode, Debian sources)"
    mkdir -p "$CACHE/gopath/src" "$CACHE/gocache"
    t0=$(date +%s)
    ( cd "$CACHE" &&
      GOPATH="$CACHE/gopath:/usr/share/gocode" GO111MODULE=off GOFLAGS= GOPROXY=off \
      GOCACHE="$CACHE/gocache" \
      go test -c go.etcd.io/etcd/tests/e2e -o "$CACHE/e2e.test.tmp" ) >&2
    mv "$CACHE/e2e.test.tmp" "$CACHE/e2e.test"
    log "built in $(( $(date +%s) - t0 ))s"
  fi
  [ -n "$ETCDCTL" ] || ETCDCTL=/usr/bin/etcdctl
else
  # etcd's own Makefile runs both packages with the e2e build tag (tests/common runs its
  # scenarios on the e2e framework with it).
  PKGS=(e2e common)
  MOD="$HERE/v$SUITE"
  for pkg in "${PKGS[@]}"; do
    if [ "$REBUILD" = 1 ] || [ ! -x "$CACHE/$pkg.test" ]; then
      log "building $CACHE/$pkg.test (module $MOD)"
      t0=$(date +%s)
      ( cd "$MOD" && GOFLAGS=-mod=readonly go test -c -tags e2e \
          "go.etcd.io/etcd/tests/v3/$pkg" -o "$CACHE/$pkg.test.tmp" ) >&2
      mv "$CACHE/$pkg.test.tmp" "$CACHE/$pkg.test"
      log "built in $(( $(date +%s) - t0 ))s"
    fi
  done
  # The certificates the tests name (../fixtures from the package dir), from the same module.
  TESTS_MOD_DIR="$(cd "$MOD" && GOFLAGS=-mod=readonly go list -m -f '{{.Dir}}' go.etcd.io/etcd/tests/v3)"
  CERT_DIR="$TESTS_MOD_DIR/fixtures"
  [ -n "$ETCDCTL" ] || ETCDCTL="$("$REPO/e2e/etcd-ref/bin.sh" "$SUITE" etcdctl)"
fi

# ---------------------------------------------------------------- inputs
case "$SERVER" in /*) ;; *) SERVER="$(pwd)/$SERVER" ;; esac
[ -x "$SERVER" ] || { echo "server binary not found or not executable: $SERVER" >&2; exit 2; }
[ -x "$ETCDCTL" ] || { echo "etcdctl not found: $ETCDCTL" >&2; exit 2; }

if [ -z "$OUT" ]; then OUT="$CACHE/out-$(basename "$SERVER")"; fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -rf "$OUT/logs" "$OUT/bin" "$OUT/work"
mkdir -p "$OUT/logs" "$OUT/bin" "$OUT/work"

# The suite runs <bin-dir>/etcd and <bin-dir>/etcdctl. Copy the server so a
# rebuild during the run does not swap the binary under the suite.
BIN="$OUT/bin"
cp "$SERVER" "$BIN/etcd"
ln -s "$ETCDCTL" "$BIN/etcdctl"
if [ -n "$LAST_RELEASE" ]; then cp "$LAST_RELEASE" "$BIN/etcd-last-release"; fi
if [ "$SUITE" != 3.4 ]; then
  if [ -z "$ETCDUTL" ]; then
    # oxcd's offline tools are its own subcommands (`oxcd snapshot status|restore`, as
    # `etcdutl snapshot ...` is called); an etcd server comes with its release's etcdutl.
    if "$SERVER" --version 2>/dev/null | grep -q '^oxcd'; then ETCDUTL="$BIN/etcd"
    else ETCDUTL="$("$REPO/e2e/etcd-ref/bin.sh" "$SUITE" etcdutl)"; fi
  fi
  ln -s "$ETCDUTL" "$BIN/etcdutl"
fi

# Every test of every package, as "<pkg> <Test>" (names are unique across the packages).
PKG_OF="$OUT/tests-by-package"
for pkg in "${PKGS[@]}"; do
  "$CACHE/$pkg.test" -test.list '.*' | grep '^Test' | sed "s/^/$pkg /"
done > "$PKG_OF"
ALL_TESTS="$(cut -d' ' -f2 "$PKG_OF")"
if [ -n "$TESTS_FILE" ]; then
  TESTS="$(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$TESTS_FILE" | grep -v '^$' || true)"
  unknown="$(comm -23 <(echo "$TESTS" | sort -u) <(echo "$ALL_TESTS" | sort -u) | grep -v '^$' || true)"
  [ -z "$unknown" ] || log "warning: not in the suite: $(echo $unknown)"
else
  TESTS="$ALL_TESTS"
  for p in "${EXCLUDED_PATTERNS[@]}"; do
    TESTS="$(echo "$TESTS" | grep -Ev "$p" || true)"
  done
fi
if [ -n "$FILTER" ]; then TESTS="$(echo "$TESTS" | grep -E "$FILTER" || true)"; fi
TESTS="$(echo "$TESTS" | grep -v '^$' || true)"
ntests=$(echo -n "$TESTS" | grep -c . || true)
log "server: $SERVER ($(timeout 5 "$SERVER" --version 2>/dev/null | head -1 || true))"
log "running $ntests tests, timeout ${TIMEOUT}s each, output in $OUT"

# Kill processes left by a test: anything started from our private bin dir.
cleanup_strays() {
  local pid cmd0 exe
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    cmd0="$(tr '\0' '\n' 2>/dev/null < "$d/cmdline" | head -1)" || continue
    exe="$(readlink "$d/exe" 2>/dev/null || true)"
    case "$cmd0" in
      "$BIN"/*) kill -9 "$pid" 2>/dev/null || true ;;
      *) [ "$exe" = "$BIN/etcd" ] && kill -9 "$pid" 2>/dev/null || true ;;
    esac
  done
}

# run_one NAME LOGFILE -> echoes "result seconds"
run_one() {
  local name="$1" logf="$2" wd rc t0 t1 res
  wd="$OUT/work/$name"
  pkg="$(awk -v n="$name" '$2 == n {print $1; exit}' "$PKG_OF")"
  rm -rf "$wd"
  # The work dir is laid out like etcd's source tree around the package dir.
  mkdir -p "$wd/tmp" "$wd/tests/$pkg" "$wd/integration"
  # 3.4: the JWT configs name ../../integration/fixtures/server.{crt,key.insecure};
  # 3.6: the framework reads ../fixtures.
  ln -s "$CERT_DIR" "$wd/integration/fixtures"
  ln -s "$CERT_DIR" "$wd/tests/fixtures"
  # TestEtcdExampleConfig reads ../../etcd.conf.yml.sample (relative to the
  # package dir); Debian does not ship etcd's sample, so write an equivalent.
  cat > "$wd/etcd.conf.yml.sample" <<'EOF'
name: 'default'
data-dir:
wal-dir:
snapshot-count: 10000
heartbeat-interval: 100
election-timeout: 1000
quota-backend-bytes: 0
listen-peer-urls: http://localhost:2380
listen-client-urls: http://localhost:2379
max-snapshots: 5
max-wals: 5
cors:
initial-advertise-peer-urls: http://localhost:2380
advertise-client-urls: http://localhost:2379
discovery:
discovery-fallback: 'proxy'
discovery-proxy:
discovery-srv:
initial-cluster:
initial-cluster-token: 'etcd-cluster'
initial-cluster-state: 'new'
strict-reconfig-check: false
enable-pprof: true
proxy: 'off'
proxy-failure-wait: 5000
proxy-refresh-interval: 30000
proxy-dial-timeout: 1000
proxy-write-timeout: 5000
proxy-read-timeout: 0
client-transport-security:
  cert-file:
  key-file:
  client-cert-auth: false
  trusted-ca-file:
  auto-tls: false
peer-transport-security:
  cert-file:
  key-file:
  client-cert-auth: false
  trusted-ca-file:
  auto-tls: false
debug: false
logger: zap
log-outputs: [stderr]
force-new-cluster: false
auto-compaction-mode: periodic
auto-compaction-retention: "1"
EOF
  t0=$(date +%s.%N)
  set +e
  # ETCDCTL_API is unset: etcdctl 3.4 then speaks v3, and etcdctl 3.6 warns of it on every
  # call (output the tests match).
  ( cd "$wd/tests/$pkg" &&
    env -u ETCDCTL_API TMPDIR="$wd/tmp" EXPECT_DEBUG=$EXPECT_DEBUG \
    timeout -k 10 $((TIMEOUT + 30)) "$CACHE/$pkg.test" -test.v -test.count=1 \
      -test.run "^${name}\$" -test.timeout "${TIMEOUT}s" \
      -bin-dir "$BIN" -cert-dir "$CERT_DIR" ) > "$logf" 2>&1 < /dev/null
  rc=$?
  set -e
  t1=$(date +%s.%N)
  cleanup_strays
  # go test's verdict lines can follow a process's last output on the same line (curl's
  # answers end without a newline), so they are matched anywhere in a line.
  if grep -q -- "--- FAIL: ${name} " "$logf"; then res=fail
  elif grep -q "^panic: test timed out" "$logf" || [ $rc = 124 ] || [ $rc = 137 ]; then res=timeout
  elif grep -q -- "--- SKIP: ${name} " "$logf" && [ $rc = 0 ]; then res=skip
  elif grep -q -- "--- PASS: ${name} " "$logf" && [ $rc = 0 ]; then res=pass
  elif grep -q -- "--- PASS: ${name} " "$logf"; then res=fail   # e.g. leaked goroutines after the test
  else res=fail
  fi
  [ "$KEEP" = 1 ] || rm -rf "$wd"
  awk -v r="$res" -v a="$t0" -v b="$t1" 'BEGIN{printf "%s %.1f\n", r, b-a}'
}

RESULTS="$OUT/results.tsv"
printf 'test\tresult\tseconds\n' > "$RESULTS"
npass=0; nfail=0; nskip=0
start=$(date +%s)
printf '%-60s %-8s %8s\n' TEST RESULT SECONDS
while IFS= read -r name; do
  [ -n "$name" ] || continue
  read -r res secs < <(run_one "$name" "$OUT/logs/$name.log")
  tries=0
  while { [ "$res" = fail ] || [ "$res" = timeout ]; } && [ "$tries" -lt "$RETRIES" ]; do
    tries=$((tries + 1))
    mv "$OUT/logs/$name.log" "$OUT/logs/$name.try$tries.log"
    read -r res2 secs2 < <(run_one "$name" "$OUT/logs/$name.log")
    secs="$secs2"
    if [ "$res2" = pass ]; then res=flaky; else res="$res2"; fi
  done
  case "$res" in
    pass|flaky) npass=$((npass + 1)) ;;
    skip) nskip=$((nskip + 1)) ;;
    *) nfail=$((nfail + 1)) ;;
  esac
  printf '%-60s %-8s %8s\n' "$name" "$res" "$secs"
  printf '%s\t%s\t%s\n' "$name" "$res" "$secs" >> "$RESULTS"
done <<< "$TESTS"

[ "$KEEP" = 1 ] || rm -rf "$OUT/work"
elapsed=$(( $(date +%s) - start ))
{
  echo "suite: etcd $SUITE, server: $SERVER"
  echo "tests: $ntests, wall time: ${elapsed}s"
  echo "$npass passed, $nfail failed, $nskip skipped"
} > "$OUT/summary.txt"
# What failed, and the end of each failed test's log, last: CI keeps only the tail of the output.
awk -F'\t' 'NR > 1 && $2 != "pass" && $2 != "skip" { print $1 "\t" $2 }' "$RESULTS" |
while IFS=$'\t' read -r name res; do
  echo "== $name: $res (last lines of $OUT/logs/$name.log)"
  if [ "$res" != flaky ]; then tail -n 25 "$OUT/logs/$name.log" | cut -c1-300; fi
done
echo "wall time: ${elapsed}s; results: $RESULTS"
echo "$npass passed, $nfail failed, $nskip skipped"
[ "$nfail" -eq 0 ]
