//! The reconcile loop: observe (Kubernetes objects + etcd), `decide::decide`, act, report.

use crate::backup;
use crate::crd::{BackupRecord, EtcdCluster, EtcdClusterStatus, MemberStatus};
use crate::decide::{
    self, action_kind, Action, Bootstrap, ClusterState, Observed, PodObs, VolumeObs,
};
use crate::etcd::{self, Outcome};
use crate::metrics::Metrics;
use crate::resources::{self, Names, MANAGER, TEMPLATE_HASH, VOLUME_MEMBER};
use crate::status;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Etcd(#[from] etcd::EtcdError),
    #[error("{0}")]
    Spec(#[from] resources::SpecError),
}

pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    /// Appended to `.svc` in member DNS names (e.g. `.cluster.local`).
    pub domain_suffix: String,
    pub metrics: Metrics,
    /// Test hook (OXCD_OPERATOR_FAILPOINT=exit-after:<Action>): exit right after performing
    /// that action, to prove reconciles resume from any point.
    pub failpoint: Option<String>,
    /// Image of the restore init container (this operator's image).
    pub operator_image: String,
}

/// Short requeue while something is in flight, long when all is well.
const BUSY: Duration = Duration::from_secs(3);
const IDLE: Duration = Duration::from_secs(30);

/// One reconcile of `ec`, in a span naming the cluster, its duration recorded.
pub async fn reconcile(ec: Arc<EtcdCluster>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "reconcile",
        cluster = %ec.name_any(),
        namespace = %ec.namespace().unwrap_or_default()
    );
    let _timer = ctx.metrics.reconcile_started();
    reconcile_once(ec, ctx.clone()).instrument(span).await
}

async fn reconcile_once(ec: Arc<EtcdCluster>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let ns = ec.namespace().unwrap_or_else(|| "default".into());
    let names = Names::new(&ec, &ctx.domain_suffix).with_operator_image(&ctx.operator_image);
    if let Err(e) = resources::validate(&ec) {
        let status = EtcdClusterStatus {
            observed_generation: ec.metadata.generation,
            phase: Some("Degraded".into()),
            conditions: status::conditions(
                &ec,
                jiff::Timestamp::now(),
                &[("Degraded", true, "InvalidSpec", e.to_string())],
            ),
            ..ec.status.clone().unwrap_or_default()
        };
        patch_status(&ctx.client, &ec, &status).await?;
        return Ok(Requeue::requeue(IDLE));
    }
    let access = match etcd_access(&ctx, &ec, &ns).await {
        Ok(a) => a,
        Err(why) => {
            let status = EtcdClusterStatus {
                observed_generation: ec.metadata.generation,
                phase: Some("Degraded".into()),
                conditions: status::conditions(
                    &ec,
                    jiff::Timestamp::now(),
                    &[("Degraded", true, "TlsSecret", why)],
                ),
                ..ec.status.clone().unwrap_or_default()
            };
            patch_status(&ctx.client, &ec, &status).await?;
            return Ok(Requeue::requeue(BUSY));
        }
    };
    let (observed, members) = observe(&ctx, &ec, &names, &ns, &access).await?;
    let action = decide::decide(&observed);
    tracing::info!(cluster = %names.cluster, namespace = %ns, ?action, "reconcile");
    if let Some(replicas) = observed.statefulset_replicas {
        let voters = members.iter().filter(|m| !m.learner).count().max(1) as u32;
        sync_owned(&ctx, &ec, &names, &ns, voters, replicas).await?;
    }
    let note = act(&ctx, &ec, &names, &ns, &action, &members, &access).await?;
    if ctx.failpoint.as_deref() == Some(&format!("exit-after:{}", action_kind(&action))) {
        tracing::error!(?action, "failpoint: exiting after this action");
        std::process::exit(86);
    }
    let backup = maybe_backup(&ctx, &ec, &ns, &observed, &members, &access).await;
    report(&ctx, &ec, &observed, &action, members, note, backup).await?;
    Ok(match action {
        Action::Idle => Requeue::requeue(IDLE),
        _ => Requeue::requeue(BUSY),
    })
}

pub fn error_policy(ec: Arc<EtcdCluster>, err: &Error, ctx: Arc<Context>) -> Requeue {
    ctx.metrics.reconcile_failed();
    tracing::warn!(cluster = %ec.name_any(), error = %err, "reconcile failed");
    Requeue::requeue(Duration::from_secs(10))
}

