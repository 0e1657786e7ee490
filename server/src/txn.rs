//! etcd's request semantics over the MVCC store (etcd's `etcdserver/txn` package): Range, Put,
//! DeleteRange, and Txn with compares and nested transactions. The checks a request passes
//! before it is proposed are the API's (`api::key`).

use crate::auth::{AuthInfo, AuthStore};
use crate::error::{EtcdError, Result};
use crate::lease::Lessor;
use crate::mvcc::{RangeEnd, RangeOptions, ReadView, WriteTxn};
use crate::pb::etcdserverpb::{
    compare, range_request, request_op, response_op, Compare, DeleteRangeRequest,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, ResponseHeader,
    ResponseOp, TxnRequest, TxnResponse,
};
use crate::pb::mvccpb::KeyValue;
use std::cmp::Ordering;

fn header(rev: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision: rev,
        ..Default::default()
    })
}

pub fn is_txn_read_only(r: &TxnRequest) -> bool {
    r.success
        .iter()
        .chain(r.failure.iter())
        .all(|op| match &op.request {
            Some(request_op::Request::RequestRange(_)) | None => true,
            Some(request_op::Request::RequestTxn(t)) => is_txn_read_only(t),
            _ => false,
        })
}

/// Whether a request writes keys and so needs backend space (etcd's quota check).
pub fn txn_has_puts(r: &TxnRequest) -> bool {
    r.success
        .iter()
        .chain(r.failure.iter())
        .any(|op| match &op.request {
            Some(request_op::Request::RequestPut(_)) => true,
            Some(request_op::Request::RequestTxn(t)) => txn_has_puts(t),
            _ => false,
        })
}

/// etcd's `checkTxnAuth`: every compare is a read, every op of both branches is checked as
/// its own request would be. Nested txns are checked too, which etcd 3.4 forgets (its check
/// skips them, letting a nested op past the permissions).
pub fn check_txn_auth(auth: &AuthStore, ai: &AuthInfo, t: &TxnRequest) -> Result<()> {
    for c in &t.compare {
        auth.is_range_permitted(ai, &c.key, &c.range_end)?;
    }
    for op in t.success.iter().chain(t.failure.iter()) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => {
                auth.is_range_permitted(ai, &r.key, &r.range_end)?
            }
            Some(request_op::Request::RequestPut(p)) => auth.is_put_permitted(ai, &p.key)?,
            Some(request_op::Request::RequestDeleteRange(d)) => {
                if d.prev_kv {
                    auth.is_range_permitted(ai, &d.key, &d.range_end)?;
                }
                auth.is_delete_range_permitted(ai, &d.key, &d.range_end)?
            }
            Some(request_op::Request::RequestTxn(inner)) => check_txn_auth(auth, ai, inner)?,
            None => {}
        }
    }
    Ok(())
}

// ---- execution ----

/// Range's sort: a target other than KEY with order NONE sorts ascending (etcd's rule).
pub fn sort_kvs(kvs: &mut [KeyValue], target: i32, mut order: i32) {
    if target != range_request::SortTarget::Key as i32
        && order == range_request::SortOrder::None as i32
    {
        order = range_request::SortOrder::Ascend as i32;
    }
    if order != range_request::SortOrder::None as i32 {
        let cmp = |a: &KeyValue, b: &KeyValue| -> Ordering {
            match range_request::SortTarget::try_from(target)
                .unwrap_or(range_request::SortTarget::Key)
            {
                range_request::SortTarget::Key => a.key.cmp(&b.key),
                range_request::SortTarget::Version => a.version.cmp(&b.version),
                range_request::SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                range_request::SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                range_request::SortTarget::Value => a.value.cmp(&b.value),
            }
        };
        if order == range_request::SortOrder::Descend as i32 {
            // Go's sort.Sort(sort.Reverse(..)) is not stable; equal elements keep key order
            // in practice only for distinct values, so sort stably on the reversed order.
            kvs.sort_by(|a, b| cmp(b, a));
        } else {
            kvs.sort_by(cmp);
        }
    }
}

