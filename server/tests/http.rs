//! etcd's HTTP endpoints on the client port (`/health`, `/version`), compared with real etcd
//! 3.4 byte for byte, and `/health` flipping when a member loses its quorum.

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
    (r.status, headers, r.body.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_version_answer_as_etcd_does() {
    support::require_etcd();
    let etcd = Server::start(Kind::Etcd).await;
    let oxcd = Server::start(Kind::Oxcd).await;
    let requests = [
        ("GET", "/version"),
        ("GET", "/health"),
        ("GET", "/health?serializable=true"),
        ("GET", "/health?exclude=NOSPACE"),
        ("POST", "/health"),
        ("PUT", "/version"),
        ("GET", "/no-such-path"),
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
    let kind = Kind::subject();
    let mut cluster = Cluster::start(kind, 3).await;
    let ep = cluster.members[0].endpoint();
    let ok = http_request("GET", &ep, "/health").await.unwrap();
    assert_eq!((ok.status, ok.body.as_str()), (200, r#"{"health":"true"}"#));

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
    assert_eq!(
        (failed.status, failed.body.as_str()),
        (503, "{\"health\":\"false\"}\n")
    );
    if kind == Kind::Oxcd {
        // etcd 3.4 has no /livez or /readyz (3.5 added them); they are oxcd's probes.
        let live = http_request("GET", &ep, "/livez").await.unwrap();
        assert_eq!((live.status, live.body.as_str()), (200, "ok\n"));
        let ready = http_request("GET", &ep, "/readyz").await.unwrap();
        assert_eq!(ready.status, 503, "{}", ready.body);
    }

    cluster.members[1].restart().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = http_request("GET", &ep, "/health").await.unwrap();
        if r.status == 200 {
            assert_eq!(r.body, r#"{"health":"true"}"#);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "health never came back: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if kind == Kind::Oxcd {
        let ready = http_request("GET", &ep, "/readyz").await.unwrap();
        assert_eq!((ready.status, ready.body.as_str()), (200, "ok\n"));
    }
}
