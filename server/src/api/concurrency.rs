//! etcd's concurrency recipes (clientv3/concurrency: Mutex and Election), run inside the
//! server for the `v3lockpb.Lock` and `v3electionpb.Election` gRPC services, as etcd does.
//!
//! A lock or a candidacy is a key `<name>/<lease in hex>` owned by a lease. The owner is the
//! key under `<name>/` with the lowest create revision; everyone else waits until every key
//! created before theirs is deleted (by unlock, resign, or lease expiry). Every step is an
//! ordinary KV, Txn or Watch call through the server's own services, so auth, quotas and
//! linearizability are exactly those of a client's call.

use super::kv::KvService;
use super::lease::LeaseService;
use crate::auth::Caller;
use crate::etcdserver::EtcdServer;
use crate::mvcc::prefix_end;
use crate::pb::etcdserverpb::{
    compare, kv_server::Kv, lease_server::Lease, range_request, request_op, watch_request, Compare,
    DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest, RangeResponse, RequestOp,
    ResponseHeader, TxnRequest, TxnResponse, WatchCreateRequest, WatchRequest, WatchResponse,
};
use crate::pb::mvccpb::{event::EventType, KeyValue};
use crate::pb::v3electionpb::LeaderKey;
use crate::watch::WatchStream;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status};

/// TTL of the lease granted for a Lock or Campaign that names none (etcd's default session TTL).
const DEFAULT_SESSION_TTL: i64 = 60;

/// Error texts of etcd's concurrency package and election service (returned as gRPC Unknown,
/// as a plain Go error is).
pub const ERR_ELECTION_NOT_LEADER: &str = "election: not leader";
pub const ERR_ELECTION_NO_LEADER: &str = "election: no leader";
pub const ERR_MISSING_LEADER_KEY: &str = "\"leader\" field must be provided";
pub const ERR_SESSION_EXPIRED: &str = "session expired";

/// How the Lock and Election services report a failed step: etcd's services return the
/// in-process client's error as a plain Go error, which gRPC sends as Unknown with the same
/// message (`Unknown: etcdserver: requested lease not found`, not NotFound).
pub fn as_service_error(s: Status) -> Status {
    match s.code() {
        tonic::Code::Cancelled | tonic::Code::DeadlineExceeded => s,
        _ => Status::unknown(s.message().to_string()),
    }
}

/// An in-process client of this member (etcd's v3client): calls go through the same service
/// code as a remote client's.
#[derive(Clone)]
pub struct LocalClient {
    server: Arc<EtcdServer>,
    /// The client these calls are made for: its credentials are checked on every call.
    caller: Caller,
}

impl LocalClient {
    pub fn new(server: Arc<EtcdServer>, caller: Caller) -> Self {
        LocalClient { server, caller }
    }

    fn req<T>(&self, r: T) -> Request<T> {
        let mut req = Request::new(r);
        req.extensions_mut().insert(self.caller.clone());
        req
    }

    pub async fn range(&self, r: RangeRequest) -> Result<RangeResponse, Status> {
        let resp = KvService(self.server.clone()).range(self.req(r)).await?;
        Ok(resp.into_inner())
    }

    pub async fn txn(&self, r: TxnRequest) -> Result<TxnResponse, Status> {
        let resp = KvService(self.server.clone()).txn(self.req(r)).await?;
        Ok(resp.into_inner())
    }

    pub async fn delete(&self, key: Vec<u8>) -> Result<ResponseHeader, Status> {
        let r = DeleteRangeRequest {
            key,
            ..Default::default()
        };
        let resp = KvService(self.server.clone())
            .delete_range(self.req(r))
            .await?;
        Ok(resp.into_inner().header.unwrap_or_default())
    }

    async fn grant(&self, ttl: i64) -> Result<i64, Status> {
        let r = LeaseGrantRequest { ttl, id: 0 };
        let resp = LeaseService(self.server.clone())
            .lease_grant(self.req(r))
            .await?;
        Ok(resp.into_inner().id)
    }

    /// The lease a Lock or Campaign runs under: the one given, or a new one like etcd's
    /// session makes when none is given.
    pub async fn session_lease(&self, lease: i64) -> Result<i64, Status> {
        if lease == 0 {
            self.grant(DEFAULT_SESSION_TTL).await
        } else {
            Ok(lease)
        }
    }