/// How to reach the members: TLS from `spec.tls` (the CA of the client certificates, and the
/// operator's own certificate from `operatorSecret`), else plain. Err says what is missing.
async fn etcd_access(ctx: &Context, ec: &EtcdCluster, ns: &str) -> Result<etcd::Access, String> {
    let Some(tls) = ec.spec.tls.as_ref() else {
        return Ok(etcd::Access::plain());
    };
    let Some(client_secret) = &tls.client_secret else {
        return Ok(etcd::Access::plain());
    };
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    let read = |name: String| {
        let secrets = secrets.clone();
        async move {
            let s = secrets
                .get(&name)
                .await
                .map_err(|e| format!("reading Secret {name}: {e}"))?;
            let data = s.data.unwrap_or_default();
            let key = |k: &str| {
                data.get(k)
                    .map(|v| v.0.clone())
                    .ok_or_else(|| format!("Secret {name} has no {k}"))
            };
            Ok::<_, String>((key("ca.crt"), key("tls.crt"), key("tls.key")))
        }
    };
    match &tls.operator_secret {
        Some(name) => {
            let (ca, cert, key) = read(name.clone()).await?;
            Ok(etcd::Access::tls(ca?, Some((cert?, key?))))
        }
        None => {
            let (ca, _, _) = read(client_secret.clone()).await?;
            Ok(etcd::Access::tls(ca?, None))
        }
    }
}

async fn observe(
    ctx: &Context,
    ec: &EtcdCluster,
    names: &Names,
    ns: &str,
    access: &etcd::Access,
) -> Result<(Observed, Vec<MemberStatus>), Error> {
    let client = &ctx.client;
    let sts = Api::<StatefulSet>::namespaced(client.clone(), ns)
        .get_opt(&names.cluster)
        .await?;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(&names.bootstrap_config())
        .await?;
    let selector = ListParams::default().labels(&resources::selector_string(ec));
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&selector)
        .await?;
    let pvcs = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .list(&selector)
        .await?;
    let now = jiff::Timestamp::now();
    let mut pod_obs = BTreeMap::new();
    for p in &pods.items {
        let Some(k) = names.ordinal_of_pod(&p.name_any()) else {
            continue;
        };
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let age = p
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| (now.as_second() - t.0.as_second()).max(0) as u64)
            .unwrap_or(0);
        pod_obs.insert(
            k,
            PodObs {
                template: p
                    .annotations()
                    .get(TEMPLATE_HASH)
                    .cloned()
                    .unwrap_or_default(),
                ready,
                terminating: p.metadata.deletion_timestamp.is_some(),
                age_secs: age,
                lost_member: lost_member(p),
            },
        );
    }
    let mut volumes = BTreeMap::new();
    for v in &pvcs.items {
        let Some(k) = v
            .name_any()
            .strip_prefix("data-")
            .and_then(|pod| names.ordinal_of_pod(pod))
        else {
            continue;
        };
        if v.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let member_id = v
            .annotations()
            .get(VOLUME_MEMBER)
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        volumes.insert(k, VolumeObs { member_id });
    }
    let endpoints: Vec<String> = pod_obs
        .iter()
        .filter(|(_, p)| !p.terminating)
        .map(|(k, _)| names.client_url(*k))
        .collect();
    let (etcd_obs, members) = if sts.is_some() {
        match etcd::observe(access, names, &endpoints).await {
            Ok(view) => (Some(view.obs), view.members),
            Err(e) => {
                tracing::info!(cluster = %names.cluster, error = %e, "etcd not reachable");
                (None, ec.status.clone().unwrap_or_default().members)
            }
        }
    } else {
        (None, Vec::new())
    };
    let template = resources::pod_template(ec, names)?;
    let observed = Observed {
        desired_replicas: ec.spec.replicas.clamp(1, 9) as u32,
        desired_template: resources::template_hash(&template),
        preferred_leader: ec
            .spec
            .preferred_leader
            .as_deref()
            .and_then(|p| names.ordinal_of_pod(p)),
        statefulset_replicas: sts
            .as_ref()
            .map(|s| s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0) as u32),
        bootstrap: cm
            .as_ref()
            .and_then(|cm| resources::parse_bootstrap(cm, names)),
        pods: pod_obs,
        volumes,
        etcd: etcd_obs,
    };
    Ok((observed, members))
}

/// The member the pod's server last refused to start as because its data is lost, from the
/// container's termination message (the server's last log lines, by the pod's
/// `FallbackToLogsOnError` policy).
fn lost_member(pod: &Pod) -> Option<u64> {
    let status = pod.status.as_ref()?.container_statuses.as_ref()?;
    let c = status.iter().find(|c| c.name == resources::CONTAINER)?;
    [c.state.as_ref(), c.last_state.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|s| s.terminated.as_ref()?.message.as_deref())
        .find_map(resources::lost_member_in)
}