pub fn range(view: &impl ReadView, r: &RangeRequest) -> Result<RangeResponse> {
    let filtered = r.sort_order != range_request::SortOrder::None as i32
        || r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0;
    let mut limit = if filtered { 0 } else { r.limit };
    if limit > 0 {
        limit += 1; // one more, to know whether there are more
    }
    let rr = view.range(
        &r.key,
        RangeEnd::from_request(&r.range_end),
        RangeOptions {
            limit,
            rev: r.revision,
            count_only: r.count_only,
        },
    )?;
    let mut kvs = rr.kvs;
    if r.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= r.max_mod_revision);
    }
    if r.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= r.min_mod_revision);
    }
    if r.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= r.max_create_revision);
    }
    if r.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= r.min_create_revision);
    }
    sort_kvs(&mut kvs, r.sort_target, r.sort_order);
    let mut more = false;
    if r.limit > 0 && kvs.len() as i64 > r.limit {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse {
        header: header(rr.rev),
        kvs,
        more,
        count: rr.count,
    })
}

pub fn put(txn: &mut WriteTxn, r: &PutRequest) -> Result<PutResponse> {
    let mut value = r.value.clone();
    let mut lease = r.lease;
    let mut prev_kv = None;
    if r.ignore_value || r.ignore_lease || r.prev_kv {
        let rr = txn.range(&r.key, RangeEnd::Key, RangeOptions::default())?;
        let prev = rr.kvs.into_iter().next();
        if (r.ignore_value || r.ignore_lease) && prev.is_none() {
            return Err(EtcdError::KeyNotFound);
        }
        if let Some(p) = &prev {
            if r.ignore_value {
                value = p.value.clone();
            }
            if r.ignore_lease {
                lease = p.lease;
            }
        }
        if r.prev_kv {
            prev_kv = prev;
        }
    }
    let rev = txn.put(&r.key, value, lease);
    Ok(PutResponse {
        header: header(rev),
        prev_kv,
    })
}

pub fn delete_range(txn: &mut WriteTxn, r: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
    let end = RangeEnd::from_request(&r.range_end);
    let prev_kvs = if r.prev_kv {
        txn.range(&r.key, end, RangeOptions::default())?.kvs
    } else {
        vec![]
    };
    let (deleted, rev) = txn.delete_range(&r.key, end);
    Ok(DeleteRangeResponse {
        header: header(rev),
        deleted,
        prev_kvs,
    })
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    use compare::{CompareResult, CompareTarget, TargetUnion};
    let target = CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version);
    let num = |f: fn(&TargetUnion) -> Option<i64>| c.target_union.as_ref().and_then(f).unwrap_or(0);
    let ord = match target {
        CompareTarget::Value => {
            let v: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(v)
        }
        CompareTarget::Create => kv.create_revision.cmp(&num(|t| match t {
            TargetUnion::CreateRevision(x) => Some(*x),
            _ => None,
        })),
        CompareTarget::Mod => kv.mod_revision.cmp(&num(|t| match t {
            TargetUnion::ModRevision(x) => Some(*x),
            _ => None,
        })),
        CompareTarget::Version => kv.version.cmp(&num(|t| match t {
            TargetUnion::Version(x) => Some(*x),
            _ => None,
        })),
        CompareTarget::Lease => kv.lease.cmp(&num(|t| match t {
            TargetUnion::Lease(x) => Some(*x),
            _ => None,
        })),
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord == Ordering::Equal,
        Ok(CompareResult::NotEqual) => ord != Ordering::Equal,
        Ok(CompareResult::Greater) => ord == Ordering::Greater,
        Ok(CompareResult::Less) => ord == Ordering::Less,
        Err(_) => true,
    }
}

fn apply_compare(view: &impl ReadView, c: &Compare) -> bool {
    let Ok(rr) = view.range(
        &c.key,
        RangeEnd::from_request(&c.range_end),
        RangeOptions::default(),
    ) else {
        return false;
    };
    if rr.kvs.is_empty() {
        if c.target == compare::CompareTarget::Value as i32 {
            // No way to compare the value of a missing key.
            return false;
        }
        return compare_kv(c, &KeyValue::default());
    }
    rr.kvs.iter().all(|kv| compare_kv(c, kv))
}

