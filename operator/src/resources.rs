//! The Kubernetes objects an `EtcdCluster` owns, built from its spec. Pure functions: the
//! controller applies what these return with server-side apply.
//!
//! - `<name>-peer`: headless Service giving each member a DNS name,
//!   `<pod>.<name>-peer.<namespace>.svc`, published before the pod is ready (members must
//!   find each other to become ready);
//! - `<name>`: the client Service;
//! - `<name>-bootstrap`: ConfigMap with ETCD_INITIAL_CLUSTER{,_STATE,_TOKEN}, rewritten by the
//!   operator before any member starts, so a member that joins later joins the right cluster;
//! - `<name>`: PodDisruptionBudget keeping a quorum;
//! - `<name>`: StatefulSet, `OnDelete` (the operator decides which pod restarts when),
//!   `Parallel` (members of a new cluster must start together).

use crate::crd::{EtcdCluster, EtcdClusterSpec, RetentionPolicy};
use crate::decide::{quorum, Bootstrap, ClusterState};
use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EnvFromSource, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodAffinityTerm, PodAntiAffinity, PodSpec, PodTemplateSpec, Probe,
    SecretEnvSource, SecretVolumeSource, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

pub const CLIENT_PORT: i32 = 2379;
pub const PEER_PORT: i32 = 2380;
/// A plain-HTTP listener for `/metrics` and the health endpoints (`--listen-metrics-urls`):
/// kubelet probes and Prometheus reach it even when the client port requires a certificate.
pub const METRICS_PORT: i32 = 2381;
pub const DATA_MOUNT: &str = "/var/lib/oxcd";
pub const DATA_DIR: &str = "/var/lib/oxcd/data";
pub const DEFAULT_STORAGE: &str = "8Gi";
/// Pod template annotation: hash of the template; a pod with another value is outdated.
pub const TEMPLATE_HASH: &str = "oxcd.io/template-hash";
/// PVC annotation: the member ID (hex) whose data the volume holds.
pub const VOLUME_MEMBER: &str = "oxcd.io/member-id";
pub const MANAGER: &str = "oxcd-operator";
/// The server's container in every member pod.
pub const CONTAINER: &str = "oxcd";
/// What the server says when it refuses to start because its data is lost (etcd's text).
const LOST_DATA: &str = " has already been bootstrapped";

/// etcd flags the operator sets itself; `spec.options` may not override them.
const OWNED_FLAGS: &[&str] = &[
    "name",
    "data-dir",
    "wal-dir",
    "config-file",
    "listen-client-urls",
    "advertise-client-urls",
    "listen-peer-urls",
    "initial-advertise-peer-urls",
    "initial-cluster",
    "initial-cluster-state",
    "initial-cluster-token",
    "discovery",
    "discovery-srv",
    "force-new-cluster",
    "cert-file",
    "key-file",
    "trusted-ca-file",
    "client-cert-auth",
    "auto-tls",
    "peer-cert-file",
    "peer-key-file",
    "peer-trusted-ca-file",
    "peer-client-cert-auth",
    "peer-auto-tls",
];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("spec.options.{0}: the operator sets this flag itself")]
    OwnedFlag(String),
    #[error("spec.options.{0}: not an etcd flag name (lower-case letters, digits and dashes)")]
    BadFlagName(String),
    #[error("spec.storage.size {0:?} is not a Kubernetes quantity")]
    BadStorageSize(String),
    #[error("spec.preferredLeader {0:?} is not a member of this cluster (expected {1}-<ordinal>)")]
    BadPreferredLeader(String, String),
    #[error("spec.tls.clientCertAuth needs spec.tls.clientSecret, and spec.tls.operatorSecret for the certificate the operator presents to the members")]
    OperatorCertificateRequired,
}