    /// A watch of `key` (to `range_end`) from `start_rev`, served by this member's own watch
    /// machinery; it ends when the returned value is dropped.
    pub fn watch(&self, key: Vec<u8>, range_end: Vec<u8>, start_rev: i64) -> LocalWatch {
        let (req_tx, req_rx) = mpsc::channel(1);
        let (tx, rx) = mpsc::channel(64);
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key,
                    range_end,
                    start_revision: start_rev,
                    ..Default::default()
                },
            )),
        };
        // The channel is new and has room for one request.
        let _ = req_tx.try_send(Ok(create));
        tokio::spawn(
            WatchStream::new(self.server.clone(), tx, self.caller.clone())
                .run(ReceiverStream::new(req_rx)),
        );
        LocalWatch { _req: req_tx, rx }
    }
}

pub struct LocalWatch {
    /// Held so the watch stream stays open; dropping it ends the stream's task.
    _req: mpsc::Sender<Result<WatchRequest, Status>>,
    rx: mpsc::Receiver<Result<WatchResponse, Status>>,
}

impl LocalWatch {
    /// The next response carrying events; an error if the watch was canceled (compacted).
    pub async fn next(&mut self) -> Result<WatchResponse, Status> {
        loop {
            let resp = self
                .rx
                .recv()
                .await
                .ok_or_else(|| Status::unavailable("etcdserver: server stopped"))??;
            if resp.canceled {
                return Err(Status::unknown(if resp.compact_revision > 0 {
                    "etcdserver: mvcc: required revision has been compacted".to_string()
                } else {
                    resp.cancel_reason
                }));
            }
            if !resp.events.is_empty() {
                return Ok(resp);
            }
        }
    }
}

fn put_op(key: &[u8], value: &[u8], lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
            ..Default::default()
        })),
    }
}

fn range_op(r: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(r)),
    }
}

fn get(key: &[u8]) -> RangeRequest {
    RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    }
}

/// The key under `prefix` created first: the owner (clientv3's WithFirstCreate).
fn first_created(prefix: &[u8]) -> RangeRequest {
    one_by_creation(prefix, range_request::SortOrder::Ascend, 0)
}

/// The newest key under `prefix` created at or before `max_create_rev`.
fn last_created_up_to(prefix: &[u8], max_create_rev: i64) -> RangeRequest {
    one_by_creation(prefix, range_request::SortOrder::Descend, max_create_rev)
}

/// One key under `prefix`, the first in creation `order` (created at or before
/// `max_create_rev`, when not 0).
fn one_by_creation(
    prefix: &[u8],
    order: range_request::SortOrder,
    max_create_rev: i64,
) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: order as i32,
        sort_target: range_request::SortTarget::Create as i32,
        max_create_revision: max_create_rev,
        ..Default::default()
    }
}

fn create_rev_is(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(compare::TargetUnion::CreateRevision(rev)),
        ..Default::default()
    }
}

/// `<prefix><lease in lower-case hex>`, the key a session holds under a name.
fn session_key(prefix: &[u8], lease: i64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(format!("{lease:x}").as_bytes());
    key
}

fn name_prefix(name: &[u8]) -> Vec<u8> {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

fn range_kvs(resp: &TxnResponse, i: usize) -> &[KeyValue] {
    match resp.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(crate::pb::etcdserverpb::response_op::Response::ResponseRange(r)) => &r.kvs,
        _ => &[],
    }
}

/// Waits until every key under `prefix` created at or before `max_create_rev` is deleted;
/// returns the header of the read that found none left.
async fn wait_deletes(
    client: &LocalClient,
    prefix: &[u8],
    max_create_rev: i64,
) -> Result<ResponseHeader, Status> {
    loop {
        let resp = client
            .range(last_created_up_to(prefix, max_create_rev))
            .await?;
        let header = resp.header.unwrap_or_default();
        let Some(last) = resp.kvs.first() else {
            return Ok(header);
        };
        wait_delete(client, &last.key, header.revision).await?;
    }
}

