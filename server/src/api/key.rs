//! The checks a KV request passes before it is proposed (etcd's `v3rpc/key.go`): empty keys,
//! ignore_value/ignore_lease with a value or lease, txn size, overlapping puts and deletes.

use crate::error::{EtcdError, Result};
use crate::pb::etcdserverpb::{
    request_op, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use std::collections::HashSet;

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
