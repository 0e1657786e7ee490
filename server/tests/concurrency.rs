//! Locks and elections: the `v3lockpb.Lock` and `v3electionpb.Election` services (driven by the
//! etcd-client crate, which uses them) and `etcdctl lock` / `etcdctl elect` (which build the same
//! recipes on the client side). Each scenario runs against real etcd 3.4 and against the
//! subject; the traces of what a client saw must be equal once lease IDs are named by order.

mod support;

use etcd_client::{Client, LeaderKey, LockOptions, ProclaimOptions, ResignOptions};
use std::time::Duration;
use support::{Kind, Server};

/// How long a call that must block is given to (wrongly) return.
const BLOCKED_FOR: Duration = Duration::from_millis(400);
/// Bound on any call that must return.
const RETURNS_WITHIN: Duration = Duration::from_secs(10);

fn err_text(e: &etcd_client::Error) -> String {
    let (code, msg) = support::grpc_error(e);
    format!("{code:?}: {msg}")
}

/// A trace of client-visible outcomes, with each lease ID replaced by its name (L1, L2, ...).
struct Trace {
    lines: Vec<String>,
    leases: Vec<i64>,
}

impl Trace {
    fn new() -> Self {
        Trace {
            lines: vec![],
            leases: vec![],
        }
    }
    fn named(&self, text: String) -> String {
        self.leases.iter().enumerate().fold(text, |t, (i, id)| {
            t.replace(&format!("{id:x}"), &format!("L{}", i + 1))
        })
    }
    fn push(&mut self, line: String) {
        let line = self.named(line);
        self.lines.push(line);
    }
}

async fn grant(c: &mut Client, t: &mut Trace, ttl: i64) -> i64 {
    let id = c.lease_grant(ttl, None).await.expect("lease grant").id();
    t.leases.push(id);
    id
}

/// Awaits `fut`, asserting it is still pending after BLOCKED_FOR; returns it to finish later.
async fn assert_blocks<F: std::future::Future + Unpin>(what: &str, fut: &mut F) {
    if tokio::time::timeout(BLOCKED_FOR, fut).await.is_ok() {
        panic!("{what} returned while it should wait");
    }
}

async fn finish<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(RETURNS_WITHIN, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not return within {RETURNS_WITHIN:?}"))
}

