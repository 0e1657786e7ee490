//! Bootstrap (etcd's `etcdserver/bootstrap.go`): open or create the member's data dir (or
//! import an etcd one), recover the store and the Raft log, join or start the cluster, and
//! start the Raft node, the applier and the background tasks.

use super::apply::Applier;
use super::*;
use crate::auth::{self, AuthStore};
use crate::config::Config;
use crate::lease::Lessor;
use crate::membership::{self, Member, Membership};
use crate::mvcc::{self, Store};
use crate::pb::oxcdpb::{peer_client::PeerClient, ClusterInfoRequest};
use crate::raft_node::{self, CommittedBatch, NodeConfig, RaftNode, RaftStatus};
use crate::schema::{
    META_CLUSTER_ID, META_CONF_STATE, META_MEMBER_ID, META_SNAPSHOT_INDEX, META_SNAPSHOT_TERM,
};
use crate::transport::Transport;
use crate::wal::{Replayed, Wal};
use crate::watch::WatchHub;
use parking_lot::Mutex;
use protobuf::Message as _;
use raft::prelude::{
    ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, HardState, SnapshotMetadata,
};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The leader's state as a Raft snapshot, for followers behind its log.
struct StateSnapshots {
    store: Arc<Store>,
    storage: raft::storage::MemStorage,
}

impl crate::transport::SnapshotSource for StateSnapshots {
    fn snapshot(&self) -> std::result::Result<(SnapshotMetadata, mvcc::Records), String> {
        use raft::Storage;
        let (index, records) = self.store.snapshot_copy().map_err(|e| e.to_string())?;
        let term = self
            .storage
            .term(index)
            .map_err(|e| format!("term of {index}: {e}"))?;
        let conf_state = records
            .iter()
            .find(|(k, _)| k.as_slice() == META_CONF_STATE)
            .map(|(_, v)| ConfState::parse_from_bytes(v))
            .transpose()
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        let mut meta = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        meta.set_conf_state(conf_state);
        Ok((meta, records))
    }
}

/// A crash between installing a leader's snapshot and restarting the log at it leaves the
/// state ahead of the log: restart the log at the installed snapshot point.
fn repair_wal(
    store: &Store,
    consistent_index: u64,
    mut wal: Wal,
    replayed: Replayed,
) -> anyhow::Result<(Wal, Replayed)> {
    let last = replayed
        .entries
        .last()
        .map(|e| e.index)
        .unwrap_or(replayed.snapshot.index);
    if consistent_index <= last {
        return Ok((wal, replayed));
    }
    let read = |k: &[u8]| -> anyhow::Result<Option<u64>> {
        Ok(store
            .get_record(k)?
            .map(|v| u64::from_be_bytes(v.as_slice().try_into().unwrap_or_default())))
    };
    let (Some(index), Some(term)) = (read(META_SNAPSHOT_INDEX)?, read(META_SNAPSHOT_TERM)?) else {
        anyhow::bail!("the state is at raft index {consistent_index} but the WAL ends at {last}: the WAL lost committed entries");
    };
    if index != consistent_index {
        anyhow::bail!("the state is at raft index {consistent_index} but the WAL ends at {last}");
    }
    let mut meta = SnapshotMetadata {
        index,
        term,
        ..Default::default()
    };
    if let Some(cs) = store.get_record(META_CONF_STATE)? {
        meta.set_conf_state(ConfState::parse_from_bytes(&cs)?);
    }
    let mut hs = replayed.hard_state.clone();
    hs.term = hs.term.max(term);
    hs.commit = index;
    tracing::warn!(
        index,
        term,
        "finishing an interrupted snapshot install: the log restarts at the snapshot"
    );
    wal.reset_to(meta.clone(), hs.clone())?;
    Ok((
        wal,
        Replayed {
            snapshot: meta,
            hard_state: hs,
            entries: vec![],
        },
    ))
}

fn read_id(store: &Store, key: &[u8]) -> anyhow::Result<u64> {
    let v = store.get_record(key)?.ok_or_else(|| {
        anyhow::anyhow!(
            "data dir has a WAL but no member identity ({})",
            String::from_utf8_lossy(key)
        )
    })?;
    Ok(u64::from_be_bytes(v.as_slice().try_into()?))
}