/// Waits for a delete of `key` after revision `rev`.
async fn wait_delete(client: &LocalClient, key: &[u8], rev: i64) -> Result<(), Status> {
    let mut watch = client.watch(key.to_vec(), vec![], rev + 1);
    loop {
        let resp = watch.next().await?;
        if resp
            .events
            .iter()
            .any(|ev| ev.r#type == EventType::Delete as i32)
        {
            return Ok(());
        }
    }
}

/// Deletes a key when dropped while armed: a Lock or Campaign that fails or whose caller goes
/// away does not leave its key behind to block everyone else (etcd unlocks / resigns too).
struct Cleanup {
    client: LocalClient,
    key: Vec<u8>,
    /// Only delete while the key still has this create revision (0: unconditionally).
    create_rev: i64,
    armed: bool,
}

impl Cleanup {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let client = self.client.clone();
        let key = std::mem::take(&mut self.key);
        let create_rev = self.create_rev;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let result = if create_rev == 0 {
                    client.delete(key).await.map(|_| ())
                } else {
                    resign_key(&client, &key, create_rev).await.map(|_| ())
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e.message(), "could not release an abandoned lock or candidacy key");
                }
            });
        }
    }
}

/// Mutex.Lock: returns the header and the key that holds the lock.
pub async fn lock(
    client: &LocalClient,
    name: &[u8],
    lease: i64,
) -> Result<(ResponseHeader, Vec<u8>), Status> {
    let lease = client.session_lease(lease).await?;
    let prefix = name_prefix(name);
    let my_key = session_key(&prefix, lease);
    let resp = client
        .txn(TxnRequest {
            compare: vec![create_rev_is(&my_key, 0)],
            success: vec![
                put_op(&my_key, b"", lease),
                range_op(first_created(&prefix)),
            ],
            failure: vec![range_op(get(&my_key)), range_op(first_created(&prefix))],
        })
        .await?;
    let header = resp.header.unwrap_or_default();
    let my_rev = if resp.succeeded {
        header.revision
    } else {
        range_kvs(&resp, 0)
            .first()
            .map(|kv| kv.create_revision)
            .unwrap_or(header.revision)
    };
    let owner = range_kvs(&resp, 1).first().map(|kv| kv.create_revision);
    if owner.is_none() || owner == Some(my_rev) {
        return Ok((header, my_key));
    }
    let cleanup = Cleanup {
        client: client.clone(),
        key: my_key.clone(),
        create_rev: 0,
        armed: true,
    };
    let header = wait_deletes(client, &prefix, my_rev - 1).await?;
    // Our own key may have gone with its lease while we waited: then nobody holds the lock
    // for us (etcd 3.4 returned success here; later etcd reports the expired session).
    let mine = client.range(get(&my_key)).await?;
    if mine.kvs.first().map(|kv| kv.create_revision) != Some(my_rev) {
        cleanup.disarm();
        return Err(Status::unknown(ERR_SESSION_EXPIRED));
    }
    cleanup.disarm();
    Ok((header, my_key))
}

/// Election.Campaign: waits until this candidate leads; returns the txn's header and the
/// leader key that proves it.
pub async fn campaign(
    client: &LocalClient,
    name: &[u8],
    lease: i64,
    value: &[u8],
) -> Result<(ResponseHeader, LeaderKey), Status> {
    let lease = client.session_lease(lease).await?;
    let prefix = name_prefix(name);
    let key = session_key(&prefix, lease);
    let resp = client
        .txn(TxnRequest {
            compare: vec![create_rev_is(&key, 0)],
            success: vec![put_op(&key, value, lease)],
            failure: vec![range_op(get(&key))],
        })
        .await?;
    let header = resp.header.unwrap_or_default();
    let mut leader = LeaderKey {
        name: name.to_vec(),
        key: key.clone(),
        rev: header.revision,
        lease,
    };
    if !resp.succeeded {
        if let Some(kv) = range_kvs(&resp, 0).first() {
            leader.rev = kv.create_revision;
        }
    }
    let cleanup = Cleanup {
        client: client.clone(),
        key: key.clone(),
        create_rev: leader.rev,
        armed: true,
    };
    if !resp.succeeded
        && range_kvs(&resp, 0)
            .first()
            .is_some_and(|kv| kv.value != value)
    {
        proclaim(client, &leader, value).await?;
    }
    wait_deletes(client, &prefix, leader.rev - 1).await?;
    cleanup.disarm();
    Ok((header, leader))
}

/// Election.Proclaim: sets the leader's value, only while `leader` still leads.
pub async fn proclaim(
    client: &LocalClient,
    leader: &LeaderKey,
    value: &[u8],
) -> Result<ResponseHeader, Status> {
    let resp = client
        .txn(TxnRequest {
            compare: vec![create_rev_is(&leader.key, leader.rev)],
            success: vec![put_op(&leader.key, value, leader.lease)],
            failure: vec![],
        })
        .await?;
    if !resp.succeeded {
        return Err(Status::unknown(ERR_ELECTION_NOT_LEADER));
    }
    Ok(resp.header.unwrap_or_default())
}

