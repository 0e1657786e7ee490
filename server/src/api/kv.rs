use super::key;
use crate::auth::Caller;
use crate::error::EtcdError;
use crate::etcdserver::{Applied, EtcdServer};
use crate::pb::etcdserverpb::{
    kv_server::Kv, range_request, request_op, CompactionRequest, CompactionResponse,
    DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse,
    RangeStreamResponse, ResponseHeader, TxnRequest, TxnResponse,
};
use crate::pb::oxcdpb::raft_request::Request as Raft;
use crate::txn;
use prost::Message;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// etcd 3.7's first RangeStream chunk asks for this many keys; later chunks double or halve
/// to land near --max-request-bytes.
const STREAM_FIRST_CHUNK: i64 = 10;

/// etcd's `adjustChunkLimit`: double below half the target size, halve above twice it.
fn next_chunk_limit(last: i64, last_size: usize, target: usize) -> i64 {
    let next = if last_size < target / 2 {
        last.saturating_mul(2)
    } else if last_size > target.saturating_mul(2) {
        last / 2
    } else {
        last
    };
    next.max(1)
}

/// etcd 3.7 streams only in key order (its `IsDefaultOrdering`: order NONE, whatever the
/// target, which then sorts each chunk on its own as Range would; or KEY ascending) and
/// without revision filters.
fn check_range_stream(r: &RangeRequest) -> Result<(), EtcdError> {
    key::check_range(r)?;
    let key_order = r.sort_order == range_request::SortOrder::None as i32
        || (r.sort_target == range_request::SortTarget::Key as i32
            && r.sort_order == range_request::SortOrder::Ascend as i32);
    if !key_order {
        return Err(EtcdError::RangeStreamSort);
    }
    if r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0
    {
        return Err(EtcdError::RangeStreamFilter);
    }
    Ok(())
}

/// Sends `r` as RangeStream chunks read from the store one chunk at a time, at the revision of
/// the first chunk. The channel holds one chunk, so a slow client holds back the reading:
/// memory per stream stays near two chunks whatever the size of the range.
async fn stream_range(
    server: Arc<EtcdServer>,
    mut r: RangeRequest,
    tx: tokio::sync::mpsc::Sender<Result<RangeStreamResponse, Status>>,
) -> Result<(), EtcdError> {
    let total_limit = if r.limit > 0 { r.limit } else { i64::MAX };
    let target = server.cfg.max_request_bytes;
    let mut limit = STREAM_FIRST_CHUNK.min(total_limit);
    let mut sent: i64 = 0;
    let mut first: Option<(i64, i64)> = None; // (revision, count of the whole range)
                                              // Pages are read in key order; a sort target (with order NONE) then sorts each chunk.
    let (sort_target, sort_order) = (r.sort_target, r.sort_order);
    r.sort_target = range_request::SortTarget::Key as i32;
    r.sort_order = range_request::SortOrder::None as i32;
    loop {
        r.limit = limit;
        let mut resp = txn::range(&server.store.read(), &r)?;
        let (rev, count) = *first
            .get_or_insert_with(|| (resp.header.as_ref().map_or(0, |h| h.revision), resp.count));
        if r.revision == 0 {
            r.revision = rev;
        }
        sent += resp.kvs.len() as i64;
        let size = prost::Message::encoded_len(&resp);
        let done = !resp.more || sent >= total_limit;
        let next_key = resp.kvs.last().map(|kv| {
            let mut k = kv.key.clone();
            k.push(0);
            k
        });
        // etcd 3.7 sorts each chunk before continuing after its last kv, so it repeats and
        // skips keys; oxcd continues in key order and then sorts the chunk.
        txn::sort_kvs(&mut resp.kvs, sort_target, sort_order);
        let mut out = RangeResponse {
            kvs: resp.kvs,
            ..Default::default()
        };
        if done {
            let mut header = Some(ResponseHeader {
                revision: rev,
                ..Default::default()
            });
            server.fill(&mut header);
            out.header = header;
            out.more = resp.more;
            out.count = count;
        }
        let chunk = RangeStreamResponse {
            range_response: Some(out),
        };
        if tx.send(Ok(chunk)).await.is_err() || done {
            return Ok(());
        }
        match next_key {
            Some(k) => r.key = k,
            None => return Ok(()),
        }
        limit = next_chunk_limit(limit, size, target).min(total_limit - sent);
    }
}

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
        key::check_range(&r)?;
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
                || txn::range(&self.0.store.read(), &r),
            )
            .await?;
        self.0.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        key::check_put(&r)?;
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
        let caller = Caller::of(&req);
        let r = req.into_inner();
        key::check_delete(&r)?;
        match self.0.propose_as(Raft::DeleteRange(r), &caller).await? {
            Applied::DeleteRange(mut resp) => {
                self.0.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        key::check_txn(&r, self.0.cfg.max_txn_ops)?;
        if txn::is_txn_read_only(&r) {
            // Read-only txns never touch the log (etcd serves them locally too).
            if !txn_serializable(&r) {
                self.0.read_barrier().await?;
            }
            let mut resp = self
                .0
                .read_as(
                    &caller,
                    |auth, ai| txn::check_txn_auth(auth, ai, &r),
                    || txn::read_only_txn(&self.0.store.read(), &r),
                )
                .await?;
            self.0.fill(&mut resp.header);
            return Ok(Response::new(resp));
        }
        if txn::txn_has_puts(&r) {
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

    type RangeStreamStream = ReceiverStream<Result<RangeStreamResponse, Status>>;

    /// etcd 3.7's streaming Range: disjoint chunks of kvs in key order; the last chunk has the
    /// header, `more` and `count` (count_only: one message with the header and count).
    async fn range_stream(
        &self,
        req: Request<RangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        check_range_stream(&r)?;
        if !r.serializable {
            self.0.read_barrier().await?;
        }
        // Permission is checked once, for the whole range, as etcd does.
        self.0
            .read_as(
                &caller,
                |auth, ai| auth.is_range_permitted(ai, &r.key, &r.range_end),
                || Ok(()),
            )
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        // What fails before the first chunk (a future or compacted revision) fails the call
        // itself, as on etcd; count_only is answered by this count.
        let counted = RangeRequest {
            count_only: true,
            ..r.clone()
        };
        let resp = txn::range(&self.0.store.read(), &counted)?;
        if r.count_only {
            let mut header = Some(ResponseHeader {
                revision: resp.header.as_ref().map_or(0, |h| h.revision),
                ..Default::default()
            });
            self.0.fill(&mut header);
            let out = RangeResponse {
                header,
                count: resp.count,
                ..Default::default()
            };
            let _ = tx.try_send(Ok(RangeStreamResponse {
                range_response: Some(out),
            }));
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        crate::metrics::TxnOps {
            ranges: 1,
            ..Default::default()
        }
        .record();
        let server = self.0.clone();
        tokio::spawn(async move {
            if let Err(e) = stream_range(server, r, tx.clone()).await {
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
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
