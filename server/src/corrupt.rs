//! Corruption checks (etcd's `corrupt.go`): members compare HashKV at the same revision, since
//! a replicated key space must hash the same everywhere. `--experimental-initial-corrupt-check`
//! refuses to start a member whose data differs from its peers'; with
//! `--experimental-corrupt-check-time` the leader checks the members periodically and raises
//! the CORRUPT alarm for a member that differs, which stops every write (`etcdserver: corrupt
//! cluster`) until an operator disarms it.

use crate::error::EtcdError;
use crate::etcdserver::EtcdServer;
use crate::pb::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmType, HashKvRequest, HashKvResponse,
    ResponseHeader,
};
use crate::pb::oxcdpb::raft_request::Request;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How long a peer has to answer with its hash.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// This member's HashKV at `rev` (0: the current revision), computed off the async threads.
pub async fn hash_kv(server: &EtcdServer, rev: i64) -> Result<HashKvResponse, EtcdError> {
    let store = server.store.clone();
    let (hash, current, compact) = tokio::task::spawn_blocking(move || store.hash_kv(rev))
        .await
        .map_err(|e| EtcdError::Internal(format!("hash: {e}")))??;
    let mut resp = HashKvResponse {
        header: Some(ResponseHeader {
            revision: current,
            ..Default::default()
        }),
        hash,
        compact_revision: compact,
        // The revision hashed: the one asked for, or the current one for 0 (etcd 3.6).
        hash_revision: if rev == 0 { current } else { rev },
    };
    server.fill(&mut resp.header);
    Ok(resp)
}

/// One peer's answer to "your HashKV at revision r".
struct PeerHash {
    id: u64,
    result: Result<HashKvResponse, tonic::Status>,
}

/// Asks every other member for its HashKV at `rev`, all at once.
async fn peer_hashes(server: &EtcdServer, rev: i64) -> Vec<PeerHash> {
    let peers: Vec<(u64, Vec<String>)> = server
        .membership
        .read()
        .members()
        .into_iter()
        .filter(|m| m.id != server.id)
        .map(|m| (m.id, m.peer_ur_ls))
        .collect();
    let tls = &server.cfg.peer_tls;
    let asks = peers.into_iter().map(|(id, urls)| async move {
        let ask = async {
            let mut c = crate::transport::connect_peer(&urls, tls)
                .await
                .ok_or_else(|| tonic::Status::unavailable(format!("cannot reach {urls:?}")))?;
            Ok(c.hash_kv(HashKvRequest { revision: rev })
                .await?
                .into_inner())
        };
        let result = tokio::time::timeout(PEER_TIMEOUT, ask)
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in time")));
        PeerHash { id, result }
    });
    futures::future::join_all(asks).await
}

fn id_hex(id: u64) -> String {
    format!("{id:x}")
}

/// Logs why a peer's hash could not be compared (etcd's wording).
fn log_unanswered(local: u64, p: &PeerHash, e: &tonic::Status) {
    let why = match e.message() {
        m if m.contains("future revision") => "cannot fetch hash from slow remote peer",
        m if m.contains("has been compacted") => {
            "cannot fetch hash from remote peer; local member is behind"
        }
        _ => "cannot fetch hash from remote peer",
    };
    tracing::warn!(
        local_member_id = %id_hex(local),
        remote_peer_id = %id_hex(p.id),
        error = %e.message(),
        "{why}"
    );
}

