//! Linearizability of a 3-member cluster under faults: concurrent clients on all members run
//! put / get / compare-and-swap on a few keys, every operation's invocation and return is
//! recorded, and the history checker (support/linearizability.rs) must find a linearization.
//! One test kills leaders (processes on loopback); one, with members on hosts of their own
//! (network namespaces, support/hosts.rs), also cuts members off their peers (partitions of
//! the leader and of followers), heals them and pauses the leader. Bounded in time; fails with the offending part of the history.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::linearizability::{assert_linearizable, run_client, Event};
use support::{Cluster, Kind, Placement};

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
    const RUN_FOR: Duration = Duration::from_secs(30);
    let mut cluster = Cluster::start_on_hosts(Kind::Oxcd, 3, &[], Placement::Hosts).await;
    let history: Arc<Mutex<Vec<Event>>> = Arc::default();
    let start = Instant::now();
    let until = start + RUN_FOR;
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        clients.push(cluster.member_client(c % 3).await);
    }
    let tasks = spawn_clients(clients, until, &history);

    // Faults, in turn while clients run: the leader cut off from its peers (it must step
    // down while the others elect a new one), the leader killed and restarted, a follower cut
    // off, the leader paused (SIGSTOP: alive, answering nothing). Each heals before the next.
    let (mut partitions, mut kills, mut pauses) = (0, 0, 0);
    let mut round = 0;
    while start.elapsed() + Duration::from_secs(5) < RUN_FOR {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let leader = cluster.leader().await;
        let net = cluster.net.as_ref().unwrap();
        match round % 4 {
            0 => {
                net.isolate(leader);
                partitions += 1;
                tokio::time::sleep(Duration::from_millis(2500)).await;
                net.heal();
            }
            1 => {
                cluster.kill9(leader);
                kills += 1;
                tokio::time::sleep(Duration::from_millis(800)).await;
                cluster.members[leader].respawn();
            }
            2 => {
                let follower = (leader + 1) % 3;
                net.isolate(follower);
                partitions += 1;
                tokio::time::sleep(Duration::from_millis(2500)).await;
                net.heal();
            }
            _ => {
                cluster.members[leader].pause();
                pauses += 1;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                cluster.members[leader].resume();
            }
        }
        round += 1;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        partitions >= 2 && kills >= 1 && pauses >= 1,
        "the faults did not happen"
    );
    let history = history.lock().unwrap().clone();
    assert_linearizable(
        &history,
        &format!("{partitions} partitions, {kills} leader kills, {pauses} leader pauses"),
        150,
        40,
    );
    // Afterwards every member converges: same revision, applied index and HashKV.
    cluster.wait_converged(Duration::from_secs(30)).await;
}
