//! Hostile clients (issue 25): what a careless or malicious client sends that no honest test
//! does. Every probe runs against real etcd 3.6 and against oxcd; after each, the server must
//! be alive, answer Status, and still hold the 100 keys written before the probes, intact.
//! (Codes and messages of single bad requests are compared in `bad_input.rs`.)

mod support;

use etcd_client::{Client, GetOptions, WatchOptions};
use oxcd::pb::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request, RangeRequest,
    WatchCreateRequest, WatchRequest,
};
use std::time::Duration;
use support::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEYS: usize = 100;

/// `host:port` of a URL.
fn addr(url: &str) -> String {
    url.split("://").nth(1).unwrap_or(url).to_string()
}

async fn write_keys(c: &mut Client) {
    for i in 0..KEYS {
        c.put(format!("intact/{i:03}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
}

/// Alive, answering, and with every key as written.
async fn assert_healthy(server: &mut Server, after: &str) {
    let l = server.kind.label();
    assert!(server.is_running(), "{l}: died after {after}");
    let mut c = tokio::time::timeout(Duration::from_secs(10), server.client())
        .await
        .unwrap_or_else(|_| panic!("{l}: no connection after {after}"));
    let ep = server.endpoint();
    tokio::time::timeout(Duration::from_secs(10), c.status())
        .await
        .unwrap_or_else(|_| panic!("{l}: Status hangs after {after}"))
        .unwrap_or_else(|e| panic!("{l}: Status fails after {after} ({ep}): {e}"));
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        c.get("intact/", Some(GetOptions::new().with_prefix())),
    )
    .await
    .unwrap_or_else(|_| panic!("{l}: Range hangs after {after}"))
    .unwrap();
    assert_eq!(got.kvs().len(), KEYS, "{l}: keys lost after {after}");
    for (i, kv) in got.kvs().iter().enumerate() {
        assert_eq!(kv.value(), format!("v{i}").as_bytes(), "{l}: after {after}");
    }
}

/// Sends `bytes` on a new connection to `to`, reads what comes back for a moment, closes.
async fn send_raw(to: &str, bytes: &[u8], hold: Duration) {
    let Ok(mut s) = TcpStream::connect(to).await else {
        return;
    };
    let _ = s.write_all(bytes).await;
    let mut buf = vec![0u8; 4096];
    let _ = tokio::time::timeout(hold, async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

fn garbage(n: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// An HTTP/2 connection that has said its preface and an empty SETTINGS frame.
async fn h2_preface(to: &str) -> TcpStream {
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_and_broken_protocols_on_client_and_peer_ports() {
    for mut server in support::both(&[]).await {
        let mut c = server.client().await;
        write_keys(&mut c).await;
        let client = addr(&server.endpoint());
        let peer = addr(&server.peer_url());
        let short = Duration::from_millis(300);
        for (seed, to) in [(1, &client), (2, &peer)] {
            send_raw(to, &garbage(64 << 10, seed), short).await;
        }
        assert_healthy(&mut server, "random bytes").await;
        // A truncated preface, left hanging, and HTTP/1.1 nonsense.
        for to in [&client, &peer] {
            send_raw(to, b"PRI * HTTP/2.0\r\n", short).await;
            send_raw(
                to,
                b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                short,
            )
            .await;
            send_raw(
                to,
                b"POST /raft/stream/msgapp/1 HTTP/1.1\r\n\r\n\xff\xff",
                short,
            )
            .await;
        }
        assert_healthy(&mut server, "truncated prefaces and bad HTTP/1.1").await;
        // After the preface: a HEADERS frame of garbage, and a frame claiming 16 MiB.
        for seed in 3..6 {
            let mut s = h2_preface(&client).await;
            let mut frame = vec![0, 0x40, 0, 1, 0x5, 0, 0, 0, 1];
            frame.extend(garbage(0x4000, seed));
            let _ = s.write_all(&frame).await;
            let _ = s.write_all(&[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 3]).await;
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(short, s.read(&mut buf)).await;
        }
        assert_healthy(&mut server, "garbage HTTP/2 frames").await;
    }
}

/// A gRPC message whose length prefix says 100 MiB and whose body never comes (or is cut).
#[tokio::test(flavor = "multi_thread")]
async fn a_100_mib_length_prefix_is_refused_without_reading_it() {
    for mut server in support::both(&[]).await {
        let mut c = server.client().await;
        write_keys(&mut c).await;
        let tcp = TcpStream::connect(addr(&server.endpoint())).await.unwrap();
        let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::post("/etcdserverpb.KV/Range")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (resp, mut body) = send.send_request(req, false).unwrap();
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&(100u32 << 20).to_be_bytes());
        prefix.extend_from_slice(&[0x0a; 1024]);
        let _ = body.send_data(prefix.into(), true);
        let answer = tokio::time::timeout(Duration::from_secs(10), resp).await;
        let l = server.kind.label();
        let status = answer
            .unwrap_or_else(|_| panic!("{l}: no answer to a 100 MiB prefix"))
            .ok()
            .and_then(|r| {
                r.headers()
                    .get("grpc-status")
                    .map(|v| v.to_str().unwrap().to_string())
            });
        // RESOURCE_EXHAUSTED (8) in the headers, or in trailers after them: never served.
        assert_ne!(
            status.as_deref(),
            Some("0"),
            "{l}: a 100 MiB prefix was served"
        );
        assert_healthy(&mut server, "a 100 MiB length prefix").await;
    }
}

/// 10,000 watches on one stream, then 1,000 concurrent streams on one connection, then 1,000
/// idle connections.
#[tokio::test(flavor = "multi_thread")]
async fn floods_of_watches_streams_and_connections() {
    for mut server in support::both(&[]).await {
        let l = server.kind.label();
        let mut c = server.client().await;
        write_keys(&mut c).await;

        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let mut w = WatchClient::connect(server.endpoint()).await.unwrap();
        let sender = tokio::spawn(async move {
            for i in 0..10_000u32 {
                let create = WatchCreateRequest {
                    key: format!("flood/{i}").into_bytes(),
                    ..Default::default()
                };
                let req = WatchRequest {
                    request_union: Some(watch_request::RequestUnion::CreateRequest(create)),
                };
                if tx.send(req).await.is_err() {
                    break;
                }
            }
            tx
        });
        let mut stream = w
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut created = 0;
        let counting = async {
            while let Ok(Some(r)) = stream.message().await {
                if r.created {
                    created += 1;
                    if created == 10_000 {
                        break;
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), counting)
            .await
            .unwrap_or_else(|_| panic!("{l}: 10,000 watches not all created"));
        assert_eq!(created, 10_000, "{l}: the watch stream ended early");
        drop(sender.await);
        drop(stream);
        assert_healthy(&mut server, "10,000 watches on one stream").await;

        let ch = server.channel().await;
        let ranges = (0..1000).map(|_| {
            let mut kv = KvClient::new(ch.clone());
            async move {
                kv.range(RangeRequest {
                    key: b"intact/000".to_vec(),
                    ..Default::default()
                })
                .await
            }
        });
        let answers =
            tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(ranges))
                .await
                .unwrap_or_else(|_| panic!("{l}: 1,000 streams on one connection hang"));
        assert!(answers.iter().all(|a| a.is_ok()), "{l}: a stream failed");
        assert_healthy(&mut server, "1,000 streams on one connection").await;

        let to = addr(&server.endpoint());
        let mut idle = Vec::new();
        for _ in 0..1000 {
            idle.push(TcpStream::connect(&to).await.unwrap());
        }
        assert_healthy(&mut server, "1,000 idle connections").await;
        drop(idle);
    }
}

/// A watcher that never reads while a writer fills its stream, and requests at revisions that
/// do not exist (future, negative) and leases at the extremes of their TTL.
#[tokio::test(flavor = "multi_thread")]
async fn slow_watchers_odd_revisions_and_lease_extremes() {
    for mut server in support::both(&[]).await {
        let l = server.kind.label();
        let mut c = server.client().await;
        write_keys(&mut c).await;

        // Never read: the server must buffer or drop it, not grow without end or stall writes.
        let mut slow = server.client().await;
        let _unread = slow
            .watch("slow/", Some(WatchOptions::new().with_prefix()))
            .await
            .unwrap();
        let value = "x".repeat(64 << 10);
        for i in 0..300 {
            tokio::time::timeout(
                Duration::from_secs(10),
                c.put(format!("slow/{i}"), value.clone(), None),
            )
            .await
            .unwrap_or_else(|_| panic!("{l}: writes stall behind a slow watcher"))
            .unwrap();
        }
        assert_healthy(&mut server, "a watcher that never reads").await;

        let rev = c.status().await.unwrap().header().unwrap().revision();
        for r in [rev + 1, rev + 1_000_000, i64::MAX, -1, i64::MIN] {
            let _ = c
                .get("intact/000", Some(GetOptions::new().with_revision(r)))
                .await;
            let _ = c
                .watch("intact/", Some(WatchOptions::new().with_start_revision(r)))
                .await;
        }
        assert_healthy(&mut server, "future and negative revisions").await;

        for ttl in [i64::MAX, i64::MIN, -1, 0, 1, 9_000_000_000] {
            if let Ok(g) = c.lease_grant(ttl, None).await {
                let _ = c.lease_keep_alive(g.id()).await;
                let _ = c.lease_time_to_live(g.id(), None).await;
                let _ = c.lease_revoke(g.id()).await;
            }
        }
        for id in [i64::MAX, i64::MIN, -1, 0] {
            let _ = c
                .lease_grant(5, Some(etcd_client::LeaseGrantOptions::new().with_id(id)))
                .await;
            let _ = c.lease_revoke(id).await;
        }
        assert_healthy(&mut server, "lease TTL and ID extremes").await;
    }
}