/// Decides every (nested) txn's branch up front, on the state before the txn: etcd's txn path.
fn compare_to_path(view: &impl ReadView, t: &TxnRequest, path: &mut Vec<bool>) {
    let ok = t.compare.iter().all(|c| apply_compare(view, c));
    path.push(ok);
    let ops = if ok { &t.success } else { &t.failure };
    for op in ops {
        if let Some(request_op::Request::RequestTxn(inner)) = &op.request {
            compare_to_path(view, inner, path);
        }
    }
}

/// What a txn's earlier ops on its path put (true) or deleted (false), in order, so that a
/// later op knows whether a key still exists.
#[derive(Default)]
struct Written(Vec<(Vec<u8>, Vec<u8>, bool)>);

impl Written {
    fn exists(&self, key: &[u8]) -> Option<bool> {
        self.0
            .iter()
            .rev()
            .find(|(k, end, _)| RangeEnd::from_request(end).contains(k, key))
            .map(|(_, _, put)| *put)
    }
}

/// Checks the ops of the chosen branches (`path`) before any runs, as etcd's `checkTxn` does.
fn check_path(
    view: &impl ReadView,
    // None for a txn that writes nothing (it has no put whose lease to check).
    lessor: Option<&Lessor>,
    t: &TxnRequest,
    path: &[bool],
    pos: &mut usize,
    written: &mut Written,
) -> Result<()> {
    let ok = path[*pos];
    *pos += 1;
    for op in if ok { &t.success } else { &t.failure } {
        match &op.request {
            // etcd 3.6's checkTxn: one pass over the chosen branches in op order, so the first
            // op that cannot run names the error (etcd 3.4 checked every put, then every range).
            Some(request_op::Request::RequestPut(p)) => {
                // etcd's checkRequestPut: the key first, then the lease. The key is looked up
                // as the txn's earlier ops leave it: etcd 3.4 checks the state before the txn
                // only, and panics at apply when an earlier op deleted the key.
                if p.ignore_value || p.ignore_lease {
                    let exists = match written.exists(&p.key) {
                        Some(e) => e,
                        None => !view
                            .range(&p.key, RangeEnd::Key, RangeOptions::default())?
                            .kvs
                            .is_empty(),
                    };
                    if !exists {
                        return Err(EtcdError::KeyNotFound);
                    }
                }
                if p.lease != 0 && !lessor.is_some_and(|l| l.exists(p.lease)) {
                    return Err(EtcdError::LeaseNotFound);
                }
                written.0.push((p.key.clone(), Vec::new(), true));
            }
            Some(request_op::Request::RequestDeleteRange(d)) => {
                written.0.push((d.key.clone(), d.range_end.clone(), false));
            }
            Some(request_op::Request::RequestRange(r)) if r.revision != 0 => {
                if r.revision > view.rev() {
                    return Err(EtcdError::FutureRev);
                }
                if r.revision < view.compact_rev() {
                    return Err(EtcdError::Compacted);
                }
            }
            Some(request_op::Request::RequestTxn(inner)) => {
                check_path(view, lessor, inner, path, pos, written)?
            }
            _ => {}
        }
    }
    Ok(())
}

/// Where a txn's chosen ops run: a write transaction, or a read view for a txn that writes
/// nothing (`is_txn_read_only`).
trait OpTarget {
    fn op_range(&self, r: &RangeRequest) -> Result<RangeResponse>;
    fn op_put(&mut self, p: &PutRequest) -> Result<PutResponse>;
    fn op_delete_range(&mut self, d: &DeleteRangeRequest) -> Result<DeleteRangeResponse>;
}

impl OpTarget for WriteTxn<'_> {
    fn op_range(&self, r: &RangeRequest) -> Result<RangeResponse> {
        range(self, r)
    }
    fn op_put(&mut self, p: &PutRequest) -> Result<PutResponse> {
        put(self, p)
    }
    fn op_delete_range(&mut self, d: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        delete_range(self, d)
    }
}

struct ReadOnly<'a, V>(&'a V);

