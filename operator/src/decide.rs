//! The operator's brain: from one observation of a cluster, the single next safe action.
//!
//! Pure: no I/O, no clock (ages come in the observation). `observe` builds an `Observed`,
//! `decide` returns an `Action`, `act` performs it; the next reconcile observes the result.
//! Because the decision is taken again from what is observed, every step resumes correctly
//! after the operator is killed at any point.
//!
//! Safety rules, each enforced here and checked by the property tests below:
//! - at most one membership change in flight (an unstarted or unpromoted learner is one);
//! - no action leaves fewer healthy voters than a quorum of the voters after it;
//! - nothing while the cluster has no leader (the observation is reported instead);
//! - the leader is moved away before it is removed or its pod deleted;
//! - only members outside the desired set are removed.

use std::collections::{BTreeMap, BTreeSet};

/// How long a restarted member may take to come back healthy before the roll stops.
pub const MEMBER_RETURN_TIMEOUT_SECS: u64 = 300;

/// Everything the decision needs, gathered by `observe`.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// spec.replicas.
    pub desired_replicas: u32,
    /// Hash of everything in the pod template; pods carrying another hash are outdated.
    pub desired_template: String,
    /// Ordinal of spec.preferredLeader, when it names a pod of this cluster.
    pub preferred_leader: Option<u32>,
    /// The StatefulSet's spec.replicas; None until the cluster is created.
    pub statefulset_replicas: Option<u32>,
    /// What the bootstrap ConfigMap tells a starting member; None until written.
    pub bootstrap: Option<Bootstrap>,
    pub pods: BTreeMap<u32, PodObs>,
    /// Volumes by ordinal, with the member ID recorded on each once its member started.
    pub volumes: BTreeMap<u32, VolumeObs>,
    /// The etcd side; None when no member answered.
    pub etcd: Option<EtcdObs>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bootstrap {
    pub state: ClusterState,
    /// Ordinals of the members a starting member is told about (ETCD_INITIAL_CLUSTER).
    pub members: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterState {
    New,
    Existing,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PodObs {
    pub template: String,
    /// Kubernetes readiness (the /readyz probe).
    pub ready: bool,
    /// Being deleted (deletionTimestamp set).
    pub terminating: bool,
    /// Seconds since the pod was created.
    pub age_secs: u64,
    /// The member its server last refused to start as because its data dir is empty while
    /// the cluster knows that member as started (its data is lost): the ID named in the
    /// container's last termination message.
    pub lost_member: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct VolumeObs {
    pub member_id: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdObs {
    pub leader: Option<u64>,
    pub members: Vec<MemberObs>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberObs {
    pub id: u64,
    /// The pod ordinal, from the member's peer URL; None for a member that is not one of
    /// this cluster's pods.
    pub ordinal: Option<u32>,
    /// Has published its name (the process has run).
    pub started: bool,
    pub learner: bool,
    /// Answered Status through its own endpoint, naming a leader.
    pub healthy: bool,
}

/// The one thing to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write the bootstrap ConfigMap and create the StatefulSet with `replicas` members that
    /// form a new cluster together.
    CreateCluster { replicas: u32 },
    /// Rewrite the bootstrap ConfigMap so a member starting now joins the current cluster.
    WriteBootstrap(Bootstrap),
    /// MemberAdd of pod `ordinal` as a learner.
    AddLearner { ordinal: u32 },
    /// Set the StatefulSet's replicas.
    ScaleStatefulSet { replicas: u32 },
    /// MemberPromote once the learner has caught up (etcd refuses until then).
    PromoteLearner { id: u64 },
    /// MoveLeader to `to`.
    MoveLeader { from: u64, to: u64 },
    /// MemberRemove.
    RemoveMember { id: u64 },
    /// MemberRemove of a wanted member whose data is lost, so that it is added again as a
    /// learner and rejoins with no data (the next reconciles do that).
    ReplaceMember { ordinal: u32, id: u64 },
    /// Delete pod `ordinal` so that it is recreated from the current template.
    DeletePod { ordinal: u32, reason: DeleteReason },
    /// Delete the volume of `ordinal` (and its pod, which holds it) because its data belongs
    /// to a member that is no longer in the cluster.
    RecycleVolume { ordinal: u32 },
    /// Record on the volume which member's data it holds.
    LabelVolume { ordinal: u32, member_id: u64 },
    /// Nothing safe to do until something changes; `degraded` when a person may need to act.
    Wait { reason: String, degraded: bool },
    /// The cluster has lost its quorum; report, never act.
    QuorumLost { message: String },
    /// Everything matches the spec.
    Idle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteReason {
    Upgrade,
    /// The pod of a re-added learner waits out a crash back-off from its lost-data run.
    Rejoin,
}

pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

fn wait(reason: impl Into<String>) -> Action {
    Action::Wait {
        reason: reason.into(),
        degraded: false,
    }
}

fn degraded(reason: impl Into<String>) -> Action {
    Action::Wait {
        reason: reason.into(),
        degraded: true,
    }
}

/// The next single safe action.
pub fn decide(o: &Observed) -> Action {
    let desired = o.desired_replicas.max(1);
    let Some(sts_replicas) = o.statefulset_replicas else {
        return Action::CreateCluster { replicas: desired };
    };
    let Some(etcd) = &o.etcd else {
        return unreachable(o, sts_replicas);
    };
    let voters: Vec<&MemberObs> = etcd.members.iter().filter(|m| !m.learner).collect();
    let healthy_voters = voters.iter().filter(|m| m.healthy).count();
    let bootstrapping = o
        .bootstrap
        .as_ref()
        .is_some_and(|b| b.state == ClusterState::New);
    let Some(leader) = etcd.leader else {
        if healthy_voters < quorum(voters.len()) && !bootstrapping {
            return Action::QuorumLost {
                message: quorum_message(voters.len(), healthy_voters),
            };
        }
        return wait("no leader yet; waiting for an election");
    };
    if healthy_voters < quorum(voters.len()) {
        // A leader exists, so the cluster has its quorum; members just do not answer us yet.
        let why = format!(
            "only {healthy_voters} of {} voting members answer the operator",
            voters.len()
        );
        return if bootstrapping {
            wait(why)
        } else {
            degraded(why)
        };
    }
    if let Some(stranger) = etcd.members.iter().find(|m| m.ordinal.is_none()) {
        return degraded(format!(
            "member {:x} is not one of this cluster's pods; remove it with etcdctl member remove",
            stranger.id
        ));
    }
    let by_ordinal: BTreeMap<u32, &MemberObs> = etcd
        .members
        .iter()
        .filter_map(|m| m.ordinal.map(|k| (k, m)))
        .collect();

    // Bootstrap information always describes the current member list, so a pod that starts
    // now (scale-up, replacement) joins the right cluster.
    let want_bootstrap = Bootstrap {
        state: ClusterState::Existing,
        members: by_ordinal.keys().copied().collect(),
    };
    if o.bootstrap.as_ref() != Some(&want_bootstrap) {
        return Action::WriteBootstrap(want_bootstrap);
    }

    // Record which member each started volume belongs to.
    for (k, m) in &by_ordinal {
        if !m.started {
            continue;
        }
        if let Some(v) = o.volumes.get(k) {
            if v.member_id.is_none() && o.pods.get(k).is_some_and(|p| p.ready) {
                return Action::LabelVolume {
                    ordinal: *k,
                    member_id: m.id,
                };
            }
        }
    }

    // 1. Finish the membership change in flight (a learner), or undo it if no longer wanted.
    if let Some((k, learner)) = by_ordinal.iter().find(|(_, m)| m.learner) {
        let (k, learner) = (*k, *learner);
        if k >= desired {
            return Action::RemoveMember { id: learner.id };
        }
        if !learner.started {
            if let Some(v) = o.volumes.get(&k) {
                if v.member_id.is_some_and(|id| id != learner.id) {
                    return Action::RecycleVolume { ordinal: k };
                }
            }
            if sts_replicas <= k {
                return Action::ScaleStatefulSet { replicas: k + 1 };
            }
            // Its pod waits out the crash back-off of a lost-data run, or is stuck (e.g.
            // Pending on a claim deleted under it): a new pod joins now.
            if o.pods.get(&k).is_some_and(|p| {
                !p.ready
                    && !p.terminating
                    && (p.lost_member.is_some() || p.age_secs >= MEMBER_RETURN_TIMEOUT_SECS)
            }) {
                return Action::DeletePod {
                    ordinal: k,
                    reason: DeleteReason::Rejoin,
                };
            }
            return wait(format!("waiting for learner {} to start", k));
        }
        if !learner.healthy {
            return wait(format!("waiting for learner {} to become healthy", k));
        }
        return Action::PromoteLearner { id: learner.id };
    }

    // 2. Replace a wanted member whose data is lost: its server refuses to start under the
    //    old identity, so remove it; step 4 adds it again as a learner.
    if let Some((k, m)) = by_ordinal.iter().find(|(k, m)| {
        **k < desired
            && !m.learner
            && m.id != leader
            && o.pods.get(k).is_some_and(|p| p.lost_member == Some(m.id))
    }) {
        let healthy_after = healthy_voters - usize::from(m.healthy);
        if healthy_after < quorum(voters.len() - 1) {
            return degraded(format!(
                "member {k} lost its data but removing it would leave {healthy_after} healthy of {} voters",
                voters.len() - 1
            ));
        }
        return Action::ReplaceMember {
            ordinal: *k,
            id: m.id,
        };
    }

    // 3. Scale down: remove the highest member outside the desired set, leader moved first.
    if let Some((k, m)) = by_ordinal.iter().rev().find(|(k, _)| **k >= desired) {
        let (_k, m) = (*k, *m);
        if m.id == leader {
            return match move_target(o, &by_ordinal, leader, desired) {
                Some(to) => Action::MoveLeader { from: leader, to },
                None => degraded("the leader must be removed but no healthy member can take over"),
            };
        }
        let after = voters.len() - 1;
        let healthy_after = healthy_voters - usize::from(m.healthy);
        if healthy_after < quorum(after) {
            return degraded(format!(
                "removing member {:x} would leave {healthy_after} healthy of {after} voters",
                m.id
            ));
        }
        return Action::RemoveMember { id: m.id };
    }
    if sts_replicas > desired {
        return Action::ScaleStatefulSet { replicas: desired };
    }

    // 4. Scale up (or re-add a member removed behind our back): one learner at a time, only
    //    when every voter is healthy.
    if let Some(k) = (0..desired).find(|k| !by_ordinal.contains_key(k)) {
        if healthy_voters < voters.len() {
            return wait("waiting for every member to be healthy before adding one");
        }
        return Action::AddLearner { ordinal: k };
    }
    // Every member needs its pod (someone may have scaled the StatefulSet by hand).
    let top = by_ordinal.keys().next_back().map_or(0, |k| k + 1);
    if sts_replicas < top {
        return Action::ScaleStatefulSet { replicas: top };
    }

    // 5. Rolling upgrade: followers first, leader last after moving leadership.
    if let Some(a) = roll(o, &by_ordinal, leader, healthy_voters, voters.len()) {
        return a;
    }

    // 6. Leader placement on request.
    if let Some(p) = o.preferred_leader {
        if let Some(m) = by_ordinal.get(&p) {
            if m.id != leader && m.healthy && !m.learner {
                return Action::MoveLeader {
                    from: leader,
                    to: m.id,
                };
            }
        }
    }
    if healthy_voters < voters.len() {
        return degraded(format!(
            "{} of {} members healthy",
            healthy_voters,
            voters.len()
        ));
    }
    Action::Idle
}

fn quorum_message(voters: usize, healthy: usize) -> String {
    format!(
        "only {healthy} of {voters} voting members are healthy (quorum is {}); bring members \
         back, or recover from a backup (spec.restore into a new EtcdCluster)",
        quorum(voters)
    )
}

/// No member answered: a new cluster still starting, or every member is down.
fn unreachable(o: &Observed, sts_replicas: u32) -> Action {
    let bootstrapping = o
        .bootstrap
        .as_ref()
        .is_some_and(|b| b.state == ClusterState::New);
    let young = o
        .pods
        .values()
        .all(|p| p.age_secs < MEMBER_RETURN_TIMEOUT_SECS);
    if bootstrapping && (young || o.pods.len() < sts_replicas as usize) {
        return wait("waiting for the members of the new cluster to start");
    }
    Action::QuorumLost {
        message: "no member answers on its client URL; check the pods' logs".to_string(),
    }
}

/// Where to move leadership away from `leader`: preferably the preferred leader, else the
/// lowest healthy, up-to-date voter in the desired set.
fn move_target(
    o: &Observed,
    by_ordinal: &BTreeMap<u32, &MemberObs>,
    leader: u64,
    desired: u32,
) -> Option<u64> {
    let candidates: Vec<(u32, &MemberObs)> = by_ordinal
        .iter()
        .filter(|(k, m)| **k < desired && m.id != leader && m.healthy && !m.learner && m.started)
        .map(|(k, m)| (*k, *m))
        .collect();
    let current = |k: u32| {
        o.pods
            .get(&k)
            .is_some_and(|p| p.template == o.desired_template)
    };
    candidates
        .iter()
        .find(|(k, _)| Some(*k) == o.preferred_leader && current(*k))
        .or_else(|| candidates.iter().find(|(k, _)| current(*k)))
        .or_else(|| candidates.first())
        .map(|(_, m)| m.id)
}

fn roll(
    o: &Observed,
    by_ordinal: &BTreeMap<u32, &MemberObs>,
    leader: u64,
    healthy_voters: usize,
    voters: usize,
) -> Option<Action> {
    let outdated: BTreeSet<u32> = o
        .pods
        .iter()
        .filter(|(k, p)| by_ordinal.contains_key(k) && p.template != o.desired_template)
        .map(|(k, _)| *k)
        .collect();
    // A member whose pod is restarting (ours or not): wait for it; if it does not come back,
    // stop with Degraded rather than disrupt a second member.
    for (k, m) in by_ordinal {
        let pod = o.pods.get(k);
        if pod.is_some_and(|p| p.ready && !p.terminating) && m.healthy {
            continue;
        }
        let age = pod.map_or(0, |p| p.age_secs);
        if age >= MEMBER_RETURN_TIMEOUT_SECS {
            return Some(degraded(format!(
                "member {k} has not come back healthy after {age}s; no further member is restarted until it does"
            )));
        }
        return Some(wait(format!("waiting for member {k} to come back healthy")));
    }
    if outdated.is_empty() {
        return None;
    }
    if voters == 2 || healthy_voters < voters {
        // Restarting either member of two loses quorum.
        return Some(degraded(
            "restarting a member now would leave less than a quorum; a two-member cluster cannot be upgraded without downtime, scale it to three",
        ));
    }
    // Followers first, highest ordinal first; the leader last.
    if let Some(k) = outdated
        .iter()
        .rev()
        .find(|k| by_ordinal.get(k).is_some_and(|m| m.id != leader))
    {
        return Some(Action::DeletePod {
            ordinal: *k,
            reason: DeleteReason::Upgrade,
        });
    }
    let k = *outdated.iter().next()?;
    if voters > 1 {
        let to = move_target(o, by_ordinal, leader, o.desired_replicas.max(1))?;
        return Some(Action::MoveLeader { from: leader, to });
    }
    // A single member cannot be restarted without downtime; that is what one member means.
    Some(Action::DeletePod {
        ordinal: k,
        reason: DeleteReason::Upgrade,
    })
}

pub fn action_kind(a: &Action) -> &'static str {
    match a {
        Action::CreateCluster { .. } => "CreateCluster",
        Action::WriteBootstrap(_) => "WriteBootstrap",
        Action::AddLearner { .. } => "AddLearner",
        Action::ScaleStatefulSet { .. } => "ScaleStatefulSet",
        Action::PromoteLearner { .. } => "PromoteLearner",
        Action::MoveLeader { .. } => "MoveLeader",
        Action::RemoveMember { .. } => "RemoveMember",
        Action::ReplaceMember { .. } => "ReplaceMember",
        Action::DeletePod { .. } => "DeletePod",
        Action::RecycleVolume { .. } => "RecycleVolume",
        Action::LabelVolume { .. } => "LabelVolume",
        Action::Wait { .. } => "Wait",
        Action::QuorumLost { .. } => "QuorumLost",
        Action::Idle => "Idle",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::fixtures::*;

    fn etcd(o: &mut Observed) -> &mut EtcdObs {
        o.etcd.as_mut().unwrap()
    }

    fn member_mut(o: &mut Observed, k: u32) -> &mut MemberObs {
        etcd(o)
            .members
            .iter_mut()
            .find(|m| m.ordinal == Some(k))
            .unwrap()
    }

    fn is_wait(a: &Action, want_degraded: bool) -> bool {
        matches!(a, Action::Wait { degraded, .. } if *degraded == want_degraded)
    }

    #[test]
    fn creates_a_new_cluster_then_waits_for_it() {
        let mut o = healthy(3);
        o.statefulset_replicas = None;
        o.etcd = None;
        assert_eq!(decide(&o), Action::CreateCluster { replicas: 3 });

        o.statefulset_replicas = Some(3);
        o.bootstrap = Some(Bootstrap {
            state: ClusterState::New,
            members: vec![0, 1, 2],
        });
        for p in o.pods.values_mut() {
            p.age_secs = 5;
        }
        assert!(is_wait(&decide(&o), false), "{:?}", decide(&o));
        // Once members answer, the bootstrap information switches to joining.
        let mut up = healthy(3);
        up.bootstrap = o.bootstrap.clone();
        assert_eq!(
            decide(&up),
            Action::WriteBootstrap(Bootstrap {
                state: ClusterState::Existing,
                members: vec![0, 1, 2]
            })
        );
    }

    #[test]
    fn an_established_cluster_that_stops_answering_has_lost_quorum() {
        let mut o = healthy(3);
        o.etcd = None;
        assert!(matches!(decide(&o), Action::QuorumLost { .. }));
    }

    #[test]
    fn steady_cluster_is_idle() {
        assert_eq!(decide(&healthy(3)), Action::Idle);
        assert_eq!(decide(&healthy(1)), Action::Idle);
    }

    #[test]
    fn started_volumes_are_labelled_with_their_member() {
        let mut o = healthy(3);
        o.volumes.get_mut(&1).unwrap().member_id = None;
        assert_eq!(
            decide(&o),
            Action::LabelVolume {
                ordinal: 1,
                member_id: id(1)
            }
        );
    }

    #[test]
    fn scale_up_adds_a_learner_grows_the_set_then_promotes() {
        let mut o = healthy(3);
        o.desired_replicas = 5;
        assert_eq!(decide(&o), Action::AddLearner { ordinal: 3 });

        let mut learner = member(3);
        learner.learner = true;
        learner.started = false;
        learner.healthy = false;
        etcd(&mut o).members.push(learner);
        // Killed between MemberAdd and the StatefulSet change: the bootstrap is rewritten
        // first, so the pod that starts next joins with the right member list.
        assert_eq!(
            decide(&o),
            Action::WriteBootstrap(Bootstrap {
                state: ClusterState::Existing,
                members: vec![0, 1, 2, 3]
            })
        );
        o.bootstrap.as_mut().unwrap().members.push(3);
        assert_eq!(decide(&o), Action::ScaleStatefulSet { replicas: 4 });

        o.statefulset_replicas = Some(4);
        assert!(is_wait(&decide(&o), false));
        o.pods.insert(
            3,
            PodObs {
                template: NEW.into(),
                ready: false,
                terminating: false,
                age_secs: 2,
                lost_member: None,
            },
        );
        member_mut(&mut o, 3).started = true;
        assert!(is_wait(&decide(&o), false), "learner not healthy yet");
        member_mut(&mut o, 3).healthy = true;
        assert_eq!(decide(&o), Action::PromoteLearner { id: id(3) });

        member_mut(&mut o, 3).learner = false;
        o.pods.get_mut(&3).unwrap().ready = true;
        o.volumes.insert(
            3,
            VolumeObs {
                member_id: Some(id(3)),
            },
        );
        assert_eq!(decide(&o), Action::AddLearner { ordinal: 4 });
    }

    #[test]
    fn scale_up_waits_for_every_member_to_be_healthy() {
        let mut o = healthy(3);
        o.desired_replicas = 4;
        member_mut(&mut o, 2).healthy = false;
        assert!(is_wait(&decide(&o), false));
    }

    #[test]
    fn scale_down_moves_the_leader_removes_then_shrinks() {
        let mut o = healthy(5);
        o.desired_replicas = 3;
        etcd(&mut o).leader = Some(id(4));
        assert_eq!(
            decide(&o),
            Action::MoveLeader {
                from: id(4),
                to: id(0)
            }
        );

        etcd(&mut o).leader = Some(id(0));
        assert_eq!(decide(&o), Action::RemoveMember { id: id(4) });
        etcd(&mut o).members.retain(|m| m.id != id(4));
        o.bootstrap.as_mut().unwrap().members.retain(|k| *k != 4);
        assert_eq!(decide(&o), Action::RemoveMember { id: id(3) });
        etcd(&mut o).members.retain(|m| m.id != id(3));
        o.bootstrap.as_mut().unwrap().members.retain(|k| *k != 3);
        assert_eq!(decide(&o), Action::ScaleStatefulSet { replicas: 3 });
        o.statefulset_replicas = Some(3);
        o.pods.retain(|k, _| *k < 3);
        assert_eq!(decide(&o), Action::Idle);
    }

    #[test]
    fn scale_down_refuses_to_break_quorum() {
        let mut o = healthy(3);
        o.desired_replicas = 2;
        member_mut(&mut o, 1).healthy = false;
        // Removing healthy member 2 leaves 1 healthy of 2 voters: below quorum.
        assert!(is_wait(&decide(&o), true), "{:?}", decide(&o));
    }

    #[test]
    fn an_unwanted_learner_is_removed() {
        let mut o = healthy(3);
        let mut learner = member(3);
        learner.learner = true;
        learner.started = false;
        etcd(&mut o).members.push(learner);
        o.bootstrap.as_mut().unwrap().members.push(3);
        assert_eq!(decide(&o), Action::RemoveMember { id: id(3) });
    }

    #[test]
    fn rolling_upgrade_restarts_followers_then_moves_the_leader_and_restarts_it() {
        let mut o = healthy(3);
        for p in o.pods.values_mut() {
            p.template = OLD.into();
        }
        assert_eq!(
            decide(&o),
            Action::DeletePod {
                ordinal: 2,
                reason: DeleteReason::Upgrade
            }
        );
        // Pod 2 is recreated; until it is back and healthy nothing else happens.
        o.pods.insert(
            2,
            PodObs {
                template: NEW.into(),
                ready: false,
                terminating: false,
                age_secs: 3,
                lost_member: None,
            },
        );
        member_mut(&mut o, 2).healthy = false;
        assert!(is_wait(&decide(&o), false));
        o.pods.get_mut(&2).unwrap().ready = true;
        member_mut(&mut o, 2).healthy = true;
        assert_eq!(
            decide(&o),
            Action::DeletePod {
                ordinal: 1,
                reason: DeleteReason::Upgrade
            }
        );
        o.pods.insert(
            1,
            PodObs {
                template: NEW.into(),
                ready: true,
                terminating: false,
                age_secs: 3,
                lost_member: None,
            },
        );
        // Only the leader is left: leadership goes to an upgraded member first.
        assert_eq!(
            decide(&o),
            Action::MoveLeader {
                from: id(0),
                to: id(1)
            }
        );
        etcd(&mut o).leader = Some(id(1));
        assert_eq!(
            decide(&o),
            Action::DeletePod {
                ordinal: 0,
                reason: DeleteReason::Upgrade
            }
        );
        o.pods.insert(
            0,
            PodObs {
                template: NEW.into(),
                ready: true,
                terminating: false,
                age_secs: 3,
                lost_member: None,
            },
        );
        assert_eq!(decide(&o), Action::Idle);
    }

    #[test]
    fn a_member_that_does_not_come_back_stops_the_roll() {
        let mut o = healthy(3);
        for p in o.pods.values_mut() {
            p.template = OLD.into();
        }
        o.pods.insert(
            2,
            PodObs {
                template: NEW.into(),
                ready: false,
                terminating: false,
                age_secs: MEMBER_RETURN_TIMEOUT_SECS + 1,
                lost_member: None,
            },
        );
        member_mut(&mut o, 2).healthy = false;
        assert!(is_wait(&decide(&o), true), "{:?}", decide(&o));
    }

    #[test]
    fn two_members_cannot_roll_but_one_member_can() {
        let mut two = healthy(2);
        for p in two.pods.values_mut() {
            p.template = OLD.into();
        }
        assert!(is_wait(&decide(&two), true));
        let mut one = healthy(1);
        one.pods.get_mut(&0).unwrap().template = OLD.into();
        assert_eq!(
            decide(&one),
            Action::DeletePod {
                ordinal: 0,
                reason: DeleteReason::Upgrade
            }
        );
    }

    #[test]
    fn no_leader_means_wait_or_quorum_lost() {
        let mut o = healthy(3);
        etcd(&mut o).leader = None;
        assert!(is_wait(&decide(&o), false));
        member_mut(&mut o, 1).healthy = false;
        member_mut(&mut o, 2).healthy = false;
        assert!(matches!(decide(&o), Action::QuorumLost { .. }));
    }

    #[test]
    fn preferred_leader_is_honoured() {
        let mut o = healthy(3);
        o.preferred_leader = Some(2);
        assert_eq!(
            decide(&o),
            Action::MoveLeader {
                from: id(0),
                to: id(2)
            }
        );
        etcd(&mut o).leader = Some(id(2));
        assert_eq!(decide(&o), Action::Idle);
        // Not while that member is unhealthy.
        etcd(&mut o).leader = Some(id(0));
        member_mut(&mut o, 2).healthy = false;
        assert!(!matches!(decide(&o), Action::MoveLeader { .. }));
    }

    #[test]
    fn a_member_removed_behind_our_back_is_re_added_on_a_fresh_volume() {
        let mut o = healthy(3);
        etcd(&mut o).members.retain(|m| m.ordinal != Some(2));
        o.bootstrap.as_mut().unwrap().members = vec![0, 1];
        assert_eq!(decide(&o), Action::AddLearner { ordinal: 2 });
        let mut learner = member(2);
        learner.id = 0x9999;
        learner.learner = true;
        learner.started = false;
        learner.healthy = false;
        etcd(&mut o).members.push(learner);
        o.bootstrap.as_mut().unwrap().members = vec![0, 1, 2];
        // The volume still holds the removed member's data.
        assert_eq!(decide(&o), Action::RecycleVolume { ordinal: 2 });
        o.volumes.remove(&2);
        assert!(is_wait(&decide(&o), false));
    }

    #[test]
    fn a_member_whose_data_is_lost_is_removed_re_added_and_its_pod_restarted() {
        // Pod 2 restarted on an empty volume: its server refuses to start as member 2.
        let mut o = healthy(3);
        member_mut(&mut o, 2).healthy = false;
        let pod = o.pods.get_mut(&2).unwrap();
        pod.ready = false;
        pod.lost_member = Some(id(2));
        o.volumes.get_mut(&2).unwrap().member_id = None;
        assert_eq!(
            decide(&o),
            Action::ReplaceMember {
                ordinal: 2,
                id: id(2)
            }
        );
        // Not while another membership change is in flight.
        let mut busy = o.clone();
        busy.desired_replicas = 4;
        busy.statefulset_replicas = Some(4);
        let mut learner = member(3);
        learner.learner = true;
        learner.healthy = false;
        busy.bootstrap.as_mut().unwrap().members = vec![0, 1, 2, 3];
        etcd(&mut busy).members.push(learner);
        assert!(is_wait(&decide(&busy), false), "{:?}", decide(&busy));
        // Not when removing it would leave less than a quorum of healthy voters.
        let mut weak = o.clone();
        member_mut(&mut weak, 1).healthy = false;
        assert!(is_wait(&decide(&weak), true), "{:?}", decide(&weak));

        // Removed: added again as a learner under a new ID.
        etcd(&mut o).members.retain(|m| m.ordinal != Some(2));
        o.bootstrap.as_mut().unwrap().members = vec![0, 1];
        assert_eq!(decide(&o), Action::AddLearner { ordinal: 2 });
        let mut learner = member(2);
        learner.id = 0x2002;
        learner.learner = true;
        learner.started = false;
        learner.healthy = false;
        etcd(&mut o).members.push(learner);
        o.bootstrap.as_mut().unwrap().members = vec![0, 1, 2];
        // Its pod is in a crash back-off from the refused start: restart it now.
        assert_eq!(
            decide(&o),
            Action::DeletePod {
                ordinal: 2,
                reason: DeleteReason::Rejoin
            }
        );
        // The new pod joins; the stale message of an old pod never names the new member.
        let pod = o.pods.get_mut(&2).unwrap();
        pod.lost_member = None;
        pod.age_secs = 5;
        assert!(is_wait(&decide(&o), false));
        // A pod that never starts its member is replaced too.
        let mut stuck = o.clone();
        stuck.pods.get_mut(&2).unwrap().age_secs = MEMBER_RETURN_TIMEOUT_SECS;
        assert_eq!(
            decide(&stuck),
            Action::DeletePod {
                ordinal: 2,
                reason: DeleteReason::Rejoin
            }
        );
        let m = member_mut(&mut o, 2);
        m.started = true;
        m.healthy = true;
        assert_eq!(decide(&o), Action::PromoteLearner { id: 0x2002 });
        let m = member_mut(&mut o, 2);
        m.learner = false;
        o.pods.get_mut(&2).unwrap().lost_member = Some(id(2));
        o.pods.get_mut(&2).unwrap().ready = true;
        assert_eq!(
            decide(&o),
            Action::LabelVolume {
                ordinal: 2,
                member_id: 0x2002
            }
        );
        o.volumes.get_mut(&2).unwrap().member_id = Some(0x2002);
        assert_eq!(decide(&o), Action::Idle);
    }

    #[test]
    fn a_member_of_another_cluster_is_reported() {
        let mut o = healthy(3);
        let mut stranger = member(7);
        stranger.ordinal = None;
        etcd(&mut o).members.push(stranger);
        assert!(is_wait(&decide(&o), true));
    }

    // ---- properties over random states ----

    use proptest::prelude::*;

    fn arb_observed() -> impl Strategy<Value = Observed> {
        let member = (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>());
        let pod = (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u64..600,
            any::<bool>(),
        );
        (
            1u32..=9,
            proptest::collection::btree_map(0u32..9, (member, proptest::option::of(pod)), 1..8),
            0usize..8,
            any::<bool>(),
            proptest::option::of(0u32..9),
            0u32..10,
            any::<bool>(),
        )
            .prop_map(
                |(desired, members, leader_pick, has_leader, preferred, sts, boot_ok)| {
                    let mut o = healthy(0);
                    o.desired_replicas = desired;
                    o.preferred_leader = preferred;
                    o.statefulset_replicas = Some(sts);
                    let mut list = Vec::new();
                    for (k, ((learner, started, healthy, labelled), pod)) in &members {
                        list.push(MemberObs {
                            id: id(*k),
                            ordinal: Some(*k),
                            started: *started || !*learner,
                            learner: *learner,
                            healthy: *healthy,
                        });
                        if let Some((ready, current, terminating, age, lost)) = pod {
                            o.pods.insert(
                                *k,
                                PodObs {
                                    template: if *current { NEW } else { OLD }.into(),
                                    ready: *ready,
                                    terminating: *terminating,
                                    age_secs: *age,
                                    lost_member: lost.then_some(id(*k)),
                                },
                            );
                        }
                        o.volumes.insert(
                            *k,
                            VolumeObs {
                                member_id: labelled.then_some(id(*k)),
                            },
                        );
                    }
                    let voters: Vec<u64> =
                        list.iter().filter(|m| !m.learner).map(|m| m.id).collect();
                    let leader = (has_leader && !voters.is_empty())
                        .then(|| voters[leader_pick % voters.len()]);
                    o.bootstrap = Some(Bootstrap {
                        state: ClusterState::Existing,
                        members: if boot_ok {
                            members.keys().copied().collect()
                        } else {
                            vec![]
                        },
                    });
                    o.etcd = Some(EtcdObs {
                        leader,
                        members: list,
                    });
                    o
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn every_action_is_safe(o in arb_observed()) {
            let action = decide(&o);
            let e = o.etcd.as_ref().unwrap();
            let voters: Vec<&MemberObs> = e.members.iter().filter(|m| !m.learner).collect();
            let healthy = voters.iter().filter(|m| m.healthy).count();
            let learners = e.members.iter().filter(|m| m.learner).count();
            let member = |id: u64| e.members.iter().find(|m| m.id == id).unwrap();
            if e.leader.is_none() {
                prop_assert!(matches!(action, Action::Wait { .. } | Action::QuorumLost { .. }), "{action:?}");
            }
            match &action {
                Action::AddLearner { ordinal } => {
                    // One membership change at a time, every voter healthy, a free ordinal.
                    prop_assert_eq!(learners, 0);
                    prop_assert_eq!(healthy, voters.len());
                    prop_assert!(*ordinal < o.desired_replicas);
                    prop_assert!(!e.members.iter().any(|m| m.ordinal == Some(*ordinal)));
                }
                Action::RemoveMember { id } => {
                    let m = member(*id);
                    // Only members outside the desired set, never the leader.
                    prop_assert!(m.ordinal.unwrap() >= o.desired_replicas);
                    prop_assert!(Some(*id) != e.leader);
                    if !m.learner {
                        prop_assert_eq!(learners, 0, "a voter removed while a learner is pending");
                        let after = voters.len() - 1;
                        prop_assert!(healthy - usize::from(m.healthy) >= quorum(after));
                    }
                }
                Action::PromoteLearner { id } => {
                    let m = member(*id);
                    prop_assert!(m.learner && m.started && m.healthy);
                    prop_assert!(m.ordinal.unwrap() < o.desired_replicas);
                }
                Action::MoveLeader { from, to } => {
                    prop_assert_eq!(Some(*from), e.leader);
                    let t = member(*to);
                    prop_assert!(t.healthy && !t.learner && t.started);
                    prop_assert!(t.ordinal.unwrap() < o.desired_replicas);
                }
                Action::DeletePod { ordinal, reason: DeleteReason::Rejoin } => {
                    // Only the pod of a learner that has not started.
                    let m = e.members.iter().find(|m| m.ordinal == Some(*ordinal)).unwrap();
                    prop_assert!(m.learner && !m.started);
                }
                Action::ReplaceMember { ordinal, id } => {
                    // A wanted voter whose own server reported its data lost; never the
                    // leader, never with a learner pending, never below quorum.
                    let m = member(*id);
                    prop_assert_eq!(m.ordinal, Some(*ordinal));
                    prop_assert!(!m.learner && Some(*id) != e.leader);
                    prop_assert_eq!(o.pods[ordinal].lost_member, Some(*id));
                    prop_assert_eq!(learners, 0);
                    prop_assert!(healthy - usize::from(m.healthy) >= quorum(voters.len() - 1));
                }
                Action::DeletePod { ordinal, .. } => {
                    let m = e.members.iter().find(|m| m.ordinal == Some(*ordinal)).unwrap();
                    prop_assert_eq!(learners, 0);
                    if voters.len() > 1 {
                        // Never the leader, and the rest still hold a quorum.
                        prop_assert!(Some(m.id) != e.leader);
                        prop_assert!(healthy - usize::from(m.healthy) >= quorum(voters.len()));
                    }
                }
                Action::ScaleStatefulSet { replicas } => {
                    // A shrink never drops the pod of a member.
                    let top = e.members.iter().filter_map(|m| m.ordinal).max().map_or(0, |k| k + 1);
                    if Some(*replicas) < o.statefulset_replicas {
                        prop_assert!(*replicas >= top, "{action:?}");
                    }
                }
                Action::RecycleVolume { ordinal } => {
                    // Only the volume of a learner that has not started (its data is not a member's).
                    let m = e.members.iter().find(|m| m.ordinal == Some(*ordinal)).unwrap();
                    prop_assert!(m.learner && !m.started);
                }
                _ => {}
            }
        }
    }
}