/// Naming shared by every object of one cluster.
#[derive(Clone, Debug)]
pub struct Names {
    pub cluster: String,
    pub namespace: String,
    /// DNS suffix after `.svc` (e.g. `.cluster.local`), empty by default.
    pub domain_suffix: String,
    pub client_scheme: &'static str,
    pub peer_scheme: &'static str,
    /// The operator's own image, which restores snapshots in an init container.
    pub operator_image: String,
}

/// The operator image of this build.
pub fn default_operator_image() -> String {
    format!("ghcr.io/oxcd/oxcd-operator:{}", env!("CARGO_PKG_VERSION"))
}

impl Names {
    pub fn new(ec: &EtcdCluster, domain_suffix: &str) -> Names {
        let tls = ec.spec.tls.as_ref();
        Names {
            cluster: ec.name_any(),
            namespace: ec.namespace().unwrap_or_else(|| "default".into()),
            domain_suffix: domain_suffix.to_string(),
            client_scheme: if tls.is_some_and(|t| t.client_secret.is_some()) {
                "https"
            } else {
                "http"
            },
            peer_scheme: if tls.is_some_and(|t| t.peer_secret.is_some()) {
                "https"
            } else {
                "http"
            },
            operator_image: default_operator_image(),
        }
    }

    pub fn with_operator_image(mut self, image: &str) -> Names {
        self.operator_image = image.to_string();
        self
    }
    pub fn pod(&self, ordinal: u32) -> String {
        format!("{}-{ordinal}", self.cluster)
    }
    pub fn peer_service(&self) -> String {
        format!("{}-peer", self.cluster)
    }
    pub fn bootstrap_config(&self) -> String {
        format!("{}-bootstrap", self.cluster)
    }
    pub fn host(&self, pod: &str) -> String {
        format!(
            "{pod}.{}.{}.svc{}",
            self.peer_service(),
            self.namespace,
            self.domain_suffix
        )
    }
    pub fn peer_url(&self, ordinal: u32) -> String {
        format!(
            "{}://{}:{PEER_PORT}",
            self.peer_scheme,
            self.host(&self.pod(ordinal))
        )
    }
    pub fn client_url(&self, ordinal: u32) -> String {
        format!(
            "{}://{}:{CLIENT_PORT}",
            self.client_scheme,
            self.host(&self.pod(ordinal))
        )
    }
    /// The client Service's URL.
    pub fn service_url(&self) -> String {
        format!(
            "{}://{}.{}.svc{}:{CLIENT_PORT}",
            self.client_scheme, self.cluster, self.namespace, self.domain_suffix
        )
    }
    /// The ordinal of this cluster's pod named by a peer URL.
    pub fn ordinal_of_peer_url(&self, url: &str) -> Option<u32> {
        let host = url.split("://").nth(1)?.split(':').next()?;
        let pod = host.strip_suffix(&format!(
            ".{}.{}.svc{}",
            self.peer_service(),
            self.namespace,
            self.domain_suffix
        ))?;
        self.ordinal_of_pod(pod)
    }
    pub fn ordinal_of_pod(&self, pod: &str) -> Option<u32> {
        let k = pod.strip_prefix(&format!("{}-", self.cluster))?;
        if k.starts_with('+') || (k.len() > 1 && k.starts_with('0')) {
            return None;
        }
        k.parse().ok()
    }
    /// The `--initial-cluster-token`: unique per cluster object, so that members of a deleted
    /// and re-created cluster of the same name never join each other.
    pub fn token(&self, uid: &str) -> String {
        if uid.is_empty() {
            return self.cluster.clone();
        }
        format!("{}-{}", self.cluster, uid.split('-').next().unwrap_or(uid))
    }
}

pub fn labels(ec: &EtcdCluster) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "oxcd".to_string()),
        ("app.kubernetes.io/instance".to_string(), ec.name_any()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGER.to_string(),
        ),
    ])
}

pub fn selector_labels(ec: &EtcdCluster) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "oxcd".to_string()),
        ("app.kubernetes.io/instance".to_string(), ec.name_any()),
    ])
}

