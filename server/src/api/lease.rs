use crate::auth::Caller;
use crate::error::EtcdError;
use crate::etcdserver::{Applied, EtcdServer};
use crate::pb::etcdserverpb::{
    lease_server::Lease, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest,
    LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use crate::pb::oxcdpb::raft_request::Request as Raft;
use futures::StreamExt;
use prost::Message;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub struct LeaseService(pub Arc<EtcdServer>);

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let caller = Caller::of(&req);
        // etcd 3.6 names a user for grants, revokes and TTL queries when auth is on.
        self.0.require_auth_info(&caller).await?;
        let mut r = req.into_inner();
        self.0.check_quota(r.encoded_len()).await?;
        if r.id == 0 {
            r.id = self.0.next_id();
        }
        match self.0.propose_as(Raft::LeaseGrant(r), &caller).await? {
            Applied::LeaseGrant(mut resp) => {
                self.0.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(Status::internal(format!(
                "unexpected apply result {other:?}"
            ))),
        }
    }

    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let caller = Caller::of(&req);
        self.0.require_auth_info(&caller).await?;
        match self
            .0
            .propose_as(Raft::LeaseRevoke(req.into_inner()), &caller)
            .await?
        {
            Applied::LeaseRevoke(mut resp) => {
                self.0.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(Status::internal(format!(
                "unexpected apply result {other:?}"
            ))),
        }
    }

    type LeaseKeepAliveStream = ReceiverStream<Result<LeaseKeepAliveResponse, Status>>;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        Ok(Response::new(keep_alive(self.0.clone(), req.into_inner())))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let caller = Caller::of(&req);
        self.0.require_auth_info(&caller).await?;
        let r = req.into_inner();
        // Attached keys are listed only to a caller allowed to read them (etcd 3.6).
        if r.keys {
            self.0.check_lease_keys_readable(&caller, &[r.id]).await?;
        }
        let mut resp = self.0.time_to_live(r).await?;
        self.0.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn lease_leases(
        &self,
        req: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let ids = self.0.lessor.ids();
        self.0
            .check_lease_keys_readable(&Caller::of(&req), &ids)
            .await?;
        let leases = ids.into_iter().map(|id| LeaseStatus { id }).collect();
        let mut resp = LeaseLeasesResponse {
            header: None,
            leases,
        };
        self.0.fill(&mut resp.header);
        Ok(Response::new(resp))
    }
}

/// Renews each lease the client names, answering with its TTL (0: not found), until the
/// client's stream ends (shared by gRPC and the JSON gateway).
pub(crate) fn keep_alive(
    server: Arc<EtcdServer>,
    mut inbound: impl futures::Stream<Item = Result<LeaseKeepAliveRequest, Status>>
        + Unpin
        + Send
        + 'static,
) -> ReceiverStream<Result<LeaseKeepAliveResponse, Status>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(Ok(r)) = inbound.next().await {
            // The header is taken before renewing, so its revision is never newer than the
            // renewal (etcd does the same).
            let header = Some(server.header(server.store.current_rev()));
            let ttl = match server.lease_renew(r.id).await {
                Ok(ttl) => ttl,
                Err(EtcdError::LeaseNotFound) => 0,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            if tx
                .send(Ok(LeaseKeepAliveResponse {
                    header,
                    id: r.id,
                    ttl,
                }))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
