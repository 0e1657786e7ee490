#!/usr/bin/env bash
# The operator on a real Kubernetes cluster (kind). See README.md in this directory.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
name=oxcd-e2e
ns=e2e
for tool in docker kind kubectl helm cargo; do
    command -v "$tool" >/dev/null || { echo "run.sh needs $tool" >&2; exit 2; }
done
cleanup() { [ -n "${KEEP:-}" ] || kind delete cluster --name "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
step() { echo; echo "=== $*"; }
wait_for() { # wait_for <seconds> <description> <command...>
    local secs="$1" what="$2"; shift 2
    for _ in $(seq "$secs"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
    echo "timed out: $what" >&2
    kubectl -n "$ns" get etcdc,sts,pods -o wide >&2 || true
    kubectl -n "$ns" get etcdc demo -o yaml >&2 || true
    exit 1
}
ready_members() { # ready_members <n>
    [ "$(kubectl -n "$ns" get etcdc demo -o jsonpath='{.status.phase}/{.status.readyReplicas}')" = "Running/$1" ]
}
etcdctl() { kubectl -n "$ns" exec writer -- etcdctl --endpoints=http://demo:2379 "$@"; }

step "kind cluster and images"
kind create cluster --name "$name" --wait 120s
# OCI archives (no Docker engine needed to build them); kind imports them into its nodes.
images="$(mktemp -d)"
OUT="$images/1.tar" "$repo/scripts/build-image.sh" oxcd:e2e-1
OUT="$images/2.tar" OXCD="$repo/target/release/oxcd" "$repo/scripts/build-image.sh" oxcd:e2e-2
OUT="$images/op.tar" "$repo/scripts/build-image.sh" --operator oxcd-operator:e2e
for a in 1 2 op; do kind load image-archive --name "$name" "$images/$a.tar"; done

step "helm install"
helm lint "$repo/charts/oxcd-operator"
helm template oxcd-operator "$repo/charts/oxcd-operator" -n oxcd-system | kubectl apply --dry-run=server -f - >/dev/null
helm install oxcd-operator "$repo/charts/oxcd-operator" -n oxcd-system --create-namespace \
    --set image.repository=oxcd-operator --set image.tag=e2e --set image.pullPolicy=Never --wait
kubectl create namespace "$ns"

step "the example cluster"
sed 's/version: "0.1.0"/image: oxcd:e2e-1/' "$repo/deploy/examples/minimal.yaml" | kubectl -n "$ns" apply -f -
wait_for 300 "3 ready members" ready_members 3

step "writer"
# etcdctl from the Debian image of the runner's own etcd-client would do; a tiny pod is simpler.
kubectl -n "$ns" run writer --image=quay.io/coreos/etcd:v3.4.23 --restart=Never --command -- \
    sh -c 'i=0; while [ $i -lt 100000 ]; do etcdctl --endpoints=http://demo:2379 put w/$i v$i >/dev/null 2>&1 && echo $i; i=$((i+1)); sleep 0.05; done'
wait_for 120 "writer running" kubectl -n "$ns" wait --for=condition=Ready pod/writer --timeout=1s

step "scale 3 -> 1 -> 3 -> 5 -> 3"
for n in 1 3 5 3; do
    kubectl -n "$ns" scale etcdcluster demo --replicas=$n
    wait_for 600 "$n ready members" ready_members $n
done

step "rolling upgrade, leader last"
leader="$(kubectl -n "$ns" get etcdc demo -o jsonpath='{.status.leader}')"
kubectl -n "$ns" patch etcdc demo --type merge -p '{"spec":{"image":"oxcd:e2e-2"}}'
wait_for 900 "upgrade" sh -c "[ \"\$(kubectl -n $ns get etcdc demo -o jsonpath='{.status.phase}/{.status.currentVersion}')\" = Running/e2e-2 ]"
last="$(kubectl -n "$ns" get pods -l app.kubernetes.io/instance=demo --sort-by=.metadata.creationTimestamp -o jsonpath='{.items[-1].metadata.name}')"
[ "$last" = "$leader" ] || { echo "the last restarted pod is $last, the leader was $leader" >&2; exit 1; }

step "delete the leader pod"
leader="$(kubectl -n "$ns" get etcdc demo -o jsonpath='{.status.leader}')"
kubectl -n "$ns" delete pod "$leader"
sleep 5
wait_for 300 "healthy after losing the leader" ready_members 3

step "a member whose volume is lost is replaced"
leader="$(kubectl -n "$ns" get etcdc demo -o jsonpath='{.status.leader}')"
follower="$(kubectl -n "$ns" get etcdc demo -o jsonpath='{.status.members[*].name}' | tr ' ' '\n' | grep -vx "$leader" | head -1)"
kubectl -n "$ns" delete pvc "data-$follower" --wait=false
kubectl -n "$ns" delete pod "$follower"
wait_for 300 "ReplaceMember event" sh -c "kubectl -n $ns get events --field-selector reason=ReplaceMember -o name | grep -q ."
wait_for 600 "healthy after the replacement" ready_members 3

step "nothing acknowledged was lost"
kubectl -n "$ns" delete pod writer --wait=false
sleep 2
kubectl -n "$ns" logs writer > /tmp/oxcd-e2e-acked.txt || true
acked="$(wc -l < /tmp/oxcd-e2e-acked.txt)"
kubectl -n "$ns" run reader --image=quay.io/coreos/etcd:v3.4.23 --restart=Never --rm -i --command -- \
    etcdctl --endpoints=http://demo:2379 get w/ --prefix --keys-only | grep -v '^$' | sed 's#^w/##' | sort > /tmp/oxcd-e2e-stored.txt
missing="$(sort /tmp/oxcd-e2e-acked.txt | comm -23 - /tmp/oxcd-e2e-stored.txt | wc -l)"
echo "acknowledged $acked, missing $missing"
[ "$acked" -gt 0 ] && [ "$missing" -eq 0 ]

step "backup to MinIO"
kubectl -n "$ns" apply -f "$(dirname "$0")/minio.yaml"
kubectl -n "$ns" rollout status deploy/minio --timeout=180s
kubectl -n "$ns" run mkbucket --image=quay.io/minio/mc:RELEASE.2024-10-08T09-37-26Z --restart=Never --rm -i --command -- \
    sh -c 'mc alias set m http://minio:9000 oxcd oxcd-secret-key && mc mb m/oxcd-backups'
kubectl -n "$ns" patch etcdc demo --type merge -p \
    '{"spec":{"backup":{"destination":"s3://oxcd-backups/e2e","credentialsSecret":"minio-credentials","request":"1"}}}'
wait_for 300 "a verified backup" sh -c "[ \"\$(kubectl -n $ns get etcdc demo -o jsonpath='{.status.lastSuccessfulBackup.request}')\" = 1 ]"
kubectl -n "$ns" get etcdc demo -o jsonpath='{.status.lastSuccessfulBackup}'; echo

step "restore into a new cluster"
url="$(kubectl -n "$ns" get etcdc demo -o jsonpath='{.status.lastSuccessfulBackup.url}')"
rev="$(kubectl -n "$ns" get etcdc demo -o jsonpath='{.status.lastSuccessfulBackup.revision}')"
kubectl -n "$ns" apply -f - <<YAML
apiVersion: oxcd.io/v1alpha1
kind: EtcdCluster
metadata: {name: restored}
spec:
  replicas: 3
  image: oxcd:e2e-2
  restore: {source: "$url", credentialsSecret: minio-credentials}
YAML
wait_for 600 "restored cluster" sh -c "[ \"\$(kubectl -n $ns get etcdc restored -o jsonpath='{.status.phase}/{.status.readyReplicas}')\" = Running/3 ]"
dump() { kubectl -n "$ns" run "dump-$1" --image=quay.io/coreos/etcd:v3.4.23 --restart=Never --rm -i --command -- \
    etcdctl --endpoints="http://$1:2379" get w/ --prefix -w json | tr ',' '\n' | grep -E '"(key|value|create_revision|mod_revision|version)"' ; }
# The restored cluster starts at the backup's revision.
got_rev="$(kubectl -n "$ns" run rev --image=quay.io/coreos/etcd:v3.4.23 --restart=Never --rm -i --command -- \
    etcdctl --endpoints=http://restored:2379 endpoint status -w json | grep -o '"revision":[0-9]*' | head -1 | cut -d: -f2)"
[ "$got_rev" = "$rev" ] || { echo "restored revision $got_rev, backup revision $rev" >&2; exit 1; }
# No writes reached the source after the writer stopped, so both hold the same keys.
dump demo > /tmp/oxcd-e2e-source.txt
dump restored > /tmp/oxcd-e2e-restored.txt
[ -s /tmp/oxcd-e2e-restored.txt ] && diff /tmp/oxcd-e2e-source.txt /tmp/oxcd-e2e-restored.txt

echo; echo "kind e2e: all steps passed"
