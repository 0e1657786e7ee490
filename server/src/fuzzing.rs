//! The decoders a client or a peer reaches, each as a function of untrusted bytes. The fuzz
//! targets in `fuzz/` (cargo-fuzz, libFuzzer: `scripts/fuzz.sh`) and the bounded run in the
//! unit tests below (every CI run) call these same functions. Each must return for any input:
//! a panic, an abort or a hang is a bug.

use crate::pb::etcdserverpb::TxnRequest;
use crate::pb::nesting::{self, Root};
use crate::pb::oxcdpb::{raft_request, PeerMessage, RaftRequest};
use prost::Message as _;
use protobuf::Message as _;
use std::path::PathBuf;

/// A client's Txn as the KV service takes it: the codec's nesting measure, the decode, etcd's
/// request checks; what passes must survive the trip into a Raft entry and back.
pub fn grpc_txn(data: &[u8]) {
    if nesting::too_deep(data, Root::Txn) {
        return;
    }
    let Ok(txn) = TxnRequest::decode(data) else {
        return;
    };
    if crate::api::key::check_txn(&txn, 128).is_err() {
        return;
    }
    let entry = RaftRequest {
        id: 1,
        request: Some(raft_request::Request::Txn(txn)),
        ..Default::default()
    }
    .encode_to_vec();
    assert!(
        !nesting::too_deep(&entry, Root::Entry),
        "an accepted Txn measures too deep as an entry"
    );
    if let Err(e) = RaftRequest::decode(entry.as_slice()) {
        panic!("an accepted Txn does not decode as an entry: {e}");
    }
}

/// A committed log entry as the applier decodes it.
pub fn raft_entry(data: &[u8]) {
    if !nesting::too_deep(data, Root::Entry) {
        let _ = RaftRequest::decode(data);
    }
}

/// A peer's message as the peer service decodes it: the envelope, then raft's message.
pub fn peer_message(data: &[u8]) {
    let _ = raft::prelude::Message::parse_from_bytes(data);
    if let Ok(m) = PeerMessage::decode(data) {
        let _ = raft::prelude::Message::parse_from_bytes(&m.message);
    }
}

/// A scratch directory for one input, removed afterwards.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Scratch {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "oxcd-fuzz-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::create_dir_all(&dir);
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A WAL segment as a restart reads it.
pub fn wal_segment(data: &[u8]) {
    let dir = Scratch::new("wal");
    if std::fs::write(dir.0.join("0000000000000000-0000000000000000.wal"), data).is_ok() {
        let _ = crate::wal::Wal::open(&dir.0);
    }
}

/// A backend file (etcd's bbolt format) as `snapshot restore` and `snapshot status` read it.
pub fn backend_file(data: &[u8]) {
    let dir = Scratch::new("db");
    let path = dir.0.join("db");
    if std::fs::write(&path, data).is_ok() {
        let _ = crate::snapshot::bolt::read(&path);
    }
}

