//! `--config-file`: etcd's YAML configuration file. The same file (but for ports and paths)
//! starts real etcd 3.4 and oxcd; both must then report the member it describes, ignore
//! `ETCD_*` variables as etcd does, and serve the metrics listener it names.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};
use support::Kind;

struct Started {
    _dir: tempfile::TempDir,
    _child: tokio::process::Child,
    client: String,
    metrics: String,
}

async fn start_from_file(kind: Kind, extra_yaml: &str) -> Started {
    let dir = tempfile::tempdir().expect("temp dir");
    let (client, peer, metrics) = (
        support::free_port(),
        support::free_port(),
        support::free_port(),
    );
    let yaml = format!(
        "name: from-file\n\
         data-dir: {data}\n\
         listen-client-urls: http://127.0.0.1:{client}\n\
         advertise-client-urls: http://127.0.0.1:{client}\n\
         listen-peer-urls: http://127.0.0.1:{peer}\n\
         initial-advertise-peer-urls: http://127.0.0.1:{peer}\n\
         initial-cluster: from-file=http://127.0.0.1:{peer}\n\
         initial-cluster-token: file-token\n\
         initial-cluster-state: new\n\
         listen-metrics-urls: http://127.0.0.1:{metrics}\n\
         heartbeat-interval: 100\n\
         election-timeout: 1000\n\
         snapshot-count: 10000\n\
         quota-backend-bytes: 0\n\
         max-snapshots: 5\n\
         max-wals: 5\n\
         strict-reconfig-check: true\n\
         enable-v2: false\n\
         enable-pprof: false\n\
         discovery:\n\
         proxy: 'off'\n\
         client-transport-security:\n  cert-file:\n  client-cert-auth: false\n  auto-tls: false\n\
         peer-transport-security:\n  cert-file:\n  client-cert-auth: false\n  auto-tls: false\n\
         debug: false\n\
         force-new-cluster: false\n\
         logger: zap\n\
         log-outputs: [stderr]\n\
         auto-compaction-mode: periodic\n\
         auto-compaction-retention: \"1\"\n\
         {extra_yaml}",
        data = dir.path().join("data").display(),
    );
    let file = dir.path().join("etcd.conf.yml");
    std::fs::write(&file, yaml).expect("write config file");
    let log = std::fs::File::create(dir.path().join("server.log")).expect("log file");
    let child = tokio::process::Command::new(kind.binary())
        .arg(format!("--config-file={}", file.display()))
        // Ignored when a config file is given (etcd's rule).
        .env("ETCD_NAME", "from-env")
        .env("ETCD_LISTEN_CLIENT_URLS", "http://127.0.0.1:1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn server");
    let endpoint = format!("http://127.0.0.1:{client}");
    let deadline = Instant::now() + support::READY_TIMEOUT;
    loop {
        let health = support::http_request("GET", &endpoint, "/health").await;
        if health.is_ok_and(|r| r.status == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} from a config file did not become healthy: {}",
            kind.label(),
            std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Started {
        _dir: dir,
        _child: child,
        client: endpoint,
        metrics: format!("http://127.0.0.1:{metrics}"),
    }
}

/// What a client sees of the member, with the ports taken out.
async fn observed(s: &Started) -> Vec<String> {
    let members = support::etcdctl_at(&s.client, &["member", "list"], None).await;
    let port = s.client.rsplit(':').next().unwrap_or_default().to_string();
    let line = members.ok().trim().replace(&port, "<client>");
    let fields: Vec<String> = line.split(", ").skip(1).map(|f| f.to_string()).collect();
    let metrics = support::http_request("GET", &s.metrics, "/metrics")
        .await
        .map(|r| (r.status, r.body.contains("\netcd_server_has_leader 1\n")))
        .expect("metrics listener");
    let mut out = fields;
    out.push(format!("metrics listener: {metrics:?}"));
    out
}

#[tokio::test]
async fn the_same_config_file_starts_etcd_and_oxcd_alike() {
    support::require_etcd();
    let (etcd, subject) = tokio::join!(
        start_from_file(Kind::Etcd, ""),
        start_from_file(Kind::subject(), "")
    );
    same_member(&etcd, &subject).await;
}

/// etcd 3.6's keys: feature gates, promoted flag names, `max-learners`, and durations written
/// as Go's `time.Duration` is in JSON (nanoseconds); compared with etcd 3.6 itself.
#[tokio::test]
async fn an_etcd_3_6_config_file_starts_oxcd_as_it_starts_etcd_3_6() {
    let extra = "feature-gates: InitialCorruptCheck=true\n\
                 watch-progress-notify-interval: 5000000000\n\
                 corrupt-check-time: 300000000000\n\
                 grpc-keepalive-min-time: 5000000000\n\
                 compact-hash-check-time: 60000000000\n\
                 max-learners: 1\n";
    let (etcd, subject) = tokio::join!(
        start_from_file(support::REFERENCE, extra),
        start_from_file(Kind::subject(), extra)
    );
    same_member(&etcd, &subject).await;
}

async fn same_member(etcd: &Started, subject: &Started) {
    let (want, got) = tokio::join!(observed(etcd), observed(subject));
    // Sanity on etcd itself: the file's name and URLs, not the environment's.
    assert_eq!(want[1], "from-file", "etcd's own view: {want:?}");
    assert_eq!(
        want.last().map(String::as_str),
        Some("metrics listener: (200, true)")
    );
    // The peer URL's port differs; everything else must match.
    let strip_peer = |v: &[String]| -> Vec<String> {
        v.iter()
            .map(|f| {
                if f.starts_with("http://127.0.0.1:") && !f.contains("<client>") {
                    "<peer>".into()
                } else {
                    f.clone()
                }
            })
            .collect()
    };
    assert_eq!(strip_peer(&got), strip_peer(&want));
}