async fn lock_scenario(server: &Server) -> Vec<String> {
    let mut c = server.client().await;
    let mut t = Trace::new();
    let l1 = grant(&mut c, &mut t, 60).await;
    let l2 = grant(&mut c, &mut t, 60).await;
    let l3 = grant(&mut c, &mut t, 60).await;

    let r = c
        .lock("lk", Some(LockOptions::new().with_lease(l1)))
        .await
        .expect("first lock");
    let k1 = r.key().to_vec();
    t.push(format!(
        "lock L1: key={} rev={}",
        String::from_utf8_lossy(&k1),
        r.header().unwrap().revision()
    ));
    assert!(k1.starts_with(b"lk/"), "lock key {k1:?}");

    // Locking again under the same lease re-enters at once with the same key.
    let r = finish(
        "re-lock",
        c.lock("lk", Some(LockOptions::new().with_lease(l1))),
    )
    .await
    .expect("re-lock");
    assert_eq!(r.key(), k1.as_slice());
    t.push(format!(
        "re-lock L1: rev={}",
        r.header().unwrap().revision()
    ));

    // L2 and then L3 queue behind L1, in order.
    let mut c2 = server.client().await;
    let mut c3 = server.client().await;
    let mut second = Box::pin(c2.lock("lk", Some(LockOptions::new().with_lease(l2))));
    assert_blocks("lock L2 while L1 holds", &mut second).await;
    let mut third = Box::pin(c3.lock("lk", Some(LockOptions::new().with_lease(l3))));
    assert_blocks("lock L3 while L1 holds", &mut third).await;

    let u = c.unlock(k1.clone()).await.expect("unlock L1");
    t.push(format!("unlock L1: rev={}", u.header().unwrap().revision()));
    let r = finish("lock L2", second).await.expect("lock L2");
    t.push(format!(
        "lock L2 acquired: key={} rev={}",
        String::from_utf8_lossy(r.key()),
        r.header().unwrap().revision()
    ));
    assert_blocks("lock L3 while L2 holds", &mut third).await;

    // Revoking the holder's lease releases the lock too.
    let rv = c.lease_revoke(l2).await.expect("revoke L2");
    t.push(format!(
        "revoke L2: rev={}",
        rv.header().unwrap().revision()
    ));
    let r = finish("lock L3", third).await.expect("lock L3");
    t.push(format!(
        "lock L3 acquired: key={} rev={}",
        String::from_utf8_lossy(r.key()),
        r.header().unwrap().revision()
    ));

    // Errors.
    let e = c
        .lock("lk2", Some(LockOptions::new().with_lease(0x7777)))
        .await
        .expect_err("lock with a lease that does not exist");
    t.push(format!("lock with missing lease: {}", err_text(&e)));
    let u = c.unlock("no/such/key").await.expect("unlock of no key");
    t.push(format!(
        "unlock missing: rev={}",
        u.header().unwrap().revision()
    ));

    // A waiter that gives up leaves nothing behind: L1 locks at once afterwards... no, L3
    // still holds; after L3 unlocks, L1 gets it without waiting for the gone waiter.
    let l4 = grant(&mut c, &mut t, 60).await;
    let mut c4 = server.client().await;
    let gave_up = tokio::time::timeout(
        BLOCKED_FOR,
        c4.lock("lk", Some(LockOptions::new().with_lease(l4))),
    )
    .await;
    assert!(gave_up.is_err(), "lock L4 returned while L3 holds");
    drop(c4);
    // The server notices the cancel and deletes the waiter's key.
    let gone = async {
        loop {
            let n = c
                .get(
                    "lk/",
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_count_only(),
                    ),
                )
                .await
                .expect("count lock keys")
                .count();
            if n == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    finish("the canceled waiter's key to go", gone).await;
    t.push("canceled waiter's key deleted".to_string());
    c.unlock(r.key().to_vec()).await.expect("unlock L3");
    let r = finish(
        "lock L1 again",
        c.lock("lk", Some(LockOptions::new().with_lease(l1))),
    )
    .await
    .expect("lock L1 again");
    t.push(format!(
        "lock L1 again: key={}",
        String::from_utf8_lossy(r.key())
    ));
    t.lines
}

/// The next leader the observer reports, as `key=value@header revision`.
async fn observed(obs: &mut etcd_client::ObserveStream) -> String {
    let msg = finish("observe", obs.message())
        .await
        .expect("observe stream")
        .expect("observe stream ended");
    let kv = msg.kv().expect("observed kv");
    format!(
        "{}={}@{}",
        kv.key_str().unwrap(),
        kv.value_str().unwrap(),
        msg.header().unwrap().revision()
    )
}

async fn election_scenario(server: &Server) -> Vec<String> {
    let mut c = server.client().await;
    let mut t = Trace::new();
    let l1 = grant(&mut c, &mut t, 60).await;
    let l2 = grant(&mut c, &mut t, 60).await;

    let e = c
        .leader("el")
        .await
        .expect_err("leader of an empty election");
    t.push(format!("leader before any campaign: {}", err_text(&e)));

    let r = c.campaign("el", "a", l1).await.expect("campaign L1");
    let leader1: LeaderKey = r.leader().expect("leader key").clone();
    t.push(format!(
        "campaign L1: name={} key={} rev={} lease=L{} header.rev={}",
        leader1.name_str().unwrap(),
        leader1.key_str().unwrap(),
        leader1.rev(),
        if leader1.lease() == l1 { 1 } else { 0 },
        r.header().unwrap().revision()
    ));
    // (Observe starts once there is a leader: etcd sends a stream's headers with its first
    // message, and the client waits for them.)
    let mut observer = server.client().await;
    let mut obs = observer.observe("el").await.expect("observe");
    let mut seen = vec![observed(&mut obs).await];

    let mut c2 = server.client().await;
    let mut second = Box::pin(c2.campaign("el", "b", l2));
    assert_blocks("campaign L2 while L1 leads", &mut second).await;

    let p = c
        .proclaim(
            "a2",
            Some(ProclaimOptions::new().with_leader(leader1.clone())),
        )
        .await
        .expect("proclaim");
    t.push(format!(
        "proclaim a2: rev={}",
        p.header().unwrap().revision()
    ));
    seen.push(observed(&mut obs).await);
    let l = c.leader("el").await.expect("leader");
    let kv = l.kv().unwrap();
    t.push(format!(
        "leader: {}={} create={} mod={}",
        kv.key_str().unwrap(),
        kv.value_str().unwrap(),
        kv.create_revision(),
        kv.mod_revision()
    ));

    let rs = c
        .resign(Some(ResignOptions::new().with_leader(leader1.clone())))
        .await
        .expect("resign");
    t.push(format!(
        "resign L1: rev={}",
        rs.header().unwrap().revision()
    ));
    let r2 = finish("campaign L2", second).await.expect("campaign L2");
    let leader2 = r2.leader().unwrap().clone();
    t.push(format!(
        "campaign L2 won: key={} rev={} header.rev={}",
        leader2.key_str().unwrap(),
        leader2.rev(),
        r2.header().unwrap().revision()
    ));
    seen.push(observed(&mut obs).await);

    // The old leader key no longer proves anything.
    let e = c
        .proclaim(
            "late",
            Some(ProclaimOptions::new().with_leader(leader1.clone())),
        )
        .await
        .expect_err("proclaim with a resigned leader key");
    t.push(format!("proclaim after resign: {}", err_text(&e)));
    let rs = c
        .resign(Some(ResignOptions::new().with_leader(leader1.clone())))
        .await
        .expect("resign twice");
    t.push(format!(
        "resign again: rev={}",
        rs.header().unwrap().revision()
    ));

    // Campaigning again under a lease that already leads with another value proclaims it.
    let r = c.campaign("el", "b2", l2).await.expect("campaign L2 again");
    t.push(format!(
        "campaign L2 again: rev={} header.rev={}",
        r.leader().unwrap().rev(),
        r.header().unwrap().revision()
    ));

    seen.push(observed(&mut obs).await);
    // Every leader value in order.
    t.push(format!("observed: {}", seen.join(" ")));
    let values: Vec<&str> = seen
        .iter()
        .map(|s| s.split('=').nth(1).unwrap().split('@').next().unwrap())
        .collect();
    assert_eq!(values, ["a", "a2", "b", "b2"]);

    let e = c
        .proclaim("x", None)
        .await
        .expect_err("proclaim without a leader key");
    t.push(format!("proclaim without leader: {}", err_text(&e)));
    t.lines
}

#[tokio::test]
async fn lock_service_matches_etcd() {
    support::require_etcd();
    let (etcd, subject) = tokio::join!(Server::start(Kind::Etcd), Server::start(Kind::subject()));
    let (want, got) = tokio::join!(lock_scenario(&etcd), lock_scenario(&subject));
    assert_eq!(got, want, "lock trace differs from etcd's");
}

#[tokio::test]
async fn election_service_matches_etcd() {
    support::require_etcd();
    let (etcd, subject) = tokio::join!(Server::start(Kind::Etcd), Server::start(Kind::subject()));
    let (want, got) = tokio::join!(election_scenario(&etcd), election_scenario(&subject));
    assert_eq!(got, want, "election trace differs from etcd's");
}

/// Reads the next stdout line of an etcdctl process, with a bound.
async fn next_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> String {
    finish("an etcdctl output line", lines.next_line())
        .await
        .expect("read etcdctl output")
        .expect("etcdctl ended without printing")
}

fn stdout_lines(
    child: &mut tokio::process::Child,
) -> tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>> {
    use tokio::io::AsyncBufReadExt;
    tokio::io::BufReader::new(child.stdout.take().expect("piped stdout")).lines()
}

/// Replaces the hex lease ID after `name/` with `<lease>`.
fn lease_free(line: &str, name: &str) -> String {
    match line.strip_prefix(&format!("{name}/")) {
        Some(hex) if !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()) => {
            format!("{name}/<lease>")
        }
        _ => line.to_string(),
    }
}

