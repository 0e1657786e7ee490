//! Maintenance as etcd's runbooks use it: the space quota and its alarm, compaction and
//! defragmentation, Hash and HashKV, and the corruption checks. Scenarios with observable
//! etcd behaviour run against real etcd 3.4 first, then against the subject.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use etcd_client::{
    AlarmAction, AlarmOptions, AlarmType, CompactionOptions, DeleteOptions, GetOptions, Txn, TxnOp,
};
use support::{assert_grpc_err, Cluster, Kind};
use tonic::Code;

const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";
const CORRUPT: &str = "etcdserver: corrupt cluster";

/// Bytes of every file under `dir`.
fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(md) = e.metadata() else { continue };
        total += if md.is_dir() {
            dir_size(&e.path())
        } else {
            md.len()
        };
    }
    total
}

#[tokio::test(flavor = "multi_thread")]
async fn database_space_exceeded_then_recovered_by_compaction_defragment_and_disarm() {
    for server in &support::both(&["--quota-backend-bytes=1048576"]).await {
        let l = server.kind.label();
        let mut c = server.client().await;
        c.put("keep", "me", None).await.unwrap();
        let value = vec![b'q'; 64 * 1024];
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut written = 0;
        let err = loop {
            assert!(
                written < 400 && Instant::now() < deadline,
                "{l}: quota never hit after {written} puts"
            );
            match c
                .put(format!("fill/{written:04}"), value.clone(), None)
                .await
            {
                Ok(_) => written += 1,
                Err(e) => break e,
            }
        };
        let (code, msg) = support::grpc_error(&err);
        assert_eq!(
            (code, msg.as_str()),
            (Code::ResourceExhausted, NO_SPACE),
            "{l}: after {written} puts"
        );
        assert!(written > 0, "{l}: quota hit before any write succeeded");

        // Further writes stay rejected, also through txn and lease grant.
        assert_grpc_err(
            &format!("{l}: small put"),
            c.put("tiny", "x", None).await,
            Code::ResourceExhausted,
            NO_SPACE,
        );
        let txn = Txn::new().and_then([TxnOp::put("tiny", "x", None)]);
        assert_grpc_err(
            &format!("{l}: txn put"),
            c.txn(txn).await,
            Code::ResourceExhausted,
            NO_SPACE,
        );
        assert_grpc_err(
            &format!("{l}: lease grant"),
            c.lease_grant(60, None).await,
            Code::ResourceExhausted,
            NO_SPACE,
        );
        // A Txn that only deletes costs no quota, so it applies: etcd 3.4's and 3.6's capped
        // appliers refuse only Txns with puts (etcd 3.5.1 was seen refusing it).
        let txn = Txn::new().and_then([TxnOp::delete("absent", None)]);
        c.txn(txn)
            .await
            .unwrap_or_else(|e| panic!("{l}: delete-only txn under NOSPACE: {e}"));
        let txn = Txn::new().and_then([TxnOp::get("keep", None)]);
        c.txn(txn)
            .await
            .unwrap_or_else(|e| panic!("{l}: read-only txn under NOSPACE: {e}"));

        // Reads and deletes still work.
        let r = c
            .get("keep", None)
            .await
            .unwrap_or_else(|e| panic!("{l}: read under NOSPACE: {e}"));
        assert_eq!(r.kvs()[0].value(), b"me", "{l}");
        let r = c
            .get(
                "fill/",
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .unwrap();
        assert_eq!(
            r.count(),
            written as i64,
            "{l}: every acknowledged fill key readable"
        );
        let d = c
            .delete("fill/", Some(DeleteOptions::new().with_prefix()))
            .await
            .unwrap_or_else(|e| panic!("{l}: delete under NOSPACE: {e}"));
        assert_eq!(d.deleted(), written as i64, "{l}");

        // The alarm is raised, and it stays until disarmed explicitly.
        let alarms = c
            .alarm(AlarmAction::Get, AlarmType::None, None)
            .await
            .unwrap_or_else(|e| panic!("{l}: alarm list: {e}"));
        let kinds: Vec<AlarmType> = alarms.alarms().iter().map(|a| a.alarm()).collect();
        assert_eq!(kinds, [AlarmType::Nospace], "{l}: alarm list");
        // (etcd 3.4 sends no header with AlarmResponse; take the ID from Status.)
        let member = c.status().await.unwrap().header().unwrap().member_id();
        assert_eq!(
            alarms.alarms()[0].member_id(),
            member,
            "{l}: alarm raised by this member"
        );
        assert_grpc_err(
            &format!("{l}: put after delete"),
            c.put("tiny", "x", None).await,
            Code::ResourceExhausted,
            NO_SPACE,
        );

        // etcd's runbook: compact, defragment, disarm. The backend and the data dir shrink,
        // and writes are taken again.
        let rev = c.status().await.unwrap().header().unwrap().revision();
        c.compact(rev, Some(CompactionOptions::new().with_physical()))
            .await
            .unwrap_or_else(|e| panic!("{l}: compact under NOSPACE: {e}"));
        let kv_hash = c.hash_kv(0).await.unwrap().hash();
        let db_before = c.status().await.unwrap().db_size();
        let dir_before = dir_size(&server.data_dir());
        c.defragment()
            .await
            .unwrap_or_else(|e| panic!("{l}: defragment: {e}"));
        let db_after = c.status().await.unwrap().db_size();
        let dir_after = dir_size(&server.data_dir());
        assert!(
            db_after < db_before / 2,
            "{l}: db size {db_before} before defragment, {db_after} after"
        );
        assert!(
            dir_after + (db_before - db_after) as u64 / 2 <= dir_before,
            "{l}: data dir {dir_before} bytes before defragment, {dir_after} after"
        );
        assert_eq!(
            c.hash_kv(0).await.unwrap().hash(),
            kv_hash,
            "{l}: defragment changes no data"
        );
        let mut disarm = AlarmOptions::new();
        disarm.with_member(member);
        c.alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(disarm))
            .await
            .unwrap_or_else(|e| panic!("{l}: alarm disarm: {e}"));
        let alarms = c
            .alarm(AlarmAction::Get, AlarmType::None, None)
            .await
            .unwrap();
        assert!(alarms.alarms().is_empty(), "{l}: alarms after disarm");
        c.put("tiny", "x", None)
            .await
            .unwrap_or_else(|e| panic!("{l}: put after recovery: {e}"));
        let r = c.get("keep", None).await.unwrap();
        assert_eq!(r.kvs()[0].value(), b"me", "{l}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hash_follows_the_backend() {
    for server in &support::both(&[]).await {
        let l = server.kind.label();
        let mut c = server.client().await;
        c.put("a", "1", None).await.unwrap();
        let h1 = c.hash().await.unwrap();
        let h2 = c.hash().await.unwrap();
        assert_eq!(h1.hash(), h2.hash(), "{l}: no write, same hash");
        assert_eq!(
            h1.header().unwrap().revision(),
            2,
            "{l}: Hash's header revision"
        );
        c.put("a", "2", None).await.unwrap();
        let h3 = c.hash().await.unwrap();
        assert_ne!(h1.hash(), h3.hash(), "{l}: a write changes the hash");
    }
}

/// One member's data is altered while it is down (a value rewritten in its backend behind
/// Raft's back). The initial check refuses to start it; started without that check, the
/// leader's periodic check finds it and raises CORRUPT, which stops writes but not reads.
#[tokio::test(flavor = "multi_thread")]
async fn an_altered_member_is_refused_at_start_and_found_by_the_periodic_check() {
    let _serial = support::serial_cluster_test();
    let mut cluster =
        Cluster::start_with(Kind::Oxcd, 3, &["--experimental-corrupt-check-time=1s"]).await;
    let mut c = cluster.client().await;
    for k in ["a", "b", "c"] {
        c.put(k, "original", None).await.unwrap();
    }
    let leader = cluster.leader().await;
    let victim = (0..3).find(|&i| i != leader).unwrap();
    let victim_id = cluster.id(victim);
    // Every member has applied the writes before the victim goes down.
    let rev = c.get("c", None).await.unwrap().header().unwrap().revision();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = cluster.members[victim].status().await;
        if st.is_ok_and(|s| s.header().unwrap().revision() >= rev) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "member {victim} never applied revision {rev}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.stop(victim);
    alter_value(&cluster.members[victim].data_dir(), b"b", b"altered");

    cluster.members[victim].push_arg("--experimental-initial-corrupt-check");
    let (status, log) = cluster.members[victim]
        .restart_expect_exit(Duration::from_secs(30))
        .await;
    assert!(
        status.is_some_and(|s| !s.success()),
        "the altered member must refuse to start: {status:?}\n{}",
        support::tail(&log, 30)
    );
    assert!(
        log.contains(&format!(
            "{victim_id:x} found data inconsistency with peers"
        )),
        "{}",
        support::tail(&log, 30)
    );

    cluster.members[victim].remove_arg("--experimental-initial-corrupt-check");
    cluster.restart(victim).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let alarms = c
            .alarm(AlarmAction::Get, AlarmType::None, None)
            .await
            .unwrap();
        let corrupt: Vec<u64> = alarms
            .alarms()
            .iter()
            .filter(|a| a.alarm() == AlarmType::Corrupt)
            .map(|a| a.member_id())
            .collect();
        if !corrupt.is_empty() {
            assert_eq!(corrupt, [victim_id], "CORRUPT names the altered member");
            break;
        }
        assert!(Instant::now() < deadline, "no CORRUPT alarm raised");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_grpc_err(
        "put under CORRUPT",
        c.put("d", "x", None).await,
        Code::DataLoss,
        CORRUPT,
    );
    let txn = Txn::new().and_then([TxnOp::put("d", "x", None)]);
    assert_grpc_err(
        "txn under CORRUPT",
        c.txn(txn).await,
        Code::DataLoss,
        CORRUPT,
    );
    assert_grpc_err(
        "delete under CORRUPT",
        c.delete("a", Some(DeleteOptions::new())).await,
        Code::DataLoss,
        CORRUPT,
    );
    let r = c
        .get("", Some(GetOptions::new().with_from_key()))
        .await
        .expect("reads are served under CORRUPT");
    assert_eq!(r.count(), 3);
}

/// Rewrites the value of `key`'s latest version in a stopped oxcd member's backend.
fn alter_value(data_dir: &Path, key: &[u8], value: &[u8]) {
    use oxcd::mvcc::{revision::KEY_PREFIX, Store};
    use prost::Message;
    let (store, _) = Store::open(&data_dir.join("member").join("db")).unwrap();
    let mut latest = None;
    for (k, v) in store.records(&[KEY_PREFIX]).unwrap() {
        let kv = oxcd::pb::mvccpb::KeyValue::decode(v.as_slice()).unwrap();
        if kv.key == key {
            latest = Some((k, kv));
        }
    }
    let (k, mut kv) = latest.expect("the key is in the backend");
    kv.value = value.to_vec();
    store.put_record_durable(&k, &kv.encode_to_vec()).unwrap();
}

/// Output of a long etcdctl command (e.g. `check perf`, which runs for a minute).
async fn long_etcdctl(server: &support::Server, args: &[&str]) -> String {
    let child = server.spawn_etcdctl(args);
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("etcdctl {args:?} did not finish within 180 s"))
        .expect("wait for etcdctl");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `etcdctl check perf`'s verdicts: (criterion, passed) for throughput, slowest request and
/// stddev, then ("overall", passed).
fn perf_verdicts(out: &str) -> Vec<(&'static str, bool)> {
    let mut v = Vec::new();
    for line in out.split(['\n', '\r']).map(str::trim) {
        // A verdict may follow the progress bar on the same line.
        // etcdctl 3.4 prints this failure without "FAIL: ".
        const SLOWEST_FAILED: &str = "Slowest request took too long";
        let at = [
            line.find("PASS: "),
            line.find("FAIL: "),
            line.find(SLOWEST_FAILED),
        ]
        .into_iter()
        .flatten()
        .min();
        let line = at.map_or(line, |i| &line[i..]);
        let passed = if line.starts_with("PASS") {
            true
        } else if line.starts_with("FAIL") || line.starts_with(SLOWEST_FAILED) {
            false
        } else {
            continue;
        };
        let what = if line.contains("Throughput") {
            "throughput"
        } else if line.contains("Slowest request") {
            "slowest request"
        } else if line.contains("Stddev") {
            "stddev"
        } else if line == "PASS" || line == "FAIL" {
            "overall"
        } else {
            continue;
        };
        v.push((what, passed));
    }
    v
}

#[test]
fn perf_verdicts_reads_etcdctls_failures_too() {
    let out = " 60 / 60  100.00% 1m0s\nPASS: Throughput is 150 writes/s\n\
               Slowest request took too long: 0.507455s\nPASS: Stddev is 0.028154s\nFAIL\n";
    assert_eq!(
        perf_verdicts(out),
        [
            ("throughput", true),
            ("slowest request", false),
            ("stddev", true),
            ("overall", false)
        ]
    );
}

/// The runbook's health checks: `etcdctl check datascale` and `etcdctl check perf` (its small
/// load, one minute, run on both servers at once so both see the same machine). Whatever etcd
/// passes, oxcd passes.
#[tokio::test(flavor = "multi_thread")]
async fn etcdctl_check_perf_and_datascale_pass_as_on_etcd() {
    let [etcd, subject] = support::both(&[]).await;
    for s in [&etcd, &subject] {
        let out = long_etcdctl(s, &["check", "datascale"]).await;
        assert!(
            out.contains("PASS: Approximate system memory used"),
            "{}: {out}",
            s.kind.label()
        );
    }
    let (e, o) = tokio::join!(
        long_etcdctl(&etcd, &["check", "perf", "--load", "s"]),
        long_etcdctl(&subject, &["check", "perf", "--load", "s"])
    );
    let (ev, ov) = (perf_verdicts(&e), perf_verdicts(&o));
    assert_eq!(ev.len(), 4, "etcd's verdicts: {e}");
    assert_eq!(
        ov.iter().map(|(w, _)| *w).collect::<Vec<_>>(),
        ev.iter().map(|(w, _)| *w).collect::<Vec<_>>(),
        "oxcd's output: {o}"
    );
    for ((what, etcd_passed), (_, oxcd_passed)) in ev.iter().zip(&ov) {
        assert!(
            !etcd_passed || *oxcd_passed,
            "etcd passes {what}, oxcd does not:\n--- etcd\n{e}\n--- oxcd\n{o}"
        );
    }
}
