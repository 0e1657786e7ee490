//! What an `EtcdCluster`'s status says (phase, conditions, members, backups), from what was
//! observed and decided: pure, like `decide`, so it is tested without a cluster.

use crate::crd::{BackupRecord, EtcdCluster, EtcdClusterStatus, MemberStatus};
use crate::decide::{action_kind, Action, ClusterState, Observed};
use crate::resources;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The phase shown by `kubectl get etcdc`: Running only when nothing is left to do.
pub fn phase(o: &Observed, action: &Action) -> &'static str {
    match action {
        Action::Idle => return "Running",
        Action::ReplaceMember { .. } => return "Repairing",
        Action::QuorumLost { .. } => return "QuorumLost",
        Action::Wait { degraded: true, .. } => return "Degraded",
        Action::CreateCluster { .. } => return "Creating",
        _ => {}
    }
    let Some(etcd) = &o.etcd else {
        return "Creating";
    };
    let members = etcd.members.len() as u32;
    if members != o.desired_replicas || etcd.members.iter().any(|m| m.learner) {
        return "Scaling";
    }
    if o.bootstrap
        .as_ref()
        .is_some_and(|b| b.state == ClusterState::New)
    {
        return "Creating";
    }
    // Restarting members (an upgrade, or pods that went away) until all are back.
    "Upgrading"
}

