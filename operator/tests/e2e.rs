//! The operator end to end: the real `oxcd-operator run` binary against the Kubernetes API
//! stand-in, whose StatefulSet pods are real oxcd processes reachable under their pod DNS
//! names. Needs root (the stand-in writes pod names into /etc/hosts) and the oxcd binary
//! (`cargo test --workspace` builds it).

mod support;

use serde_json::json;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{settled, Harness};

const SETTLE: Duration = Duration::from_secs(120);

/// An EtcdCluster running the stand-in's `oxcd:test` image; `extra` is appended to its spec.
fn manifest(name: &str, replicas: u32, extra: &str) -> String {
    format!(
        "apiVersion: oxcd.io/v1alpha1\nkind: EtcdCluster\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  image: oxcd:test\n{extra}"
    )
}

/// Writes `w/<n>` keys one at a time until stopped (or 20,000 writes, or 10 minutes), and
/// records every write that was acknowledged.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeSet<u64>>>,
    task: tokio::task::JoinHandle<u64>,
}

impl Writer {
    fn start(endpoints: Vec<String>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let (s, a) = (stop.clone(), acked.clone());
        let task = tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(600);
            let opts = etcd_client::ConnectOptions::new()
                .with_timeout(Duration::from_secs(3))
                .with_connect_timeout(Duration::from_secs(2));
            let mut client = None;
            let mut n = 0u64;
            let mut failures = 0u64;
            while !s.load(Ordering::Relaxed) && n < 20_000 && Instant::now() < deadline {
                if client.is_none() {
                    client = etcd_client::Client::connect(&endpoints, Some(opts.clone()))
                        .await
                        .ok();
                }
                let Some(c) = client.as_mut() else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                match c.put(format!("w/{n:06}"), format!("v{n}"), None).await {
                    Ok(_) => {
                        a.lock().unwrap().insert(n);
                    }
                    Err(_) => {
                        failures += 1;
                        client = None;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            failures
        });
        Writer { stop, acked, task }
    }

    async fn finish(self) -> (BTreeSet<u64>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self.task.await.unwrap();
        let acked = self.acked.lock().unwrap().clone();
        (acked, failures)
    }
}

async fn assert_nothing_lost(endpoints: Vec<String>, acked: &BTreeSet<u64>) {
    // A restarted member may still trigger an election; availability is not what is checked here.
    let mut c = etcd_client::Client::connect(&endpoints, None)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let resp = loop {
        match c
            .get("w/", Some(etcd_client::GetOptions::new().with_prefix()))
            .await
        {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline => {
                eprintln!("final read: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("final read failed: {e}"),
        }
    };
    let stored: BTreeSet<u64> = resp
        .kvs()
        .iter()
        .filter_map(|kv| kv.key_str().ok()?.strip_prefix("w/")?.parse().ok())
        .collect();
    let lost: Vec<&u64> = acked.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}

fn members(c: &serde_json::Value) -> Vec<String> {
    c["status"]["members"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| m["name"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A follower of cluster `c` (by the status): (pod name, member ID in hex).
fn follower(c: &serde_json::Value) -> (String, String) {
    let m = c["status"]["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["leader"] != true))
        .expect("a follower in the status");
    (
        m["name"].as_str().unwrap().to_string(),
        m["id"].as_str().unwrap().to_string(),
    )
}

/// The member ID the status gives pod `pod`.
fn member_id(c: &serde_json::Value, pod: &str) -> Option<String> {
    c["status"]["members"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == pod)
        .and_then(|m| m["id"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn example_cluster_rolls_an_upgrade_and_replaces_lost_members_under_a_writer() {
    let oxcd = support::oxcd_binary();
    // The second image is another file (the same build), so the roll is visible per pod.
    let v2_dir = tempfile::tempdir().unwrap();
    let v2 = v2_dir.path().join("oxcd-v2");
    std::fs::copy(&oxcd, &v2).unwrap();
    let mut h = Harness::start(&[
        ("ghcr.io/oxcd/oxcd:0.1.0", oxcd.clone()),
        ("oxcd:v2", v2.clone()),
    ])
    .await;
    h.start_operator(None);
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/minimal.yaml"
    ))
    .unwrap();
    h.apply(&example);
    let c = h
        .wait_for("demo", "3 members", SETTLE, |c| settled(c, 3))
        .await;
    assert_eq!(members(&c), ["demo-0", "demo-1", "demo-2"]);
    assert_eq!(c["status"]["currentVersion"], "0.1.0");
    assert!(c["status"]["leader"]
        .as_str()
        .is_some_and(|l| l.starts_with("demo-")));

    let writer = Writer::start(h.endpoints("demo", 3));

    // Rolling upgrade: followers first, the leader last after moving leadership.
    let leader_before = c["status"]["leader"].as_str().unwrap().to_string();
    h.patch_spec("demo", json!({"image": "oxcd:v2"}));
    let c = h
        .wait_for(
            "demo",
            "upgrade to oxcd:v2",
            Duration::from_secs(240),
            |c| settled(c, 3) && c["status"]["currentVersion"] == "v2",
        )
        .await;
    let events = h.events();
    let deletes = h.kubelet.deleted.lock().unwrap().clone();

    assert_eq!(deletes.len(), 3, "one restart per member: {deletes:?}");
    assert_eq!(
        deletes.iter().collect::<BTreeSet<_>>().len(),
        3,
        "{deletes:?}"
    );
    assert_eq!(deletes[2], leader_before, "the leader restarts last");
    let running = h.kubelet.binaries();
    assert_eq!(running.len(), 3, "{running:?}");
    assert!(
        running.values().all(|b| *b == v2),
        "every member runs the new image: {running:?}"
    );
    assert!(
        events.iter().any(|(r, _)| r == "MoveLeader"),
        "leadership moved before the leader's pod went: {events:?}"
    );
    assert_ne!(c["status"]["leader"].as_str(), None);

    // A member removed behind the operator's back (etcdctl member remove) is added again as
    // a learner; its volume holds the removed member's data, so it starts on a fresh one.
    let (gone, gone_id) = follower(&c);
    // Ask the other two: the removed member exits once it learns of its removal, and an
    // answer it was about to send goes with it.
    let others: Vec<String> = h
        .endpoints("demo", 3)
        .into_iter()
        .filter(|e| !e.starts_with(&format!("http://{gone}.")))
        .collect();
    assert_eq!(others.len(), 2, "{gone} among {others:?}");
    let mut admin = etcd_client::Client::connect(others, None).await.unwrap();
    // (Right after the roll, etcd's strict reconfig check may still call it unhealthy.)
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match admin
            .member_remove(u64::from_str_radix(&gone_id, 16).unwrap())
            .await
        {
            Ok(_) => break,
            Err(e) if e.to_string().contains("unhealthy cluster") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("member remove {gone_id}: {e}"),
        }
    }
    let c = h
        .wait_for("demo", "the removed member back", SETTLE, |c| {
            settled(c, 3) && member_id(c, &gone).is_some_and(|id| id != gone_id)
        })
        .await;
    assert_eq!(members(&c), ["demo-0", "demo-1", "demo-2"]);

    // A member whose data is lost (its claim deleted, its pod restarted on an empty volume):
    // its server refuses to start as the old member, and the operator replaces it.
    let (lost, lost_id) = follower(&c);
    h.store
        .delete(&support::kubelet::pvcs(), &h.ns, &format!("data-{lost}"));
    h.kubelet.delete_pod(&lost);
    let c = h
        .wait_for("demo", "the member with lost data replaced", SETTLE, |c| {
            settled(c, 3) && member_id(c, &lost).is_some_and(|id| id != lost_id)
        })
        .await;
    assert_eq!(members(&c), ["demo-0", "demo-1", "demo-2"]);
    let events = h.events();
    assert!(
        events
            .iter()
            .any(|(r, n)| r == "ReplaceMember" && n.contains(&lost_id) && n.contains(&lost)),
        "{events:?}"
    );

    let (acked, failures) = writer.finish().await;
    assert!(
        acked.len() > 50,
        "the writer made progress ({} acked, {failures} failed)",
        acked.len()
    );
    assert_nothing_lost(h.endpoints("demo", 3), &acked).await;
    // Every member holds the same data, the replaced ones included.
    let (all, _) = dump(h.endpoints("demo", 3)).await;
    for url in h.endpoints("demo", 3) {
        wait_member_serves(&url, &all).await;
    }
    for reason in [
        "CreateCluster",
        "AddLearner",
        "PromoteLearner",
        "RecycleVolume",
        "ReplaceMember",
        "MoveLeader",
    ] {
        assert!(
            events.iter().any(|(r, _)| r == reason),
            "no {reason} event: {events:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scales_1_3_5_3_under_a_writer_resuming_after_a_kill_between_member_add_and_statefulset_change(
) {
    let oxcd = support::oxcd_binary();
    let mut h = Harness::start(&[("oxcd:test", oxcd)]).await;
    h.start_operator(None);
    h.apply(&manifest("solo", 1, ""));
    h.wait_for("solo", "1 member", SETTLE, |c| settled(c, 1))
        .await;
    // solo-0 stays a member throughout, so the writer needs no other endpoint.
    let writer = Writer::start(h.endpoints("solo", 1));

    h.start_operator(Some("exit-after:AddLearner"));
    h.patch_spec("solo", json!({"replicas": 3}));
    let exit = h.operator_exit(Duration::from_secs(60)).await;
    assert_eq!(
        exit.and_then(|s| s.code()),
        Some(86),
        "{}",
        h.operator_log()
    );
    // The learner is in etcd's member list, but no pod was added for it.
    let mut c = etcd_client::Client::connect(h.endpoints("solo", 1), None)
        .await
        .unwrap();
    let list = c.member_list().await.unwrap();
    assert_eq!(list.members().len(), 2);
    assert!(list
        .members()
        .iter()
        .any(|m| m.is_learner() && m.name().is_empty()));
    assert_eq!(h.statefulset_replicas("solo"), Some(1));

    // A new operator resumes from what it observes.
    h.start_operator(None);
    let c = h
        .wait_for("solo", "3 members after the restart", SETTLE, |c| {
            settled(c, 3)
        })
        .await;
    assert_eq!(members(&c), ["solo-0", "solo-1", "solo-2"]);
    let list = etcd_client::Client::connect(h.endpoints("solo", 3), None)
        .await
        .unwrap()
        .member_list()
        .await
        .unwrap();
    assert_eq!(list.members().len(), 3, "no duplicate member was added");

    // 3 -> 5: learners added one at a time and promoted.
    h.patch_spec("solo", json!({"replicas": 5}));
    let c = h
        .wait_for("solo", "5 members", SETTLE, |c| settled(c, 5))
        .await;
    assert_eq!(members(&c).len(), 5);
    assert_eq!(h.statefulset_replicas("solo"), Some(5));
    // 5 -> 3: members removed before their pods (the leader moved away first if need be).
    h.patch_spec("solo", json!({"replicas": 3}));
    let c = h
        .wait_for("solo", "3 members again", SETTLE, |c| settled(c, 3))
        .await;
    assert_eq!(members(&c), ["solo-0", "solo-1", "solo-2"]);
    h.wait_for("solo", "StatefulSet shrunk", SETTLE, |_| {
        h.statefulset_replicas("solo") == Some(3)
    })
    .await;
    let (acked, failures) = writer.finish().await;
    assert!(
        acked.len() > 50,
        "the writer made progress ({} acked, {failures} failed)",
        acked.len()
    );
    assert_nothing_lost(h.endpoints("solo", 3), &acked).await;
    let events = h.events();
    for reason in [
        "AddLearner",
        "PromoteLearner",
        "RemoveMember",
        "ScaleStatefulSet",
    ] {
        assert!(
            events.iter().any(|(r, _)| r == reason),
            "no {reason} event: {events:?}"
        );
    }

    // The operator's own endpoints.
    let (code, body) = support::http("GET", &h.operator_http, "/healthz")
        .await
        .unwrap();
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, _) = support::http("GET", &h.operator_http, "/readyz")
        .await
        .unwrap();
    assert_eq!(code, 200, "the only replica leads");
    let (code, metrics) = support::http("GET", &h.operator_http, "/metrics")
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("oxcd_operator_actions_total{action=\"PromoteLearner\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("oxcd_operator_reconciles_total "),
        "{metrics}"
    );
}

/// Waits for a successful backup newer than `after` (RFC 3339 string comparison works for
/// the fixed format) answering `request`.
async fn wait_backup(
    h: &Harness,
    name: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let c = h
        .wait_for(name, what, Duration::from_secs(90), |c| {
            done(&c["status"]["lastBackup"])
        })
        .await;
    c["status"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backups_go_to_s3_and_files_are_verified_pruned_and_scheduled() {
    let oxcd = support::oxcd_binary();
    let moto = support::Moto::start().await;
    moto.create_bucket("oxcd-backups").await;
    let mut h = Harness::start(&[("oxcd:test", oxcd.clone())]).await;
    h.start_operator(None);
    h.apply(&manifest("bk", 1, ""));
    h.wait_for("bk", "1 member", SETTLE, |c| settled(c, 1))
        .await;
    let mut c = etcd_client::Client::connect(h.endpoints("bk", 1), None)
        .await
        .unwrap();
    for i in 0..200 {
        c.put(format!("key/{i:03}"), format!("value {i}"), None)
            .await
            .unwrap();
    }
    h.store
        .put(
            &support::standin::collection("v1", "secrets"),
            &h.ns,
            json!({"metadata": {"name": "s3-creds"}, "stringData": {
                "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT": moto.endpoint, "AWS_ALLOW_HTTP": "true"}}),
            None,
            true,
        )
        .unwrap();

    // On request, to S3: uploaded, read back, opened; retention keeps the newest two.
    let mut urls = Vec::new();
    for req in ["1", "2", "3"] {
        h.patch_spec(
            "bk",
            json!({"backup": {"destination": "s3://oxcd-backups/prod",
            "credentialsSecret": "s3-creds", "retention": {"maxCount": 2}, "request": req}}),
        );
        let s = wait_backup(&h, "bk", &format!("backup {req}"), |b| b["request"] == req).await;
        let b = &s["lastBackup"];
        assert_eq!(b["succeeded"], true, "{b}");
        assert_eq!(s["lastSuccessfulBackup"], *b);
        assert!(b["revision"].as_i64().unwrap() >= 201, "{b}");
        assert!(b["keys"].as_u64().unwrap() >= 200, "{b}");
        assert_eq!(b["sha256"].as_str().unwrap().len(), 64);
        assert!(b["url"]
            .as_str()
            .unwrap()
            .starts_with("s3://oxcd-backups/prod/"));
        urls.push(b["url"].as_str().unwrap().to_string());
        // Names carry the time to the second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let keys = moto.keys("oxcd-backups", "prod/").await;
    assert_eq!(keys.len(), 2, "retention keeps two: {keys:?}");
    assert!(
        !keys.iter().any(|k| urls[0].ends_with(k.as_str())),
        "the oldest went: {keys:?}"
    );
    let conds = h.cluster("bk")["status"]["conditions"].clone();
    assert!(
        conds
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "BackupReady" && c["status"] == "True"),
        "{conds}"
    );

    // A destination that does not work is reported, and is never the last successful one.
    h.patch_spec(
        "bk",
        json!({"backup": {"destination": "s3://no-such-bucket/x", "request": "bad"}}),
    );
    let s = wait_backup(&h, "bk", "failed backup", |b| b["request"] == "bad").await;
    assert_eq!(s["lastBackup"]["succeeded"], false);
    assert!(s["lastBackup"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert_eq!(s["lastSuccessfulBackup"]["request"], "3");

    // To a file:// volume, on a schedule: the file is a snapshot oxcd can read.
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("file://{}/backups", dir.path().display());
    h.patch_spec(
        "bk",
        json!({"backup": {"destination": dest, "schedule": "* * * * *", "request": null}}),
    );
    let s = h
        .wait_for("bk", "scheduled backup", Duration::from_secs(150), |c| {
            let b = &c["status"]["lastBackup"];
            b["succeeded"] == true && b["url"].as_str().is_some_and(|u| u.starts_with("file://"))
        })
        .await["status"]
        .clone();
    let b = &s["lastBackup"];
    let file = b["url"]
        .as_str()
        .unwrap()
        .trim_start_matches("file://")
        .to_string();
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len() as u64, b["size"].as_u64().unwrap());
    let out = std::process::Command::new(&oxcd)
        .args(["snapshot", "status", &file, "-w", "json"])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(status["revision"], b["revision"]);
}

/// A key with its value and revisions, as the dumps compare them.
fn row(kv: &etcd_client::KeyValue) -> (String, String, i64, i64, i64) {
    (
        kv.key_str().unwrap().to_string(),
        kv.value_str().unwrap().to_string(),
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
    )
}

/// Waits until the member at `url` serves exactly `want` from its own store (serializable).
async fn wait_member_serves(url: &str, want: &[(String, String, i64, i64, i64)]) {
    let mut c = etcd_client::Client::connect([url], None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: Vec<(String, String, i64, i64, i64)> = c
            .get(
                "",
                Some(
                    etcd_client::GetOptions::new()
                        .with_all_keys()
                        .with_serializable(),
                ),
            )
            .await
            .map(|r| r.kvs().iter().map(row).collect())
            .unwrap_or_default();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} serves {} keys, not the {} the cluster has",
            got.len(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every key with its value and revisions, and the store's revision.
async fn dump(endpoints: Vec<String>) -> (Vec<(String, String, i64, i64, i64)>, i64) {
    let mut c = etcd_client::Client::connect(endpoints, None).await.unwrap();
    let r = c
        .get("", Some(etcd_client::GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    let kvs = r.kvs().iter().map(row).collect();
    (kvs, r.header().unwrap().revision())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_clusters_start_from_an_oxcd_backup_and_from_an_etcd_snapshot() {
    let oxcd = support::oxcd_binary();
    let mut h = Harness::start(&[("oxcd:test", oxcd)]).await;
    h.start_operator(None);
    let backups = tempfile::tempdir().unwrap();
    h.apply(&manifest("src", 1, ""));
    h.wait_for("src", "source cluster", SETTLE, |c| settled(c, 1))
        .await;
    let mut c = etcd_client::Client::connect(h.endpoints("src", 1), None)
        .await
        .unwrap();
    for i in 0..300 {
        c.put(format!("k/{i:03}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    for i in 0..50 {
        c.put(format!("k/{i:03}"), format!("again {i}"), None)
            .await
            .unwrap();
        c.delete(format!("k/{:03}", 299 - i), None).await.unwrap();
    }
    let dest = format!("file://{}/b", backups.path().display());
    h.patch_spec(
        "src",
        json!({"backup": {"destination": dest, "request": "r1"}}),
    );
    let s = wait_backup(&h, "src", "backup", |b| {
        b["request"] == "r1" && b["succeeded"] == true
    })
    .await;
    let url = s["lastBackup"]["url"].as_str().unwrap().to_string();
    let (want, want_rev) = dump(h.endpoints("src", 1)).await;
    assert_eq!(s["lastBackup"]["revision"].as_i64(), Some(want_rev));

    // Three members restored from it: same keys, values, revisions.
    h.apply(&manifest(
        "dst",
        3,
        &format!("  restore:\n    source: {url}\n"),
    ));
    h.wait_for("dst", "restored cluster", SETTLE, |c| settled(c, 3))
        .await;
    let (got, got_rev) = dump(h.endpoints("dst", 3)).await;
    assert_eq!(got_rev, want_rev);
    assert_eq!(got, want);
    // It goes on from there, and grows like any cluster (the new member joins, not restores).
    let mut c = etcd_client::Client::connect(h.endpoints("dst", 3), None)
        .await
        .unwrap();
    let put = c.put("after", "restore", None).await.unwrap();
    assert_eq!(put.header().unwrap().revision(), want_rev + 1);
    h.patch_spec("dst", json!({"replicas": 4}));
    h.wait_for("dst", "restored cluster grown to 4", SETTLE, |c| {
        settled(c, 4)
    })
    .await;

    // Migration from etcd 3.4: a snapshot saved by etcdctl from a real etcd.
    let etcd_dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let peer = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client_url = format!("http://127.0.0.1:{port}");
    let mut etcd = std::process::Command::new("/usr/bin/etcd")
        .args([
            "--data-dir",
            &etcd_dir.path().join("data").to_string_lossy(),
        ])
        .args([
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
        ])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
        ])
        .args([
            "--initial-cluster",
            &format!("default=http://127.0.0.1:{peer}"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("real etcd 3.4 (/usr/bin/etcd, Debian etcd-server) is required");
    let mut ec = None;
    for _ in 0..100 {
        if let Ok(mut c) = etcd_client::Client::connect([client_url.as_str()], None).await {
            if c.status().await.is_ok() {
                ec = Some(c);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ec = ec.expect("etcd did not start");
    for i in 0..100 {
        ec.put(format!("etcd/{i:03}"), format!("from etcd {i}"), None)
            .await
            .unwrap();
    }
    let snap = backups.path().join("etcd-3.4.db");
    let saved = std::process::Command::new("/usr/bin/etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &client_url,
            "snapshot",
            "save",
            &snap.to_string_lossy(),
        ])
        .output()
        .unwrap();
    assert!(
        saved.status.success(),
        "{}",
        String::from_utf8_lossy(&saved.stderr)
    );
    let (want, want_rev) = dump(vec![client_url.clone()]).await;
    let _ = etcd.kill();
    let _ = etcd.wait();
    h.apply(&manifest(
        "mig",
        1,
        &format!("  restore:\n    source: file://{}\n", snap.display()),
    ));
    h.wait_for("mig", "cluster migrated from etcd", SETTLE, |c| {
        settled(c, 1)
    })
    .await;
    let (got, got_rev) = dump(h.endpoints("mig", 1)).await;
    assert_eq!(got_rev, want_rev);
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_lease_holder_acts_and_a_standby_takes_over() {
    let oxcd = support::oxcd_binary();
    let mut h = Harness::start(&[("oxcd:test", oxcd)]).await;
    h.start_operator(None);
    h.apply(&manifest("le", 1, ""));
    h.wait_for("le", "1 member", SETTLE, |c| settled(c, 1))
        .await;
    let leases = support::standin::collection("coordination.k8s.io/v1", "leases");
    let holder = |h: &Harness| {
        h.store
            .get(&leases, &h.ns, "oxcd-operator-leader")
            .map(|l| {
                l["spec"]["holderIdentity"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
    };
    assert_eq!(holder(&h).as_deref(), Some("operator-1"));

    // A second replica waits: not ready, and the lease stays with the first.
    let (mut standby, standby_http) = h.spawn_operator(None);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (code, _) = support::http("GET", &standby_http, "/readyz")
        .await
        .unwrap();
    assert_eq!(code, 503, "a standby is not ready");
    assert_eq!(holder(&h).as_deref(), Some("operator-1"));

    // The leader goes; after its lease expires the standby takes over and acts.
    h.stop_operator();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = support::http("GET", &standby_http, "/readyz")
            .await
            .map(|(c, _)| c == 200)
            .unwrap_or(false);
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "the standby never took over");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(holder(&h).as_deref(), Some("operator-2"));
    h.patch_spec("le", json!({"replicas": 3}));
    h.wait_for("le", "3 members under the new leader", SETTLE, |c| {
        settled(c, 3)
    })
    .await;
    let _ = standby.kill();
    let _ = standby.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_cluster_is_scaled_and_backed_up_with_the_operators_own_certificate() {
    let oxcd = support::oxcd_binary();
    let mut h = Harness::start(&[("oxcd:test", oxcd)]).await;
    let (ca, tls) = h.tls_secrets("sec");
    h.start_operator(None);
    h.apply(&manifest(
        "sec",
        1,
        "  tls:\n    clientSecret: sec-server\n    clientCertAuth: true\n    peerSecret: sec-server\n    operatorSecret: sec-operator\n",
    ));
    h.wait_for("sec", "1 TLS member", SETTLE, |c| settled(c, 1))
        .await;
    let opts = etcd_client::ConnectOptions::new()
        .with_tls(tls)
        .with_timeout(Duration::from_secs(5));
    let mut c = etcd_client::Client::connect(h.tls_endpoints("sec", 1), Some(opts.clone()))
        .await
        .unwrap();
    for i in 0..20 {
        c.put(format!("tls/{i:02}"), "v", None).await.unwrap();
    }
    // The members require a client certificate: without one nothing is served.
    let no_cert = etcd_client::ConnectOptions::new()
        .with_tls(
            etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&ca)),
        )
        .with_timeout(Duration::from_secs(3))
        .with_connect_timeout(Duration::from_secs(3));
    let refused = async {
        etcd_client::Client::connect(h.tls_endpoints("sec", 1), Some(no_cert))
            .await?
            .get("tls/00", None)
            .await
    }
    .await;
    assert!(refused.is_err(), "served without a client certificate");

    // MemberAdd, each member's Status and MemberPromote, all over TLS; peers over TLS too.
    h.patch_spec("sec", json!({"replicas": 3}));
    let c = h
        .wait_for("sec", "3 TLS members", SETTLE, |c| settled(c, 3))
        .await;
    for m in c["status"]["members"].as_array().unwrap() {
        assert!(
            m["clientUrl"].as_str().unwrap().starts_with("https://"),
            "{m}"
        );
        assert!(
            m["peerUrl"].as_str().unwrap().starts_with("https://"),
            "{m}"
        );
    }

    // A backup streamed from a member over TLS, verified like any other.
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("file://{}/backups", dir.path().display());
    h.patch_spec(
        "sec",
        json!({"backup": {"destination": dest, "request": "tls"}}),
    );
    let s = wait_backup(&h, "sec", "a backup over TLS", |b| b["request"] == "tls").await;
    assert_eq!(s["lastBackup"]["succeeded"], true, "{}", s["lastBackup"]);
    assert!(s["lastBackup"]["keys"].as_u64().unwrap() >= 20);

    // Without the operator's certificate Secret, the cluster is reported, not guessed at.
    h.store.delete(
        &support::standin::collection("v1", "secrets"),
        &h.ns,
        "sec-operator",
    );
    h.patch_spec("sec", json!({"replicas": 3, "backup": null}));
    let c = h
        .wait_for("sec", "the missing Secret reported", SETTLE, |c| {
            c["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|x| x["type"] == "Degraded" && x["reason"] == "TlsSecret")
            })
        })
        .await;
    assert_eq!(c["status"]["phase"], "Degraded");
}
