//! Operations flags whose effect a client or a log reader sees: `--logger` (the lines tools
//! wait for, and zap's JSON shape), `--max-concurrent-streams`, the TCP gateway and unix://
//! URLs. Each runs against real etcd 3.4 first, then against the subject, with the same flags.

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

/// `gateway start`: etcd's TCP gateway. etcdctl talks to the gateway's address; with a dead
/// member listed first, the gateway skips it. Same on etcd's gateway and oxcd's.
#[tokio::test(flavor = "multi_thread")]
async fn gateway_relays_clients_to_a_live_member() {
    for kind in [Kind::Etcd, Kind::subject()] {
        let l = kind.label();
        let server = Server::start(kind).await;
        let dead = format!("http://127.0.0.1:{}", support::free_port());
        let listen = format!("127.0.0.1:{}", support::free_port());
        let mut gw = tokio::process::Command::new(kind.binary())
            .arg("gateway")
            .arg(format!("--endpoints={dead},{}", server.endpoint()))
            .arg(format!("--listen-addr={listen}"))
            .arg("start")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the gateway");
        // Ready when it accepts connections (it logs "ready to proxy client requests").
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&listen).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{l}: the gateway never listened"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for i in 0..3 {
            let out = support::etcdctl_at(&listen, &["put", &format!("gw{i}"), "v"], None).await;
            assert_eq!(out.ok(), "OK\n", "{l}");
        }
        let out =
            support::etcdctl_at(&listen, &["get", "gw", "--prefix", "--keys-only"], None).await;
        assert_eq!(out.ok(), "gw0\n\ngw1\n\ngw2\n\n", "{l}");
        let _ = gw.start_kill();
        let out = gw.wait_with_output().await.unwrap();
        let log = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(log.contains("ready to proxy client requests"), "{l}: {log}");
    }
}

/// etcd's unix:// URLs: the client API and the peer port on unix sockets. A URL is still
/// host:port, and the socket is the file `host:port` in the working directory.
#[tokio::test(flavor = "multi_thread")]
async fn unix_socket_urls_serve_clients_and_peers() {
    for kind in [Kind::Etcd, Kind::subject()] {
        let l = kind.label();
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = ("unix://client.sock:1", "unix://peer.sock:1");
        let mut cmd = tokio::process::Command::new(kind.binary());
        cmd.current_dir(dir.path())
            .args(["--name", "u1", "--data-dir", "data"])
            .args([
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
            ])
            .args([
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
            ])
            .args(["--initial-cluster", &format!("u1={peer}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        for (k, _) in std::env::vars_os() {
            if k.to_str().is_some_and(|k| k.starts_with("ETCD_")) {
                cmd.env_remove(k);
            }
        }
        let mut server = cmd.spawn().expect("start the server");
        // etcdctl dials the socket relative to its own working directory.
        let ctl = |args: &[&str]| {
            std::process::Command::new(support::ETCDCTL_BIN)
                .current_dir(dir.path())
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", client, "--dial-timeout", "2s"])
                .args(args)
                .output()
                .expect("run etcdctl")
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let out = ctl(&["put", "over", "unix"]);
            if out.status.success() {
                assert_eq!(String::from_utf8_lossy(&out.stdout), "OK\n", "{l}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{l}: no answer over {client}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for sock in ["client.sock:1", "peer.sock:1"] {
            assert!(dir.path().join(sock).exists(), "{l}: {sock}");
        }
        let out = ctl(&["get", "over"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "over\nunix\n", "{l}");
        let out = ctl(&["member", "list"]);
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            line.ends_with(&format!("started, u1, {peer}, {client}, false")),
            "{l}: {line}"
        );
        // A path is refused, as etcd refuses it.
        let out = std::process::Command::new(kind.binary())
            .current_dir(dir.path())
            .args(["--name", "u2", "--data-dir", "data2"])
            .args(["--listen-client-urls", "unix:///tmp/x.sock"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{l}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("unix:///tmp/x.sock"),
            "{l}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = server.start_kill();
        let _ = server.wait().await;
    }
}
