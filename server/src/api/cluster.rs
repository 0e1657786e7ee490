use crate::error::EtcdError;
use crate::membership::{self, Member};
use crate::pb::etcdserverpb::{
    cluster_client::ClusterClient, cluster_server::Cluster, MemberAddRequest, MemberAddResponse,
    MemberListRequest, MemberListResponse, MemberPromoteRequest, MemberPromoteResponse,
    MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
};
use crate::pb::oxcdpb::raft_request::Request as Raft;
use crate::server::{Applied, EtcdServer};
use raft::prelude::ConfChangeType;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

pub struct ClusterService(pub Arc<EtcdServer>);

/// A learner may be promoted once it has 90% of the leader's log (etcd's readyPercent).
const LEARNER_READY_PERCENT: f64 = 0.9;

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
    fn voters(&self) -> usize {
        self.0
            .membership
            .read()
            .members()
            .iter()
            .filter(|m| !m.is_learner)
            .count()
    }

    fn header(&self) -> Option<crate::pb::etcdserverpb::ResponseHeader> {
        // etcd's Cluster API headers carry no revision.
        Some(self.0.header(0))
    }

    /// etcd's --strict-reconfig-check: a change must leave enough started voters for a quorum.
    async fn check_quorum_after(
        &self,
        voters_after: usize,
        removing: Option<u64>,
    ) -> Result<(), EtcdError> {
        let st = self.0.node_status().await?;
        if !st.is_leader {
            // Only the leader knows which members are active; it checks again when proposing.
            return Ok(());
        }
        let active = st
            .voters
            .iter()
            .filter(|id| Some(**id) != removing)
            .filter(|id| st.progress.get(id).is_some_and(|(_, active)| *active))
            .count();
        if active < voters_after / 2 + 1 {
            return Err(EtcdError::MemberNotEnoughStarted);
        }
        Ok(())
    }

    async fn forward_promote(
        &self,
        r: MemberPromoteRequest,
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
                return ClusterClient::new(ch).member_promote(r).await;
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
        self.0.check_not_learner()?;
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
        if !r.is_learner {
            let voters = self.voters();
            self.check_quorum_after(voters + 1, None).await?;
        }
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
        self.0.check_not_learner()?;
        let r = req.into_inner();
        let target = self
            .0
            .membership
            .read()
            .get(r.id)
            .cloned()
            .ok_or(EtcdError::MemberNotFound)?;
        if !target.is_learner {
            let voters = self.voters();
            self.check_quorum_after(voters.saturating_sub(1), Some(r.id))
                .await?;
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
        self.0.check_not_learner()?;
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
        match self.0.propose(Raft::MemberUpdate(r)).await? {
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
        self.0.check_not_learner()?;
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
            return self.forward_promote(r).await;
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
        let voters = self.voters();
        self.check_quorum_after(voters + 1, None).await?;
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
        _: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        self.0.check_not_learner()?;
        let members = self.0.membership.read().members();
        Ok(Response::new(MemberListResponse {
            header: self.header(),
            members,
        }))
    }
}
