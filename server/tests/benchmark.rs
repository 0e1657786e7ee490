//! Smoke run of the load generator (`oxcd benchmark`) against oxcd and real etcd 3.4, every
//! workload, a few hundred operations each, so the tool cannot rot. No timing is asserted:
//! performance is measured by `scripts/bench-compare.py`, never in a test.

mod support;

use std::process::Command;
use support::{Kind, Server};

/// Runs one workload and returns its JSON report.
fn bench(server: &Server, args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = Command::new(Kind::Oxcd.binary())
        .arg("benchmark")
        .arg("--endpoints")
        .arg(server.endpoint())
        .arg("--json")
        .arg(&json)
        .arg("--no-progress")
        .args(args)
        .output()
        .expect("run oxcd benchmark");
    assert!(
        out.status.success(),
        "oxcd benchmark {args:?} against {} failed:\n{}\n{}",
        server.kind.label(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Requests/sec"));
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn assert_clean(report: &serde_json::Value, ok: u64) {
    assert_eq!(report["ok"], ok, "{report:#}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report:#}");
    let l = &report["latency_ms"];
    assert!(l["min"].as_f64().unwrap() <= l["p50"].as_f64().unwrap());
    assert!(l["p99"].as_f64().unwrap() <= l["max"].as_f64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_runs_against_oxcd_and_etcd() {
    for kind in [Kind::Oxcd, Kind::Etcd] {
        let server = Server::start(kind).await;
        let common = ["--clients", "4", "--conns", "2", "--key-space-size", "50"];
        let with = |extra: &[&str]| -> Vec<String> {
            common.iter().chain(extra).map(|s| s.to_string()).collect()
        };
        let run = |extra: &[&str]| {
            let args = with(extra);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            bench(&server, &args)
        };
        assert_clean(&run(&["--total", "300", "--val-size", "64", "put"]), 300);
        assert_clean(&run(&["--total", "300", "range"]), 300);
        assert_clean(
            &run(&["--total", "300", "--consistency", "s", "range"]),
            300,
        );
        assert_clean(
            &run(&["--total", "100", "range", "--key", "000", "--prefix"]),
            100,
        );
        assert_clean(&run(&["--total", "200", "txn-put"]), 200);
        assert_clean(&run(&["--total", "200", "--rate", "2000", "put"]), 200);
        // 50 writes seen by 20 watchers: 1000 events.
        assert_clean(
            &run(&[
                "--total",
                "50",
                "watch",
                "--watchers",
                "20",
                "--streams",
                "4",
            ]),
            1000,
        );
        assert_clean(
            &run(&["--total", "300", "lease-keepalive", "--leases", "20"]),
            300,
        );
    }
}
