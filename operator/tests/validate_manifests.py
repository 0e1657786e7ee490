#!/usr/bin/env python3
"""Validates every manifest the project ships, and the objects the operator builds, against
Kubernetes' schemas (kubernetes-validate) and the EtcdCluster CRD's own schema (jsonschema).

    validate_manifests.py <repo> <oxcd-operator binary>

Checked:
- deploy/base and each deploy/overlays/* as rendered by `kubectl kustomize`;
- deploy/examples/*.yaml: EtcdClusters against the generated CRD schema, the rest against
  Kubernetes' schemas;
- for each example EtcdCluster, the objects `oxcd-operator render` prints (ConfigMap,
  Services, PodDisruptionBudget, StatefulSet).
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

    for f in failures:
        print("FAIL", f)
    print(f"{checked} manifests checked, {len(failures)} failed")
    sys.exit(1 if failures or checked == 0 else 0)


if __name__ == "__main__":
    main()