/// Inputs made from `seeds` for a run without libFuzzer: each seed as it is, then bit flips,
/// byte changes, cuts, repeats of a slice and splices of two seeds, from `rng_seed`.
pub fn mutations(seeds: &[Vec<u8>], rng_seed: u64) -> impl Iterator<Item = Vec<u8>> + '_ {
    let mut state = rng_seed | 1;
    let mut next = move || {
        // xorshift64*: enough to vary inputs; no cryptographic need.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut i = 0usize;
    std::iter::from_fn(move || {
        i += 1;
        if i <= seeds.len() {
            return Some(seeds[i - 1].clone());
        }
        let mut v = seeds[next() as usize % seeds.len()].clone();
        for _ in 0..1 + next() % 4 {
            let at = |n: u64, len: usize| if len == 0 { 0 } else { n as usize % len };
            match next() % 6 {
                0 if !v.is_empty() => {
                    let p = at(next(), v.len());
                    v[p] ^= 1 << (next() % 8);
                }
                1 if !v.is_empty() => {
                    let p = at(next(), v.len());
                    v[p] = [0, 0x7f, 0x80, 0xff][next() as usize % 4];
                }
                2 => v.truncate(at(next(), v.len() + 1)),
                3 if !v.is_empty() => {
                    let a = at(next(), v.len());
                    let b = (a + 1 + at(next(), 64)).min(v.len());
                    let slice = v[a..b].to_vec();
                    for _ in 0..1 + next() % 8 {
                        v.splice(a..a, slice.iter().copied());
                    }
                }
                4 => {
                    let other = &seeds[next() as usize % seeds.len()];
                    let cut = at(next(), other.len() + 1);
                    let p = at(next(), v.len() + 1);
                    v.splice(p..p, other[cut..].iter().copied());
                }
                _ => v.push(next() as u8),
            }
        }
        Some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::etcdserverpb::{request_op, Compare, PutRequest, RangeRequest, RequestOp};
    use std::time::{Duration, Instant};

    /// How long each target runs in every test run (CI included); `scripts/fuzz.sh` runs
    /// them under libFuzzer for longer.
    const BUDGET: Duration = Duration::from_secs(8);

    fn run(target: fn(&[u8]), seeds: Vec<Vec<u8>>, rng_seed: u64) -> usize {
        let until = Instant::now() + BUDGET;
        let mut n = 0;
        for input in mutations(&seeds, rng_seed) {
            if Instant::now() >= until {
                break;
            }
            target(&input);
            n += 1;
        }
        eprintln!("{n} inputs in {BUDGET:?}");
        n
    }

    fn txn_seeds() -> Vec<Vec<u8>> {
        let put = RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                lease: 7,
                ..Default::default()
            })),
        };
        let range = RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: b"a".to_vec(),
                range_end: b"z".to_vec(),
                ..Default::default()
            })),
        };
        let inner = TxnRequest {
            compare: vec![Compare {
                key: b"k".to_vec(),
                ..Default::default()
            }],
            success: vec![put.clone(), range.clone()],
            failure: vec![range],
        };
        let outer = TxnRequest {
            success: vec![
                put,
                RequestOp {
                    request: Some(request_op::Request::RequestTxn(inner.clone())),
                },
            ],
            ..Default::default()
        };
        vec![inner.encode_to_vec(), outer.encode_to_vec()]
    }

    #[test]
    fn client_txns_and_log_entries_survive_mutations() {
        let seeds = txn_seeds();
        assert!(run(grpc_txn, seeds.clone(), 1) > 1000);
        let entries = seeds
            .iter()
            .map(|t| {
                RaftRequest {
                    id: 9,
                    request: Some(raft_request::Request::Txn(
                        TxnRequest::decode(&t[..]).unwrap(),
                    )),
                    username: "root".into(),
                    ..Default::default()
                }
                .encode_to_vec()
            })
            .collect();
        assert!(run(raft_entry, entries, 2) > 1000);
    }

    #[test]
    fn peer_messages_survive_mutations() {
        let mut m = raft::prelude::Message::default();
        m.set_msg_type(raft::prelude::MessageType::MsgAppend);
        m.from = 1;
        m.to = 2;
        m.term = 3;
        let mut e = raft::prelude::Entry::default();
        e.data = b"payload".to_vec().into();
        m.entries = vec![e].into();
        let raw = m.write_to_bytes().unwrap();
        let wrapped = PeerMessage {
            cluster_id: 5,
            message: raw.clone(),
        }
        .encode_to_vec();
        assert!(run(peer_message, vec![raw, wrapped], 3) > 1000);
    }

    #[test]
    fn wal_segments_and_backend_files_survive_mutations() {
        let dir = Scratch::new("seed");
        let wal_dir = dir.0.join("wal");
        let mut wal = crate::wal::Wal::create(
            &wal_dir,
            raft::prelude::SnapshotMetadata::default(),
            crate::wal::Metadata::default(),
        )
        .unwrap();
        let mut e = raft::prelude::Entry::default();
        e.index = 1;
        e.term = 1;
        e.data = b"x".to_vec().into();
        wal.append(&[e], None).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let segment = std::fs::read_dir(&wal_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "wal"))
            .unwrap();
        assert!(run(wal_segment, vec![std::fs::read(segment).unwrap()], 4) > 100);

        let (store, _) = crate::mvcc::Store::open(&dir.0.join("store")).unwrap();
        let db = dir.0.join("db");
        crate::snapshot::write_backend(&store, &db).unwrap();
        assert!(run(backend_file, vec![std::fs::read(db).unwrap()], 5) > 10);
    }
}
