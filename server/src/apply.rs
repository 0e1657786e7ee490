//! etcd's request semantics over the MVCC store (etcd's `apply.go`): Range, Put, DeleteRange,
//! Txn with compares and nested transactions, and the request checks etcd makes before
//! proposing (empty keys, txn size, overlapping puts and deletes).

use crate::auth::{AuthInfo, AuthStore};
use crate::error::{EtcdError, Result};
use crate::lease::Lessor;
use crate::mvcc::{RangeEnd, RangeOptions, ReadView, WriteTxn};
use crate::pb::etcdserverpb::{
    compare, range_request, request_op, response_op, Compare, DeleteRangeRequest,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp,
    ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use crate::pb::mvccpb::KeyValue;
use std::cmp::Ordering;
use std::collections::HashSet;

fn header(rev: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision: rev,
        ..Default::default()
    })
}

// ---- checks made before a request is proposed (etcd's v3rpc/key.go) ----

pub fn check_range(r: &RangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    Ok(())
}

pub fn check_put(r: &PutRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(EtcdError::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(EtcdError::LeaseProvided);
    }
    Ok(())
}

pub fn check_delete(r: &DeleteRangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    Ok(())
}

pub fn check_txn(r: &TxnRequest, max_txn_ops: usize) -> Result<()> {
    check_txn_ops(r, max_txn_ops as i64)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

fn check_txn_ops(r: &TxnRequest, max_txn_ops: i64) -> Result<()> {
    let opc = r.compare.len().max(r.success.len()).max(r.failure.len()) as i64;
    if opc > max_txn_ops {
        return Err(EtcdError::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(EtcdError::EmptyKey);
    }
    for op in r.success.iter().chain(r.failure.iter()) {
        match &op.request {
            Some(request_op::Request::RequestRange(x)) => check_range(x)?,
            Some(request_op::Request::RequestPut(x)) => check_put(x)?,
            Some(request_op::Request::RequestDeleteRange(x)) => check_delete(x)?,
            Some(request_op::Request::RequestTxn(x)) => check_txn_ops(x, max_txn_ops - opc)?,
            None => return Err(EtcdError::KeyNotFound),
        }
    }
    Ok(())
}

/// A deleted interval [start, end) as etcd's affine string intervals see it: an empty end is
/// unbounded, a single key is [key, key+"\0").
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    fn contains(&self, k: &[u8]) -> bool {
        k >= self.start.as_slice() && self.end.as_deref().is_none_or(|e| k < e)
    }
}

/// Rejects a txn branch whose puts overlap each other or a delete (etcd's `checkIntervals`);
/// returns the branch's put keys and delete intervals for the enclosing level.
fn check_intervals(reqs: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<Interval>)> {
    let mut dels = Vec::new();
    for r in reqs {
        if let Some(request_op::Request::RequestDeleteRange(d)) = &r.request {
            let end = if d.range_end.is_empty() {
                let mut e = d.key.clone();
                e.push(0);
                Some(e)
            } else {
                Some(d.range_end.clone())
            };
            dels.push(Interval {
                start: d.key.clone(),
                end,
            });
        }
    }
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for r in reqs {
        let Some(request_op::Request::RequestTxn(t)) = &r.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || dels.iter().any(|d| d.contains(k)) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            // The same key in then and else is fine: only one branch runs.
            if puts.contains(k) && !puts_then.contains(k) {
                return Err(EtcdError::DuplicateKey);
            }
            if dels.iter().any(|d| d.contains(k)) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for r in reqs {
        let Some(request_op::Request::RequestPut(p)) = &r.request else {
            continue;
        };
        if puts.contains(&p.key) || dels.iter().any(|d| d.contains(&p.key)) {
            return Err(EtcdError::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
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

/// Checks the ops of the chosen branches against the state before the txn (etcd's
/// `checkRequests`): all puts first (write txns only), then all ranges, as etcd orders them.
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

fn check_path(
    view: &impl ReadView,
    lessor: &Lessor,
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
                if p.lease != 0 && !lessor.exists(p.lease) {
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

fn apply_txn_ops(
    txn: &mut WriteTxn,
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
                Some(response_op::Response::ResponseRange(range(txn, r)?))
            }
            Some(request_op::Request::RequestPut(p)) => {
                Some(response_op::Response::ResponsePut(put(txn, p)?))
            }
            Some(request_op::Request::RequestDeleteRange(d)) => Some(
                response_op::Response::ResponseDeleteRange(delete_range(txn, d)?),
            ),
            Some(request_op::Request::RequestTxn(inner)) => Some(
                response_op::Response::ResponseTxn(apply_txn_ops(txn, inner, path, pos)?),
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
    check_path(txn, lessor, t, &path, &mut 0, &mut Written::default())?;
    if !is_txn_read_only(t) {
        // etcd compares and checks in a read transaction of its own, then writes in another:
        // its metrics count them as two.
        txn.take_ops().record();
    }
    let mut resp = apply_txn_ops(txn, t, &path, &mut 0)?;
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
    let lessor = Lessor::new(1);
    check_path(view, &lessor, t, &path, &mut 0, &mut Written::default())?;
    fn run(
        view: &impl ReadView,
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
                    Some(response_op::Response::ResponseRange(range(view, r)?))
                }
                Some(request_op::Request::RequestTxn(inner)) => Some(
                    response_op::Response::ResponseTxn(run(view, inner, path, pos)?),
                ),
                _ => None,
            };
            responses.push(ResponseOp { response: resp });
        }
        Ok(TxnResponse {
            header: Some(ResponseHeader::default()),
            succeeded: ok,
            responses,
        })
    }
    let mut resp = run(view, t, &path, &mut 0)?;
    resp.header = header(view.rev());
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_op(k: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }
    fn del_op(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: k.into(),
                    range_end: end.into(),
                    ..Default::default()
                },
            )),
        }
    }
    fn txn_op(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestTxn(TxnRequest {
                compare: vec![],
                success,
                failure,
            })),
        }
    }

    #[test]
    fn duplicate_keys_are_rejected_as_etcd_does() {
        let t = |s: Vec<RequestOp>| {
            check_txn(
                &TxnRequest {
                    compare: vec![],
                    success: s,
                    failure: vec![],
                },
                128,
            )
        };
        assert_eq!(
            t(vec![put_op("a"), put_op("a")]),
            Err(EtcdError::DuplicateKey)
        );
        assert_eq!(
            t(vec![put_op("b"), del_op("a", "c")]),
            Err(EtcdError::DuplicateKey)
        );
        assert_eq!(
            t(vec![put_op("a"), del_op("a", "")]),
            Err(EtcdError::DuplicateKey)
        );
        assert_eq!(t(vec![put_op("c"), del_op("a", "c")]), Ok(()));
        // Deletes may overlap deletes.
        assert_eq!(t(vec![del_op("a", "c"), del_op("b", "")]), Ok(()));
        // Then and else of a nested txn may both write the same key.
        assert_eq!(
            t(vec![txn_op(vec![put_op("a")], vec![put_op("a")])]),
            Ok(())
        );
        assert_eq!(
            t(vec![put_op("a"), txn_op(vec![put_op("a")], vec![])]),
            Err(EtcdError::DuplicateKey)
        );
        // A from-key delete ("\0" end) does not conflict in etcd 3.4's interval check.
        assert_eq!(t(vec![put_op("b"), del_op("a", "\0")]), Ok(()));
    }

    #[test]
    fn too_many_ops_and_empty_ops() {
        let many: Vec<RequestOp> = (0..5).map(|i| put_op(&format!("k{i}"))).collect();
        let r = TxnRequest {
            compare: vec![],
            success: many,
            failure: vec![],
        };
        assert_eq!(check_txn(&r, 4), Err(EtcdError::TooManyOps));
        assert_eq!(check_txn(&r, 5), Ok(()));
        let r = TxnRequest {
            compare: vec![],
            success: vec![RequestOp { request: None }],
            failure: vec![],
        };
        assert_eq!(check_txn(&r, 5), Err(EtcdError::KeyNotFound));
    }
}
