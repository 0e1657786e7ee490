//! `Maintenance.HashKV` is etcd's own definition (crc32c over the key space in etcd's backend
//! encoding), so hashes taken from oxcd and etcd after the same writes are equal: members
//! can be compared with etcd's tooling, and oxcd with etcd.

mod support;

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, PutOptions, Txn, TxnOp};
use support::{Kind, Server};

/// The same writes on both servers: puts, overwrites, deletes, a txn, a lease and its revoke.
async fn write_history(c: &mut Client) {
    for i in 0..20 {
        c.put(format!("k{}", i % 7), format!("v{i}"), None)
            .await
            .unwrap();
    }
    c.delete("k3", None).await.unwrap();
    c.delete("k5", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    let txn = Txn::new()
        .when([Compare::version("k1", CompareOp::Greater, 0)])
        .and_then([
            TxnOp::put("t1", "x", None),
            TxnOp::put("t2", "y", None),
            TxnOp::delete("k2", None),
        ]);
    c.txn(txn).await.unwrap();
    let lease = c
        .lease_grant(
            600,
            Some(etcd_client::LeaseGrantOptions::new().with_id(4242)),
        )
        .await
        .unwrap();
    c.put(
        "leased",
        "l",
        Some(PutOptions::new().with_lease(lease.id())),
    )
    .await
    .unwrap();
    c.lease_revoke(lease.id()).await.unwrap();
    c.put("last", "z", None).await.unwrap();
}

async fn hashes(c: &mut Client, upto: i64) -> Vec<(i64, u32, i64)> {
    let mut out = Vec::new();
    for rev in 0..=upto {
        match c.maintenance_client().hash_kv(rev).await {
            Ok(r) => out.push((rev, r.hash(), r.compact_version())),
            Err(e) => {
                let (code, msg) = support::grpc_error(&e);
                out.push((rev, code as u32, msg.len() as i64));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn hashkv_equals_etcds_at_every_revision_before_and_after_compaction() {
    let etcd = Server::start(support::REFERENCE).await;
    let oxcd = Server::start(Kind::subject()).await;
    let (mut e, mut o) = (etcd.client().await, oxcd.client().await);
    write_history(&mut e).await;
    write_history(&mut o).await;
    let rev = e
        .get("last", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert_eq!(
        rev,
        o.get("last", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision()
    );
    let before = hashes(&mut e, rev + 1).await;
    assert_eq!(
        before,
        hashes(&mut o, rev + 1).await,
        "HashKV before compaction"
    );
    // Distinct hashes across revisions: the comparison cannot pass on a constant.
    let distinct: std::collections::HashSet<u32> = before.iter().map(|h| h.1).collect();
    assert!(distinct.len() > 10, "{before:?}");

    e.compact(rev / 2, None).await.unwrap();
    o.compact(rev / 2, None).await.unwrap();
    let after = hashes(&mut e, rev + 1).await;
    assert_eq!(
        after,
        hashes(&mut o, rev + 1).await,
        "HashKV after compaction"
    );

    // Compacted on a tombstone (the delete of k3, right after the 20 puts at revisions 2-21):
    // etcd 3.6 answers at the compacted revision with the hash that compaction took (against
    // the compaction before it, 13).
    e.compact(22, None).await.unwrap();
    o.compact(22, None).await.unwrap();
    let on_tombstone = hashes(&mut e, rev + 1).await;
    assert!(
        on_tombstone.iter().any(|h| h.0 == 22 && h.2 == 13),
        "{on_tombstone:?}"
    );
    assert_eq!(
        on_tombstone,
        hashes(&mut o, rev + 1).await,
        "HashKV after compacting on a tombstone"
    );
}
