//! `/metrics` against real etcd 3.4: the same workload on both, then the families etcd's
//! Grafana dashboard and alerts use must exist with etcd's type and label names, and the
//! counters that describe the workload must have etcd's values.

mod support;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use std::collections::{BTreeMap, BTreeSet};
use support::{Kind, Server};

/// Families graphed by etcd's Grafana dashboard or used by its alerting rules, that a
/// one-member cluster exports.
const DASHBOARD_FAMILIES: &[&str] = &[
    "etcd_server_has_leader",
    "etcd_server_is_leader",
    "etcd_server_leader_changes_seen_total",
    "etcd_server_proposals_committed_total",
    "etcd_server_proposals_applied_total",
    "etcd_server_proposals_pending",
    "etcd_server_proposals_failed_total",
    "etcd_server_version",
    "etcd_server_id",
    "etcd_server_quota_backend_bytes",
    "etcd_server_health_success",
    "etcd_server_health_failures",
    "etcd_cluster_version",
    "etcd_disk_wal_fsync_duration_seconds",
    "etcd_disk_backend_commit_duration_seconds",
    "etcd_mvcc_db_total_size_in_bytes",
    "etcd_mvcc_db_total_size_in_use_in_bytes",
    "etcd_debugging_mvcc_db_total_size_in_bytes",
    "etcd_mvcc_put_total",
    "etcd_mvcc_range_total",
    "etcd_mvcc_delete_total",
    "etcd_mvcc_txn_total",
    "etcd_debugging_mvcc_keys_total",
    "etcd_debugging_mvcc_current_revision",
    "etcd_debugging_mvcc_compact_revision",
    "etcd_network_client_grpc_received_bytes_total",
    "etcd_network_client_grpc_sent_bytes_total",
    "grpc_server_started_total",
    "grpc_server_handled_total",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
];

/// Counters whose values a workload fixes: equal on both sides.
const SAME_VALUE: &[&str] = &[
    "etcd_server_has_leader",
    "etcd_server_is_leader",
    "etcd_server_leader_changes_seen_total",
    "etcd_server_proposals_pending",
    "etcd_server_proposals_failed_total",
    "etcd_server_health_success",
    "etcd_server_health_failures",
    "etcd_server_version",
    "etcd_cluster_version",
    "etcd_mvcc_put_total",
    "etcd_mvcc_range_total",
    "etcd_mvcc_delete_total",
    "etcd_mvcc_txn_total",
    "etcd_debugging_mvcc_keys_total",
    "etcd_debugging_mvcc_current_revision",
    "etcd_debugging_mvcc_compact_revision",
];

#[derive(Default, Debug)]
struct Scrape {
    /// family -> type
    types: BTreeMap<String, String>,
    /// sample name with its labels as printed, normalised to sorted labels -> value
    samples: BTreeMap<String, f64>,
    /// family -> label names seen
    labels: BTreeMap<String, BTreeSet<String>>,
}

fn family_of(sample: &str, types: &BTreeMap<String, String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = sample.strip_suffix(suffix) {
            if types
                .get(base)
                .is_some_and(|t| t == "histogram" || t == "summary")
            {
                return base.to_string();
            }
        }
    }
    sample.to_string()
}

fn parse(text: &str) -> Scrape {
    let mut s = Scrape::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(t)) = (it.next(), it.next()) {
                s.types.insert(name.to_string(), t.to_string());
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut pairs: Vec<&str> = if labels.is_empty() {
            vec![]
        } else {
            labels
                .split("\",")
                .map(|p| p.trim_end_matches('"'))
                .collect()
        };
        pairs.sort();
        let fam = family_of(name, &s.types);
        let names = s.labels.entry(fam).or_default();
        for p in &pairs {
            let label = p.split('=').next().unwrap_or("");
            if label != "le" {
                names.insert(label.to_string());
            }
        }
        let key = format!("{name}{{{}}}", pairs.join(","));
        s.samples.insert(key, value.parse().unwrap_or(f64::NAN));
    }
    s
}

