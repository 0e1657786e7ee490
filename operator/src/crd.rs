//! The `EtcdCluster` custom resource (`oxcd.io/v1alpha1`). `crds/` holds the YAML generated from
//! these types (`oxcd-operator crd`); a test fails when the two drift apart.

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The image repository used when only `spec.version` is given.
pub const DEFAULT_IMAGE_REPOSITORY: &str = "ghcr.io/oxcd/oxcd";

/// An etcd-compatible cluster of oxcd members, run as a StatefulSet.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "oxcd.io",
    version = "v1alpha1",
    kind = "EtcdCluster",
    namespaced,
    status = "EtcdClusterStatus",
    shortname = "etcdc",
    category = "oxcd",
    doc = "An etcd-compatible oxcd cluster: members, upgrades, leader placement and backups.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".status.currentVersion"
    ),
    printcolumn(name = "Leader", type_ = "string", json_path = ".status.leader"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EtcdClusterSpec {
    /// Number of members, 1 to 9. Odd sizes are recommended: an even size tolerates no more
    /// failures than the odd size below it.
    #[schemars(range(min = 1, max = 9))]
    pub replicas: i32,
    /// oxcd version (image tag of the default repository). Ignored when `image` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Full image reference; overrides `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    /// Volumes of the members. Fixed once the cluster exists (StatefulSet volume claim
    /// templates cannot change).
    #[serde(default)]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("storage is immutable; create a new cluster and restore a backup into it"))]
    pub storage: StorageSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodTemplateOverrides>,
    /// Extra etcd flags without the leading dashes, e.g. `quota-backend-bytes: "8589934592"`.
    /// Flags the operator owns (names, URLs, initial cluster, data dir, TLS files) are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,
    /// Bootstrap a new cluster from a snapshot. Only read when the cluster is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("restore is immutable: it only applies when the cluster is created"))]
    pub restore: Option<RestoreSpec>,
    /// Name of the member (pod) that should lead; the operator moves leadership to it when it
    /// is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_leader: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each member's volume (default 8Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// What happens to a member's volume when it is removed by a scale-down, and when the
    /// cluster is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<VolumeRetention>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRetention {
    /// `Delete` (default) or `Retain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when_scaled: Option<RetentionPolicy>,
    /// `Retain` (default) or `Delete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when_deleted: Option<RetentionPolicy>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetentionPolicy {
    Retain,
    Delete,
}

impl RetentionPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionPolicy::Retain => "Retain",
            RetentionPolicy::Delete => "Delete",
        }
    }
}

/// Pod settings merged into the members' pod template.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateOverrides {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Replaces the default affinity (which prefers spreading members over nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
}

