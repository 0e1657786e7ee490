use crate::apply;
use crate::auth::Caller;
use crate::error::EtcdError;
use crate::pb::etcdserverpb::{
    kv_server::Kv, request_op, CompactionRequest, CompactionResponse, DeleteRangeRequest,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest,
    TxnResponse,
};
use crate::pb::oxcdpb::raft_request::Request as Raft;
use crate::server::{Applied, EtcdServer};
use prost::Message;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct KvService(pub Arc<EtcdServer>);

fn unexpected(a: Applied) -> Status {
    Status::internal(format!("unexpected apply result {a:?}"))
}

fn txn_serializable(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(t.failure.iter())
        .all(|op| match &op.request {
            Some(request_op::Request::RequestRange(r)) => r.serializable,
            Some(request_op::Request::RequestTxn(inner)) => txn_serializable(inner),
            _ => true,
        })
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        apply::check_range(&r)?;
        if !r.serializable {
            self.0.check_not_learner()?;
            self.0.read_barrier().await?;
        }
        crate::metrics::TxnOps {
            ranges: 1,
            ..Default::default()
        }
        .record();
        let mut resp = self
            .0
            .read_as(
                &caller,
                |auth, ai| auth.is_range_permitted(ai, &r.key, &r.range_end),
                || apply::range(&self.0.store.read(), &r),
            )
            .await?;
        self.0.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        self.0.check_not_learner()?;
        let caller = Caller::of(&req);
        let r = req.into_inner();
        apply::check_put(&r)?;
        self.0.check_quota(r.encoded_len()).await?;
        match self.0.propose_as(Raft::Put(r), &caller).await? {
            Applied::Put(mut resp) => {
                self.0.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        self.0.check_not_learner()?;
        let caller = Caller::of(&req);
        let r = req.into_inner();
        apply::check_delete(&r)?;
        match self.0.propose_as(Raft::DeleteRange(r), &caller).await? {
            Applied::DeleteRange(mut resp) => {
                self.0.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        self.0.check_not_learner()?;
        let caller = Caller::of(&req);
        let r = req.into_inner();
        apply::check_txn(&r, self.0.cfg.max_txn_ops)?;
        if apply::is_txn_read_only(&r) {
            // Read-only txns never touch the log (etcd serves them locally too).
            if !txn_serializable(&r) {
                self.0.read_barrier().await?;
            }
            let mut resp = self
                .0
                .read_as(
                    &caller,
                    |auth, ai| apply::check_txn_auth(auth, ai, &r),
                    || apply::read_only_txn(&self.0.store.read(), &r),
                )
                .await?;
            self.0.fill(&mut resp.header);
            return Ok(Response::new(resp));
        }
        if apply::txn_has_puts(&r) {
            self.0.check_quota(r.encoded_len()).await?;
        }
        match self.0.propose_as(Raft::Txn(r), &caller).await? {
            Applied::Txn(mut resp) => {
                self.0.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        self.0.check_not_learner()?;
        let caller = Caller::of(&req);
        let r = req.into_inner();
        match self.0.propose_as(Raft::Compaction(r), &caller).await? {
            Applied::Compaction(mut resp, done) => {
                if let Some(done) = done {
                    done.await.map_err(|_| Status::from(EtcdError::Stopped))?;
                }
                resp.header = None;
                self.0.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(unexpected(other)),
        }
    }
}
