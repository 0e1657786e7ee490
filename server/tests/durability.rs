//! Crash durability: every acknowledged write must survive `kill -9`, a torn
//! WAL tail must be truncated on restart, and a corrupt record in the middle
//! of the WAL must stop the server from starting (non-zero exit, "corrupt").
//!
//! The WAL tests know the on-disk framing: oxcd writes `*.wal` segments in
//! `<data-dir>/member/wal/` made of records `[u32 LE length][u32 CRC32][payload]`;
//! etcd (used when `OXCD_TEST_SERVER=etcd`) uses `[u64 LE length|padding flag]`
//! frames in the same directory. Parsing the segment lets the tests put
//! damage exactly where they mean to (after the last record, or inside a
//! record that is followed by valid ones).

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use support::{Kind, Server};

const PREFIX: &str = "dur/";

#[derive(Clone, Debug)]
struct Acked {
    key: String,
    value: String,
    rev: i64,
}

/// Runs `writers` concurrent put loops (each key written once) until `stop`
/// is set, a put fails (the server died), or the per-writer bounds are hit.
/// Returns the handles; acknowledged puts are appended to `acked`.
async fn start_writers(
    server: &Server,
    round: usize,
    writers: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut handles = Vec::new();
    for w in 0..writers {
        let mut client = server.client().await;
        let stop = stop.clone();
        let acked = acked.clone();
        handles.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            for seq in 0..20_000u32 {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let key = format!("{PREFIX}r{round}/w{w}/{seq:06}");
                // Values vary in size so records straddle buffer boundaries.
                let value = format!(
                    "{round}-{w}-{seq}-{}",
                    "x".repeat((seq as usize * 37) % 300)
                );
                let put = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.put(key.clone(), value.clone(), None),
                );
                match put.await {
                    Ok(Ok(resp)) => {
                        let rev = resp.header().expect("put header").revision();
                        acked.lock().unwrap().push(Acked { key, value, rev });
                    }
                    // Errors are expected once the server is killed.
                    _ => break,
                }
            }
        }));
    }
    handles
}

