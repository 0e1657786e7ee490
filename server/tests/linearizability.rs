//! Linearizability of a 3-member cluster under faults: concurrent clients on all members run
//! put / get / compare-and-swap on a few keys, every operation's invocation and return is
//! recorded, and the history checker (support/linearizability.rs) must find a linearization.
//! One test kills leaders (processes on loopback); one, with containers on docker networks,
//! also cuts members off their peers (partitions of the leader and of followers) and heals
//! them. Bounded in time; fails with the offending part of the history.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::docker::{client_for, docker_available, DockerCluster};
use support::linearizability::{assert_linearizable, run_client, Event};
use support::{Cluster, Kind};

const CLIENTS: usize = 6;
const KEYS: usize = 3;
const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts the workload of every client (client `c` is numbered `c` in the history).
fn spawn_clients(
    clients: Vec<etcd_client::Client>,
    until: Instant,
    history: &Arc<Mutex<Vec<Event>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    clients
        .into_iter()
        .enumerate()
        .map(|(c, client)| {
            tokio::spawn(run_client(
                c,
                client,
                KEYS,
                until,
                OP_TIMEOUT,
                history.clone(),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_under_leader_kills_is_linearizable() {
    const RUN_FOR: Duration = Duration::from_secs(12);
    let mut cluster = Cluster::start(Kind::Oxcd, 3).await;
    let history: Arc<Mutex<Vec<Event>>> = Arc::default();
    let start = Instant::now();
    let until = start + RUN_FOR;
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        // Each client talks to one member, so followers serve (and forward) too.
        clients.push(cluster.member_client(c % 3).await);
    }
    let tasks = spawn_clients(clients, until, &history);

    // Faults: kill the leader with SIGKILL, bring it back, again, while clients run.
    let mut kills = 0;
    while start.elapsed() + Duration::from_secs(3) < RUN_FOR {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let leader = cluster.leader().await;
        cluster.kill9(leader);
        kills += 1;
        tokio::time::sleep(Duration::from_millis(800)).await;
        cluster.restart(leader).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(kills >= 2, "the faults did not happen");
    let history = history.lock().unwrap().clone();
    assert_linearizable(&history, &format!("{kills} leader kills"), 200, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_under_partitions_and_leader_kills_is_linearizable() {
    if !docker_available("linearizability under partitions") {
        return;
    }
    const RUN_FOR: Duration = Duration::from_secs(24);
    let cluster = DockerCluster::start(3, true).await;
    // Wait until the cluster serves before the clock starts.
    let mut c = cluster.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.put("lin/ready", "1", None).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the cluster never served a write"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.wait_leader(Duration::from_secs(10)).await;

    let history: Arc<Mutex<Vec<Event>>> = Arc::default();
    let start = Instant::now();
    let until = start + RUN_FOR;
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        clients.push(client_for(&cluster.endpoints[c % 3..c % 3 + 1]).await);
    }
    let tasks = spawn_clients(clients, until, &history);

    // Faults, in turn while clients run: the leader cut off from its peers (it must step
    // down while the others elect a new one), the leader killed and restarted, a follower cut
    // off. Each partition heals before the next fault.
    let (mut partitions, mut kills) = (0, 0);
    let mut round = 0;
    while start.elapsed() + Duration::from_secs(5) < RUN_FOR {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        match round % 3 {
            0 => {
                cluster.partition(leader);
                partitions += 1;
                tokio::time::sleep(Duration::from_millis(2500)).await;
                cluster.heal(leader);
            }
            1 => {
                cluster.kill(leader);
                kills += 1;
                tokio::time::sleep(Duration::from_millis(800)).await;
                cluster.restart(leader);
            }
            _ => {
                let follower = (leader + 1) % 3;
                cluster.partition(follower);
                partitions += 1;
                tokio::time::sleep(Duration::from_millis(2500)).await;
                cluster.heal(follower);
            }
        }
        round += 1;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(partitions >= 2 && kills >= 1, "the faults did not happen");
    let history = history.lock().unwrap().clone();
    assert_linearizable(
        &history,
        &format!("{partitions} partitions, {kills} leader kills"),
        150,
        40,
    );
}
