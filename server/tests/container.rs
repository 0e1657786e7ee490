//! The server image, as Kubernetes will run it: a 3-member cluster of containers on docker
//! networks the tests create, each member addressed by name. One test stops a member, one cuts
//! a member off its peers (a partition), and both check that the majority serves, the
//! minority refuses what it must, and everyone converges afterwards.
//!
//! Skipped, with a message saying so, only when no Docker engine answers.

mod support;

use etcd_client::GetOptions;
use std::time::{Duration, Instant};
use support::docker::{client_for, docker_available, wait_for_value, DockerCluster};

/// Retries a write until it succeeds (connections made while members start may be reset by
/// docker's port proxy), within `within`.
async fn put_retrying(c: &mut etcd_client::Client, key: String, value: String, within: Duration) {
    let deadline = Instant::now() + within;
    while let Err(e) = c.put(key.as_str(), value.as_str(), None).await {
        assert!(Instant::now() < deadline, "write {key} kept failing: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_member_cluster_in_containers_survives_a_stopped_member() {
    if !docker_available("container cluster") {
        return;
    }
    let cluster = DockerCluster::start(3, false).await;
    let names = cluster.names.clone();
    let endpoints = cluster.endpoints.clone();

    let mut c = cluster.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let members = loop {
        if let Ok(r) = c.member_list().await {
            if r.members().iter().all(|m| !m.client_urls().is_empty()) && r.members().len() == 3 {
                break r;
            }
        }
        assert!(Instant::now() < deadline, "members never all started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Members are known by their container names, as StatefulSet pods are by DNS.
    for n in &names {
        assert!(members
            .members()
            .iter()
            .any(|m| m.name() == n && m.peer_urls() == [format!("http://{n}:2380")]));
    }
    let mut c = cluster.client().await;
    for i in 0..50 {
        put_retrying(
            &mut c,
            format!("k{i}"),
            format!("v{i}"),
            Duration::from_secs(10),
        )
        .await;
    }

    // Stop the third member; the other two keep serving writes and linearizable reads.
    cluster.stop(2);
    let mut c2 = client_for(&endpoints[..2]).await;
    for i in 50..100 {
        put_retrying(
            &mut c2,
            format!("k{i}"),
            format!("v{i}"),
            Duration::from_secs(10),
        )
        .await;
    }
    let r = c2
        .get("k", Some(GetOptions::new().with_prefix().with_count_only()))
        .await
        .unwrap();
    assert_eq!(r.count(), 100);

    // Back again: it catches up from the others.
    cluster.restart(2);
    wait_for_value(&endpoints[2], "k99", "v99", Duration::from_secs(30)).await;
    let mut c3 = client_for(&endpoints[2..]).await;
    let r = c3
        .get(
            "k",
            Some(GetOptions::new().with_prefix().with_serializable()),
        )
        .await
        .unwrap();
    assert_eq!(r.kvs().len(), 100, "restarted member has every key");
}

#[tokio::test(flavor = "multi_thread")]
async fn partitioned_minority_refuses_writes_and_the_cluster_heals() {
    if !docker_available("partition") {
        return;
    }
    let cluster = DockerCluster::start(3, true).await;
    let endpoints = cluster.endpoints.clone();
    let mut all = cluster.client().await;
    put_retrying(
        &mut all,
        "before".into(),
        "1".into(),
        Duration::from_secs(30),
    )
    .await;
    wait_for_value(&endpoints[2], "before", "1", Duration::from_secs(10)).await;

    // Cut the third member off its peers.
    cluster.partition(2);
    // Give it time to notice it lost the leader (check-quorum / election timeout).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut minority = client_for(&endpoints[2..]).await;
    let w = tokio::time::timeout(Duration::from_secs(8), minority.put("cut-off", "x", None)).await;
    assert!(
        !matches!(w, Ok(Ok(_))),
        "the partitioned member accepted a write: {w:?}"
    );
    let r = tokio::time::timeout(Duration::from_secs(8), minority.get("before", None)).await;
    assert!(
        !matches!(r, Ok(Ok(_))),
        "the partitioned member served a linearizable read: {r:?}"
    );
    let s = minority
        .get("before", Some(GetOptions::new().with_serializable()))
        .await
        .expect("serializable read on the minority");
    assert_eq!(s.kvs()[0].value(), b"1");

    // The majority keeps serving.
    let mut majority = client_for(&endpoints[..2]).await;
    for i in 0..50 {
        put_retrying(
            &mut majority,
            format!("p{i}"),
            format!("v{i}"),
            Duration::from_secs(10),
        )
        .await;
    }
    let r = majority.get("p49", None).await.unwrap();
    assert_eq!(r.kvs()[0].value(), b"v49");

    // Heal: the member catches up and serves linearizable reads again.
    cluster.heal(2);
    wait_for_value(&endpoints[2], "p49", "v49", Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Ok(r)) =
            tokio::time::timeout(Duration::from_secs(3), minority.get("p49", None)).await
        {
            assert_eq!(r.kvs()[0].value(), b"v49");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "healed member never served a linearizable read"
        );
    }
    // Every member converges: same revision and the same HashKV.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut seen = Vec::new();
        for ep in &endpoints {
            let mut c = client_for(std::slice::from_ref(ep)).await;
            let h = c
                .hash_kv(0)
                .await
                .ok()
                .map(|h| (h.header().unwrap().revision(), h.hash()));
            seen.push(h);
        }
        if seen.iter().all(|h| h.is_some() && *h == seen[0]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "members did not converge: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
