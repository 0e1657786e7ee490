//! Clusters of the server image as containers on docker networks the test creates, so members
//! have their own hosts and names (as StatefulSet pods do) and can be stopped, killed or cut
//! off. Clients reach members through ports published on 127.0.0.1 (fixed per member, so a
//! restarted container keeps its endpoint). With a separate peer network, members talk to
//! each other as `<name>-peer`, a name that resolves only there: disconnecting a member from
//! that network partitions it from its peers while clients still reach it.
//!
//! Everything created (containers, networks, image) is removed on drop.

use etcd_client::{Client, GetOptions};
use std::process::Command;
use std::time::{Duration, Instant};

pub fn docker(args: &[&str]) -> Result<String, String> {
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

/// Whether a Docker engine answers; says so when it does not, so a skip is never silent.
pub fn docker_available(test: &str) -> bool {
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

/// A client that retries connecting while members start (docker's port proxy accepts before
/// the member listens).
pub async fn client_for(endpoints: &[String]) -> Client {
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
pub async fn wait_for_value(endpoint: &str, key: &str, value: &str, within: Duration) {
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

pub struct DockerCluster {
    pub names: Vec<String>,
    /// Client endpoints (127.0.0.1:port), by member.
    pub endpoints: Vec<String>,
    image: String,
    client_net: String,
    /// The network peers talk over, when it is not the client network.
    peer_net: Option<String>,
}

impl DockerCluster {
    /// Builds the image and starts `n` members. With `peer_network`, peer traffic goes over a
    /// second network (so `partition` can cut it); otherwise members use their container names.
    pub async fn start(n: usize, peer_network: bool) -> DockerCluster {
        let run = format!("oxcdtest{:08x}", rand::random::<u32>());
        let names: Vec<String> = (1..=n).map(|i| format!("{run}-m{i}")).collect();
        let mut cluster = DockerCluster {
            endpoints: vec![],
            image: format!("oxcd:{run}"),
            client_net: format!("{run}-clients"),
            peer_net: peer_network.then(|| format!("{run}-peers")),
            names: names.clone(),
        };
        build_image(&cluster.image);
        docker(&["network", "create", &cluster.client_net]).unwrap();
        if let Some(p) = &cluster.peer_net {
            docker(&["network", "create", p]).unwrap();
        }
        let peer_host = |n: &str| {
            if peer_network {
                format!("{n}-peer")
            } else {
                n.to_string()
            }
        };
        let initial: Vec<String> = names
            .iter()
            .map(|n| format!("{n}=http://{}:2380", peer_host(n)))
            .collect();
        let initial = initial.join(",");
        for n in &names {
            let port = super::free_port();
            let publish = format!("127.0.0.1:{port}:2379");
            let advertise = format!("http://{n}:2379");
            let peer_url = format!("http://{}:2380", peer_host(n));
            docker(&[
                "create",
                "--name",
                n,
                "--network",
                &cluster.client_net,
                "-p",
                &publish,
                &cluster.image,
                "--name",
                n,
                "--listen-client-urls",
                "http://0.0.0.0:2379",
                "--advertise-client-urls",
                &advertise,
                "--listen-peer-urls",
                "http://0.0.0.0:2380",
                "--initial-advertise-peer-urls",
                &peer_url,
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
            cluster.endpoints.push(format!("127.0.0.1:{port}"));
            if let Some(net) = &cluster.peer_net {
                let alias = format!("{n}-peer");
                docker(&["network", "connect", "--alias", &alias, net, n]).unwrap();
            }
        }
        for n in &names {
            docker(&["start", n]).unwrap();
        }
        cluster
    }

    fn index(&self, name: &str) -> usize {
        self.names.iter().position(|n| n == name).unwrap()
    }

    /// Cuts member `i` off its peers (clients still reach it).
    pub fn partition(&self, i: usize) {
        let net = self
            .peer_net
            .as_ref()
            .expect("a cluster with a peer network");
        docker(&["network", "disconnect", "-f", net, &self.names[i]]).unwrap();
    }

    /// Reconnects member `i` to its peers.
    pub fn heal(&self, i: usize) {
        let net = self
            .peer_net
            .as_ref()
            .expect("a cluster with a peer network");
        let alias = format!("{}-peer", self.names[i]);
        docker(&["network", "connect", "--alias", &alias, net, &self.names[i]]).unwrap();
    }

    /// Stops member `i` gracefully (one second, then SIGKILL).
    pub fn stop(&self, i: usize) {
        docker(&["stop", "-t", "1", &self.names[i]]).unwrap();
    }

    /// Kills member `i` with SIGKILL.
    pub fn kill(&self, i: usize) {
        docker(&["kill", &self.names[i]]).unwrap();
    }

    pub fn restart(&self, i: usize) {
        docker(&["start", &self.names[i]]).unwrap();
    }

    pub async fn client(&self) -> Client {
        client_for(&self.endpoints).await
    }

    /// The member the others report as leader, asked through each member's own endpoint.
    pub async fn leader(&self) -> Option<usize> {
        for ep in &self.endpoints {
            let Ok(Ok(mut c)) =
                tokio::time::timeout(Duration::from_secs(1), Client::connect([ep.as_str()], None))
                    .await
            else {
                continue;
            };
            let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(1), c.status()).await else {
                continue;
            };
            if st.leader() == 0 {
                continue;
            }
            // Map the leader's member ID to a container by name.
            let Ok(Ok(list)) = tokio::time::timeout(Duration::from_secs(1), c.member_list()).await
            else {
                continue;
            };
            if let Some(m) = list.members().iter().find(|m| m.id() == st.leader()) {
                if self.names.iter().any(|n| n == m.name()) {
                    return Some(self.index(m.name()));
                }
            }
        }
        None
    }

    /// Waits until some member is leader.
    pub async fn wait_leader(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader().await {
                return l;
            }
            assert!(Instant::now() < deadline, "no leader within {within:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for DockerCluster {
    fn drop(&mut self) {
        for c in &self.names {
            let _ = docker(&["rm", "-f", c]);
        }
        let _ = docker(&["network", "rm", &self.client_net]);
        if let Some(p) = &self.peer_net {
            let _ = docker(&["network", "rm", p]);
        }
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}