/// The label selector in string form, for status.selector (scale subresource).
pub fn selector_string(ec: &EtcdCluster) -> String {
    selector_labels(ec)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn meta(ec: &EtcdCluster, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: ec.namespace(),
        labels: Some(labels(ec)),
        owner_references: ec.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

pub fn peer_service(ec: &EtcdCluster, names: &Names) -> Service {
    Service {
        metadata: meta(ec, names.peer_service()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            // Members resolve each other before they are ready.
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(ec)),
            ports: Some(vec![port("client", CLIENT_PORT), port("peer", PEER_PORT)]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn client_service(ec: &EtcdCluster, names: &Names) -> Service {
    Service {
        metadata: meta(ec, names.cluster.clone()),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(ec)),
            ports: Some(vec![port("client", CLIENT_PORT)]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// Keeps a quorum of `members` available through voluntary disruptions (drains).
pub fn disruption_budget(ec: &EtcdCluster, names: &Names, members: u32) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(ec, names.cluster.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(quorum(members.max(1) as usize) as i32)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(ec)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn bootstrap_config(ec: &EtcdCluster, names: &Names, b: &Bootstrap) -> ConfigMap {
    let initial_cluster = b
        .members
        .iter()
        .map(|k| format!("{}={}", names.pod(*k), names.peer_url(*k)))
        .collect::<Vec<_>>()
        .join(",");
    let state = match b.state {
        ClusterState::New => "new",
        ClusterState::Existing => "existing",
    };
    let uid = ec.uid().unwrap_or_default();
    ConfigMap {
        metadata: meta(ec, names.bootstrap_config()),
        data: Some(BTreeMap::from([
            ("ETCD_INITIAL_CLUSTER".to_string(), initial_cluster),
            ("ETCD_INITIAL_CLUSTER_STATE".to_string(), state.to_string()),
            ("ETCD_INITIAL_CLUSTER_TOKEN".to_string(), names.token(&uid)),
        ])),
        ..Default::default()
    }
}

/// Reads back what `bootstrap_config` wrote.
pub fn parse_bootstrap(cm: &ConfigMap, names: &Names) -> Option<Bootstrap> {
    let data = cm.data.as_ref()?;
    let state = match data.get("ETCD_INITIAL_CLUSTER_STATE")?.as_str() {
        "new" => ClusterState::New,
        "existing" => ClusterState::Existing,
        _ => return None,
    };
    let mut members = Vec::new();
    for entry in data
        .get("ETCD_INITIAL_CLUSTER")?
        .split(',')
        .filter(|e| !e.is_empty())
    {
        let (name, url) = entry.split_once('=')?;
        let k = names.ordinal_of_pod(name)?;
        if names.peer_url(k) != url {
            return None;
        }
        members.push(k);
    }
    members.sort_unstable();
    Some(Bootstrap { state, members })
}

/// `spec.options` as `ETCD_*` variables, refusing flags the operator owns.
pub fn option_env(spec: &EtcdClusterSpec) -> Result<Vec<EnvVar>, SpecError> {
    let mut out = Vec::new();
    for (flag, value) in &spec.options {
        let flag = flag.trim_start_matches('-');
        let valid = !flag.is_empty()
            && flag
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid {
            return Err(SpecError::BadFlagName(flag.to_string()));
        }
        if OWNED_FLAGS.contains(&flag) {
            return Err(SpecError::OwnedFlag(flag.to_string()));
        }
        out.push(env(
            &format!("ETCD_{}", flag.replace('-', "_").to_ascii_uppercase()),
            value,
        ));
    }
    Ok(out)
}

/// Checks the parts of a spec the schema cannot.
pub fn validate(ec: &EtcdCluster) -> Result<(), SpecError> {
    option_env(&ec.spec)?;
    if let Some(size) = &ec.spec.storage.size {
        let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let unit = &size[digits.len()..];
        let units = [
            "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E",
        ];
        if digits.is_empty() || digits.parse::<f64>().is_err() || !units.contains(&unit) {
            return Err(SpecError::BadStorageSize(size.clone()));
        }
    }
    if let Some(tls) = &ec.spec.tls {
        if tls.client_cert_auth && (tls.client_secret.is_none() || tls.operator_secret.is_none()) {
            return Err(SpecError::OperatorCertificateRequired);
        }
    }
    if let Some(p) = &ec.spec.preferred_leader {
        let names = Names::new(ec, "");
        match names.ordinal_of_pod(p) {
            Some(k) if (k as i32) < ec.spec.replicas => {}
            _ => return Err(SpecError::BadPreferredLeader(p.clone(), names.cluster)),
        }
    }
    Ok(())
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(METRICS_PORT),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// The members' pod template, with its hash annotation.
pub fn pod_template(ec: &EtcdCluster, names: &Names) -> Result<PodTemplateSpec, SpecError> {
    let spec = &ec.spec;
    let host = format!(
        "$(POD_NAME).{}.{}.svc{}",
        names.peer_service(),
        names.namespace,
        names.domain_suffix
    );
    let mut envs = vec![
        field_env("POD_NAME", "metadata.name"),
        env("ETCD_NAME", "$(POD_NAME)"),
        env("ETCD_DATA_DIR", DATA_DIR),
        env(
            "ETCD_LISTEN_CLIENT_URLS",
            &format!("{}://0.0.0.0:{CLIENT_PORT}", names.client_scheme),
        ),
        env(
            "ETCD_ADVERTISE_CLIENT_URLS",
            &format!("{}://{host}:{CLIENT_PORT}", names.client_scheme),
        ),
        env(
            "ETCD_LISTEN_PEER_URLS",
            &format!("{}://0.0.0.0:{PEER_PORT}", names.peer_scheme),
        ),
        env(
            "ETCD_INITIAL_ADVERTISE_PEER_URLS",
            &format!("{}://{host}:{PEER_PORT}", names.peer_scheme),
        ),
        env(
            "ETCD_LISTEN_METRICS_URLS",
            &format!("http://0.0.0.0:{METRICS_PORT}"),
        ),
    ];
    let mut mounts = vec![VolumeMount {
        name: "data".into(),
        mount_path: DATA_MOUNT.into(),
        ..Default::default()
    }];
    let mut volumes = Vec::new();
    if let Some(tls) = &spec.tls {
        if let Some(secret) = &tls.client_secret {
            envs.push(env("ETCD_CERT_FILE", "/etc/oxcd/tls/client/tls.crt"));
            envs.push(env("ETCD_KEY_FILE", "/etc/oxcd/tls/client/tls.key"));
            envs.push(env("ETCD_TRUSTED_CA_FILE", "/etc/oxcd/tls/client/ca.crt"));
            if tls.client_cert_auth {
                envs.push(env("ETCD_CLIENT_CERT_AUTH", "true"));
            }
            volumes.push(secret_volume("tls-client", secret));
            mounts.push(mount("tls-client", "/etc/oxcd/tls/client"));
        }
        if let Some(secret) = &tls.peer_secret {
            envs.push(env("ETCD_PEER_CERT_FILE", "/etc/oxcd/tls/peer/tls.crt"));
            envs.push(env("ETCD_PEER_KEY_FILE", "/etc/oxcd/tls/peer/tls.key"));
            envs.push(env(
                "ETCD_PEER_TRUSTED_CA_FILE",
                "/etc/oxcd/tls/peer/ca.crt",
            ));
            envs.push(env("ETCD_PEER_CLIENT_CERT_AUTH", "true"));
            volumes.push(secret_volume("tls-peer", secret));
            mounts.push(mount("tls-peer", "/etc/oxcd/tls/peer"));
        }
    }
    envs.extend(option_env(spec)?);
    let bootstrap_env = EnvFromSource {
        config_map_ref: Some(ConfigMapEnvSource {
            name: names.bootstrap_config(),
            optional: Some(false),
        }),
        ..Default::default()
    };
    // A restored cluster: every member starts from the snapshot (see `restore.rs`).
    let init_containers = spec.restore.as_ref().map(|r| {
        let mut env = envs.clone();
        env.push(self::env("OXCD_RESTORE_SOURCE", &r.source));
        let mut from = vec![bootstrap_env.clone()];
        if let Some(secret) = &r.credentials_secret {
            from.push(EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: secret.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            });
        }
        vec![Container {
            name: "restore".into(),
            image: Some(names.operator_image.clone()),
            image_pull_policy: Some("IfNotPresent".into()),
            args: Some(vec!["restore-member".into()]),
            env: Some(env),
            env_from: Some(from),
            volume_mounts: Some(mounts.clone()),
            ..Default::default()
        }]
    });
    let container = Container {
        name: CONTAINER.into(),
        image: Some(spec.image()),
        image_pull_policy: Some("IfNotPresent".into()),
        env: Some(envs),
        env_from: Some(vec![bootstrap_env]),
        ports: Some(vec![
            ContainerPort {
                name: Some("client".into()),
                container_port: CLIENT_PORT,
                ..Default::default()
            },
            ContainerPort {
                name: Some("peer".into()),
                container_port: PEER_PORT,
                ..Default::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: METRICS_PORT,
                ..Default::default()
            },
        ]),
        // The client and metrics ports open once the member has joined; a new member may
        // need a while to receive its snapshot, so liveness starts only after that.
        startup_probe: Some(probe("/livez", 5, 120)),
        liveness_probe: Some(probe("/livez", 10, 3)),
        // A learner is not ready by etcd 3.6's /readyz (non_learner): the operator promotes a
        // learner once it has caught up, which it reads from the member list, not from pod
        // readiness, so the check would only hold the StatefulSet's rollout back.
        readiness_probe: Some(probe("/readyz?exclude=non_learner", 5, 3)),
        resources: spec.resources.clone(),
        volume_mounts: Some(mounts),
        // The server's last log lines become the termination message, which is how the
        // operator learns that a member refused to start because its data is lost.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };
    let overrides = spec.pod_template.clone().unwrap_or_default();
    let mut pod_labels = overrides.labels.clone();
    pod_labels.extend(labels(ec));
    let affinity = overrides.affinity.clone().unwrap_or_else(|| spread(ec));
    let mut template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(overrides.annotations.clone()),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            init_containers,
            containers: vec![container],
            affinity: Some(affinity),
            tolerations: overrides.tolerations.clone(),
            node_selector: overrides.node_selector.clone(),
            priority_class_name: overrides.priority_class_name.clone(),
            topology_spread_constraints: overrides.topology_spread_constraints.clone(),
            image_pull_secrets: spec.image_pull_secrets.clone(),
            // etcd flushes on SIGTERM quickly; a member that hangs is killed after this.
            termination_grace_period_seconds: Some(30),
            volumes: (!volumes.is_empty()).then_some(volumes),
            ..Default::default()
        }),
    };
    let hash = template_hash(&template);
    if let Some(m) = template.metadata.as_mut() {
        m.annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(TEMPLATE_HASH.into(), hash);
    }
    Ok(template)
}

/// The member ID in the server's "member <hex> has already been bootstrapped" refusal (the
/// last one in `msg`).
pub fn lost_member_in(msg: &str) -> Option<u64> {
    let at = msg.rfind(LOST_DATA)?;
    let hex = msg[..at].rsplit("member ").next()?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

/// Default affinity: prefer one member per node.
fn spread(ec: &EtcdCluster) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(LabelSelector {
                            match_labels: Some(selector_labels(ec)),
                            ..Default::default()
                        }),
                        topology_key: "kubernetes.io/hostname".into(),
                        ..Default::default()
                    },
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Hash of a pod template (without its own hash annotation), short hex.
pub fn template_hash(t: &PodTemplateSpec) -> String {
    let mut t = t.clone();
    if let Some(a) = t.metadata.as_mut().and_then(|m| m.annotations.as_mut()) {
        a.remove(TEMPLATE_HASH);
    }
    let json = serde_json::to_vec(&t).unwrap_or_default();
    let digest = Sha256::digest(&json);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

pub fn statefulset(
    ec: &EtcdCluster,
    names: &Names,
    replicas: u32,
) -> Result<StatefulSet, SpecError> {
    let storage = &ec.spec.storage;
    let retention = storage.retention.clone().unwrap_or_default();
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            labels: Some(labels(ec)),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(
                        storage
                            .size
                            .clone()
                            .unwrap_or_else(|| DEFAULT_STORAGE.into()),
                    ),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(StatefulSet {
        metadata: meta(ec, names.cluster.clone()),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas as i32),
            selector: LabelSelector {
                match_labels: Some(selector_labels(ec)),
                ..Default::default()
            },
            service_name: Some(names.peer_service()),
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                ..Default::default()
            }),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_scaled: Some(
                        retention
                            .when_scaled
                            .unwrap_or(RetentionPolicy::Delete)
                            .as_str()
                            .into(),
                    ),
                    when_deleted: Some(
                        retention
                            .when_deleted
                            .unwrap_or(RetentionPolicy::Retain)
                            .as_str()
                            .into(),
                    ),
                },
            ),
            template: pod_template(ec, names)?,
            volume_claim_templates: Some(vec![claim]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The objects a new cluster starts with, as YAML documents: for every EtcdCluster in
/// `manifest` (other documents are skipped).
pub fn render_manifest(manifest: &str) -> Result<String, RenderError> {
    let mut out = String::new();
    for doc in serde_yaml::Deserializer::from_str(manifest) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if value.get("kind").and_then(|k| k.as_str()) != Some("EtcdCluster") {
            continue;
        }
        let mut ec: EtcdCluster = serde_yaml::from_value(value)?;
        if ec.metadata.namespace.is_none() {
            ec.metadata.namespace = Some("default".into());
        }
        validate(&ec)?;
        let names = Names::new(&ec, "");
        let replicas = ec.spec.replicas.clamp(1, 9) as u32;
        let bootstrap = Bootstrap {
            state: ClusterState::New,
            members: (0..replicas).collect(),
        };
        let docs = [
            serde_yaml::to_string(&bootstrap_config(&ec, &names, &bootstrap))?,
            serde_yaml::to_string(&peer_service(&ec, &names))?,
            serde_yaml::to_string(&client_service(&ec, &names))?,
            serde_yaml::to_string(&disruption_budget(&ec, &names, replicas))?,
            serde_yaml::to_string(&statefulset(&ec, &names, replicas)?)?,
        ];
        for d in docs {
            out.push_str("---\n");
            out.push_str(&d);
        }
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("yaml: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error(transparent)]
    Spec(#[from] SpecError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::example;

    fn names(ec: &EtcdCluster) -> Names {
        Names::new(ec, "")
    }

    #[test]
    fn peer_urls_and_ordinals_round_trip() {
        let ec = example(serde_json::json!({"replicas": 3}));
        let n = names(&ec);
        assert_eq!(n.peer_url(2), "http://demo-2.demo-peer.prod.svc:2380");
        assert_eq!(n.client_url(0), "http://demo-0.demo-peer.prod.svc:2379");
        assert_eq!(n.ordinal_of_peer_url(&n.peer_url(7)), Some(7));
        assert_eq!(
            n.ordinal_of_peer_url("http://demo-1.other-peer.prod.svc:2380"),
            None
        );
        assert_eq!(n.ordinal_of_pod("demo-01"), None);
        assert_eq!(n.ordinal_of_pod("demox-1"), None);
        assert_eq!(n.token("1f2e3d4c-aaaa"), "demo-1f2e3d4c");
    }

    #[test]
    fn statefulset_is_on_delete_parallel_with_probes_and_bootstrap_env() {
        let ec = example(serde_json::json!({
            "replicas": 3, "version": "0.1.0",
            "storage": {"size": "2Gi", "storageClassName": "fast", "retention": {"whenScaled": "Retain"}},
            "options": {"quota-backend-bytes": "4294967296", "auto-compaction-retention": "1h"},
        }));
        let sts = statefulset(&ec, &names(&ec), 3).unwrap();
        let owner = &sts.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("EtcdCluster", Some(true))
        );
        let spec = sts.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.service_name.as_deref(), Some("demo-peer"));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(
            spec.update_strategy.unwrap().type_.as_deref(),
            Some("OnDelete")
        );
        let retention = spec.persistent_volume_claim_retention_policy.unwrap();
        assert_eq!(retention.when_scaled.as_deref(), Some("Retain"));
        assert_eq!(retention.when_deleted.as_deref(), Some("Retain"));
        let claim = &spec.volume_claim_templates.unwrap()[0];
        let cs = claim.spec.as_ref().unwrap();
        assert_eq!(cs.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            cs.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0,
            "2Gi"
        );

        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("ghcr.io/oxcd/oxcd:0.1.0"));
        let env: BTreeMap<_, _> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.as_str(), e.value.clone().unwrap_or_default()))
            .collect();
        assert_eq!(env["ETCD_NAME"], "$(POD_NAME)");
        assert_eq!(env["ETCD_DATA_DIR"], DATA_DIR);
        assert_eq!(
            env["ETCD_INITIAL_ADVERTISE_PEER_URLS"],
            "http://$(POD_NAME).demo-peer.prod.svc:2380"
        );
        assert_eq!(
            env["ETCD_ADVERTISE_CLIENT_URLS"],
            "http://$(POD_NAME).demo-peer.prod.svc:2379"
        );
        assert_eq!(env["ETCD_QUOTA_BACKEND_BYTES"], "4294967296");
        assert_eq!(env["ETCD_AUTO_COMPACTION_RETENTION"], "1h");
        // POD_NAME is defined before the variables that refer to it.
        assert_eq!(c.env.as_ref().unwrap()[0].name, "POD_NAME");
        let from = &c.env_from.as_ref().unwrap()[0];
        assert_eq!(from.config_map_ref.as_ref().unwrap().name, "demo-bootstrap");
        let ready = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        // Probes go to the plain metrics listener, which client TLS does not cover.
        assert_eq!(
            (ready.path.as_deref(), &ready.port),
            (Some("/readyz?exclude=non_learner"), &IntOrString::Int(2381))
        );
        assert_eq!(env["ETCD_LISTEN_METRICS_URLS"], "http://0.0.0.0:2381");
        let live = c
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(live.path.as_deref(), Some("/livez"));
        assert!(c.startup_probe.is_some());
    }

    #[test]
    fn template_hash_changes_with_what_restarts_a_member_only() {
        let a = example(serde_json::json!({"replicas": 3, "version": "0.1.0"}));
        let b = example(serde_json::json!({"replicas": 5, "version": "0.1.0"}));
        let c = example(serde_json::json!({"replicas": 3, "version": "0.2.0"}));
        let hash = |ec: &EtcdCluster| {
            pod_template(ec, &names(ec))
                .unwrap()
                .metadata
                .unwrap()
                .annotations
                .unwrap()[TEMPLATE_HASH]
                .clone()
        };
        assert_eq!(hash(&a), hash(&b), "scaling is not a restart");
        assert_ne!(hash(&a), hash(&c), "a new version is");
        let t = pod_template(&a, &names(&a)).unwrap();
        assert_eq!(
            template_hash(&t),
            hash(&a),
            "the hash ignores its own annotation"
        );
    }

    #[test]
    fn options_that_the_operator_owns_are_refused() {
        let ec = example(
            serde_json::json!({"replicas": 3, "options": {"initial-cluster-state": "new"}}),
        );
        assert_eq!(
            validate(&ec),
            Err(SpecError::OwnedFlag("initial-cluster-state".into()))
        );
        let ec = example(serde_json::json!({"replicas": 3, "options": {"Bad Flag": "x"}}));
        assert!(matches!(validate(&ec), Err(SpecError::BadFlagName(_))));
        let ec = example(serde_json::json!({"replicas": 3, "storage": {"size": "lots"}}));
        assert!(matches!(validate(&ec), Err(SpecError::BadStorageSize(_))));
        let ec = example(serde_json::json!({"replicas": 3, "preferredLeader": "demo-3"}));
        assert!(matches!(
            validate(&ec),
            Err(SpecError::BadPreferredLeader(..))
        ));
        let ec = example(
            serde_json::json!({"replicas": 3, "preferredLeader": "demo-2", "storage": {"size": "1.5Gi"}}),
        );
        assert_eq!(validate(&ec), Ok(()));
    }

    #[test]
    fn bootstrap_config_round_trips() {
        let ec = example(serde_json::json!({"replicas": 3}));
        let n = names(&ec);
        let b = Bootstrap {
            state: ClusterState::Existing,
            members: vec![0, 1, 3],
        };
        let cm = bootstrap_config(&ec, &n, &b);
        let data = cm.data.as_ref().unwrap();
        assert_eq!(
            data["ETCD_INITIAL_CLUSTER"],
            "demo-0=http://demo-0.demo-peer.prod.svc:2380,demo-1=http://demo-1.demo-peer.prod.svc:2380,demo-3=http://demo-3.demo-peer.prod.svc:2380"
        );
        assert_eq!(data["ETCD_INITIAL_CLUSTER_STATE"], "existing");
        assert_eq!(data["ETCD_INITIAL_CLUSTER_TOKEN"], "demo-1f2e3d4c");
        assert_eq!(parse_bootstrap(&cm, &n), Some(b));
    }

    #[test]
    fn services_and_budget() {
        let ec = example(serde_json::json!({"replicas": 5}));
        let n = names(&ec);
        let peer = peer_service(&ec, &n).spec.unwrap();
        assert_eq!(peer.cluster_ip.as_deref(), Some("None"));
        assert_eq!(peer.publish_not_ready_addresses, Some(true));
        let client = client_service(&ec, &n);
        assert_eq!(client.metadata.name.as_deref(), Some("demo"));
        let pdb = disruption_budget(&ec, &n, 5).spec.unwrap();
        assert_eq!(pdb.min_available, Some(IntOrString::Int(3)));
        assert_eq!(
            selector_string(&ec),
            "app.kubernetes.io/instance=demo,app.kubernetes.io/name=oxcd"
        );
    }

    #[test]
    fn lost_member_is_read_from_the_servers_refusal() {
        let msg = "2026-12-02T16:00:00Z ERROR failed to start\noxcd: failed to start: member 8e9e05c52164694d has already been bootstrapped: the cluster knows it as started";
        assert_eq!(lost_member_in(msg), Some(0x8e9e05c52164694d));
        assert_eq!(lost_member_in("oxcd: failed to start: no space"), None);
        assert_eq!(
            lost_member_in("member zz has already been bootstrapped"),
            None
        );
    }

    #[test]
    fn tls_secrets_switch_urls_to_https() {
        let ec = example(serde_json::json!({"replicas": 3,
            "tls": {"clientSecret": "c", "peerSecret": "p", "clientCertAuth": true}}));
        let n = names(&ec);
        assert!(n.peer_url(0).starts_with("https://"));
        assert!(n.service_url().starts_with("https://"));
        let t = pod_template(&ec, &n).unwrap().spec.unwrap();
        let env: Vec<_> = t.containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.clone())
            .collect();
        for v in [
            "ETCD_CERT_FILE",
            "ETCD_CLIENT_CERT_AUTH",
            "ETCD_PEER_CERT_FILE",
            "ETCD_PEER_CLIENT_CERT_AUTH",
        ] {
            assert!(env.iter().any(|e| e == v), "{v}");
        }
        assert_eq!(t.volumes.unwrap().len(), 2);
    }
}