/// TLS material from Secrets with `tls.crt`, `tls.key` and `ca.crt`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Secret for client-facing TLS; clients must present a certificate signed by its CA when
    /// `clientCertAuth` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    #[serde(default)]
    pub client_cert_auth: bool,
    /// Secret for member-to-member TLS (always mutually authenticated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_secret: Option<String>,
    /// Secret with the client certificate the operator itself presents (`tls.crt`, `tls.key`,
    /// `ca.crt`), needed with `clientCertAuth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_secret: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// Cron schedule in UTC (5 fields, e.g. `0 */6 * * *`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Where backups go: `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`
    /// or `file:///path` (a volume mounted into the operator).
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('s3://') || self.startsWith('gs://') || self.startsWith('az://') || self.startsWith('file:///')").message("destination must be an s3://, gs://, az:// or file:/// URL"))]
    pub destination: String,
    /// Secret whose keys are object store settings (e.g. `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<BackupRetention>,
    /// Change this to any new value to request a backup now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BackupRetention {
    /// Keep at most this many backups of this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_count: Option<u32>,
    /// Delete backups older than this many hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_age_hours: Option<u32>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSpec {
    /// URL of a snapshot (oxcd or etcd 3.4 format) to start the cluster from.
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EtcdClusterStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Creating, Running, Scaling, Upgrading, Degraded or QuorumLost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Members in the etcd member list (learners included).
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the member pods (for the scale subresource and autoscalers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
    /// Name of the leading member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<BackupRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_backup: Option<BackupRecord>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    pub name: String,
    /// Member ID in hex, as etcdctl prints it.
    pub id: String,
    #[serde(default)]
    pub client_url: String,
    #[serde(default)]
    pub peer_url: String,
    #[serde(default)]
    pub learner: bool,
    #[serde(default)]
    pub leader: bool,
    #[serde(default)]
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raft_index: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_size: Option<i64>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BackupRecord {
    /// RFC 3339 time the backup started.
    pub time: String,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub revision: i64,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub sha256: String,
    /// Keys (all buckets) in the snapshot, read back from the uploaded object.
    #[serde(default)]
    pub keys: u64,
    /// The `spec.backup.request` this backup answered, if it was requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(default)]
    pub succeeded: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl EtcdClusterSpec {
    /// The image members run.
    pub fn image(&self) -> String {
        match (&self.image, &self.version) {
            (Some(image), _) => image.clone(),
            (None, Some(v)) => format!("{DEFAULT_IMAGE_REPOSITORY}:{v}"),
            (None, None) => format!("{DEFAULT_IMAGE_REPOSITORY}:{}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// The version shown in status: `spec.version`, or the image tag.
    pub fn version_label(&self) -> String {
        if let (None, Some(v)) = (&self.image, &self.version) {
            return v.clone();
        }
        let image = self.image();
        image
            .rsplit_once(':')
            .filter(|(_, tag)| !tag.contains('/'))
            .map(|(_, tag)| tag.to_string())
            .unwrap_or(image)
    }
}

/// The CRDs as YAML documents, exactly as committed under `crds/`.
pub fn crd_yaml() -> String {
    let crd = EtcdCluster::crd();
    let yaml = serde_yaml::to_string(&crd).unwrap_or_default();
    format!("# Generated by `oxcd-operator crd`; do not edit.\n---\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::example;

    #[test]
    fn committed_crds_match_the_types() {
        // crds/ and the Helm chart's copy (Helm 3 installs a chart's crds/ before templates).
        for path in [
            "crds/etcdcluster.yaml",
            "charts/oxcd-operator/crds/etcdcluster.yaml",
        ] {
            let full = format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"));
            let committed = std::fs::read_to_string(&full).unwrap_or_default();
            assert!(
                committed == crd_yaml(),
                "{path} is out of date: run `cargo run -p oxcd-operator -- crd > {path}`"
            );
        }
    }

    #[test]
    fn crd_has_status_scale_columns_and_short_name() {
        let crd = EtcdCluster::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("etcdclusters.oxcd.io"));
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["etcdc".to_string()]));
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        let sub = v.subresources.as_ref().unwrap();
        assert!(sub.status.is_some());
        let scale = sub.scale.as_ref().unwrap();
        assert_eq!(scale.spec_replicas_path, ".spec.replicas");
        assert_eq!(scale.status_replicas_path, ".status.replicas");
        assert_eq!(
            scale.label_selector_path.as_deref(),
            Some(".status.selector")
        );
        let cols: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            cols,
            ["Replicas", "Ready", "Version", "Leader", "Phase", "Age"]
        );
        let schema = serde_json::to_value(v.schema.as_ref().unwrap()).unwrap();
        let replicas = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["replicas"];
        assert_eq!(replicas["minimum"].as_f64(), Some(1.0));
        assert_eq!(replicas["maximum"].as_f64(), Some(9.0));
    }

    #[test]
    fn cel_rules_guard_immutable_fields_and_destinations() {
        let old = example(serde_json::json!({"replicas": 3, "storage": {"size": "1Gi"}}));
        let scaled = example(serde_json::json!({"replicas": 5, "storage": {"size": "1Gi"}}));
        assert!(kube::core::cel::validate_cel_update(&scaled, &old).is_ok());
        let resized = example(serde_json::json!({"replicas": 3, "storage": {"size": "2Gi"}}));
        let err = kube::core::cel::validate_cel_update(&resized, &old).unwrap_err();
        assert!(
            format!("{err:?}").contains("storage is immutable"),
            "{err:?}"
        );

        let good = example(serde_json::json!({"replicas": 3,
            "backup": {"destination": "s3://bucket/x", "schedule": "0 * * * *"}}));
        assert!(kube::core::cel::validate_cel(&good).is_ok());
        let bad = example(serde_json::json!({"replicas": 3,
            "backup": {"destination": "ftp://host/x"}}));
        let err = kube::core::cel::validate_cel(&bad).unwrap_err();
        assert!(
            format!("{err:?}").contains("destination must be"),
            "{err:?}"
        );
    }

    #[test]
    fn image_and_version() {
        let mut spec = example(serde_json::json!({"replicas": 1, "version": "0.2.0"})).spec;
        assert_eq!(spec.image(), format!("{DEFAULT_IMAGE_REPOSITORY}:0.2.0"));
        assert_eq!(spec.version_label(), "0.2.0");
        spec.image = Some("registry:5000/oxcd:dev".into());
        assert_eq!(spec.version_label(), "dev");
        spec.image = Some("registry:5000/oxcd".into());
        assert_eq!(spec.version_label(), "registry:5000/oxcd");
    }
}
