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
    let mut starting_lines = Vec::new();
    for kind in [support::REFERENCE, Kind::subject()] {
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
                ts.len() == 27 && ts.ends_with('Z') && &ts[10..11] == "T",
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
        assert_eq!(caps.1["cluster-version"], "3.6", "{l}");
        // etcd's configuration line, which operators and etcd's own tests read: the fields
        // oxcd logs say what etcd's say for the same flags.
        let starting = &msgs
            .iter()
            .find(|(m, _)| m == "starting an etcd server")
            .unwrap_or_else(|| panic!("{l}: no configuration line"))
            .1;
        starting_lines.push(starting.clone());
    }
    let [etcd, oxcd] = [&starting_lines[0], &starting_lines[1]];
    for (key, value) in oxcd {
        if ["oxcd-version", "max-cpu-available", "ts", "caller"].contains(&key.as_str()) {
            continue;
        }
        let theirs = &etcd[key];
        match key.as_str() {
            // Paths, ports and URLs are each server's own; their shapes match.
            "data-dir"
            | "wal-dir"
            | "initial-cluster"
            | "name"
            | "advertise-client-urls"
            | "initial-advertise-peer-urls" => {
                assert_eq!(
                    std::mem::discriminant(value),
                    std::mem::discriminant(theirs),
                    "{key}: etcd {theirs}, oxcd {value}"
                )
            }
            _ => assert_eq!(value, theirs, "{key} differs from etcd's"),
        }
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

/// etcd's gRPC proxy: every service through one address with a dead member listed first;
/// unary calls, leases, a watch stream and auth tokens pass through; `/health` answers over
/// HTTP/1.1 on the same port; and a client certificate with a CommonName is refused for
/// talking to the cluster.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_proxy_forwards_every_service_to_a_live_member() {
    use etcd_client::{LeaseTimeToLiveOptions, PutOptions};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for kind in [Kind::Etcd, Kind::subject()] {
        let l = kind.label();
        let server = Server::start(kind).await;
        let dead = format!("127.0.0.1:{}", support::free_port());
        let listen = format!("127.0.0.1:{}", support::free_port());
        let member = server.endpoint().trim_start_matches("http://").to_string();
        let mut proxy = tokio::process::Command::new(kind.binary())
            .args(["grpc-proxy", "start"])
            .arg(format!("--endpoints={dead},{member}"))
            .arg(format!("--listen-addr={listen}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the proxy");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut c = loop {
            if let Ok(mut c) =
                etcd_client::Client::connect([format!("http://{listen}")], None).await
            {
                if c.put("px/a", "1", None).await.is_ok() {
                    break c;
                }
            }
            assert!(std::time::Instant::now() < deadline, "{l}: no proxy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let got = c.get("px/a", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"1", "{l}");
        let lease = c.lease_grant(60, None).await.unwrap().id();
        c.put("px/l", "x", Some(PutOptions::new().with_lease(lease)))
            .await
            .unwrap();
        let ttl = c
            .lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await
            .unwrap();
        assert_eq!(support::lease_keys(&ttl), ["px/l"], "{l}");

        let mut events = c.watch("px/w", None).await.unwrap();
        // The call returns with the response headers; the watch exists once it says so.
        let created = tokio::time::timeout(Duration::from_secs(10), events.message()).await;
        assert!(
            matches!(&created, Ok(Ok(Some(r))) if r.created()),
            "{l}: watch created through the proxy: {created:?}"
        );
        c.put("px/w", "seen", None).await.unwrap();
        assert_eq!(
            next_value(&mut events).await,
            Ok(b"seen".to_vec()),
            "{l}: the watch through the proxy"
        );
        // An idle watch stays: the proxy's connection to the member must not break the
        // member's ping policy (it was sent GOAWAY after 3 s of pings every second).
        tokio::time::sleep(Duration::from_secs(6)).await;
        c.put("px/w", "later", None).await.unwrap();
        assert_eq!(
            next_value(&mut events).await,
            Ok(b"later".to_vec()),
            "{l}: the watch through the proxy after 6 s idle"
        );

        let mut http = tokio::net::TcpStream::connect(&listen).await.unwrap();
        http.write_all(b"GET /health HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        http.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{l}: {answer}");
        assert!(answer.contains(r#"{"health":"true"}"#), "{l}: {answer}");

        c.user_add("root", "pw", None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.auth_enable().await.unwrap();
        let out =
            support::etcdctl_at(&listen, &["--user=root:pw", "put", "px/auth", "ok"], None).await;
        assert_eq!(out.ok(), "OK\n", "{l}: a token through the proxy");
        let out = support::etcdctl_at(&listen, &["get", "px/auth"], None).await;
        assert!(
            out.err().contains("user name is empty"),
            "{l}: {}",
            out.stderr
        );
        let _ = proxy.start_kill();
        let _ = proxy.wait().await;

        let dir = tempfile::tempdir().unwrap();
        let ca = support::pki::Ca::new(dir.path(), "ca");
        let named = ca.issue("named", "somebody");
        let out = std::process::Command::new(kind.binary())
            .args(["grpc-proxy", "start", "--listen-addr", &listen])
            .arg(format!("--cert={}", named.cert.display()))
            .arg(format!("--key={}", named.key.display()))
            .arg(format!("--cacert={}", ca.pem.display()))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{l}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("cert has non empty Common Name (somebody)"),
            "{l}: {stderr}"
        );
    }
}

/// The gRPC proxy moves to another member when the one it uses dies.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_proxy_fails_over_when_its_member_dies() {
    let _serial = support::serial_cluster_test();
    for kind in [Kind::Etcd, Kind::subject()] {
        let l = kind.label();
        let mut cluster = support::Cluster::start(kind, 3).await;
        let endpoints: Vec<String> = cluster
            .endpoints()
            .iter()
            .map(|e| e.trim_start_matches("http://").to_string())
            .collect();
        let listen = format!("127.0.0.1:{}", support::free_port());
        let _proxy = tokio::process::Command::new(kind.binary())
            .args(["grpc-proxy", "start"])
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg(format!("--listen-addr={listen}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the proxy");
        let put = |i: usize| {
            let listen = listen.clone();
            async move {
                let deadline = std::time::Instant::now() + Duration::from_secs(15);
                loop {
                    let out = support::etcdctl_at(
                        &listen,
                        &["--command-timeout=2s", "put", &format!("fo/{i}"), "v"],
                        None,
                    )
                    .await;
                    if out.status.success() {
                        return;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{l}: no put through the proxy: {}",
                        out.stderr
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        put(0).await;
        // The proxy uses the first endpoint; kill it.
        cluster.members[0].kill9();
        put(1).await;
        put(2).await;
        let out =
            support::etcdctl_at(&listen, &["get", "fo/", "--prefix", "--keys-only"], None).await;
        assert_eq!(out.ok(), "fo/0\n\nfo/1\n\nfo/2\n\n", "{l}");
    }
}

/// `--grpc-keepalive-min-time`: grpc-go's enforcement policy, as etcd sets it. A client that
/// pings with no stream open (more often than every two hours) gets GOAWAY ENHANCE_YOUR_CALM on
/// its third strike, and the connection ends; one that pings no more often than the minimum
/// time while a stream is open keeps its connection.
#[tokio::test(flavor = "multi_thread")]
async fn keepalive_min_time_sends_too_many_pings_goaway_as_etcd_does() {
    for kind in [Kind::Etcd, Kind::subject()] {
        let l = kind.label();
        let server = Server::start_with(kind, &["--grpc-keepalive-min-time=200ms"]).await;
        let addr = server.endpoint().trim_start_matches("http://").to_string();

        // One ping at a time, each answered before the next: the first is free, the next
        // three are strikes, and the third strike is answered with the GOAWAY (etcd may
        // still acknowledge that ping first, so the GOAWAY is read after it).
        let mut raw = BareH2::connect(&addr).await;
        let mut goaway = None;
        for n in 1..=6u64 {
            match raw.ping(n).await {
                PingAnswer::Ack => {}
                PingAnswer::GoAway { code, debug } => {
                    goaway = Some((n, code, debug));
                    break;
                }
                PingAnswer::Ended(e) => panic!("{l}: the connection ended at ping {n}: {e}"),
            }
        }
        let (n, code, debug) = goaway.unwrap_or_else(|| panic!("{l}: no GOAWAY after 6 pings"));
        assert!((4..=5).contains(&n), "{l}: GOAWAY at ping {n}");
        assert_eq!(code, 0xb, "{l}: GOAWAY code (ENHANCE_YOUR_CALM)");
        assert_eq!(debug, b"too_many_pings", "{l}: GOAWAY debug data");
        let end = tokio::time::timeout(Duration::from_secs(10), raw.ping(7))
            .await
            .unwrap_or_else(|_| panic!("{l}: the connection stays open after the GOAWAY"));
        assert!(
            matches!(end, PingAnswer::Ended(_)),
            "{l}: after GOAWAY: {end:?}"
        );

        // Pings 500 ms apart while a stream (a watch) is open are within the policy (200 ms
        // apart would be too: the margin is for a loaded machine, where the server may read
        // one ping late and the next on time).
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (send, mut conn) = h2::client::handshake(tcp).await.unwrap();
        let mut pings = conn.ping_pong().expect("ping_pong");
        let driver = tokio::spawn(conn);
        let mut send = send.ready().await.unwrap();
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/etcdserverpb.Watch/Watch"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (_response, _stream) = send.send_request(req, false).unwrap();
        for i in 0..5 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            pings
                .ping(h2::Ping::opaque())
                .await
                .unwrap_or_else(|e| panic!("{l}: ping {i} with a stream open: {e:?}"));
        }
        assert!(!driver.is_finished(), "{l}: the connection stays");
        driver.abort();
    }
}

/// What a bare HTTP/2 connection heard after sending a PING.
#[derive(Debug)]
enum PingAnswer {
    Ack,
    GoAway {
        code: u32,
        debug: Vec<u8>,
    },
    /// End of stream or an I/O error before an answer.
    Ended(String),
}

/// A client connection that speaks just enough HTTP/2 to test the ping policy: unlike the h2
/// crate's, it sends nothing of its own (no pings, no window updates) and reads the server's
/// frames in order, so a GOAWAY is seen even when the server closes right after it.
struct BareH2 {
    tcp: tokio::net::TcpStream,
}

impl BareH2 {
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const GOAWAY: u8 = 0x7;
    const ACK: u8 = 0x1;

    async fn connect(addr: &str) -> BareH2 {
        use tokio::io::AsyncWriteExt;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(Self::frame(Self::SETTINGS, 0, &[]));
        tcp.write_all(&hello).await.unwrap();
        BareH2 { tcp }
    }

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags, 0, 0, 0, 0]);
        f.extend(payload);
        f
    }

    /// Sends PING `n` and reads frames until its ACK, a GOAWAY or the end.
    async fn ping(&mut self, n: u64) -> PingAnswer {
        use tokio::io::AsyncWriteExt;
        let ping = Self::frame(Self::PING, 0, &n.to_be_bytes());
        if let Err(e) = self.tcp.write_all(&ping).await {
            // The server may have closed first; its GOAWAY may still be waiting to be read.
            return match self.next_answer(n).await {
                PingAnswer::Ended(_) => PingAnswer::Ended(format!("write: {e}")),
                answer => answer,
            };
        }
        let _ = self.tcp.flush().await;
        self.next_answer(n).await
    }

    async fn next_answer(&mut self, n: u64) -> PingAnswer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let mut header = [0u8; 9];
            if let Err(e) = self.tcp.read_exact(&mut header).await {
                return PingAnswer::Ended(e.to_string());
            }
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0u8; len];
            if let Err(e) = self.tcp.read_exact(&mut payload).await {
                return PingAnswer::Ended(e.to_string());
            }
            match (header[3], header[4] & Self::ACK != 0) {
                (Self::SETTINGS, false) => {
                    let ack = Self::frame(Self::SETTINGS, Self::ACK, &[]);
                    if let Err(e) = self.tcp.write_all(&ack).await {
                        return PingAnswer::Ended(format!("write: {e}"));
                    }
                }
                (Self::PING, true) if payload == n.to_be_bytes() => return PingAnswer::Ack,
                (Self::GOAWAY, _) if len >= 8 => {
                    return PingAnswer::GoAway {
                        code: u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]),
                        debug: payload[8..].to_vec(),
                    };
                }
                _ => {}
            }
        }
    }
}

