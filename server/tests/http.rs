//! etcd's HTTP endpoints on the client port (`/health`, `/version`), compared with the reference etcd
//! (3.6) byte for byte, and `/health` flipping when a member loses its quorum.

mod support;

use std::time::{Duration, Instant};
use support::{http_request, Cluster, Kind, Server};

/// The parts of a response a client can rely on (the Date header varies).
fn shape(r: &support::HttpResponse) -> (u16, Vec<(String, String)>, String) {
    let headers = r
        .headers
        .iter()
        .filter(|(k, _)| k.as_str() != "date")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // etcd runs the checks of /livez and /readyz in Go's map order, a new one each time.
    let body = if r.body.starts_with("[") {
        let mut lines: Vec<&str> = r.body.lines().collect();
        lines.sort();
        lines.join("\n")
    } else {
        r.body.clone()
    };
    (r.status, headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_version_answer_as_etcd_does() {
    let etcd = Server::start(support::REFERENCE).await;
    let oxcd = Server::start(Kind::Oxcd).await;
    let requests = [
        ("GET", "/version"),
        ("GET", "/health"),
        ("GET", "/health?serializable=true"),
        ("GET", "/health?exclude=NOSPACE"),
        ("POST", "/health"),
        ("PUT", "/version"),
        ("GET", "/no-such-path"),
        ("GET", "/livez"),
        ("GET", "/readyz"),
        ("GET", "/livez?verbose"),
        ("GET", "/readyz?verbose"),
        (
            "GET",
            "/readyz?verbose&exclude=linearizable_read&exclude=no_such_check",
        ),
        ("GET", "/readyz/non_learner?verbose"),
        ("GET", "/livez/serializable_read"),
        ("GET", "/livez/linearizable_read"),
        ("POST", "/readyz"),
    ];
    for (method, path) in requests {
        let want = http_request(method, &etcd.endpoint(), path).await.unwrap();
        let got = http_request(method, &oxcd.endpoint(), path).await.unwrap();
        assert_eq!(shape(&got), shape(&want), "{method} {path}");
    }
    // gRPC still works on the same port after HTTP connections.
    let mut c = oxcd.client().await;
    c.put("k", "v", None).await.unwrap();
    assert_eq!(c.get("k", None).await.unwrap().kvs()[0].value(), b"v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_fails_when_quorum_is_lost() {
    let _serial = support::serial_cluster_test();
    for kind in [support::REFERENCE, Kind::subject()] {
        health_fails_when_quorum_is_lost_on(kind).await;
    }
}

async fn health_fails_when_quorum_is_lost_on(kind: Kind) {
    let mut cluster = Cluster::start(kind, 3).await;
    let ep = cluster.members[0].endpoint();
    let ok = http_request("GET", &ep, "/health").await.unwrap();
    assert_eq!(
        (ok.status, ok.body.as_str()),
        (200, r#"{"health":"true","reason":""}"#)
    );

    cluster.members[1].stop();
    cluster.members[2].stop();
    // The survivor loses its leader after an election timeout; until then the linearizable
    // read of the health check already fails, so the answer flips within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    let failed = loop {
        let r = http_request("GET", &ep, "/health").await.unwrap();
        if r.status != 200 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // etcd 3.6 says why: no leader, or the linearizable read failed (before the member has
    // noticed that its leader is gone).
    assert_eq!(failed.status, 503, "{kind:?}: {}", failed.body);
    assert!(
        failed
            .body
            .starts_with(r#"{"health":"false","reason":"RAFT NO LEADER"}"#)
            || failed
                .body
                .starts_with(r#"{"health":"false","reason":"RANGE ERROR:"#),
        "{kind:?}: {}",
        failed.body
    );
    if kind != Kind::Etcd {
        // etcd 3.4 has no /livez or /readyz (3.5 added them). Alive: local reads work.
        let live = http_request("GET", &ep, "/livez").await.unwrap();
        assert_eq!((live.status, live.body.as_str()), (200, "ok\n"), "{kind:?}");
        let ready = http_request("GET", &ep, "/readyz?exclude=linearizable_read")
            .await
            .unwrap();
        assert_eq!(
            (ready.status, ready.body.as_str()),
            (200, "ok\n"),
            "{kind:?}"
        );
        let ready = http_request("GET", &ep, "/readyz/linearizable_read")
            .await
            .unwrap();
        assert_eq!(ready.status, 503, "{kind:?}: {}", ready.body);
        assert!(
            ready.body.starts_with("[-]linearizable_read failed: "),
            "{kind:?}: {}",
            ready.body
        );
    }

    cluster.members[1].restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = http_request("GET", &ep, "/health").await.unwrap();
        if r.status == 200 {
            assert_eq!(r.body, r#"{"health":"true","reason":""}"#, "{kind:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "health never came back: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if kind != Kind::Etcd {
        let ready = http_request("GET", &ep, "/readyz").await.unwrap();
        assert_eq!((ready.status, ready.body.as_str()), (200, "ok\n"));
    }
}
