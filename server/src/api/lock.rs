//! `v3lockpb.Lock`: etcd's lock service, over the concurrency recipes.

use super::concurrency::{self, LocalClient};
use crate::auth::Caller;
use crate::etcdserver::EtcdServer;
use crate::pb::v3lockpb::{
    lock_server::Lock, LockRequest, LockResponse, UnlockRequest, UnlockResponse,
};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct LockService(pub Arc<EtcdServer>);

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let client = LocalClient::new(self.0.clone(), Caller::of(&req));
        let r = req.into_inner();
        let (header, key) = concurrency::lock(&client, &r.name, r.lease)
            .await
            .map_err(concurrency::as_service_error)?;
        Ok(Response::new(LockResponse {
            header: Some(header),
            key,
        }))
    }

    async fn unlock(
        &self,
        req: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let client = LocalClient::new(self.0.clone(), Caller::of(&req));
        let header = client
            .delete(req.into_inner().key)
            .await
            .map_err(concurrency::as_service_error)?;
        Ok(Response::new(UnlockResponse {
            header: Some(header),
        }))
    }
}
