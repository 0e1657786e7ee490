//! The server image, as Kubernetes will run it: a 3-member cluster of containers on docker
//! networks the tests create, each member addressed by name. One test stops a member, one cuts
//! a member off its peers (a partition), and both check that the majority serves, the
//! minority refuses what it must, and everyone converges afterwards.
//!
//! Skipped, with a message saying so, only when no Docker engine answers.

use etcd_client::{Client, GetOptions};
use std::process::Command;
use std::time::{Duration, Instant};

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Removes everything the test created, whatever happens.
struct Cleanup {
    containers: Vec<String>,
    network: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        let _ = docker(&["network", "rm", &self.network]);
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

/// Whether a Docker engine answers; says so when it does not, so a skip is never silent.
fn docker_available(test: &str) -> bool {
    match docker(&["info", "--format", "{{.ServerVersion}}"]) {
        Ok(_) => true,
        Err(e) => {
            eprintln!(
                "SKIPPED: no Docker engine answers, so the {test} test cannot run here ({e})"
            );
            false
        }
    }
}

/// Builds the server image from the binary under test with the project's own script.
fn build_image(tag: &str) {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let build = Command::new("bash")
        .arg(format!("{repo}/scripts/build-image.sh"))
        .arg(tag)
        .env("OXCD", env!("CARGO_BIN_EXE_oxcd"))
        .output()
        .expect("run scripts/build-image.sh");
    assert!(
        build.status.success(),
        "image build failed: {}",
        String::from_utf8_lossy(&build.stderr)
    );
}

async fn client_for(endpoints: &[String]) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(c) = Client::connect(endpoints, None).await {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "could not connect to {endpoints:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the member answers a serializable read of `key` with `value`.
async fn wait_for_value(endpoint: &str, key: &str, value: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(mut c) = Client::connect([endpoint], None).await {
            if let Ok(r) = c
                .get(key, Some(GetOptions::new().with_serializable()))
                .await
            {
                if r.kvs().first().map(|kv| kv.value()) == Some(value.as_bytes()) {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{endpoint} did not reach {key}={value} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_member_cluster_in_containers_survives_a_stopped_member() {
    if !docker_available("container cluster") {
        return;
    }
    let run = format!("oxcdtest{:08x}", rand::random::<u32>());
    let image = format!("oxcd:{run}");
    let network = format!("{run}-net");
    let names: Vec<String> = (1..=3).map(|i| format!("{run}-m{i}")).collect();
    let mut cleanup = Cleanup {
        containers: vec![],
        network: network.clone(),
        image: image.clone(),
    };

    build_image(&image);

    docker(&["network", "create", &network]).unwrap();
    let initial: Vec<String> = names
        .iter()
        .map(|n| format!("{n}=http://{n}:2380"))
        .collect();
    let initial = initial.join(",");
    for n in &names {
        let id = docker(&[
            "run",
            "-d",
            "--name",
            n,
            "--network",
            &network,
            "-p",
            "127.0.0.1::2379",
            &image,
            "--name",
            n,
            "--listen-client-urls",
            "http://0.0.0.0:2379",
            "--advertise-client-urls",
            &format!("http://{n}:2379"),
            "--listen-peer-urls",
            "http://0.0.0.0:2380",
            "--initial-advertise-peer-urls",
            &format!("http://{n}:2380"),
            "--initial-cluster",
            &initial,
            "--initial-cluster-token",
            &run,
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ])
        .unwrap();
        assert!(!id.is_empty());
        cleanup.containers.push(n.clone());
    }
    let endpoints: Vec<String> = names
        .iter()
        .map(|n| {
            docker(&["port", n, "2379"])
                .unwrap()
                .lines()
                .next()
                .unwrap()
                .to_string()
        })
        .collect();

    let mut c = client_for(&endpoints).await;
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
    // Connections made while members were still starting went through docker's port proxy
    // to nothing and may be reset: start a fresh client, and retry transport errors.
    let mut c = client_for(&endpoints).await;
    for i in 0..50 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = c.put(format!("k{i}"), format!("v{i}"), None).await {
            assert!(Instant::now() < deadline, "write {i} kept failing: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Stop the third member; the other two keep serving writes and linearizable reads.
    docker(&["stop", "-t", "1", &names[2]]).unwrap();
    let mut c2 = client_for(&endpoints[..2]).await;
    for i in 50..100 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match c2.put(format!("k{i}"), format!("v{i}"), None).await {
                Ok(_) => break,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "write {i} kept failing with two of three members: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let r = c2
        .get("k", Some(GetOptions::new().with_prefix().with_count_only()))
        .await
        .unwrap();
    assert_eq!(r.count(), 100);

    // Back again: it catches up from the others.
    docker(&["start", &names[2]]).unwrap();
    let ep3 = docker(&["port", &names[2], "2379"])
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    wait_for_value(&ep3, "k99", "v99", Duration::from_secs(30)).await;
    let mut c3 = client_for(&[ep3]).await;
    let r = c3
        .get(
            "k",
            Some(GetOptions::new().with_prefix().with_serializable()),
        )
        .await
        .unwrap();
    assert_eq!(r.kvs().len(), 100, "restarted member has every key");
    drop(cleanup);
}

/// Members on two networks: clients reach them through ports published on the first, peers
/// talk over the second by `<name>-peer` aliases that resolve only there, so disconnecting a
/// member from the peer network partitions it while clients can still reach it.
#[tokio::test(flavor = "multi_thread")]
async fn partitioned_minority_refuses_writes_and_the_cluster_heals() {
    if !docker_available("partition") {
        return;
    }
    let run = format!("oxcdpart{:08x}", rand::random::<u32>());
    let image = format!("oxcd:{run}");
    let client_net = format!("{run}-clients");
    let peer_net = format!("{run}-peers");
    let names: Vec<String> = (1..=3).map(|i| format!("{run}-m{i}")).collect();
    let mut cleanup = Cleanup {
        containers: vec![],
        network: client_net.clone(),
        image: image.clone(),
    };
    build_image(&image);
    docker(&["network", "create", &client_net]).unwrap();
    docker(&["network", "create", &peer_net]).unwrap();
    struct NetGuard(String);
    impl Drop for NetGuard {
        fn drop(&mut self) {
            let _ = docker(&["network", "rm", &self.0]);
        }
    }
    let initial: Vec<String> = names
        .iter()
        .map(|n| format!("{n}=http://{n}-peer:2380"))
        .collect();
    let initial = initial.join(",");
    for n in &names {
        docker(&[
            "create",
            "--name",
            n,
            "--network",
            &client_net,
            "-p",
            "127.0.0.1::2379",
            &image,
            "--name",
            n,
            "--listen-client-urls",
            "http://0.0.0.0:2379",
            "--advertise-client-urls",
            &format!("http://{n}:2379"),
            "--listen-peer-urls",
            "http://0.0.0.0:2380",
            "--initial-advertise-peer-urls",
            &format!("http://{n}-peer:2380"),
            "--initial-cluster",
            &initial,
            "--initial-cluster-token",
            &run,
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ])
        .unwrap();
        cleanup.containers.push(n.clone());
        docker(&[
            "network",
            "connect",
            "--alias",
            &format!("{n}-peer"),
            &peer_net,
            n,
        ])
        .unwrap();
        docker(&["start", n]).unwrap();
    }
    // Containers go before networks: the peer network guard drops after `cleanup`.
    let _peer_guard = NetGuard(peer_net.clone());
    let cleanup = cleanup;
    let endpoints: Vec<String> = names
        .iter()
        .map(|n| {
            docker(&["port", n, "2379"])
                .unwrap()
                .lines()
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut all = client_for(&endpoints).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while all.put("before", "1", None).await.is_err() {
        assert!(Instant::now() < deadline, "cluster never served a write");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for_value(&endpoints[2], "before", "1", Duration::from_secs(10)).await;

    // Cut the third member off its peers.
    docker(&["network", "disconnect", &peer_net, &names[2]]).unwrap();
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
        let deadline = Instant::now() + Duration::from_secs(10);
        while majority
            .put(format!("p{i}"), format!("v{i}"), None)
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "the majority stopped serving writes"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let r = majority.get("p49", None).await.unwrap();
    assert_eq!(r.kvs()[0].value(), b"v49");

    // Heal: the member catches up and serves linearizable reads again.
    docker(&[
        "network",
        "connect",
        "--alias",
        &format!("{}-peer", names[2]),
        &peer_net,
        &names[2],
    ])
    .unwrap();
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
    let counts: Vec<usize> = {
        let mut v = Vec::new();
        for ep in &endpoints {
            let mut c = client_for(std::slice::from_ref(ep)).await;
            let r = c
                .get(
                    "p",
                    Some(GetOptions::new().with_prefix().with_serializable()),
                )
                .await
                .unwrap();
            v.push(r.kvs().len());
        }
        v
    };
    assert_eq!(counts, vec![50, 50, 50], "every member converged");
    drop(cleanup);
}