async fn resign_key(
    client: &LocalClient,
    key: &[u8],
    create_rev: i64,
) -> Result<ResponseHeader, Status> {
    let resp = client
        .txn(TxnRequest {
            compare: vec![create_rev_is(key, create_rev)],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(
                    DeleteRangeRequest {
                        key: key.to_vec(),
                        ..Default::default()
                    },
                )),
            }],
            failure: vec![],
        })
        .await?;
    Ok(resp.header.unwrap_or_default())
}

/// Election.Resign: gives up leadership if `leader` still holds it; no error otherwise.
pub async fn resign(client: &LocalClient, leader: &LeaderKey) -> Result<ResponseHeader, Status> {
    resign_key(client, &leader.key, leader.rev).await
}

/// Election.Leader: the current leader's key-value.
pub async fn leader(
    client: &LocalClient,
    name: &[u8],
) -> Result<(ResponseHeader, KeyValue), Status> {
    let resp = client.range(first_created(&name_prefix(name))).await?;
    let header = resp.header.unwrap_or_default();
    match resp.kvs.into_iter().next() {
        Some(kv) => Ok((header, kv)),
        None => Err(Status::unknown(ERR_ELECTION_NO_LEADER)),
    }
}

/// Election.Observe: sends the leader's key-value each time leadership or the leader's value
/// changes, until `out` is closed.
pub async fn observe(
    client: LocalClient,
    name: Vec<u8>,
    out: mpsc::Sender<Result<(ResponseHeader, KeyValue), Status>>,
) {
    let prefix = name_prefix(&name);
    loop {
        let step = async {
            let resp = client.range(first_created(&prefix)).await?;
            let header = resp.header.unwrap_or_default();
            let (mut header, kv) = match resp.kvs.into_iter().next() {
                Some(kv) => (header, kv),
                None => {
                    // No leader yet: the first put under the prefix makes one.
                    let mut watch =
                        client.watch(prefix.clone(), prefix_end(&prefix), header.revision);
                    loop {
                        let wr = watch.next().await?;
                        let put = wr.events.into_iter().find_map(|ev| {
                            (ev.r#type == EventType::Put as i32)
                                .then_some(ev.kv)
                                .flatten()
                        });
                        if let Some(kv) = put {
                            let mut h = wr.header.unwrap_or_default();
                            h.revision = kv.mod_revision;
                            break (h, kv);
                        }
                    }
                }
            };
            if out.send(Ok((header, kv.clone()))).await.is_err() {
                return Ok::<bool, Status>(false);
            }
            // Follow that leader's key until it is deleted.
            let mut watch = client.watch(kv.key.clone(), vec![], header.revision + 1);
            loop {
                let wr = watch.next().await?;
                header = wr.header.unwrap_or_default();
                for ev in wr.events {
                    if ev.r#type == EventType::Delete as i32 {
                        return Ok(true);
                    }
                    if let Some(kv) = ev.kv {
                        if out.send(Ok((header, kv))).await.is_err() {
                            return Ok(false);
                        }
                    }
                }
            }
        };
        let result = tokio::select! {
            r = step => r,
            _ = out.closed() => return,
        };
        match result {
            Ok(true) => continue,
            Ok(false) => return,
            Err(e) => {
                let _ = out.send(Err(e)).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_keys_are_name_slash_lease_in_hex() {
        assert_eq!(
            session_key(&name_prefix(b"lk"), 0x694d7a1b2c3d4e5f),
            b"lk/694d7a1b2c3d4e5f"
        );
        assert_eq!(session_key(&name_prefix(b""), 10), b"/a");
    }

    #[test]
    fn owner_query_is_the_oldest_key_under_the_prefix() {
        let r = first_created(b"e/");
        assert_eq!(r.range_end, b"e0");
        assert_eq!(r.limit, 1);
        assert_eq!(r.sort_target, range_request::SortTarget::Create as i32);
        assert_eq!(r.sort_order, range_request::SortOrder::Ascend as i32);
        let w = last_created_up_to(b"e/", 7);
        assert_eq!(w.max_create_revision, 7);
        assert_eq!(w.sort_order, range_request::SortOrder::Descend as i32);
    }
}