/// `--force-new-cluster` (etcd's restart as a standalone node): drops the log's uncommitted
/// tail, then appends and commits, on this member alone, the removal of every other member
/// of the configuration the committed log ends with. Replaying them shrinks Raft's
/// configuration to this member, which then elects itself and serves its data.
fn force_new_cluster(
    store: &Store,
    id: u64,
    applied: u64,
    wal: &mut Wal,
    rep: &mut Replayed,
) -> anyhow::Result<()> {
    let committed = rep.hard_state.commit.max(applied).max(rep.snapshot.index);
    let dropped = rep.entries.iter().filter(|e| e.index > committed).count();
    rep.entries.retain(|e| e.index <= committed);
    // The members as of `applied` (the store), then the committed membership changes after it.
    let mut members: BTreeSet<u64> = Membership::load(store)?
        .members()
        .iter()
        .map(|m| m.id)
        .collect();
    for e in rep.entries.iter().filter(|e| e.index > applied) {
        if e.get_entry_type() != EntryType::EntryConfChangeV2 {
            continue;
        }
        let cc = ConfChangeV2::parse_from_bytes(&e.data)?;
        for ch in cc.get_changes() {
            match ch.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    members.insert(ch.node_id);
                }
                ConfChangeType::RemoveNode => {
                    members.remove(&ch.node_id);
                }
            }
        }
    }
    let (last_index, last_term) = rep
        .entries
        .last()
        .map(|e| (e.index, e.term))
        .unwrap_or((rep.snapshot.index, rep.snapshot.term));
    let term = rep.hard_state.term.max(last_term);
    let mut removals = Vec::new();
    // One change per entry: simple membership changes, never a joint configuration.
    for (i, other) in members.iter().filter(|m| **m != id).enumerate() {
        let cc = membership::conf_change(ConfChangeType::RemoveNode, *other, None, 0);
        let e = membership::conf_change_entry(last_index + 1 + i as u64, term, &cc)?;
        removals.push(e);
    }
    let mut hs = rep.hard_state.clone();
    hs.term = term;
    hs.commit = last_index + removals.len() as u64;
    wal.append(&removals, Some(&hs))?;
    wal.sync()?;
    tracing::warn!(
        member_id = %format!("{id:x}"),
        dropped_uncommitted_entries = dropped,
        removed_members = ?members.iter().filter(|m| **m != id).map(|m| format!("{m:x}")).collect::<Vec<_>>(),
        commit = hs.commit,
        "forcing a new cluster of this member alone (--force-new-cluster)"
    );
    rep.entries.extend(removals);
    rep.hard_state = hs;
    Ok(())
}

/// The committed entries every member of a new cluster starts its log with.
fn bootstrap_entries(members: &[Member]) -> anyhow::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let cc = membership::conf_change(ConfChangeType::AddNode, m.id, Some(m.clone()), 0);
        entries.push(membership::conf_change_entry(i as u64 + 1, 1, &cc)?);
    }
    Ok(entries)
}

