//! Backups in etcd's own format, both ways: `etcdctl snapshot save` from etcd 3.4 and 3.6
//! restored by `oxcd snapshot restore` into a 3-member oxcd cluster, and from oxcd restored by
//! etcd 3.6's `etcdutl snapshot restore` and served by real etcd 3.6, with the same keys,
//! values, revisions and leases. `oxcd snapshot status` prints exactly what etcd 3.6's
//! `etcdutl snapshot status` prints.
//! oxcd also starts on etcd's own data dirs: those `etcdctl snapshot restore` makes, and those
//! of a stopped etcd cluster (in-place replacement).

// The cluster-test guard serialises whole tests on purpose; it is held across their awaits.
#![allow(clippy::await_holding_lock)]

mod support;

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::{snapshot_restore, snapshot_tool, Cluster, DumpedKv, Kind};

const LEASE_ID: i64 = 0x1234_5678;
const LEASE_TTL: i64 = 900;

/// Writes with history: overwrites, deletes, a txn, a lease with keys, and a compaction in
/// the middle (so the backup holds a compacted key space). Returns the compacted revision.
async fn load(c: &mut Client) -> i64 {
    for i in 0..300 {
        c.put(format!("key/{:03}", i % 97), format!("value-{i}"), None)
            .await
            .unwrap();
    }
    let mid = c
        .get("key/000", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.delete("key/01", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    c.compact(mid, None).await.unwrap();
    let txn = Txn::new()
        .when([Compare::version("key/050", CompareOp::Greater, 0)])
        .and_then([
            TxnOp::put("txn/a", "1", None),
            TxnOp::put("txn/b", "2", None),
            TxnOp::delete("key/050", None),
        ]);
    c.txn(txn).await.unwrap();
    c.lease_grant(
        LEASE_TTL,
        Some(etcd_client::LeaseGrantOptions::new().with_id(LEASE_ID)),
    )
    .await
    .unwrap();
    for k in ["leased/1", "leased/2"] {
        c.put(k, "l", Some(PutOptions::new().with_lease(LEASE_ID)))
            .await
            .unwrap();
    }
    for i in 0..20 {
        c.put(format!("key/{:03}", i), format!("after-{i}"), None)
            .await
            .unwrap();
    }
    mid
}

fn backup_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// `etcdctl snapshot save` against one member.
async fn save(cluster: &Cluster, i: usize, path: &Path) {
    let out = cluster.members[i]
        .etcdctl(&["snapshot", "save", &path.display().to_string()])
        .await;
    out.ok();
    assert!(path.exists(), "etcdctl saved no file: {}", out.stderr);
}

/// Asserts every member serves exactly `want` and the revision and compaction point it came
/// with; checks the lease and its keys, and that history after the compaction reads the same.
async fn assert_restored(
    cluster: &Cluster,
    want: &[DumpedKv],
    want_rev: i64,
    compacted: i64,
    history: &[(i64, Vec<DumpedKv>)],
) {
    let label = cluster.kind.label();
    for i in 0..cluster.len() {
        let got = cluster.dump(i).await;
        assert_eq!(got.len(), want.len(), "{label} member {i}: key count");
        assert_eq!(got, want, "{label} member {i}: keys, values, revisions");
    }
    let mut c = cluster.client().await;
    let r = c
        .get("key/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(
        r.header().unwrap().revision(),
        want_rev,
        "{label}: revision"
    );
    // The compaction point came along: older revisions are gone, newer ones readable.
    let e = c
        .get(
            "key/000",
            Some(GetOptions::new().with_revision(compacted - 1)),
        )
        .await
        .expect_err("a read below the compacted revision must fail");
    assert!(e.to_string().contains("compacted"), "{label}: {e}");
    for (rev, kvs) in history {
        assert_eq!(
            &dump_at(&mut c, *rev).await,
            kvs,
            "{label}: history at {rev}"
        );
    }
    let ttl = c
        .lease_time_to_live(
            LEASE_ID,
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await
        .unwrap();
    assert_eq!(ttl.granted_ttl(), LEASE_TTL, "{label}: lease TTL");
    assert_eq!(
        support::lease_keys(&ttl),
        ["leased/1", "leased/2"],
        "{label}: lease keys"
    );
    // The restored cluster goes on from the backup's revision.
    let put = c.put("after-restore", "x", None).await.unwrap();
    assert_eq!(put.header().unwrap().revision(), want_rev + 1, "{label}");
}

/// (ID, name, peer URLs, client URLs) of every member, sorted.
async fn member_list(cluster: &Cluster) -> Vec<(u64, String, Vec<String>, Vec<String>)> {
    let mut members: Vec<_> = cluster
        .client()
        .await
        .member_list()
        .await
        .unwrap()
        .members()
        .iter()
        .map(|m| {
            (
                m.id(),
                m.name().to_string(),
                m.peer_urls().to_vec(),
                m.client_urls().to_vec(),
            )
        })
        .collect();
    members.sort();
    members
}

async fn dump_at(c: &mut Client, rev: i64) -> Vec<DumpedKv> {
    let r = c
        .get(
            "",
            Some(GetOptions::new().with_all_keys().with_revision(rev)),
        )
        .await
        .unwrap();
    support::dumped(r.kvs())
}

/// What the source cluster serves: all keys now, the revision, and the key space at a few
/// revisions after the compaction.
async fn source_state(
    cluster: &Cluster,
    compacted: i64,
) -> (Vec<DumpedKv>, i64, Vec<(i64, Vec<DumpedKv>)>) {
    let mut c = cluster.client().await;
    let rev = c.get("x", None).await.unwrap().header().unwrap().revision();
    let mut history = Vec::new();
    for r in [compacted, compacted + 5, rev - 10] {
        history.push((r, dump_at(&mut c, r).await));
    }
    (cluster.dump(0).await, rev, history)
}

/// `oxcd snapshot status` and etcd 3.6's `etcdutl snapshot status` print the same, in every
/// format.
fn assert_same_status(backup: &Path) {
    for w in ["simple", "table", "json"] {
        let ours = snapshot_tool(Kind::Oxcd, "status", backup, &["-w", w]);
        let theirs = snapshot_tool(support::REFERENCE, "status", backup, &["-w", w]);
        assert_eq!(ours.ok(), theirs.ok(), "snapshot status -w {w}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_from_etcd_restores_into_an_oxcd_cluster() {
    let _serial = support::serial_cluster_test();
    let dir = tempfile::tempdir().unwrap();
    for kind in [Kind::Etcd, support::REFERENCE] {
        let backup = backup_path(&dir, &format!("from-{}.db", kind.label()));
        let etcd = Cluster::start(kind, 1).await;
        let compacted = load(&mut etcd.client().await).await;
        let (want, want_rev, history) = source_state(&etcd, compacted).await;
        save(&etcd, 0, &backup).await;
        drop(etcd);
        assert_same_status(&backup);

        let oxcd = Cluster::start_from_backup(Kind::Oxcd, 3, &backup).await;
        oxcd.wait_converged(Duration::from_secs(30)).await;
        assert_restored(&oxcd, &want, want_rev, compacted, &history).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_from_oxcd_restores_into_etcd_and_into_oxcd() {
    let _serial = support::serial_cluster_test();
    let dir = tempfile::tempdir().unwrap();
    let backup = backup_path(&dir, "from-oxcd.db");

    let source = Cluster::start(Kind::Oxcd, 3).await;
    let compacted = load(&mut source.client().await).await;
    source.wait_converged(Duration::from_secs(30)).await;
    let (want, want_rev, history) = source_state(&source, compacted).await;
    // From a follower: any member serves a backup of the same state.
    let follower = (source.leader().await + 1) % 3;
    save(&source, follower, &backup).await;
    drop(source);
    assert_same_status(&backup);

    // A backup of a 3.6 cluster (cluster and storage version 3.6.0) is served by etcd 3.6;
    // etcd 3.4 refuses 3.6 backups, etcd's and oxcd's alike.
    let etcd = Cluster::start_from_backup(support::REFERENCE, 1, &backup).await;
    assert_restored(&etcd, &want, want_rev, compacted, &history).await;
    drop(etcd);

    let oxcd = Cluster::start_from_backup(Kind::Oxcd, 3, &backup).await;
    oxcd.wait_converged(Duration::from_secs(30)).await;
    assert_restored(&oxcd, &want, want_rev, compacted, &history).await;
}

/// The etcd runbook: `etcdctl snapshot restore` (etcd's own tool, writing etcd's data dir
/// layout: bbolt backend, WAL, v2 snap file) and then start the members on the restored dirs,
/// here oxcd members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctls_own_restore_makes_data_dirs_oxcd_starts_on() {
    let _serial = support::serial_cluster_test();
    let dir = tempfile::tempdir().unwrap();
    let backup = backup_path(&dir, "from-oxcd.db");
    let source = Cluster::start(Kind::Oxcd, 1).await;
    let compacted = load(&mut source.client().await).await;
    let (want, want_rev, history) = source_state(&source, compacted).await;
    save(&source, 0, &backup).await;
    drop(source);

    let oxcd = Cluster::start_from_backup_restored_by(Kind::Oxcd, 3, &backup, Kind::Etcd).await;
    oxcd.wait_converged(Duration::from_secs(30)).await;
    assert_restored(&oxcd, &want, want_rev, compacted, &history).await;
    for (i, m) in oxcd.members.iter().enumerate() {
        assert!(
            m.log().contains("imported etcd's data dir"),
            "member {i} did not say it imported etcd's data dir"
        );
    }
}

/// etcd replaced in place: a 3-member etcd 3.4 cluster is stopped (one member killed) and oxcd
/// is started on the same data dirs with the same flags. Members keep their IDs and the cluster its ID, every
/// key, revision, lease and the compaction point; the etcd log's tail (members publishing
/// themselves, empty leader entries) is carried over; the cluster goes on and restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oxcd_takes_over_an_etcd_clusters_data_dirs_in_place() {
    let _serial = support::serial_cluster_test();
    let mut cluster = Cluster::start(Kind::Etcd, 3).await;
    let compacted = load(&mut cluster.client().await).await;
    cluster.wait_converged(Duration::from_secs(30)).await;
    let (want, want_rev, history) = source_state(&cluster, compacted).await;
    let etcd_ids: Vec<u64> = (0..3).map(|i| cluster.id(i)).collect();
    let etcd_cluster_id = cluster.members[0]
        .status()
        .await
        .unwrap()
        .header()
        .unwrap()
        .cluster_id();
    let etcd_members = member_list(&cluster).await;

    // One member killed (its backend and WAL as a crash leaves them), the others stopped.
    cluster.members[0].kill9();
    cluster.replace_binary(Kind::Oxcd).await;
    cluster.wait_converged(Duration::from_secs(30)).await;
    for i in 0..3 {
        let st = cluster.members[i].status().await.unwrap();
        let h = st.header().unwrap();
        assert_eq!(h.member_id(), etcd_ids[i], "member {i} kept its ID");
        assert_eq!(h.cluster_id(), etcd_cluster_id, "the cluster kept its ID");
        assert!(cluster.members[i]
            .log()
            .contains("imported etcd's data dir"));
        assert!(
            cluster.members[i]
                .wal_dir()
                .with_file_name("wal.etcd")
                .is_dir(),
            "etcd's WAL is kept beside oxcd's"
        );
    }
    let members = member_list(&cluster).await;
    assert_eq!(members, etcd_members, "member list");
    assert_restored(&cluster, &want, want_rev, compacted, &history).await;

    // Now an oxcd data dir: a restart does not import again, and nothing is lost.
    let leader = cluster.leader().await;
    cluster.members[leader].restart().await;
    cluster.wait_converged(Duration::from_secs(30)).await;
    let mut c = cluster.client().await;
    let got = c.get("after-restore", None).await.unwrap();
    assert_eq!(got.kvs().len(), 1);
    assert_eq!(got.header().unwrap().revision(), want_rev + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_backups_are_refused_and_nothing_is_restored() {
    let _serial = support::serial_cluster_test();
    let dir = tempfile::tempdir().unwrap();
    let good = backup_path(&dir, "good.db");
    let source = Cluster::start(Kind::Oxcd, 1).await;
    load(&mut source.client().await).await;
    save(&source, 0, &good).await;
    drop(source);
    let bytes = std::fs::read(&good).unwrap();

    let restore = |file: &Path, data_dir: &Path, extra: &[&str]| {
        let mut args = vec!["--data-dir", data_dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        snapshot_restore(Kind::Oxcd, file, &args)
    };

    // One flipped bit in the middle: the sha256 trailer no longer matches.
    let flipped = backup_path(&dir, "flipped.db");
    let mut b = bytes.clone();
    b[bytes.len() / 2] ^= 0x10;
    std::fs::write(&flipped, &b).unwrap();
    let target = dir.path().join("flipped.oxcd");
    let err = restore(&flipped, &target, &[]).err().to_string();
    assert!(err.contains("expected sha256"), "{err}");
    assert!(!target.exists(), "a refused restore left {target:?} behind");
    // etcdctl refuses it too.
    let theirs = snapshot_restore(
        Kind::Etcd,
        &flipped,
        &[
            "--data-dir",
            dir.path().join("flipped.etcd").to_str().unwrap(),
        ],
    );
    assert!(theirs.err().contains("expected sha256"));

    // Truncated half-way: no trailer where etcd's would be, and pages missing.
    let truncated = backup_path(&dir, "truncated.db");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2 + 7]).unwrap();
    let target = dir.path().join("truncated.oxcd");
    let err = restore(&truncated, &target, &[]).err().to_string();
    assert!(err.contains("snapshot missing hash"), "{err}");
    assert!(!target.exists());
    // Even with the hash check skipped, a truncated database is refused, not half-restored.
    let err = restore(&truncated, &target, &["--skip-hash-check"])
        .err()
        .to_string();
    assert!(err.contains("damaged"), "{err}");
    assert!(!target.exists());

    // Not a bbolt file at all.
    let garbage = backup_path(&dir, "garbage.db");
    std::fs::write(&garbage, vec![0x42u8; 8192]).unwrap();
    let err = restore(&garbage, &target, &["--skip-hash-check"])
        .err()
        .to_string();
    assert!(err.contains("not a bbolt database"), "{err}");
    assert!(!target.exists());

    // A data dir with anything in it is never overwritten (etcdutl 3.6's words); an empty
    // one, as a volume mount or a test's temporary dir gives, is used.
    let existing = dir.path().join("existing.oxcd");
    std::fs::create_dir_all(existing.join("member")).unwrap();
    let err = restore(&good, &existing, &[]).err().to_string();
    assert!(err.contains("not empty or could not be read"), "{err}");
    assert!(existing.join("member").read_dir().unwrap().next().is_none());
    let empty = dir.path().join("empty.oxcd");
    std::fs::create_dir_all(&empty).unwrap();
    restore(&good, &empty, &[]).ok();
    assert!(
        empty.join("member").exists(),
        "nothing restored into an empty dir"
    );

    // The good file restores.
    let target = dir.path().join("good.oxcd");
    restore(&good, &target, &[]).ok();
    assert!(target.join("member").exists());
}
