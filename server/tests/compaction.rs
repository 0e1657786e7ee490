//! `--auto-compaction-mode periodic`: history older than the retention window is compacted
//! without anyone asking, as etcd's periodic compactor does.

mod support;

use etcd_client::GetOptions;
use std::time::{Duration, Instant};
use support::{Kind, Server};

#[tokio::test(flavor = "multi_thread")]
async fn periodic_auto_compaction_compacts_history_older_than_the_retention() {
    let server = Server::start_with(
        Kind::Oxcd,
        &[
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "2s",
        ],
    )
    .await;
    let mut c = server.client().await;
    let first = c
        .put("k", "v1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.put("k", "v2", None).await.unwrap();
    c.put("k", "v3", None).await.unwrap();
    // Old revisions stay readable until the retention has passed...
    let r = c
        .get("k", Some(GetOptions::new().with_revision(first)))
        .await
        .unwrap();
    assert_eq!(r.kvs()[0].value(), b"v1");
    // ...and are compacted after it, bounded in time.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match c
            .get("k", Some(GetOptions::new().with_revision(first)))
            .await
        {
            Err(e) => {
                let (code, msg) = support::grpc_error(&e);
                assert_eq!(code, tonic::Code::OutOfRange, "{msg}");
                assert_eq!(
                    msg,
                    "etcdserver: mvcc: required revision has been compacted"
                );
                break;
            }
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "revision {first} still readable 15s later"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    // The latest value survives compaction.
    let r = c.get("k", None).await.unwrap();
    assert_eq!(r.kvs()[0].value(), b"v3");
}