/// Checks every acknowledged write is present with its value and revision.
/// Returns the number of keys present that were never acknowledged (writes
/// in flight when the server died may or may not have been applied).
async fn verify(client: &mut Client, acked: &[Acked]) -> usize {
    let resp = client
        .get(PREFIX, Some(GetOptions::new().with_prefix()))
        .await
        .expect("range over written keys after restart");
    let present: HashMap<String, (String, i64, i64, i64)> = resp
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                (
                    kv.value_str().unwrap().to_string(),
                    kv.mod_revision(),
                    kv.create_revision(),
                    kv.version(),
                ),
            )
        })
        .collect();
    let mut missing = Vec::new();
    for a in acked {
        match present.get(&a.key) {
            None => missing.push(a.key.clone()),
            Some((v, m, c, ver)) => {
                assert_eq!(v, &a.value, "wrong value for acknowledged key {}", a.key);
                assert_eq!(
                    (*m, *c, *ver),
                    (a.rev, a.rev, 1),
                    "wrong revisions for {}",
                    a.key
                );
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost after restart, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
    // Revisions of acknowledged writes are unique (each put is one revision).
    let mut revs: Vec<i64> = acked.iter().map(|a| a.rev).collect();
    revs.sort();
    let before = revs.len();
    revs.dedup();
    assert_eq!(before, revs.len(), "two acknowledged puts share a revision");
    present.len() - acked.len()
}

/// A new write after restart must get a revision above everything already
/// acknowledged: the revision counter must not go backwards.
async fn assert_revision_moves_forward(client: &mut Client, acked: &[Acked]) {
    let max = acked.iter().map(|a| a.rev).max().unwrap_or(0);
    let resp = client
        .put("probe", "after-restart", None)
        .await
        .expect("put after restart");
    let rev = resp.header().unwrap().revision();
    assert!(
        rev > max,
        "revision went backwards after restart: new put got {rev}, acknowledged max {max}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_writes_survive_kill9_under_load() {
    const ROUNDS: usize = 3;
    const WRITERS: usize = 4;
    let mut server = Server::start(Kind::subject()).await;
    let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
    let mut extras = 0;
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = start_writers(&server, round, WRITERS, stop.clone(), acked.clone()).await;
        // Let the load run, then pull the plug mid-flight.
        let before = acked.lock().unwrap().len();
        let load_deadline = Instant::now() + Duration::from_secs(10);
        tokio::time::sleep(Duration::from_millis(700 + 300 * round as u64)).await;
        // Make sure this round actually acknowledged something before killing.
        while acked.lock().unwrap().len() < before + 20 && Instant::now() < load_deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            tokio::time::timeout(Duration::from_secs(30), h)
                .await
                .expect("writer did not stop after the server was killed")
                .expect("writer task panicked");
        }
        let round_acked = acked.lock().unwrap().len() - before;
        assert!(
            round_acked >= 20,
            "round {round}: only {round_acked} puts acknowledged before the kill"
        );

        server.restart().await;
        let mut client = server.client().await;
        let snapshot = acked.lock().unwrap().clone();
        extras = verify(&mut client, &snapshot).await;
        assert!(
            extras <= WRITERS * (round + 1),
            "{extras} unacknowledged keys present; at most one in-flight put per writer per crash is possible"
        );
        eprintln!("round {round}: {round_acked} acknowledged this round, {} total, {extras} in-flight extras", snapshot.len());
    }
    let mut client = server.client().await;
    let all = acked.lock().unwrap().clone();
    assert_revision_moves_forward(&mut client, &all).await;
    // And a clean restart (SIGTERM) keeps everything too.
    server.stop();
    server.restart().await;
    let mut client = server.client().await;
    let extras_after = verify(&mut client, &all).await;
    assert_eq!(
        extras_after, extras,
        "keys appeared or vanished across a clean restart"
    );
}

// ---------------------------------------------------------------------------
// WAL surgery

/// One framed record in a WAL segment.
#[derive(Debug, Clone, Copy)]
struct Rec {
    /// Offset and length of the payload (the bytes covered by the CRC).
    payload: usize,
    len: usize,
    /// Offset just past the frame (including etcd's padding).
    end: usize,
}

/// Parses etcd's WAL framing (which oxcd writes too) until the data ends, a zero length
/// (preallocated space), or a frame that runs past the end of the file.
fn parse_wal(data: &[u8]) -> Vec<Rec> {
    let mut recs = Vec::new();
    let mut off = 0usize;
    while off + 8 <= data.len() {
        let field = u64::from_le_bytes(data[off..off + 8].try_into().unwrap());
        let len = (field & !(0xffu64 << 56)) as usize;
        let pad = if field >> 63 == 1 {
            ((field >> 56) & 0x7) as usize
        } else {
            0
        };
        if len == 0 || off + 8 + len + pad > data.len() {
            break;
        }
        recs.push(Rec {
            payload: off + 8,
            len,
            end: off + 8 + len + pad,
        });
        off += 8 + len + pad;
    }
    recs
}

fn wal_segments(dir: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read WAL dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segs.sort();
    assert!(!segs.is_empty(), "no *.wal segments in {}", dir.display());
    segs
}

/// The newest segment and its parsed records; asserts the file follows the
/// documented framing (so the damage below lands where intended).
fn newest_segment(server: &Server) -> (PathBuf, Vec<u8>, Vec<Rec>) {
    let path = wal_segments(&server.wal_dir()).pop().unwrap();
    let data = std::fs::read(&path).unwrap();
    let recs = parse_wal(&data);
    let end = recs.last().map_or(0, |r| r.end);
    assert!(
        !recs.is_empty() && data[end..].iter().all(|b| *b == 0),
        "{} does not follow the documented WAL framing (or a torn tail was not truncated): parsed {} records ending at {end} of {} bytes",
        path.display(),
        recs.len(),
        data.len()
    );
    (path, data, recs)
}

async fn put_n(server: &Server, prefix: &str, n: usize) -> Vec<Acked> {
    let mut client = server.client().await;
    let mut out = Vec::new();
    for i in 0..n {
        let key = format!("{PREFIX}{prefix}{i:04}");
        let value = format!("value-{prefix}-{i}-{}", "y".repeat(i % 50));
        let resp = client
            .put(key.clone(), value.clone(), None)
            .await
            .expect("put");
        out.push(Acked {
            key,
            value,
            rev: resp.header().unwrap().revision(),
        });
    }
    out
}

fn write_at(path: &Path, offset: usize, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset as u64)).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn torn_wal_tail_is_truncated_on_restart() {
    let mut server = Server::start(Kind::subject()).await;
    let mut acked = put_n(&server, "t1-", 40).await;
    server.kill9();

    // 1. A partial record: a header promising 1000 bytes, then only 10.
    let (path, _, recs) = newest_segment(&server);
    let tail = recs.last().unwrap().end;
    let mut partial = 1000u64.to_le_bytes().to_vec();
    partial.extend_from_slice(b"0123456789");
    write_at(&path, tail, &partial);
    server.restart().await;
    let mut client = server.client().await;
    assert_eq!(verify(&mut client, &acked).await, 0);
    // The log must be writable again after truncation, and those writes
    // must be durable too.
    acked.extend(put_n(&server, "t2-", 30).await);
    server.kill9();

    if server.kind == Kind::Etcd {
        // etcd repairs torn records but refuses arbitrary garbage at the tail
        // ("wal: max entry size limit exceeded"); the steps below are oxcd's
        // own, stricter contract, so the etcd validation run stops here.
        server.restart().await;
        let mut client = server.client().await;
        assert_eq!(verify(&mut client, &acked).await, 0);
        return;
    }

    // 2. Plain garbage shorter than a record header.
    let (path, _, recs) = newest_segment(&server);
    write_at(
        &path,
        recs.last().unwrap().end,
        &[0xde, 0xad, 0xbe, 0xef, 0x01],
    );
    server.restart().await;
    let mut client = server.client().await;
    assert_eq!(verify(&mut client, &acked).await, 0);
    acked.extend(put_n(&server, "t3-", 10).await);
    server.kill9();

    // 3. Garbage appended at the very end of the file (past any
    //    preallocated space) as well as a torn header at the tail.
    let (path, data, recs) = newest_segment(&server);
    write_at(&path, recs.last().unwrap().end, &[0x07, 0x00]);
    write_at(
        &path,
        data.len(),
        b"\xff\xfe garbage after the end \x00\x01",
    );
    server.restart().await;
    let mut client = server.client().await;
    assert_eq!(verify(&mut client, &acked).await, 0);
    assert_revision_moves_forward(&mut client, &acked).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_wal_record_in_the_middle_fails_startup() {
    let mut server = Server::start(Kind::subject()).await;
    let acked = put_n(&server, "c-", 60).await;
    assert_eq!(acked.len(), 60);
    server.kill9();

    let (path, data, recs) = newest_segment(&server);
    assert!(
        recs.len() >= 5,
        "expected several WAL records, found {}",
        recs.len()
    );
    // A record in the middle, followed by at least two intact ones.
    let victim_idx = recs.len() / 2;
    let victim = recs[victim_idx];
    assert!(
        recs.len() - victim_idx > 2,
        "need two intact records after the victim"
    );
    // Flip the payload's last byte (for etcd: inside the entry data, which
    // its record CRC covers); the frame lengths stay intact, so the records
    // after it still parse.
    let at = victim.payload + victim.len - 1;
    write_at(&path, at, &[data[at] ^ 0xff]);
    let after = std::fs::read(&path).unwrap();
    assert_eq!(
        parse_wal(&after).len(),
        recs.len(),
        "framing must survive the flip"
    );

    let (status, log) = server.restart_expect_exit(Duration::from_secs(20)).await;
    let status = status.unwrap_or_else(|| {
        panic!(
            "server kept running with a corrupt record in the middle of its WAL\n--- log ---\n{}",
            support::tail(&log, 30)
        )
    });
    assert!(
        !status.success(),
        "server exited successfully despite WAL corruption: {status}"
    );
    if server.kind == Kind::Oxcd {
        assert!(
            log.to_lowercase().contains("corrupt"),
            "startup failure should say \"corrupt\"; log was:\n{}",
            support::tail(&log, 30)
        );
    } else {
        // etcd reports a CRC mismatch instead; only the refusal is common.
        assert!(log.contains("crc mismatch"), "{}", support::tail(&log, 30));
    }
}
