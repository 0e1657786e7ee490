use crate::auth::Caller;
use crate::error::EtcdError;
use crate::etcdserver::{Applied, EtcdServer};
use crate::membership::{self, Member};
use crate::pb::etcdserverpb::{
    cluster_client::ClusterClient, cluster_server::Cluster, MemberAddRequest, MemberAddResponse,
    MemberListRequest, MemberListResponse, MemberPromoteRequest, MemberPromoteResponse,
    MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
};
use crate::pb::oxcdpb::raft_request::Request as Raft;
use raft::prelude::ConfChangeType;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

pub struct ClusterService(pub Arc<EtcdServer>);

/// A learner may be promoted once it has 90% of the leader's log (etcd's readyPercent).
const LEARNER_READY_PERCENT: f64 = 0.9;
/// etcd's `HealthInterval`: how long every peer must have been connected for a voter to be
/// added under `--strict-reconfig-check`.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

fn check_urls(urls: &[String]) -> Result<(), EtcdError> {
    if urls.is_empty() {
        return Err(EtcdError::MemberBadUrls);
    }
    for u in urls {
        let ok = url::Url::parse(u)
            .map(|p| matches!(p.scheme(), "http" | "https") && p.port().is_some())
            .unwrap_or(false);
        if !ok {
            return Err(EtcdError::MemberBadUrls);
        }
    }
    Ok(())
}

impl ClusterService {
    fn header(&self) -> Option<crate::pb::etcdserverpb::ResponseHeader> {
        // etcd's Cluster API headers carry no revision.
        Some(self.0.header(0))
    }

    /// Voters this member has been connected to since `since` (itself included): etcd's
    /// `numConnectedSince`.
    fn connected_since(&self, since: Instant, voters: &[u64]) -> usize {
        voters
            .iter()
            .filter(|id| {
                **id == self.0.id
                    || self
                        .0
                        .transport
                        .active_since(**id)
                        .is_some_and(|t| t <= since)
            })
            .count()
    }

    fn voter_ids(&self) -> Vec<u64> {
        self.0
            .membership
            .read()
            .members()
            .iter()
            .filter(|m| !m.is_learner)
            .map(|m| m.id)
            .collect()
    }

    /// etcd 3.6's `mayAddMember` under `--strict-reconfig-check`: a new voter needs a started
    /// quorum afterwards, and any new member needs this member connected for the last 5 s to
    /// a quorum of the voters plus the new member, counted as down (a one-member cluster
    /// always may add). etcd 3.4 wanted every voter connected.
    fn may_add_member(&self, is_learner: bool) -> Result<(), EtcdError> {
        if !self.0.cfg.strict_reconfig_check {
            return Ok(());
        }
        if !is_learner && !self.0.membership.read().ready_to_add_voter() {
            return Err(EtcdError::MemberNotEnoughStarted);
        }
        let voters = self.voter_ids();
        let since = Instant::now() - HEALTH_INTERVAL;
        if voters.len() > 1 && self.connected_since(since, &voters) < (voters.len() + 1) / 2 + 1 {
            return Err(EtcdError::Unhealthy);
        }
        Ok(())
    }

    /// etcd's `mayRemoveMember`: removing a voter must leave a started quorum, and, unless
    /// the member is down, enough voters connected for the last 5 seconds for a quorum.
    fn may_remove_voter(&self, id: u64) -> Result<(), EtcdError> {
        if !self.0.cfg.strict_reconfig_check {
            return Ok(());
        }
        if !self.0.membership.read().ready_to_remove_voter(id) {
            return Err(EtcdError::MemberNotEnoughStarted);
        }
        // A member that is down is not part of the active quorum: safe to remove.
        if id != self.0.id && self.0.transport.active_since(id).is_none() {
            return Ok(());
        }
        let voters = self.voter_ids();
        let since = Instant::now() - HEALTH_INTERVAL;
        let active = self.connected_since(since, &voters);
        if active.saturating_sub(1) < 1 + (voters.len().saturating_sub(1)) / 2 {
            return Err(EtcdError::Unhealthy);
        }
        Ok(())
    }

    /// etcd's `mayPromoteMember`: counting the learner, the started voters make a quorum.
    fn may_promote(&self) -> Result<(), EtcdError> {
        if self.0.cfg.strict_reconfig_check && !self.0.membership.read().ready_to_promote() {
            return Err(EtcdError::MemberNotEnoughStarted);
        }
        Ok(())
    }