async fn apply<K>(client: &kube::Client, ns: &str, obj: &K) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug,
{
    let api = Api::<K>::namespaced(client.clone(), ns);
    api.patch(
        &obj.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await?;
    Ok(())
}

/// Keeps the owned objects that are not membership (Services, budget, StatefulSet template)
/// in line with the spec. With `OnDelete`, a template change restarts nothing by itself.
async fn sync_owned(
    ctx: &Context,
    ec: &EtcdCluster,
    names: &Names,
    ns: &str,
    voters: u32,
    replicas: u32,
) -> Result<(), Error> {
    let c = &ctx.client;
    apply(c, ns, &resources::peer_service(ec, names)).await?;
    apply(c, ns, &resources::client_service(ec, names)).await?;
    apply(c, ns, &resources::disruption_budget(ec, names, voters)).await?;
    apply(c, ns, &resources::statefulset(ec, names, replicas)?).await?;
    Ok(())
}

/// Performs one action; returns a note for the Event.
async fn act(
    ctx: &Context,
    ec: &EtcdCluster,
    names: &Names,
    ns: &str,
    action: &Action,
    members: &[MemberStatus],
    access: &etcd::Access,
) -> Result<Option<String>, Error> {
    let c = &ctx.client;
    // Voters only: a learner refuses every RPC the actions send (etcd 3.6 answers
    // FailedPrecondition "rpc not supported for learner"), and a client may pick any endpoint.
    let endpoints = || -> Vec<String> {
        let with_url = || members.iter().filter(|m| !m.client_url.is_empty());
        let voters: Vec<String> = with_url()
            .filter(|m| !m.learner)
            .map(|m| m.client_url.clone())
            .collect();
        if voters.is_empty() {
            with_url().map(|m| m.client_url.clone()).collect()
        } else {
            voters
        }
    };
    let note = match action {
        Action::CreateCluster { replicas } => {
            let b = Bootstrap {
                state: ClusterState::New,
                members: (0..*replicas).collect(),
            };
            // Bootstrap information first: members read it when they start.
            apply(c, ns, &resources::bootstrap_config(ec, names, &b)).await?;
            sync_owned(ctx, ec, names, ns, *replicas, *replicas).await?;
            Some(format!("created a new cluster of {replicas} members"))
        }
        Action::WriteBootstrap(b) => {
            apply(c, ns, &resources::bootstrap_config(ec, names, b)).await?;
            None
        }
        Action::AddLearner { ordinal } => {
            let mut client = access.connect(&endpoints()).await?;
            let id = etcd::add_learner(&mut client, &names.peer_url(*ordinal)).await?;
            Some(format!("added {} as learner {id:x}", names.pod(*ordinal)))
        }
        Action::ScaleStatefulSet { replicas } => {
            apply(c, ns, &resources::statefulset(ec, names, *replicas)?).await?;
            Some(format!("StatefulSet scaled to {replicas}"))
        }
        Action::PromoteLearner { id } => {
            let mut client = access.connect(&endpoints()).await?;
            match etcd::promote(&mut client, *id).await? {
                Outcome::Done => Some(format!("promoted learner {id:x} to voting member")),
                Outcome::NotYet(why) => {
                    tracing::info!(member = %format!("{id:x}"), %why, "learner not ready");
                    None
                }
            }
        }
        Action::MoveLeader { from, to } => {
            let leader = members
                .iter()
                .find(|m| m.id == format!("{from:x}"))
                .map(|m| m.client_url.clone())
                .filter(|u| !u.is_empty())
                .ok_or(etcd::EtcdError::NoClientUrl(*from))?;
            etcd::move_leader(access, &leader, *to).await?;
            Some(format!("moved leadership from {from:x} to {to:x}"))
        }
        Action::RemoveMember { id } => {
            let mut client = access.connect(&endpoints()).await?;
            match etcd::remove(&mut client, *id).await? {
                Outcome::Done => Some(format!("removed member {id:x}")),
                Outcome::NotYet(why) => {
                    tracing::info!(member = %format!("{id:x}"), %why, "removal refused for now");
                    None
                }
            }
        }
        Action::ReplaceMember { ordinal, id } => {
            let mut client = access.connect(&endpoints()).await?;
            match etcd::remove(&mut client, *id).await? {
                Outcome::Done => Some(format!(
                    "removed member {id:x}: {} restarted with its data lost; it is added again as a learner and rejoins with no data",
                    names.pod(*ordinal)
                )),
                Outcome::NotYet(why) => {
                    tracing::info!(member = %format!("{id:x}"), %why, "removal refused for now");
                    None
                }
            }
        }
        Action::DeletePod { ordinal, reason } => {
            let pods = Api::<Pod>::namespaced(c.clone(), ns);
            pods.delete(&names.pod(*ordinal), &DeleteParams::default())
                .await?;
            Some(format!("deleted pod {} ({reason:?})", names.pod(*ordinal)))
        }
        Action::RecycleVolume { ordinal } => {
            let pod = names.pod(*ordinal);
            let pvcs = Api::<PersistentVolumeClaim>::namespaced(c.clone(), ns);
            ignore_missing(
                pvcs.delete(&format!("data-{pod}"), &DeleteParams::default())
                    .await,
            )?;
            let pods = Api::<Pod>::namespaced(c.clone(), ns);
            ignore_missing(pods.delete(&pod, &DeleteParams::default()).await)?;
            Some(format!(
                "deleted the volume of {pod}: it held a removed member's data"
            ))
        }
        Action::LabelVolume { ordinal, member_id } => {
            let pvcs = Api::<PersistentVolumeClaim>::namespaced(c.clone(), ns);
            let patch = serde_json::json!({"metadata": {"annotations": {VOLUME_MEMBER: format!("{member_id:x}")}}});
            pvcs.patch(
                &format!("data-{}", names.pod(*ordinal)),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
            None
        }
        Action::Wait { .. } | Action::QuorumLost { .. } | Action::Idle => None,
    };
    Ok(note)
}

fn ignore_missing<T>(r: Result<T, kube::Error>) -> Result<(), Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Events and metrics for what this reconcile did, then the status `status::status` computes.
async fn report(
    ctx: &Context,
    ec: &EtcdCluster,
    o: &Observed,
    action: &Action,
    members: Vec<MemberStatus>,
    note: Option<String>,
    backup: Option<BackupRecord>,
) -> Result<(), Error> {
    let kind = action_kind(action);
    if let Some(note) = &note {
        ctx.metrics.action(kind);
        publish(ctx, ec, EventType::Normal, kind, note).await;
    }
    if let Action::QuorumLost { message } = action {
        publish(ctx, ec, EventType::Warning, "QuorumLost", message).await;
    }
    let status = status::status(ec, o, action, members, note, backup, jiff::Timestamp::now());
    if ec.status.as_ref() != Some(&status) {
        patch_status(&ctx.client, ec, &status).await?;
    }
    Ok(())
}

/// Runs a backup when one is due and the cluster can serve it.
async fn maybe_backup(
    ctx: &Context,
    ec: &EtcdCluster,
    ns: &str,
    o: &Observed,
    members: &[MemberStatus],
    access: &etcd::Access,
) -> Option<BackupRecord> {
    let spec = ec.spec.backup.as_ref()?;
    o.etcd.as_ref()?.leader?;
    let last = ec.status.as_ref().and_then(|s| s.last_backup.as_ref());
    let created = ec
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or_else(jiff::Timestamp::now);
    match backup::due(spec, last, created, jiff::Timestamp::now()) {
        Ok(false) => return None,
        Ok(true) => {}
        Err(e) => {
            // A bad schedule is reported once per change, as a failed backup.
            if last.and_then(|l| l.message.as_deref()) == Some(&e.to_string()) {
                return None;
            }
            return Some(backup::failed(spec, e.to_string()));
        }
    }
    let mut credentials = BTreeMap::new();
    if let Some(secret) = &spec.credentials_secret {
        match Api::<Secret>::namespaced(ctx.client.clone(), ns)
            .get(secret)
            .await
        {
            Ok(s) => {
                for (k, v) in s.data.unwrap_or_default() {
                    credentials.insert(k, String::from_utf8_lossy(&v.0).to_string());
                }
                for (k, v) in s.string_data.unwrap_or_default() {
                    credentials.insert(k, v);
                }
            }
            Err(e) => {
                return Some(backup::failed(
                    spec,
                    format!("reading Secret {secret}: {e}"),
                ))
            }
        }
    }
    let started = std::time::Instant::now();
    let scratch = std::env::temp_dir().join("oxcd-operator-backups");
    let record = backup::run(ec, spec, members, access, &credentials, &scratch).await;
    ctx.metrics
        .backup(record.succeeded, started.elapsed(), record.size);
    let (type_, reason, note) = if record.succeeded {
        (
            EventType::Normal,
            "BackupSucceeded",
            format!(
                "{} (revision {}, {} keys, {} bytes), read back and verified",
                record.url, record.revision, record.keys, record.size
            ),
        )
    } else {
        (
            EventType::Warning,
            "BackupFailed",
            record.message.clone().unwrap_or_default(),
        )
    };
    publish(ctx, ec, type_, reason, &note).await;
    Some(record)
}

async fn patch_status(
    client: &kube::Client,
    ec: &EtcdCluster,
    status: &EtcdClusterStatus,
) -> Result<(), Error> {
    let api = Api::<EtcdCluster>::namespaced(
        client.clone(),
        &ec.namespace().unwrap_or_else(|| "default".into()),
    );
    let patch = serde_json::json!({ "status": status });
    api.patch_status(
        &ec.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

async fn publish(ctx: &Context, ec: &EtcdCluster, type_: EventType, reason: &str, note: &str) {
    let ev = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: reason.to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &ec.object_ref(&())).await {
        tracing::warn!(error = %e, "publishing an event failed");
    }
}