impl<V: ReadView> OpTarget for ReadOnly<'_, V> {
    fn op_range(&self, r: &RangeRequest) -> Result<RangeResponse> {
        range(self.0, r)
    }
    fn op_put(&mut self, _: &PutRequest) -> Result<PutResponse> {
        Err(EtcdError::Internal("a put in a read-only txn".into()))
    }
    fn op_delete_range(&mut self, _: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        Err(EtcdError::Internal("a delete in a read-only txn".into()))
    }
}

/// Runs the branches `path` chose (one bool per txn, outer first, in op order).
fn execute(
    target: &mut impl OpTarget,
    t: &TxnRequest,
    path: &[bool],
    pos: &mut usize,
) -> Result<TxnResponse> {
    let ok = path[*pos];
    *pos += 1;
    let mut responses = Vec::new();
    for op in if ok { &t.success } else { &t.failure } {
        let resp = match &op.request {
            Some(request_op::Request::RequestRange(r)) => {
                Some(response_op::Response::ResponseRange(target.op_range(r)?))
            }
            Some(request_op::Request::RequestPut(p)) => {
                Some(response_op::Response::ResponsePut(target.op_put(p)?))
            }
            Some(request_op::Request::RequestDeleteRange(d)) => Some(
                response_op::Response::ResponseDeleteRange(target.op_delete_range(d)?),
            ),
            Some(request_op::Request::RequestTxn(inner)) => Some(
                response_op::Response::ResponseTxn(execute(target, inner, path, pos)?),
            ),
            None => None,
        };
        responses.push(ResponseOp { response: resp });
    }
    // Nested txn responses carry an empty header in etcd; the caller sets the outer one.
    Ok(TxnResponse {
        header: Some(ResponseHeader::default()),
        succeeded: ok,
        responses,
    })
}

/// Executes a txn as one write transaction (one revision if it changes anything).
pub fn txn(txn: &mut WriteTxn, lessor: &Lessor, t: &TxnRequest) -> Result<TxnResponse> {
    let mut path = Vec::new();
    compare_to_path(txn, t, &mut path);
    check_path(txn, Some(lessor), t, &path, &mut 0, &mut Written::default())?;
    if !is_txn_read_only(t) {
        // etcd compares and checks in a read transaction of its own, then writes in another:
        // its metrics count them as two.
        txn.take_ops().record();
    }
    let mut resp = execute(txn, t, &path, &mut 0)?;
    resp.header = header(txn.rev());
    Ok(resp)
}

/// A read-only txn served from a read view, without the log (serializable, or after a
/// linearizable read barrier).
pub fn read_only_txn(view: &impl ReadView, t: &TxnRequest) -> Result<TxnResponse> {
    let view = &CountingView::new(view);
    let result = read_only_txn_in(view, t);
    view.ops().record();
    result
}

/// A read view that counts its ranges, for etcd's mvcc metrics.
struct CountingView<'a, V> {
    view: &'a V,
    ranges: std::cell::Cell<u64>,
}

impl<'a, V: ReadView> CountingView<'a, V> {
    fn new(view: &'a V) -> Self {
        CountingView {
            view,
            ranges: std::cell::Cell::new(0),
        }
    }
    fn ops(&self) -> crate::metrics::TxnOps {
        crate::metrics::TxnOps {
            ranges: self.ranges.get(),
            ..Default::default()
        }
    }
}

impl<V: ReadView> ReadView for CountingView<'_, V> {
    fn rev(&self) -> i64 {
        self.view.rev()
    }
    fn compact_rev(&self) -> i64 {
        self.view.compact_rev()
    }
    fn range(
        &self,
        key: &[u8],
        end: RangeEnd,
        opts: RangeOptions,
    ) -> crate::mvcc::Result<crate::mvcc::RangeResult> {
        self.ranges.set(self.ranges.get() + 1);
        self.view.range(key, end, opts)
    }
}

fn read_only_txn_in(view: &impl ReadView, t: &TxnRequest) -> Result<TxnResponse> {
    let mut path = Vec::new();
    compare_to_path(view, t, &mut path);
    check_path(view, None, t, &path, &mut 0, &mut Written::default())?;
    let mut resp = execute(&mut ReadOnly(view), t, &path, &mut 0)?;
    resp.header = header(view.rev());
    Ok(resp)
}