/// `etcdctl lock` and `etcdctl elect`: the lock passes to a waiter when the holder's session
/// expires; the next candidate leads once the leader resigns; an observer sees each in turn.
async fn etcdctl_scenario(server: &Server) -> Vec<String> {
    let mut t = vec![];
    let mut holder = server.spawn_etcdctl(&["lock", "--ttl=2", "cmdlock"]);
    let mut holder_out = stdout_lines(&mut holder);
    t.push(lease_free(&next_line(&mut holder_out).await, "cmdlock"));

    let mut waiter = server.spawn_etcdctl(&["lock", "cmdlock", "echo", "got-it"]);
    let waited = tokio::time::timeout(BLOCKED_FOR, waiter.wait()).await;
    assert!(
        waited.is_err(),
        "etcdctl lock returned while another holds the lock"
    );
    holder.start_kill().expect("kill the holder");
    let out = finish("the waiter to get the lock", waiter.wait_with_output())
        .await
        .expect("waiter output");
    assert!(out.status.success(), "waiter failed: {out:?}");
    t.push(format!(
        "waiter: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    ));

    let mut leader = server.spawn_etcdctl(&["elect", "cmdelect", "p1"]);
    let mut leader_out = stdout_lines(&mut leader);
    t.push(lease_free(&next_line(&mut leader_out).await, "cmdelect"));
    t.push(next_line(&mut leader_out).await);

    let mut observer = server.spawn_etcdctl(&["elect", "-l", "cmdelect"]);
    let mut observed = stdout_lines(&mut observer);
    for _ in 0..2 {
        t.push(format!(
            "observer: {}",
            lease_free(&next_line(&mut observed).await, "cmdelect")
        ));
    }
    let mut next = server.spawn_etcdctl(&["elect", "cmdelect", "p2"]);
    let mut next_out = stdout_lines(&mut next);
    let early = tokio::time::timeout(BLOCKED_FOR, next_out.next_line()).await;
    assert!(
        early.is_err(),
        "a second candidate was elected while p1 leads: {early:?}"
    );
    // On an interrupt, `etcdctl elect` resigns.
    let pid = leader.id().expect("leader pid").to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -INT {pid}");
    t.push(format!(
        "next: {}",
        lease_free(&next_line(&mut next_out).await, "cmdelect")
    ));
    t.push(format!("next: {}", next_line(&mut next_out).await));
    for _ in 0..2 {
        t.push(format!(
            "observer: {}",
            lease_free(&next_line(&mut observed).await, "cmdelect")
        ));
    }
    t
}

#[tokio::test]
async fn etcdctl_lock_and_elect_match_etcd() {
    support::require_etcd();
    let (etcd, subject) = tokio::join!(Server::start(Kind::Etcd), Server::start(Kind::subject()));
    let (want, got) = tokio::join!(etcdctl_scenario(&etcd), etcdctl_scenario(&subject));
    assert_eq!(
        want,
        [
            "cmdlock/<lease>",
            "waiter: got-it",
            "cmdelect/<lease>",
            "p1",
            "observer: cmdelect/<lease>",
            "observer: p1",
            "next: cmdelect/<lease>",
            "next: p2",
            "observer: cmdelect/<lease>",
            "observer: p2",
        ],
        "etcd's own trace"
    );
    assert_eq!(got, want, "etcdctl lock/elect trace differs from etcd's");
}
