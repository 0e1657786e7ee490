//! Linearizability of a 3-member cluster while leaders are killed: concurrent clients on all
//! members run put / get / compare-and-swap on a few keys, every operation's invocation and
//! return is recorded, and the history checker (support/linearizability.rs) must find a
//! linearization. Bounded in time; fails with the offending part of the history.

mod support;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::linearizability::{check, Event, Op};
use support::{Cluster, Kind};

const CLIENTS: usize = 6;
const KEYS: usize = 3;
const RUN_FOR: Duration = Duration::from_secs(12);
const OP_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_under_leader_kills_is_linearizable() {
    let mut cluster = Cluster::start(Kind::Oxcd, 3).await;
    let history: Arc<Mutex<Vec<Event>>> = Arc::default();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        // Each client talks to one member, so followers serve (and forward) too.
        let mut client = cluster.member_client(c % 3).await;
        let history = history.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut last_seen: Vec<Option<String>> = vec![None; KEYS];
            while start.elapsed() < RUN_FOR {
                n += 1;
                let k = (rand::random::<u32>() as usize) % KEYS;
                let key = format!("lin/{k}");
                let choice = rand::random::<u32>() % 3;
                let invoke = Instant::now();
                let (op, ret) = match choice {
                    0 => {
                        let value = format!("c{c}-{n}");
                        let r = tokio::time::timeout(
                            OP_TIMEOUT,
                            client.put(key.as_str(), value.as_str(), None),
                        )
                        .await;
                        let ok = matches!(r, Ok(Ok(_)));
                        (Op::Put { value }, ok.then(Instant::now))
                    }
                    1 => {
                        let r = tokio::time::timeout(
                            OP_TIMEOUT,
                            client.get(key.as_str(), Some(GetOptions::new())),
                        )
                        .await;
                        match r {
                            Ok(Ok(resp)) => {
                                let seen = resp
                                    .kvs()
                                    .first()
                                    .map(|kv| String::from_utf8_lossy(kv.value()).to_string());
                                last_seen[k] = seen.clone();
                                (Op::Get { seen }, Some(Instant::now()))
                            }
                            // A failed read changed nothing: leave it out.
                            _ => continue,
                        }
                    }
                    _ => {
                        let expect = last_seen[k].clone();
                        let value = format!("c{c}-{n}");
                        let cmp = match &expect {
                            Some(v) => Compare::value(key.as_str(), CompareOp::Equal, v.as_str()),
                            None => Compare::version(key.as_str(), CompareOp::Equal, 0),
                        };
                        let txn = Txn::new().when([cmp]).and_then([TxnOp::put(
                            key.as_str(),
                            value.as_str(),
                            None,
                        )]);
                        let r = tokio::time::timeout(OP_TIMEOUT, client.txn(txn)).await;
                        match r {
                            Ok(Ok(resp)) => (
                                Op::Cas {
                                    expect,
                                    value,
                                    swapped: Some(resp.succeeded()),
                                },
                                Some(Instant::now()),
                            ),
                            _ => (
                                Op::Cas {
                                    expect,
                                    value,
                                    swapped: None,
                                },
                                None,
                            ),
                        }
                    }
                };
                history.lock().unwrap().push(Event {
                    client: c,
                    key,
                    op,
                    invoke,
                    ret,
                });
                if ret.is_none() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }

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
    let history = history.lock().unwrap().clone();
    let completed = history.iter().filter(|e| e.ret.is_some()).count();
    let writes = history
        .iter()
        .filter(|e| e.ret.is_some() && !matches!(e.op, Op::Get { .. }))
        .count();
    eprintln!("history: {} operations ({completed} completed, {writes} completed writes), {kills} leader kills", history.len());
    assert!(kills >= 2, "the faults did not happen");
    assert!(
        completed >= 200 && writes >= 50,
        "too few operations completed to mean anything"
    );
    if let Err(violation) = check(&history) {
        panic!("{violation}");
    }
}
