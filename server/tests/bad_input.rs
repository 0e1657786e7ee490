//! Invalid requests: each must fail with exactly etcd's gRPC code and message.
//! Every scenario runs against real etcd 3.4 first (proving the expectation)
//! and then against the subject, with identical flags.

mod support;

use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn,
    TxnOp,
};
use support::{assert_grpc_err, Kind, Server};
use tonic::Code;

const EMPTY_KEY: &str = "etcdserver: key is not provided";
const TOO_LARGE: &str = "etcdserver: request is too large";
const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
const FUTURE: &str = "etcdserver: mvcc: required revision is a future revision";
const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";
const TOO_MANY_OPS: &str = "etcdserver: too many operations in txn request";
const DUPLICATE_KEY: &str = "etcdserver: duplicate key given in txn request";
const VALUE_PROVIDED: &str = "etcdserver: value is provided";
const LEASE_PROVIDED: &str = "etcdserver: lease is provided";
const KEY_NOT_FOUND: &str = "etcdserver: key not found";

#[tokio::test(flavor = "multi_thread")]
async fn empty_key_is_rejected() {
    for server in &support::both(&[]).await {
        let l = server.kind.label();
        let mut c = server.client().await;
        assert_grpc_err(
            &format!("{l}: put \"\""),
            c.put("", "v", None).await,
            Code::InvalidArgument,
            EMPTY_KEY,
        );
        assert_grpc_err(
            &format!("{l}: get \"\""),
            c.get("", None).await,
            Code::InvalidArgument,
            EMPTY_KEY,
        );
        assert_grpc_err(
            &format!("{l}: delete \"\""),
            c.delete("", None).await,
            Code::InvalidArgument,
            EMPTY_KEY,
        );
        let txn = Txn::new().and_then([TxnOp::put("", "v", None)]);
        assert_grpc_err(
            &format!("{l}: txn put \"\""),
            c.txn(txn).await,
            Code::InvalidArgument,
            EMPTY_KEY,
        );
        let txn = Txn::new().or_else([TxnOp::get("", None)]);
        assert_grpc_err(
            &format!("{l}: txn get \"\""),
            c.txn(txn).await,
            Code::InvalidArgument,
            EMPTY_KEY,
        );
        // Nothing was written by the rejected requests.
        let r = c
            .get("\0", Some(GetOptions::new().with_from_key()))
            .await
            .unwrap();
        assert_eq!((r.count(), r.header().unwrap().revision()), (0, 1), "{l}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn request_larger_than_max_request_bytes_is_rejected() {
    let mut over_grpc_limit = Vec::new();
    for server in &support::both(&["--max-request-bytes=4096"]).await {
        let l = server.kind.label();
        let mut c = server.client().await;
        // Beyond --max-request-bytes plus gRPC's 512 KiB allowance, grpc-go refuses the
        // message itself, before etcd reads it.
        let huge = c.put("huge", vec![b'h'; 600 * 1024], None).await;
        let (code, msg) = support::grpc_error(&huge.expect_err("a 600 KiB put"));
        assert_eq!(code, Code::ResourceExhausted, "{l}: {msg}");
        assert!(
            msg.starts_with("grpc: received message larger than max (")
                && msg.ends_with(&format!(" vs. {})", 4096 + 512 * 1024)),
            "{l}: {msg}"
        );
        over_grpc_limit.push(msg);
        let big = vec![b'x'; 8192];
        assert_grpc_err(
            &format!("{l}: big put"),
            c.put("big", big.clone(), None).await,
            Code::InvalidArgument,
            TOO_LARGE,
        );
        let txn = Txn::new().and_then([
            TxnOp::put("t1", vec![b'y'; 3000], None),
            TxnOp::put("t2", vec![b'z'; 3000], None),
        ]);
        assert_grpc_err(
            &format!("{l}: big txn"),
            c.txn(txn).await,
            Code::InvalidArgument,
            TOO_LARGE,
        );
        // Just under the limit is fine.
        c.put("small", vec![b's'; 2048], None)
            .await
            .unwrap_or_else(|e| panic!("{l}: small put: {e}"));
        let r = c.get("big", None).await.unwrap();
        assert_eq!(r.count(), 0, "{l}: rejected put must not be applied");
    }
    assert_eq!(over_grpc_limit[0], over_grpc_limit[1], "etcd, then oxcd");
}

async fn seed(c: &mut Client) {
    // Revisions 2..=6.
    for i in 0..5 {
        c.put(format!("k{i}"), format!("v{i}"), None).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn compacted_and_future_revisions() {
    for server in &support::both(&[]).await {
        let l = server.kind.label();
        let mut c = server.client().await;
        seed(&mut c).await;
        c.compact(4, Some(CompactionOptions::new().with_physical()))
            .await
            .unwrap_or_else(|e| panic!("{l}: compact: {e}"));

        let at = |rev| Some(GetOptions::new().with_revision(rev));
        assert_grpc_err(
            &format!("{l}: get @3"),
            c.get("k0", at(3)).await,
            Code::OutOfRange,
            COMPACTED,
        );
        assert_grpc_err(
            &format!("{l}: get @1"),
            c.get("k0", at(1)).await,
            Code::OutOfRange,
            COMPACTED,
        );
        // The compaction revision itself is still readable.
        let r = c
            .get("k", Some(GetOptions::new().with_prefix().with_revision(4)))
            .await
            .unwrap();
        assert_eq!(r.count(), 3, "{l}: keys at the compaction revision");
        assert_grpc_err(
            &format!("{l}: get @7"),
            c.get("k0", at(7)).await,
            Code::OutOfRange,
            FUTURE,
        );
        assert_grpc_err(
            &format!("{l}: get @1000"),
            c.get("k0", at(1000)).await,
            Code::OutOfRange,
            FUTURE,
        );
        // Inside a txn too.
        let txn = Txn::new().and_then([TxnOp::get("k0", at(2))]);
        assert_grpc_err(
            &format!("{l}: txn get @2"),
            c.txn(txn).await,
            Code::OutOfRange,
            COMPACTED,
        );
        let txn = Txn::new().and_then([TxnOp::get("k0", at(99))]);
        assert_grpc_err(
            &format!("{l}: txn get @99"),
            c.txn(txn).await,
            Code::OutOfRange,
            FUTURE,
        );
        // Compacting again at or below the compaction point, or into the future.
        assert_grpc_err(
            &format!("{l}: compact 4 again"),
            c.compact(4, None).await,
            Code::OutOfRange,
            COMPACTED,
        );
        assert_grpc_err(
            &format!("{l}: compact 2"),
            c.compact(2, None).await,
            Code::OutOfRange,
            COMPACTED,
        );
        assert_grpc_err(
            &format!("{l}: compact 7"),
            c.compact(7, None).await,
            Code::OutOfRange,
            FUTURE,
        );
        // Current reads are unaffected.
        let r = c
            .get("k", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        assert_eq!((r.count(), r.header().unwrap().revision()), (5, 6), "{l}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_not_found() {
    for server in &support::both(&[]).await {
        let l = server.kind.label();
        let mut c = server.client().await;
        let missing = 0x1234_5678;
        let opts = Some(PutOptions::new().with_lease(missing));
        assert_grpc_err(
            &format!("{l}: put with missing lease"),
            c.put("k", "v", opts.clone()).await,
            Code::NotFound,
            LEASE_NOT_FOUND,
        );
        assert_grpc_err(
            &format!("{l}: revoke missing lease"),
            c.lease_revoke(missing).await,
            Code::NotFound,
            LEASE_NOT_FOUND,
        );
        let txn = Txn::new().and_then([TxnOp::put("k", "v", opts.clone())]);
        assert_grpc_err(
            &format!("{l}: txn put with missing lease"),
            c.txn(txn).await,
            Code::NotFound,
            LEASE_NOT_FOUND,
        );
        // A revoked lease is gone as well.
        let id = c.lease_grant(600, None).await.unwrap().id();
        c.lease_revoke(id).await.unwrap();
        let opts = Some(PutOptions::new().with_lease(id));
        assert_grpc_err(
            &format!("{l}: put with revoked lease"),
            c.put("k", "v", opts).await,
            Code::NotFound,
            LEASE_NOT_FOUND,
        );
        assert_grpc_err(
            &format!("{l}: revoke revoked lease"),
            c.lease_revoke(id).await,
            Code::NotFound,
            LEASE_NOT_FOUND,
        );
        // TimeToLive of an unknown lease is not an error: TTL -1.
        let ttl = c
            .lease_time_to_live(missing, None)
            .await
            .unwrap_or_else(|e| panic!("{l}: ttl: {e}"));
        assert_eq!((ttl.id(), ttl.ttl()), (missing, -1), "{l}");
        let r = c.get("k", None).await.unwrap();
        assert_eq!(r.count(), 0, "{l}");
    }
}

fn puts(n: usize) -> Vec<TxnOp> {
    (0..n)
        .map(|i| TxnOp::put(format!("op{i}"), "v", None))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn too_many_operations_in_txn() {
    // Explicit limit.
    for server in &support::both(&["--max-txn-ops=4"]).await {
        let l = server.kind.label();
        let mut c = server.client().await;
        c.txn(Txn::new().and_then(puts(4)))
            .await
            .unwrap_or_else(|e| panic!("{l}: 4 ops: {e}"));
        assert_grpc_err(
            &format!("{l}: 5 success ops"),
            c.txn(Txn::new().and_then(puts(5))).await,
            Code::InvalidArgument,
            TOO_MANY_OPS,
        );
        assert_grpc_err(
            &format!("{l}: 5 failure ops"),
            c.txn(Txn::new().or_else(puts(5))).await,
            Code::InvalidArgument,
            TOO_MANY_OPS,
        );
        let compares: Vec<Compare> = (0..5)
            .map(|i| Compare::version(format!("op{i}"), CompareOp::Equal, 1))
            .collect();
        assert_grpc_err(
            &format!("{l}: 5 compares"),
            c.txn(Txn::new().when(compares)).await,
            Code::InvalidArgument,
            TOO_MANY_OPS,
        );
    }
    // Default limit is 128.
    for server in &support::both(&[]).await {
        let l = server.kind.label();
        let mut c = server.client().await;
        c.txn(Txn::new().and_then(puts(128)))
            .await
            .unwrap_or_else(|e| panic!("{l}: 128 ops: {e}"));
        assert_grpc_err(
            &format!("{l}: 129 ops"),
            c.txn(Txn::new().and_then(puts(129))).await,
            Code::InvalidArgument,
            TOO_MANY_OPS,
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_key_in_txn() {
    for server in &support::both(&[]).await {
        let l = server.kind.label();
        let mut c = server.client().await;
        let dup = |ops: Vec<TxnOp>| Txn::new().and_then(ops);
        assert_grpc_err(
            &format!("{l}: put twice"),
            c.txn(dup(vec![
                TxnOp::put("d", "1", None),
                TxnOp::put("d", "2", None),
            ]))
            .await,
            Code::InvalidArgument,
            DUPLICATE_KEY,
        );
        assert_grpc_err(
            &format!("{l}: put inside deleted range"),
            c.txn(dup(vec![
                TxnOp::delete("a", Some(DeleteOptions::new().with_range("z"))),
                TxnOp::put("d", "2", None),
            ]))
            .await,
            Code::InvalidArgument,
            DUPLICATE_KEY,
        );
        assert_grpc_err(
            &format!("{l}: put in nested txn and parent"),
            c.txn(dup(vec![
                TxnOp::put("d", "1", None),
                TxnOp::txn(Txn::new().and_then([TxnOp::put("d", "2", None)])),
            ]))
            .await,
            Code::InvalidArgument,
            DUPLICATE_KEY,
        );
        // Reads of the same key, and the same key in different branches, are fine.
        c.txn(dup(vec![
            TxnOp::get("d", None),
            TxnOp::get("d", None),
            TxnOp::put("d", "1", None),
        ]))
        .await
        .unwrap_or_else(|e| panic!("{l}: gets + put: {e}"));
        c.txn(
            Txn::new()
                .and_then([TxnOp::put("d", "1", None)])
                .or_else([TxnOp::put("d", "2", None)]),
        )
        .await
        .unwrap_or_else(|e| panic!("{l}: put in both branches: {e}"));
        let r = c.get("d", None).await.unwrap();
        assert_eq!(r.kvs()[0].value(), b"1", "{l}");
        assert_eq!(
            r.header().unwrap().revision(),
            3,
            "{l}: rejected txns must not bump the revision"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ignore_value_and_ignore_lease_misuse() {
    for server in &support::both(&[]).await {
        let l = server.kind.label();
        let mut c = server.client().await;
        let lease = c.lease_grant(600, None).await.unwrap().id();
        c.put("k", "v", None).await.unwrap();

        let iv = PutOptions::new().with_ignore_value();
        let il = PutOptions::new().with_ignore_lease();
        assert_grpc_err(
            &format!("{l}: ignore_value + value"),
            c.put("k", "new", Some(iv.clone())).await,
            Code::InvalidArgument,
            VALUE_PROVIDED,
        );
        assert_grpc_err(
            &format!("{l}: ignore_lease + lease"),
            c.put("k", "v", Some(il.clone().with_lease(lease))).await,
            Code::InvalidArgument,
            LEASE_PROVIDED,
        );
        assert_grpc_err(
            &format!("{l}: ignore_value on missing key"),
            c.put("missing", "", Some(iv.clone())).await,
            Code::InvalidArgument,
            KEY_NOT_FOUND,
        );
        assert_grpc_err(
            &format!("{l}: ignore_lease on missing key"),
            c.put("missing", "x", Some(il.clone())).await,
            Code::InvalidArgument,
            KEY_NOT_FOUND,
        );
        let txn = Txn::new().and_then([TxnOp::put("missing", "", Some(iv.clone()))]);
        assert_grpc_err(
            &format!("{l}: txn ignore_value on missing key"),
            c.txn(txn).await,
            Code::InvalidArgument,
            KEY_NOT_FOUND,
        );
        let txn = Txn::new().and_then([TxnOp::put("k", "x", Some(iv.clone()))]);
        assert_grpc_err(
            &format!("{l}: txn ignore_value + value"),
            c.txn(txn).await,
            Code::InvalidArgument,
            VALUE_PROVIDED,
        );

        // Correct use works: keep the value, change the lease; then keep the lease.
        let r = c
            .put("k", "", Some(iv.clone().with_lease(lease).with_prev_key()))
            .await
            .unwrap();
        assert_eq!(r.prev_key().unwrap().value(), b"v", "{l}");
        c.put("k", "v2", Some(il.clone())).await.unwrap();
        let r = c.get("k", None).await.unwrap();
        let kv = &r.kvs()[0];
        assert_eq!(
            (kv.value(), kv.lease(), kv.version()),
            (&b"v2"[..], lease, 3),
            "{l}"
        );
        assert_eq!(r.header().unwrap().revision(), 4, "{l}");
    }
}

/// A txn whose put keeps the value (`ignore_value`) of a key an earlier op of the same txn
/// deleted: etcd 3.4 passes its checks and then panics at apply ("unexpected error during
/// txn", and again at every restart, since the entry is in its log). oxcd refuses it before
/// anything changes, with the error etcd gives a put without a key to keep.
#[tokio::test(flavor = "multi_thread")]
async fn ignore_value_after_a_delete_in_the_same_txn_is_refused() {
    let mut server = Server::start(Kind::subject()).await;
    let mut c = server.client().await;
    c.put("k", "v", None).await.unwrap();
    // (A nested from-key delete: etcd's duplicate-key check lets this through.)
    let txn = Txn::new().and_then([
        TxnOp::txn(Txn::new().and_then([TxnOp::delete(
            "a",
            Some(DeleteOptions::new().with_from_key()),
        )])),
        TxnOp::put("k", "", Some(PutOptions::new().with_ignore_value())),
    ]);
    assert_grpc_err(
        "delete, then put with ignore_value",
        c.txn(txn).await,
        Code::InvalidArgument,
        KEY_NOT_FOUND,
    );
    let r = c.get("k", None).await.expect("the server is still up");
    assert_eq!(r.kvs()[0].value(), b"v", "nothing of the txn was applied");
    assert!(server.is_running());
}

/// A Txn nested `depth` levels deep (each level one op), with a put at the innermost.
fn nested_txn(depth: usize, key: &str) -> Txn {
    let mut t = Txn::new().and_then([TxnOp::put(key, "v", None)]);
    for _ in 1..depth {
        t = Txn::new().and_then([TxnOp::txn(t)]);
    }
    t
}

/// Issue 25: a nested Txn the API accepted but the applier could not decode stopped every
/// member for good. Each depth from 1 to 200 gets etcd's answer (max-txn-ops 128, one op per
/// level: 128 levels apply, 129 do not), and the server keeps serving with its data.
#[tokio::test(flavor = "multi_thread")]
async fn nested_txns_of_any_depth_are_applied_or_refused_never_crash() {
    let [etcd, oxcd] = support::both(&[]).await;
    let (mut e, mut o) = (etcd.client().await, oxcd.client().await);
    e.put("intact", "1", None).await.unwrap();
    o.put("intact", "1", None).await.unwrap();
    for depth in 1..=200usize {
        let key = format!("depth/{depth:03}");
        let theirs = e.txn(nested_txn(depth, &key)).await;
        let ours = o.txn(nested_txn(depth, &key)).await;
        for (who, answer, client) in [("etcd", theirs, &mut e), ("oxcd", ours, &mut o)] {
            let got = client.get(key.as_str(), None).await.unwrap();
            if depth > 128 {
                assert_grpc_err(
                    &format!("{who} depth {depth}"),
                    answer,
                    Code::InvalidArgument,
                    TOO_MANY_OPS,
                );
                assert!(
                    got.kvs().is_empty(),
                    "{who} depth {depth} refused but applied"
                );
            } else {
                answer.unwrap_or_else(|err| panic!("{who} refused depth {depth}: {err}"));
                assert_eq!(
                    got.kvs().len(),
                    1,
                    "{who} depth {depth} answered but not applied"
                );
            }
        }
    }
    // The server is alive with its data.
    let got = o.get("intact", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"1");
    o.put("after", "1", None)
        .await
        .expect("still serving writes");
}

/// The same against a 3-member cluster: the depth-50 Txn (the one that stopped every member)
/// is refused or applied, and all members stay up and converge.
#[tokio::test(flavor = "multi_thread")]
async fn a_deep_nested_txn_leaves_a_cluster_running() {
    let _serial = support::serial_cluster_test();
    let cluster = support::Cluster::start(Kind::subject(), 3).await;
    let mut c = cluster.client().await;
    c.put("intact", "1", None).await.unwrap();
    for depth in [48, 49, 50, 51, 100, 128, 129] {
        let answer = c.txn(nested_txn(depth, &format!("d{depth}"))).await;
        if depth <= 128 {
            answer.unwrap_or_else(|e| panic!("depth {depth}: {e}"));
        } else {
            assert_grpc_err(
                &format!("depth {depth}"),
                answer,
                Code::InvalidArgument,
                TOO_MANY_OPS,
            );
        }
    }
    c.put("after", "1", None)
        .await
        .expect("the cluster serves writes");
    cluster
        .wait_converged(std::time::Duration::from_secs(20))
        .await;
    let mut cluster = cluster;
    // A restart replays the log: nothing in it stops a member.
    cluster.restart_all().await;
    cluster
        .wait_converged(std::time::Duration::from_secs(20))
        .await;
    // Nothing undecodable was committed, so nothing was skipped.
    for m in &cluster.members {
        assert!(!m.log().contains("undecodable") && !m.log().contains("too deep to decode"));
    }
}

/// With `--max-txn-ops` raised, the deepest Txn oxcd takes (1024 levels, pb::nesting) is
/// decoded, applied, answered and replayed within the server's stacks; one level more gets
/// etcd's answer for too deep a Txn, checked before anything recursive touches it.
#[tokio::test(flavor = "multi_thread")]
async fn the_deepest_txn_oxcd_takes_fits_its_stacks() {
    let mut server = Server::start_with(Kind::subject(), &["--max-txn-ops", "5000"]).await;
    let mut c = server.client().await;
    c.txn(nested_txn(1024, "deepest"))
        .await
        .expect("1024 levels apply");
    assert_grpc_err(
        "1025 levels",
        c.txn(nested_txn(1025, "deeper")).await,
        Code::InvalidArgument,
        TOO_MANY_OPS,
    );
    server.restart().await;
    let mut c = server.client().await;
    let got = c.get("deepest", None).await.unwrap();
    assert_eq!(got.kvs().len(), 1, "the deepest Txn survives a replay");
    assert!(c.get("deeper", None).await.unwrap().kvs().is_empty());
}

/// Issue 25: a 1 MiB request header. etcd serves it (grpc-go takes header lists up to 16 MiB,
/// Go's net/http heads up to 1 MiB + 4 KiB), over gRPC and over the JSON gateway; so must
/// oxcd. Past the limit only that one stream is refused: a watch on the same connection keeps
/// getting its events.
#[tokio::test(flavor = "multi_thread")]
async fn a_one_mib_header_is_served_and_a_bigger_one_refuses_only_its_stream() {
    use oxcd::pb::etcdserverpb::{
        kv_client::KvClient, watch_client::WatchClient, watch_request, PutRequest, RangeRequest,
        WatchCreateRequest, WatchRequest,
    };
    use tonic::metadata::MetadataValue;
    let with_header = |size: usize| {
        let mut req = tonic::Request::new(RangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        });
        let value = MetadataValue::try_from("a".repeat(size)).unwrap();
        req.metadata_mut().insert("x-big", value);
        req
    };
    let dir = tempfile::tempdir().unwrap();
    let header_file = dir.path().join("header");
    // (curl's own limit on a header line is just under 1 MiB.)
    std::fs::write(&header_file, format!("X-Big: {}\n", "a".repeat(1_048_000))).unwrap();
    for server in &support::both(&[]).await {
        let l = server.kind.label();
        let ch = server.channel().await;
        let mut kv = KvClient::new(ch.clone());
        kv.range(with_header(1 << 20))
            .await
            .unwrap_or_else(|e| panic!("{l}: a 1 MiB header: {e}"));

        // A watch on the same connection, then a header over any limit on another stream.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: b"w".to_vec(),
                    ..Default::default()
                },
            )),
        })
        .await
        .unwrap();
        let mut events = WatchClient::new(ch.clone())
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        assert!(events.message().await.unwrap().unwrap().created);
        let over = kv.range(with_header(17 << 20)).await;
        eprintln!("{l}: a 17 MiB header: {:?}", over.as_ref().map(|_| ()));
        if server.kind == Kind::subject() {
            assert!(over.is_err(), "{l}: a 17 MiB header was served");
        }
        let mut other = KvClient::connect(server.endpoint()).await.unwrap();
        other
            .put(PutRequest {
                key: b"w".to_vec(),
                value: b"1".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap();
        if server.kind == Kind::subject() {
            let got = tokio::time::timeout(std::time::Duration::from_secs(10), events.message())
                .await
                .expect("the watch got its event")
                .expect("the watch stream survived")
                .expect("not ended");
            assert_eq!(got.events.len(), 1, "{l}");
            kv.range(with_header(10))
                .await
                .expect("the connection still serves");
        }

        // The JSON gateway over HTTP/1.1.
        let url = format!("{}/v3/kv/range", server.endpoint());
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg(format!("@{}", header_file.display()))
            .args(["-d", r#"{"key":"aw=="}"#, &url])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "200",
            "{l}: gateway, a 1 MiB header"
        );
    }
}