/// The value of the next event a watch delivers (10 s at most).
async fn next_value(events: &mut etcd_client::WatchStream) -> Result<Vec<u8>, String> {
    let next = async {
        loop {
            match events.message().await {
                Ok(Some(resp)) => {
                    if let Some(kv) = resp.events().iter().find_map(|e| e.kv()) {
                        return Ok(kv.value().to_vec());
                    }
                }
                Ok(None) => return Err("the watch ended".to_string()),
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .unwrap_or_else(|_| Err("no event in 10 s".to_string()))
}

/// The flags kubeadm 1.36 writes into its etcd manifest (`--feature-gates=InitialCorruptCheck=true`,
/// `--watch-progress-notify-interval=5s`, `--snapshot-count=10000`, a metrics listener; the TLS
/// flags are the tls tests'), and the etcd 3.4 spellings of the same settings: etcd 3.6 and
/// oxcd both start and serve with either, and both warn about the deprecated spellings.
#[tokio::test(flavor = "multi_thread")]
async fn kubeadm_flags_and_the_3_4_spellings_start_the_server() {
    let metrics = |port: u16| format!("--listen-metrics-urls=http://127.0.0.1:{port}");
    for kind in [support::REFERENCE, Kind::subject()] {
        let l = kind.label();
        let kubeadm = [
            "--feature-gates=InitialCorruptCheck=true",
            "--watch-progress-notify-interval=5s",
            "--snapshot-count=10000",
            &metrics(support::free_port()),
        ];
        let server = Server::start_with(kind, &kubeadm).await;
        server.client().await.put("k", "v", None).await.expect(l);
        drop(server);

        let old = [
            "--experimental-initial-corrupt-check=true",
            "--experimental-watch-progress-notify-interval=5s",
            "--experimental-corrupt-check-time=2m",
        ];
        let server = Server::start_with(kind, &old).await;
        server.client().await.put("k", "v", None).await.expect(l);
        let log = server.log();
        for flag in ["watch-progress-notify-interval", "corrupt-check-time"] {
            let warning = format!(
                "--experimental-{flag} is deprecated in v3.6 and will be decommissioned in v3.7. Use '--{flag}' instead."
            );
            assert!(
                log.contains(&warning),
                "{l}: no {warning:?} in\n{}",
                support::tail(&log, 30)
            );
        }
    }
}

/// Feature gates and promoted flags that etcd 3.6 refuses, refused by oxcd with etcd's
/// words (etcd prefixes Go's flag package text `invalid value "…" for flag -feature-gates: `).
#[test]
fn refused_gates_and_flag_pairs_get_etcd_3_6s_error() {
    let run = |kind: Kind, args: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(kind.binary())
            .arg(format!("--data-dir={}", dir.path().join("d").display()))
            .arg(format!(
                "--listen-client-urls=http://127.0.0.1:{}",
                support::free_port()
            ))
            .arg(format!(
                "--listen-peer-urls=http://127.0.0.1:{}",
                support::free_port()
            ))
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{}: {args:?} started", kind.label());
        err
    };
    let cases: &[&[&str]] = &[
        &["--feature-gates=NoSuchGate=true"],
        &["--feature-gates=InitialCorruptCheck=maybe"],
        &["--feature-gates=InitialCorruptCheck"],
        &[
            "--experimental-watch-progress-notify-interval=5s",
            "--watch-progress-notify-interval=5s",
        ],
        &[
            "--experimental-corrupt-check-time=1m",
            "--corrupt-check-time=1m",
        ],
        // etcd 3.6 refuses the v2 store's old level in Go's flag words.
        &["--v2-deprecation=not-yet"],
    ];
    for args in cases {
        let etcd = run(support::REFERENCE, args);
        let oxcd = run(Kind::Oxcd, args);
        // etcd's reason: after Go's flag prefix, or the "error" field of its zap line.
        let first = etcd.lines().next().unwrap_or("");
        let reason = match etcd.split_once("-feature-gates: ") {
            Some((_, rest)) => rest.lines().next().unwrap_or("").to_string(),
            None if first.starts_with("invalid value ") => first.to_string(),
            None => {
                let line = etcd
                    .lines()
                    .find(|l| l.contains("failed to verify flags"))
                    .unwrap_or_else(|| panic!("etcd: {args:?}: {etcd}"));
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                v["error"].as_str().unwrap().to_string()
            }
        };
        assert!(
            oxcd.contains(&reason),
            "{args:?}: etcd says {reason:?}, oxcd:\n{oxcd}"
        );
    }
}