/// Conditions with transition times kept while their status is unchanged.
pub fn conditions(
    ec: &EtcdCluster,
    at: jiff::Timestamp,
    now: &[(&str, bool, &str, String)],
) -> Vec<Condition> {
    let old = ec
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    now.iter()
        .map(|(type_, status, reason, message)| {
            let status = if *status { "True" } else { "False" }.to_string();
            let since = old
                .iter()
                .find(|c| c.type_ == *type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or(Time(at));
            Condition {
                type_: type_.to_string(),
                status,
                reason: reason.to_string(),
                message: message.clone(),
                last_transition_time: since,
                observed_generation: ec.metadata.generation,
            }
        })
        .collect()
}

/// The status to write after `action` (taken or not, `note` saying what was done), with this
/// reconcile's backup if one ran; condition transition times are `now` where they change.
pub fn status(
    ec: &EtcdCluster,
    o: &Observed,
    action: &Action,
    members: Vec<MemberStatus>,
    note: Option<String>,
    backup: Option<BackupRecord>,
    now: jiff::Timestamp,
) -> EtcdClusterStatus {
    let kind = action_kind(action);
    let phase = phase(o, action);
    let (available, degraded, progressing, why) = match action {
        Action::QuorumLost { message } => (false, true, false, message.clone()),
        Action::Wait {
            reason,
            degraded: true,
        } => (
            o.etcd.as_ref().is_some_and(|e| e.leader.is_some()),
            true,
            false,
            reason.clone(),
        ),
        Action::Wait { reason, .. } => (
            o.etcd.as_ref().is_some_and(|e| e.leader.is_some()),
            false,
            true,
            reason.clone(),
        ),
        Action::Idle => (
            true,
            false,
            false,
            "all members healthy and up to date".to_string(),
        ),
        other => (
            o.etcd.as_ref().is_some_and(|e| e.leader.is_some()),
            false,
            true,
            note.clone().unwrap_or_else(|| format!("{other:?}")),
        ),
    };
    let even = ec.spec.replicas % 2 == 0;
    let old = ec.status.clone().unwrap_or_default();
    let last_backup = backup.clone().or(old.last_backup.clone());
    let last_successful_backup = match &backup {
        Some(b) if b.succeeded => Some(b.clone()),
        _ => old.last_successful_backup.clone(),
    };
    let mut wanted = vec![];
    if ec.spec.backup.is_some() {
        wanted.push(match &last_backup {
            Some(b) if b.succeeded => (
                "BackupReady",
                true,
                "BackupVerified",
                format!(
                    "{} (revision {}, {} bytes, verified)",
                    b.url, b.revision, b.size
                ),
            ),
            Some(b) => (
                "BackupReady",
                false,
                "BackupFailed",
                b.message.clone().unwrap_or_default(),
            ),
            None => (
                "BackupReady",
                false,
                "NoBackupYet",
                "no backup has run yet".to_string(),
            ),
        });
    }
    let mut conds = conditions(
        ec,
        now,
        &[
            (
                "Available",
                available,
                if available {
                    "QuorumHealthy"
                } else {
                    "NoQuorum"
                },
                why.clone(),
            ),
            ("Progressing", progressing, kind, why.clone()),
            (
                "Degraded",
                degraded,
                if degraded { kind } else { "AsExpected" },
                why.clone(),
            ),
            (
                "EvenMemberCount",
                even,
                if even { "EvenReplicas" } else { "OddReplicas" },
                if even {
                    format!(
                        "{} members tolerate no more failures than {}; use an odd size",
                        ec.spec.replicas,
                        ec.spec.replicas - 1
                    )
                } else {
                    String::new()
                },
            ),
        ],
    );
    conds.extend(conditions(ec, now, &wanted));
    let leader = members.iter().find(|m| m.leader).map(|m| m.name.clone());
    // The version every member runs: known once each pod has the current template and is ready.
    let all_current = !o.pods.is_empty()
        && o.pods
            .values()
            .all(|p| p.template == o.desired_template && p.ready && !p.terminating);
    EtcdClusterStatus {
        observed_generation: ec.metadata.generation,
        phase: Some(phase.into()),
        replicas: o.etcd.as_ref().map_or(0, |e| e.members.len() as i32),
        ready_replicas: members.iter().filter(|m| m.healthy).count() as i32,
        selector: Some(resources::selector_string(ec)),
        current_version: if all_current {
            Some(ec.spec.version_label())
        } else {
            old.current_version.clone()
        },
        leader,
        members,
        conditions: conds,
        last_backup,
        last_successful_backup,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{example, healthy};

    fn member(name: &str, leader: bool) -> MemberStatus {
        MemberStatus {
            name: name.into(),
            leader,
            healthy: true,
            ..Default::default()
        }
    }

    fn condition<'a>(s: &'a EtcdClusterStatus, type_: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_} condition in {:?}", s.conditions))
    }

    fn at(secs: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn an_idle_cluster_is_running_and_available() {
        let ec = example(serde_json::json!({"replicas": 3}));
        let members = vec![member("demo-0", true), member("demo-1", false)];
        let s = status(
            &ec,
            &healthy(3),
            &Action::Idle,
            members,
            None,
            None,
            at(100),
        );
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.leader.as_deref(), Some("demo-0"));
        assert_eq!((s.replicas, s.ready_replicas), (3, 2));
        assert_eq!(condition(&s, "Available").status, "True");
        assert_eq!(condition(&s, "Degraded").status, "False");
        assert_eq!(condition(&s, "EvenMemberCount").status, "False");
        assert!(
            s.conditions.iter().all(|c| c.type_ != "BackupReady"),
            "no backup configured: {:?}",
            s.conditions
        );
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let mut ec = example(serde_json::json!({"replicas": 3}));
        let first = status(&ec, &healthy(3), &Action::Idle, vec![], None, None, at(100));
        ec.status = Some(first);
        let again = status(&ec, &healthy(3), &Action::Idle, vec![], None, None, at(200));
        assert_eq!(
            condition(&again, "Available").last_transition_time,
            Time(at(100))
        );
        ec.status = Some(again);
        let lost = Action::QuorumLost {
            message: "2 of 3 members lost".into(),
        };
        let s = status(&ec, &healthy(3), &lost, vec![], None, None, at(300));
        assert_eq!(s.phase.as_deref(), Some("QuorumLost"));
        let available = condition(&s, "Available");
        assert_eq!(
            (available.status.as_str(), available.reason.as_str()),
            ("False", "NoQuorum")
        );
        assert_eq!(available.last_transition_time, Time(at(300)));
        assert_eq!(condition(&s, "Degraded").reason, "QuorumLost");
    }

    #[test]
    fn an_even_size_is_flagged() {
        let ec = example(serde_json::json!({"replicas": 4}));
        let s = status(&ec, &healthy(4), &Action::Idle, vec![], None, None, at(1));
        let even = condition(&s, "EvenMemberCount");
        assert_eq!(even.status, "True");
        assert!(even.message.contains("use an odd size"), "{}", even.message);
    }
}
