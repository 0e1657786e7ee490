//! `v3electionpb.Election`: etcd's leader election service, over the concurrency recipes.

use super::concurrency::{self, as_service_error, LocalClient, ERR_MISSING_LEADER_KEY};
use crate::auth::Caller;
use crate::etcdserver::EtcdServer;
use crate::pb::v3electionpb::{
    election_server::Election, CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest,
    LeaderResponse, ProclaimRequest, ProclaimResponse, ResignRequest, ResignResponse,
};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

pub struct ElectionService(pub Arc<EtcdServer>);

impl ElectionService {
    fn client<T>(&self, req: &Request<T>) -> LocalClient {
        LocalClient::new(self.0.clone(), Caller::of(req))
    }
}

fn leader_key(k: Option<LeaderKey>) -> Result<LeaderKey, Status> {
    k.ok_or_else(|| Status::unknown(ERR_MISSING_LEADER_KEY))
}

type ObserveStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        req: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let client = self.client(&req);
        let r = req.into_inner();
        let (header, leader) = concurrency::campaign(&client, &r.name, r.lease, &r.value)
            .await
            .map_err(as_service_error)?;
        Ok(Response::new(CampaignResponse {
            header: Some(header),
            leader: Some(leader),
        }))
    }

    async fn proclaim(
        &self,
        req: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let client = self.client(&req);
        let r = req.into_inner();
        let leader = leader_key(r.leader)?;
        let header = concurrency::proclaim(&client, &leader, &r.value)
            .await
            .map_err(as_service_error)?;
        Ok(Response::new(ProclaimResponse {
            header: Some(header),
        }))
    }

    async fn leader(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let client = self.client(&req);
        let (header, kv) = concurrency::leader(&client, &req.into_inner().name)
            .await
            .map_err(as_service_error)?;
        Ok(Response::new(LeaderResponse {
            header: Some(header),
            kv: Some(kv),
        }))
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let client = self.client(&req);
        tokio::spawn(concurrency::observe(client, req.into_inner().name, tx));
        let stream = ReceiverStream::new(rx).map(|item| {
            item.map(|(header, kv)| LeaderResponse {
                header: Some(header),
                kv: Some(kv),
            })
            .map_err(as_service_error)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn resign(
        &self,
        req: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let client = self.client(&req);
        let leader = leader_key(req.into_inner().leader)?;
        let header = concurrency::resign(&client, &leader)
            .await
            .map_err(as_service_error)?;
        Ok(Response::new(ResignResponse {
            header: Some(header),
        }))
    }
}
