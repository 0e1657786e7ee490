//! The server image, as Kubernetes will run it: a 3-member cluster of containers on a docker
//! network, each member addressed by its container name. One member is stopped, writes and
//! reads go on, it is started again and catches up.
//!
//! Skipped, with a message saying so, only when no Docker engine answers.

use etcd_client::{Client, GetOptions};
use std::process::Command;
use std::time::{Duration, Instant};

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker").args(args).output().map_err(|e| format!("docker {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("docker {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
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

async fn client_for(endpoints: &[String]) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(c) = Client::connect(endpoints, None).await {
            return c;
        }
        assert!(Instant::now() < deadline, "could not connect to {endpoints:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the member answers a serializable read of `key` with `value`.
async fn wait_for_value(endpoint: &str, key: &str, value: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(mut c) = Client::connect([endpoint], None).await {
            if let Ok(r) = c.get(key, Some(GetOptions::new().with_serializable())).await {
                if r.kvs().first().map(|kv| kv.value()) == Some(value.as_bytes()) {
                    return;
                }
            }
        }
        assert!(Instant::now() < deadline, "{endpoint} did not reach {key}={value} within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_member_cluster_in_containers_survives_a_stopped_member() {
    if let Err(e) = docker(&["info", "--format", "{{.ServerVersion}}"]) {
        eprintln!("SKIPPED: no Docker engine answers, so the container cluster test cannot run here ({e})");
        return;
    }
    let run = format!("oxcdtest{:08x}", rand::random::<u32>());
    let image = format!("oxcd:{run}");
    let network = format!("{run}-net");
    let names: Vec<String> = (1..=3).map(|i| format!("{run}-m{i}")).collect();
    let mut cleanup = Cleanup { containers: vec![], network: network.clone(), image: image.clone() };

    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let build = Command::new("bash")
        .arg(format!("{repo}/scripts/build-image.sh"))
        .arg(&image)
        .env("OXCD", env!("CARGO_BIN_EXE_oxcd"))
        .output()
        .expect("run scripts/build-image.sh");
    assert!(build.status.success(), "image build failed: {}", String::from_utf8_lossy(&build.stderr));

    docker(&["network", "create", &network]).unwrap();
    let initial: Vec<String> = names.iter().map(|n| format!("{n}=http://{n}:2380")).collect();
    let initial = initial.join(",");
    for n in &names {
        let id = docker(&[
            "run", "-d", "--name", n, "--network", &network, "-p", "127.0.0.1::2379", &image,
            "--name", n,
            "--listen-client-urls", "http://0.0.0.0:2379",
            "--advertise-client-urls", &format!("http://{n}:2379"),
            "--listen-peer-urls", "http://0.0.0.0:2380",
            "--initial-advertise-peer-urls", &format!("http://{n}:2380"),
            "--initial-cluster", &initial,
            "--initial-cluster-token", &run,
            "--heartbeat-interval", "50", "--election-timeout", "500",
        ])
        .unwrap();
        assert!(!id.is_empty());
        cleanup.containers.push(n.clone());
    }
    let endpoints: Vec<String> = names
        .iter()
        .map(|n| docker(&["port", n, "2379"]).unwrap().lines().next().unwrap().to_string())
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
        assert!(members.members().iter().any(|m| m.name() == n && m.peer_urls() == [format!("http://{n}:2380")]));
    }
    for i in 0..50 {
        c.put(format!("k{i}"), format!("v{i}"), None).await.unwrap();
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
                    assert!(Instant::now() < deadline, "write {i} kept failing with two of three members: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let r = c2.get("k", Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap();
    assert_eq!(r.count(), 100);

    // Back again: it catches up from the others.
    docker(&["start", &names[2]]).unwrap();
    let ep3 = docker(&["port", &names[2], "2379"]).unwrap().lines().next().unwrap().to_string();
    wait_for_value(&ep3, "k99", "v99", Duration::from_secs(30)).await;
    let mut c3 = client_for(&[ep3]).await;
    let r = c3.get("k", Some(GetOptions::new().with_prefix().with_serializable())).await.unwrap();
    assert_eq!(r.kvs().len(), 100, "restarted member has every key");
    drop(cleanup);
}