/// `--initial-cluster-state existing`: ask the members we were given for the cluster's
/// identity and find ourselves (added beforehand with MemberAdd) by our peer URLs.
async fn join_existing(cfg: &Config) -> anyhow::Result<(u64, u64, Vec<Member>)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last_err = String::from("no other member in --initial-cluster");
    while tokio::time::Instant::now() < deadline {
        for (_, urls) in &cfg.initial_cluster {
            if *urls == cfg.initial_advertise_peer_urls {
                continue;
            }
            for url in urls {
                let ch = match crate::tls::peer_channel(url, &cfg.peer_tls, Duration::from_secs(1))
                    .await
                {
                    Ok(ch) => ch,
                    Err(e) => {
                        last_err = e;
                        continue;
                    }
                };
                match PeerClient::new(ch).cluster(ClusterInfoRequest {}).await {
                    Ok(info) => {
                        let info = info.into_inner();
                        let me = info.members.iter().find(|m| {
                            m.peer_ur_ls
                                .iter()
                                .any(|u| cfg.initial_advertise_peer_urls.contains(u))
                        });
                        return match me {
                            // Started before (it published its client URLs) yet its data dir
                            // is empty: its data is lost. Joining would crash on the leader's
                            // first heartbeat (its commit index is beyond this empty log), so
                            // say what happened instead. The operator matches this text.
                            Some(m) if !m.client_ur_ls.is_empty() => anyhow::bail!(
                                "member {:x} has already been bootstrapped: the cluster knows it as started but its data dir is empty (its data is lost); remove it (etcdctl member remove {:x}) and add it again (etcdctl member add) to rejoin with no data",
                                m.id,
                                m.id
                            ),
                            Some(m) => Ok((m.id, info.cluster_id, info.members.clone())),
                            None => anyhow::bail!(
                                "this member's peer URLs {:?} are not in the cluster's member list; add it first (etcdctl member add)",
                                cfg.initial_advertise_peer_urls
                            ),
                        };
                    }
                    Err(e) => last_err = format!("{url}: {}", e.message()),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("could not reach the existing cluster to join it: {last_err}")
}

impl EtcdServer {
    /// Opens or creates the member's data dir, joins or bootstraps the cluster, and starts
    /// Raft, the applier and the peer listener. Must run inside the Tokio runtime.
    pub async fn start(cfg: Config) -> anyhow::Result<Arc<EtcdServer>> {
        let member_dir = cfg.data_dir.join("member");
        if let Some(etcd) = crate::snapshot::etcd_dir::detect(&cfg.data_dir, &cfg.wal_dir) {
            tracing::info!(
                data_dir = %cfg.data_dir.display(),
                "found etcd's data dir (member/snap/db and its WAL); importing it"
            );
            let bcrypt_cost = auth::effective_bcrypt_cost(cfg.bcrypt_cost);
            let i = crate::snapshot::etcd_dir::import(&etcd, bcrypt_cost).map_err(|e| {
                anyhow::anyhow!(
                    "cannot start on etcd's data dir {}: {e}",
                    cfg.data_dir.display()
                )
            })?;
            tracing::info!(
                member_id = %format!("{:x}", i.member_id),
                cluster_id = %format!("{:x}", i.cluster_id),
                index = i.index,
                term = i.term,
                commit = i.commit,
                log_entries = i.entries,
                members = i.members,
                revision = i.revision,
                etcd_wal = %i.etcd_wal.display(),
                "imported etcd's data dir; etcd's own files stay in member/snap and the moved WAL"
            );
        }
        std::fs::create_dir_all(&member_dir)?;
        if let Ok(d) = std::fs::read_dir(member_dir.join("snap")) {
            for e in d.flatten() {
                if e.file_name().to_string_lossy().ends_with(".db.tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let (store, recovered) = Store::open(&member_dir.join("db"))?;
        let fresh = !Wal::exists(&cfg.wal_dir);
        // Members to reach before the log has replayed the member list (a joining member).
        let mut known_peers: Vec<Member> = Vec::new();
        let (id, cluster_id, bootstrap) = if !fresh {
            let id = read_id(&store, META_MEMBER_ID)?;
            let cluster_id = read_id(&store, META_CLUSTER_ID)?;
            (id, cluster_id, Vec::new())
        } else if cfg.new_cluster {
            let mut members = Vec::new();
            for (name, urls) in &cfg.initial_cluster {
                members.push(Member {
                    id: membership::member_id(urls, &cfg.initial_cluster_token, None),
                    name: name.clone(),
                    peer_ur_ls: urls.clone(),
                    client_ur_ls: vec![],
                    is_learner: false,
                });
            }
            let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
            let id = membership::member_id(
                &cfg.initial_advertise_peer_urls,
                &cfg.initial_cluster_token,
                None,
            );
            (id, membership::cluster_id(&ids), members)
        } else {
            let (id, cluster_id, members) = join_existing(&cfg).await?;
            known_peers = members;
            (id, cluster_id, Vec::new())
        };
        let (wal, replayed) = if fresh {
            // Identity first: a WAL without it would be an unusable data dir.
            store.put_record_durable(META_MEMBER_ID, &id.to_be_bytes())?;
            store.put_record_durable(META_CLUSTER_ID, &cluster_id.to_be_bytes())?;
            let meta = SnapshotMetadata::default();
            let mut wal = Wal::create(
                &cfg.wal_dir,
                meta.clone(),
                crate::wal::Metadata {
                    node_id: id,
                    cluster_id,
                },
            )?;
            // Like etcd, a new cluster starts from the same log on every member: one
            // committed AddNode entry per initial member, so that members that join later
            // learn the initial configuration by replaying the log.
            let entries = bootstrap_entries(&bootstrap)?;
            let mut hs = HardState::default();
            if !entries.is_empty() {
                hs.term = 1;
                hs.commit = entries.len() as u64;
            }
            wal.append(&entries, Some(&hs))?;
            wal.sync()?;
            (
                wal,
                Replayed {
                    snapshot: meta,
                    hard_state: hs,
                    entries,
                },
            )
        } else {
            Wal::open(&cfg.wal_dir)?
        };
        let (mut wal, mut replayed) =
            repair_wal(&store, recovered.consistent_index, wal, replayed)?;
        wal.set_max_segments(usize::try_from(cfg.max_wals).unwrap_or(usize::MAX));
        if cfg.force_new_cluster && !fresh {
            force_new_cluster(
                &store,
                id,
                recovered.consistent_index,
                &mut wal,
                &mut replayed,
            )?;
        }
        let applied = recovered.consistent_index.max(replayed.snapshot.index);
        let lessor = Arc::new(Lessor::new(cfg.min_lease_ttl()));
        let tokens = auth::Tokens::from_flag(&cfg.auth_token, cfg.auth_token_ttl)?;
        let auth = Arc::new(AuthStore::new(tokens, cfg.bcrypt_cost));
        let (membership, alarms) = recover(&store, &recovered, &lessor, &auth)?;
        let alarms: Alarms = Arc::new(Mutex::new(alarms));
        if membership.is_removed(id) {
            anyhow::bail!("this member ({id:x}) has been permanently removed from the cluster; start a new member with a fresh data dir");
        }
        let conf_state = match store.get_record(META_CONF_STATE)? {
            Some(b) => Some(ConfState::parse_from_bytes(&b)?),
            None => None,
        };
        tracing::info!(
            member_id = %format!("{id:x}"),
            cluster_id = %format!("{cluster_id:x}"),
            applied,
            wal_entries = replayed.entries.len(),
            revision = store.current_rev(),
            "starting member"
        );

        if cfg.enable_pprof {
            tracing::warn!("--enable-pprof is ignored: oxcd has no Go runtime to profile (use perf, or the metrics at /metrics)");
        }

        let hub = Arc::new(WatchHub::default());
        let raft_status = Arc::new(RaftStatus::default());
        raft_status
            .term
            .store(replayed.hard_state.term, Ordering::Relaxed);
        let waiters = Arc::new(Waiters::default());
        let (raft_tx, raft_rx) = mpsc::channel();
        let (apply_tx, apply_rx) = mpsc::channel::<CommittedBatch>();
        let (applied_tx, applied_rx) = watch::channel(applied);
        let storage = raft_node::build_storage(&replayed, applied, conf_state)?;
        let source = Arc::new(StateSnapshots {
            store: store.clone(),
            storage: storage.clone(),
        });
        let transport = Arc::new(Transport::new(
            cluster_id,
            id,
            Arc::new(raft_tx.clone()),
            tokio::runtime::Handle::current(),
            source,
            Arc::new(cfg.peer_tls.clone()),
        ));
        for m in membership.members() {
            if m.id != id {
                transport.set_peer(m.id, m.peer_ur_ls.clone());
            }
        }
        let self_record = known_peers
            .iter()
            .find(|m| m.id == id)
            .cloned()
            .unwrap_or(Member {
                id,
                name: cfg.name.clone(),
                peer_ur_ls: cfg.initial_advertise_peer_urls.clone(),
                client_ur_ls: cfg.advertise_client_urls.clone(),
                is_learner: false,
            });
        for m in known_peers {
            if m.id != id {
                transport.set_peer(m.id, m.peer_ur_ls.clone());
            }
        }
        let membership = Arc::new(parking_lot::RwLock::new(membership));

        let refuse_waiters = waiters.clone();
        let node = RaftNode::new(
            NodeConfig {
                id,
                election_ticks: cfg.election_ticks,
                heartbeat: cfg.heartbeat,
            },
            storage,
            applied,
            wal,
            raft_rx,
            apply_tx,
            raft_status.clone(),
            transport.clone(),
            Box::new(move |id, err| refuse_waiters.complete(id, Err(err))),
            Box::new({
                let (lessor, election_timeout) = (lessor.clone(), cfg.election_timeout());
                // etcd extends every lease by an election timeout on promotion.
                move |leader| {
                    if leader {
                        lessor.promote(election_timeout)
                    } else {
                        lessor.demote()
                    }
                }
            }),
        )?;
        std::thread::Builder::new()
            .name("raft".into())
            .spawn(move || node.run())?;

        let applier = Applier {
            id,
            store: store.clone(),
            lessor: lessor.clone(),
            auth: auth.clone(),
            hub: hub.clone(),
            waiters: waiters.clone(),
            alarms: alarms.clone(),
            membership: membership.clone(),
            transport: transport.clone(),
            applied_tx,
            raft_tx: raft_tx.clone(),
            applied,
            released: applied,
            snapshot_count: cfg.snapshot_count,
            catchup_entries: cfg.snapshot_catchup_entries,
            warn_apply: cfg.warning_apply_duration,
            compaction_pace: mvcc::CompactionPace {
                batch_limit: cfg.compaction_batch_limit,
                sleep: cfg.compaction_sleep_interval,
            },
        };
        std::thread::Builder::new()
            .name("apply".into())
            .spawn(move || applier.run(apply_rx))?;

        let seed: u64 = rand::random::<u64>() >> 2;
        let cfg_max_streams = cfg.max_concurrent_streams;
        let server = Arc::new(EtcdServer {
            cfg,
            id,
            cluster_id,
            membership,
            transport,
            leader_client: tokio::sync::Mutex::new(None),
            ready_tx: watch::channel(false).0,
            self_record,
            store,
            lessor,
            auth,
            hub,
            raft_status,
            alarms,
            raft_tx,
            waiters,
            next_id: AtomicU64::new(seed.max(1)),
            applied_rx,
            gateway_streams: Arc::new(tokio::sync::Semaphore::new(
                (cfg_max_streams as usize).min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
        });
        server.clone().spawn_lease_expiry();
        server.clone().spawn_auto_compaction();
        server.clone().spawn_publish();
        Ok(server)
    }
}
