//! Every shipped manifest (deploy/ rendered by kustomize, the examples) and the objects the
//! operator builds for each example, validated against Kubernetes' schemas and the CRD's
//! schema by `tests/validate_manifests.py` (kubectl and kubernetes-validate, installed by
//! scripts/test.sh), and the Helm chart linted and rendered by helm with several sets of values.
//! Also: the Helm chart's RBAC grants exactly what deploy/ grants.

use std::process::Command;

#[test]
fn shipped_and_rendered_manifests_are_valid() {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/validate_manifests.py"
        ))
        .arg(repo)
        .arg(env!("CARGO_BIN_EXE_oxcd-operator"))
        .output()
        .expect("python3 is required");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    println!("{text}");
}

#[test]
fn chart_rbac_matches_deploy_rbac() {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let rules = |text: &str| -> String {
        text.split("rules:\n")
            .nth(1)
            .unwrap_or_default()
            .split("---")
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let deploy = std::fs::read_to_string(format!("{repo}/deploy/base/rbac.yaml")).unwrap();
    let chart = std::fs::read_to_string(format!("{repo}/charts/oxcd-operator/templates/rbac.yaml"))
        .unwrap();
    assert!(!rules(&deploy).is_empty());
    assert_eq!(
        rules(&chart),
        rules(&deploy),
        "the chart's ClusterRole drifted from deploy/base/rbac.yaml"
    );
}
