//! Operations flags whose effect a client or a log reader sees: `--logger` (the lines tools
//! wait for, and zap's JSON shape) and `--max-concurrent-streams`. Each runs against real
//! etcd 3.4 first, then against the subject, with the same flags.

mod support;

use std::time::Duration;

use support::{Kind, Server};

/// The lines etcd's own e2e tests and operators' scripts wait for.
const READY_LINES: &[&str] = &["published", "enabled capabilities for version"];

#[tokio::test(flavor = "multi_thread")]
async fn default_logger_prints_the_lines_tools_wait_for() {
    for kind in [Kind::Etcd, Kind::subject()] {
        let server = Server::start(kind).await;
        let mut c = server.client().await;
        c.put("k", "v", None).await.unwrap();
        let log = server.log();
        for line in READY_LINES
            .iter()
            .chain(&["ready to serve client requests"])
        {
            assert!(
                log.contains(line),
                "{}: no {line:?} in\n{}",
                kind.label(),
                support::tail(&log, 30)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn zap_logger_writes_etcd_json_lines() {
    for kind in [Kind::Etcd, Kind::subject()] {
        let l = kind.label();
        let server = Server::start_with(kind, &["--logger=zap"]).await;
        let mut c = server.client().await;
        c.put("k", "v", None).await.unwrap();
        let log = server.log();
        let mut msgs = Vec::new();
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{l}: not a JSON line ({e}): {line}"));
            let obj = v.as_object().unwrap_or_else(|| panic!("{l}: {line}"));
            for key in ["level", "ts", "caller", "msg"] {
                assert!(
                    obj.get(key).is_some_and(|v| v.is_string()),
                    "{l}: {key} in {line}"
                );
            }
            // zap's first keys, in zap's order.
            assert!(line.starts_with("{\"level\":"), "{l}: {line}");
            let ts = obj["ts"].as_str().unwrap();
            assert!(
                ts.len() == 24 && ts.ends_with('Z') && &ts[10..11] == "T",
                "{l}: ts {ts}"
            );
            assert!(
                ["debug", "info", "warn", "error"].contains(&obj["level"].as_str().unwrap()),
                "{l}: {line}"
            );
            msgs.push((obj["msg"].as_str().unwrap().to_string(), obj.clone()));
        }
        let published = msgs
            .iter()
            .find(|(m, _)| m == "published local member to cluster through raft")
            .unwrap_or_else(|| panic!("{l}: no publish line"));
        assert!(
            published.1.contains_key("local-member-id") && published.1.contains_key("cluster-id"),
            "{l}: {:?}",
            published.1
        );
        let caps = msgs
            .iter()
            .find(|(m, _)| m == "enabled capabilities for version")
            .unwrap_or_else(|| panic!("{l}: no capabilities line"));
        assert_eq!(caps.1["cluster-version"], "3.4", "{l}");
    }
}

/// With one stream per connection, a watch holding the connection's only stream makes the
/// next request on that connection wait until the watch ends.
#[tokio::test(flavor = "multi_thread")]
async fn max_concurrent_streams_limits_each_connection() {
    for kind in [Kind::Etcd, Kind::subject()] {
        let l = kind.label();
        let server = Server::start_with(kind, &["--max-concurrent-streams=1"]).await;
        let mut c = server.client().await;
        c.put("k", "v", None).await.unwrap();
        let stream = c.watch("k", None).await.unwrap();
        let blocked = tokio::time::timeout(Duration::from_secs(2), c.get("k", None)).await;
        assert!(
            blocked.is_err(),
            "{l}: a second stream was opened: {blocked:?}"
        );
        drop(stream);
        let r = tokio::time::timeout(Duration::from_secs(10), c.get("k", None))
            .await
            .unwrap_or_else(|_| panic!("{l}: the stream was never released"))
            .unwrap();
        assert_eq!(r.kvs()[0].value(), b"v", "{l}");
    }
    // The default leaves room for many.
    let server = Server::start(Kind::subject()).await;
    let mut c = server.client().await;
    let _w = c.watch("k", None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), c.get("k", None))
        .await
        .expect("default: a watch and a get side by side")
        .unwrap();
}