/// `--experimental-initial-corrupt-check`: before this member serves anyone, its HashKV must
/// equal every reachable peer's at the same revision and compaction. Peers that cannot answer
/// are logged and skipped, as on etcd.
pub async fn initial_check(server: &EtcdServer) -> anyhow::Result<()> {
    tracing::info!(local_member_id = %id_hex(server.id), "starting initial corruption check");
    let own = hash_kv(server, 0).await?;
    let rev = own.header.as_ref().map_or(0, |h| h.revision);
    let mut mismatches = 0;
    for p in peer_hashes(server, rev).await {
        match &p.result {
            Ok(r) if r.compact_revision == own.compact_revision && r.hash != own.hash => {
                tracing::error!(
                    local_member_id = %id_hex(server.id),
                    local_member_hash = own.hash,
                    remote_peer_id = %id_hex(p.id),
                    remote_peer_hash = r.hash,
                    revision = rev,
                    compact_revision = own.compact_revision,
                    "found different hash values from remote peer"
                );
                mismatches += 1;
            }
            Ok(r) if r.compact_revision != own.compact_revision => tracing::warn!(
                local_member_id = %id_hex(server.id),
                remote_peer_id = %id_hex(p.id),
                local_compact_revision = own.compact_revision,
                remote_compact_revision = r.compact_revision,
                "found different compact revision values from remote peer; hashes not compared"
            ),
            Ok(_) => {}
            Err(e) => log_unanswered(server.id, &p, e),
        }
    }
    if mismatches > 0 {
        anyhow::bail!("{} found data inconsistency with peers", id_hex(server.id));
    }
    tracing::info!(
        local_member_id = %id_hex(server.id),
        "initial corruption checking passed; no corruption"
    );
    Ok(())
}

/// `--experimental-corrupt-check-time`: while this member leads, checks every member each
/// `interval` and raises CORRUPT for any whose data differs.
pub async fn periodic_check(server: Arc<EtcdServer>, interval: Duration) {
    tracing::info!(
        local_member_id = %id_hex(server.id),
        interval = ?interval,
        "enabled corruption checking"
    );
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if !server.raft_status.is_leader.load(Ordering::Relaxed)
            || server.has_alarm(AlarmType::Corrupt)
        {
            continue;
        }
        if let Err(e) = check_members(&server).await {
            tracing::warn!(error = %e, "corruption check failed to run");
        }
    }
}

/// One leader-side check (etcd's `checkHashKV`): hash locally, ask the peers at that revision,
/// hash locally again, then judge each answer.
async fn check_members(server: &EtcdServer) -> Result<(), EtcdError> {
    let before = hash_kv(server, 0).await?;
    let rev = before.header.as_ref().map_or(0, |h| h.revision);
    let peers = peer_hashes(server, rev).await;
    let after = hash_kv(server, 0).await?;
    let rev_after = after.header.as_ref().map_or(0, |h| h.revision);
    let mut corrupt = Vec::new();
    // The leader's own data changed under it without a new revision.
    if after.hash != before.hash
        && rev_after == rev
        && after.compact_revision == before.compact_revision
    {
        tracing::error!(
            revision = rev,
            "the leader's own hash changed at the same revision"
        );
        corrupt.push(server.id);
    }
    for p in &peers {
        let r = match &p.result {
            Ok(r) => r,
            Err(e) => {
                log_unanswered(server.id, p, e);
                continue;
            }
        };
        let peer_rev = r.header.as_ref().map_or(0, |h| h.revision);
        let why = if peer_rev > rev_after {
            Some("the peer is at a revision the leader has not reached")
        } else if r.compact_revision > after.compact_revision {
            Some("the peer compacted a revision the leader has not")
        } else if r.compact_revision == before.compact_revision && r.hash != before.hash {
            Some("hash mismatch at the same revision")
        } else {
            None
        };
        if let Some(why) = why {
            tracing::error!(
                leader_hash = before.hash,
                remote_peer_id = %id_hex(p.id),
                remote_peer_hash = r.hash,
                revision = rev,
                remote_revision = peer_rev,
                compact_revision = before.compact_revision,
                remote_compact_revision = r.compact_revision,
                "found data inconsistency: {why}"
            );
            corrupt.push(p.id);
        }
    }
    for id in corrupt {
        let req = AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: id,
            alarm: AlarmType::Corrupt as i32,
        };
        server.propose(Request::Alarm(req)).await?;
    }
    Ok(())
}