async fn scrape(endpoint: &str) -> Scrape {
    let r = support::http_request("GET", endpoint, "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(r.status, 200, "/metrics status: {}", r.body);
    assert!(
        r.headers
            .get("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "content type {:?}",
        r.headers.get("content-type")
    );
    parse(&r.body)
}

/// The same calls on either server: every kind of mvcc transaction, a lease revoke, and
/// calls that fail with etcd's codes.
async fn workload(server: &Server) {
    let mut c = server.client().await;
    c.put("a", "1", None).await.unwrap();
    c.put("b", "2", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    c.get("a", None).await.unwrap();
    c.get("a", Some(GetOptions::new().with_serializable()))
        .await
        .unwrap();
    c.get(
        "",
        Some(GetOptions::new().with_all_keys().with_count_only()),
    )
    .await
    .unwrap();
    let cmp = || Compare::value("a", CompareOp::Equal, "1");
    c.txn(
        Txn::new()
            .when([cmp()])
            .and_then([TxnOp::put("c", "3", None), TxnOp::put("d", "4", None)]),
    )
    .await
    .unwrap();
    c.txn(Txn::new().when([cmp()]).and_then([TxnOp::get("c", None)]))
        .await
        .unwrap();
    c.txn(
        Txn::new()
            .when([cmp()])
            .and_then([TxnOp::put("x", "1", None)]),
    )
    .await
    .unwrap();
    c.delete("a", None).await.unwrap();
    let lease = c.lease_grant(100, None).await.unwrap().id();
    for k in ["l1", "l2"] {
        c.put(k, "v", Some(PutOptions::new().with_lease(lease)))
            .await
            .unwrap();
    }
    c.lease_revoke(lease).await.unwrap();
    // Failures: OutOfRange (future revision), InvalidArgument (empty key), NotFound (lease).
    assert!(c
        .get("a", Some(GetOptions::new().with_revision(1000)))
        .await
        .is_err());
    assert!(c.put("", "v", None).await.is_err());
    assert!(c
        .put("k", "v", Some(PutOptions::new().with_lease(0x1234)))
        .await
        .is_err());
    for _ in 0..2 {
        let h = support::http_request("GET", &server.endpoint(), "/health")
            .await
            .expect("GET /health");
        assert_eq!(h.status, 200);
    }
}

#[tokio::test]
async fn metrics_match_etcd_after_the_same_workload() {
    support::require_etcd();
    let (etcd, subject) = tokio::join!(Server::start(Kind::Etcd), Server::start(Kind::subject()));
    tokio::join!(workload(&etcd), workload(&subject));
    let (etcd_ep, subject_ep) = (etcd.endpoint(), subject.endpoint());
    let (want, got) = tokio::join!(scrape(&etcd_ep), scrape(&subject_ep));

    let mut problems = vec![];
    for fam in DASHBOARD_FAMILIES {
        match (want.types.get(*fam), got.types.get(*fam)) {
            (None, _) => problems.push(format!("{fam}: etcd itself does not export it")),
            (Some(_), None) => problems.push(format!("{fam}: missing")),
            (Some(w), Some(g)) if w != g => {
                problems.push(format!("{fam}: type {g}, etcd's is {w}"))
            }
            _ => {
                if want.labels.get(*fam) != got.labels.get(*fam) {
                    problems.push(format!(
                        "{fam}: labels {:?}, etcd's are {:?}",
                        got.labels.get(*fam),
                        want.labels.get(*fam)
                    ));
                }
            }
        }
    }
    for (key, w) in &want.samples {
        let fam = family_of(key.split('{').next().unwrap_or(""), &want.types);
        let compared = SAME_VALUE.contains(&fam.as_str())
            // Every call of the client API, by method and code.
            // (The Auth service is not served yet: its counters are not compared.)
            || (fam.starts_with("grpc_server_")
                && key.contains("grpc_service=\"etcdserverpb.")
                && !key.contains("grpc_service=\"etcdserverpb.Auth"));
        if compared && got.samples.get(key) != Some(w) {
            problems.push(format!("{key}: {:?}, etcd has {w}", got.samples.get(key)));
        }
    }
    // Histograms use etcd's buckets, and the disk ones saw the workload's writes.
    for fam in [
        "etcd_disk_wal_fsync_duration_seconds",
        "etcd_disk_backend_commit_duration_seconds",
    ] {
        let les = |s: &Scrape| -> BTreeSet<String> {
            s.samples
                .keys()
                .filter(|k| k.starts_with(&format!("{fam}_bucket{{")))
                .cloned()
                .collect()
        };
        if les(&want) != les(&got) {
            problems.push(format!(
                "{fam}: buckets {:?}, etcd's {:?}",
                les(&got),
                les(&want)
            ));
        }
        let count = got
            .samples
            .get(&format!("{fam}_count{{}}"))
            .copied()
            .unwrap_or(0.0);
        if count < 10.0 {
            problems.push(format!("{fam}: only {count} observations for 13 writes"));
        }
    }
    for fam in [
        "etcd_network_client_grpc_received_bytes_total",
        "etcd_network_client_grpc_sent_bytes_total",
    ] {
        let v = got
            .samples
            .get(&format!("{fam}{{}}"))
            .copied()
            .unwrap_or(0.0);
        if v < 100.0 {
            problems.push(format!("{fam}: {v} bytes for the whole workload"));
        }
    }
    assert!(
        problems.is_empty(),
        "metrics differ from etcd's:\n{}",
        problems.join("\n")
    );
}

#[tokio::test]
async fn listen_metrics_urls_serve_metrics_and_health_only() {
    support::require_etcd();
    let (ep, sp) = (support::free_port(), support::free_port());
    let flag = |p: u16| format!("--listen-metrics-urls=http://127.0.0.1:{p}");
    let (etcd_flag, subject_flag) = (flag(ep), flag(sp));
    let (etcd_args, subject_args) = ([etcd_flag.as_str()], [subject_flag.as_str()]);
    let (etcd, subject) = tokio::join!(
        Server::start_with(Kind::Etcd, &etcd_args),
        Server::start_with(Kind::subject(), &subject_args)
    );
    let _keep = (&etcd, &subject);
    for path in ["/metrics", "/health", "/version", "/v3/kv/range"] {
        let status = |port: u16| async move {
            support::http_request("GET", &format!("http://127.0.0.1:{port}"), path)
                .await
                .map(|r| r.status)
                .expect("metrics listener answers")
        };
        let (want, got) = tokio::join!(status(ep), status(sp));
        assert_eq!(got, want, "GET {path} on the metrics listener");
    }
    let body = support::http_request("GET", &format!("http://127.0.0.1:{sp}"), "/metrics")
        .await
        .expect("GET /metrics")
        .body;
    assert!(body.contains("\netcd_server_has_leader 1\n"), "{body}");
}