    async fn forward_promote(
        &self,
        r: MemberPromoteRequest,
        caller: &Caller,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let leader = self
            .0
            .raft_status
            .leader
            .load(std::sync::atomic::Ordering::Relaxed);
        let urls = self
            .0
            .membership
            .read()
            .get(leader)
            .map(|m| m.client_ur_ls.clone())
            .unwrap_or_default();
        for u in urls {
            let Ok(ep) = tonic::transport::Endpoint::from_shared(u) else {
                continue;
            };
            if let Ok(ch) = ep.connect_timeout(Duration::from_secs(1)).connect().await {
                // The leader checks the same credentials.
                let mut req = Request::new(r);
                if let Some(t) = caller.token.as_deref().and_then(|t| t.parse().ok()) {
                    req.metadata_mut().insert("token", t);
                }
                return ClusterClient::new(ch).member_promote(req).await;
            }
        }
        Err(EtcdError::NoLeader.into())
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let caller = Caller::of(&req);
        self.0.check_admin(&caller).await?;
        let r = req.into_inner();
        check_urls(&r.peer_ur_ls)?;
        if self
            .0
            .membership
            .read()
            .by_peer_urls(&r.peer_ur_ls)
            .is_some()
        {
            return Err(EtcdError::PeerUrlExist.into());
        }
        // etcd 3.6's --max-learners (etcd checks as the change applies; here before proposing).
        if r.is_learner {
            let learners = self
                .0
                .membership
                .read()
                .members()
                .iter()
                .filter(|m| m.is_learner)
                .count();
            if learners >= self.0.cfg.max_learners {
                return Err(EtcdError::TooManyLearners.into());
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let member = Member {
            id: membership::member_id(&r.peer_ur_ls, "", Some(now)),
            name: String::new(),
            peer_ur_ls: r.peer_ur_ls.clone(),
            client_ur_ls: vec![],
            is_learner: r.is_learner,
        };
        if self.0.membership.read().get(member.id).is_some() {
            return Err(EtcdError::MemberExist.into());
        }
        self.may_add_member(r.is_learner)?;
        let change = if r.is_learner {
            ConfChangeType::AddLearnerNode
        } else {
            ConfChangeType::AddNode
        };
        let members = self.0.propose_conf_change(change, member.clone()).await?;
        Ok(Response::new(MemberAddResponse {
            header: self.header(),
            member: Some(member),
            members,
        }))
    }

    async fn member_remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let caller = Caller::of(&req);
        self.0.check_admin(&caller).await?;
        let r = req.into_inner();
        let target = self
            .0
            .membership
            .read()
            .get(r.id)
            .cloned()
            .ok_or(EtcdError::MemberNotFound)?;
        if !target.is_learner {
            self.may_remove_voter(r.id)?;
        }
        let members = self
            .0
            .propose_conf_change(ConfChangeType::RemoveNode, target)
            .await?;
        Ok(Response::new(MemberRemoveResponse {
            header: self.header(),
            members,
        }))
    }

    async fn member_update(
        &self,
        req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let caller = Caller::of(&req);
        self.0.check_admin(&caller).await?;
        let r = req.into_inner();
        check_urls(&r.peer_ur_ls)?;
        if self.0.membership.read().get(r.id).is_none() {
            return Err(EtcdError::MemberNotFound.into());
        }
        if self
            .0
            .membership
            .read()
            .by_peer_urls(&r.peer_ur_ls)
            .is_some_and(|m| m.id != r.id)
        {
            return Err(EtcdError::PeerUrlExist.into());
        }
        match self.0.propose_as(Raft::MemberUpdate(r), &caller).await? {
            Applied::Members(members) => Ok(Response::new(MemberUpdateResponse {
                header: self.header(),
                members,
            })),
            other => Err(Status::internal(format!(
                "unexpected apply result {other:?}"
            ))),
        }
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let caller = Caller::of(&req);
        self.0.check_admin(&caller).await?;
        let r = req.into_inner();
        let target = self
            .0
            .membership
            .read()
            .get(r.id)
            .cloned()
            .ok_or(EtcdError::MemberNotFound)?;
        if !target.is_learner {
            return Err(EtcdError::MemberNotLearner.into());
        }
        let st = self.0.node_status().await?;
        if !st.is_leader {
            // Only the leader knows how far the learner got (etcd forwards to it too).
            return self.forward_promote(r, &caller).await;
        }
        let learner_match = st.progress.get(&r.id).map(|(m, _)| *m).unwrap_or(0);
        let leader_match = st
            .progress
            .get(&st.id)
            .map(|(m, _)| *m)
            .unwrap_or(st.last_index);
        if (learner_match as f64) < (leader_match as f64) * LEARNER_READY_PERCENT {
            return Err(EtcdError::LearnerNotReady.into());
        }
        self.may_promote()?;
        let mut promoted = target;
        promoted.is_learner = false;
        let members = self
            .0
            .propose_conf_change(ConfChangeType::AddNode, promoted)
            .await?;
        Ok(Response::new(MemberPromoteResponse {
            header: self.header(),
            members,
        }))
    }

    async fn member_list(
        &self,
        req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        self.0.require_auth_info(&Caller::of(&req)).await?;
        // etcd 3.6: a linearizable list waits until this member applied the leader's index.
        if req.get_ref().linearizable {
            self.0.read_barrier().await?;
        }
        let members = self.0.membership.read().members();
        Ok(Response::new(MemberListResponse {
            header: self.header(),
            members,
        }))
    }
}
