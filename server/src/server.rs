//! The etcd server: wires the Raft node, the applier, the MVCC store, the lessor and watch,
//! and offers the API layer three things: propose a write and wait for its applied result,
//! pass a linearizable read barrier (ReadIndex), and fill response headers.

use crate::apply;
use crate::auth::{self, AuthInfo, AuthStore, Caller};
use crate::config::{AutoCompaction, Config};
use crate::error::{EtcdError, Result};
use crate::lease::Lessor;
use crate::membership::{self, Member, Membership, RecordChange};
use crate::mvcc::{self, RangeEnd, Store};
use crate::pb::etcdserverpb::{
    alarm_request::AlarmAction, AlarmMember, AlarmRequest, AlarmResponse, AlarmType,
    CompactionRequest, CompactionResponse, DeleteRangeResponse, LeaseGrantResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, PutResponse, ResponseHeader, TxnResponse,
};
use crate::pb::oxcdpb::{
    peer_client::PeerClient, raft_request::Request, Attributes, ClusterInfoRequest,
    ConfChangeContext, MemberAttributes, RaftRequest,
};
use crate::raft_node::{
    self, CommittedBatch, NodeConfig, NodeStatus, RaftInput, RaftNode, RaftStatus,
};
use crate::transport::Transport;
use crate::wal::{Replayed, Wal};
use crate::watch::WatchHub;
use parking_lot::Mutex;
use prost::Message;
use protobuf::Message as _;
use raft::prelude::{
    ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, HardState,
    SnapshotMetadata,
};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// The result of applying one proposal.
#[derive(Debug)]
pub enum Applied {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    /// The response, and a signal for the end of the physical compaction.
    Compaction(CompactionResponse, Option<oneshot::Receiver<()>>),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    Alarm(AlarmResponse),
    /// A membership change: the member list after it.
    Members(Vec<Member>),
    /// Published attributes or updated peer URLs.
    MemberUpdated,
    /// An auth store change; Authenticate also gives the token.
    Auth(Option<String>),
    /// The downgrade job was set or cancelled.
    Downgrade,
}

type Waiter = oneshot::Sender<Result<Applied>>;

/// Requests waiting for their entry to be applied, by request id.
#[derive(Default)]
pub struct Waiters(Mutex<HashMap<u64, Waiter>>);

impl Waiters {
    fn register(&self, id: u64) -> oneshot::Receiver<Result<Applied>> {
        let (tx, rx) = oneshot::channel();
        self.0.lock().insert(id, tx);
        rx
    }
    fn complete(&self, id: u64, r: Result<Applied>) {
        if let Some(tx) = self.0.lock().remove(&id) {
            let _ = tx.send(r);
        }
    }
    fn forget(&self, id: u64) {
        self.0.lock().remove(&id);
    }
}

/// Active alarms, (member id, alarm type).
pub type Alarms = Arc<Mutex<BTreeSet<(u64, i32)>>>;

pub struct EtcdServer {
    pub cfg: Config,
    pub id: u64,
    pub cluster_id: u64,
    pub membership: Arc<parking_lot::RwLock<Membership>>,
    pub transport: Arc<Transport>,
    /// True once this member published its attributes (serving clients from then on).
    ready_tx: watch::Sender<bool>,
    /// This member's record as known before the log replayed it (a joining member).
    self_record: Member,
    leader_client: tokio::sync::Mutex<Option<(u64, PeerClient<tonic::transport::Channel>)>>,
    pub store: Arc<Store>,
    pub lessor: Arc<Lessor>,
    pub auth: Arc<AuthStore>,
    pub hub: Arc<WatchHub>,
    pub raft_status: Arc<RaftStatus>,
    pub alarms: Alarms,
    raft_tx: mpsc::Sender<RaftInput>,
    waiters: Arc<Waiters>,
    next_id: AtomicU64,
    applied_rx: watch::Receiver<u64>,
    /// Slots of the JSON gateway: etcd's gateway is a gRPC client of its own server, so its
    /// requests share `--max-concurrent-streams` streams and wait for a free one.
    pub gateway_streams: Arc<tokio::sync::Semaphore>,
}

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
    let (Some(index), Some(term)) = (
        read(mvcc::META_SNAPSHOT_INDEX)?,
        read(mvcc::META_SNAPSHOT_TERM)?,
    ) else {
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

use crate::mvcc::{META_CLUSTER_ID, META_CONF_STATE, META_MEMBER_ID};

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
    let mut members: BTreeSet<u64> = Membership::from_records(
        &store.records(membership::MEMBER_PREFIX)?,
        &store.records(membership::REMOVED_PREFIX)?,
    )
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
        let mut single = ConfChangeSingle::default();
        single.set_change_type(ConfChangeType::RemoveNode);
        single.node_id = *other;
        let mut cc = ConfChangeV2::default();
        cc.mut_changes().push(single);
        cc.context = ConfChangeContext::default().encode_to_vec().into();
        let mut e = Entry::default();
        e.set_entry_type(EntryType::EntryConfChangeV2);
        e.term = term;
        e.index = last_index + 1 + i as u64;
        e.data = cc.write_to_bytes()?.into();
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
        let mut single = ConfChangeSingle::default();
        single.set_change_type(ConfChangeType::AddNode);
        single.node_id = m.id;
        let mut cc = ConfChangeV2::default();
        cc.mut_changes().push(single);
        cc.context = ConfChangeContext {
            request_id: 0,
            member: Some(m.clone()),
        }
        .encode_to_vec()
        .into();
        let mut e = Entry::default();
        e.set_entry_type(EntryType::EntryConfChangeV2);
        e.term = 1;
        e.index = i as u64 + 1;
        e.data = cc.write_to_bytes()?.into();
        entries.push(e);
    }
    Ok(entries)
}

/// A client of the peer API of the member at `urls` (the first that answers).
pub async fn connect_peer(
    urls: &[String],
    tls: &crate::tls::TlsInfo,
) -> Option<PeerClient<tonic::transport::Channel>> {
    for url in urls {
        if let Ok(ch) = crate::tls::peer_channel(url, tls, Duration::from_secs(1)).await {
            return Some(PeerClient::new(ch));
        }
    }
    None
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

fn alarm_key(member: u64, alarm: i32) -> Vec<u8> {
    let mut k = mvcc::ALARM_PREFIX.to_vec();
    k.extend_from_slice(&member.to_be_bytes());
    k.extend_from_slice(&alarm.to_be_bytes());
    k
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
        let membership = Membership::from_records(
            &store.records(membership::MEMBER_PREFIX)?,
            &store.records(membership::REMOVED_PREFIX)?,
        );
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

        let lessor = Arc::new(Lessor::new(cfg.min_lease_ttl()));
        for (lid, ttl) in &recovered.leases {
            lessor.recover(*lid, *ttl);
        }
        for (lid, key) in recovered.attached {
            lessor.attach(lid, key);
        }
        let alarms: Alarms = Arc::new(Mutex::new(BTreeSet::new()));
        for rec in &recovered.alarms {
            if rec.len() == 12 {
                let m = u64::from_be_bytes(rec[..8].try_into()?);
                let a = i32::from_be_bytes(rec[8..].try_into()?);
                alarms.lock().insert((m, a));
            }
        }

        if cfg.enable_pprof {
            tracing::warn!("--enable-pprof is ignored: oxcd has no Go runtime to profile (use perf, or the metrics at /metrics)");
        }
        let tokens = auth::Tokens::from_flag(&cfg.auth_token, cfg.auth_token_ttl)?;
        let auth = Arc::new(AuthStore::new(tokens, cfg.bcrypt_cost));
        auth.recover(&store.records(auth::AUTH_PREFIX)?);

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
            raft_tx.clone(),
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
                election_timeout: cfg.election_timeout(),
            },
            storage,
            applied,
            wal,
            raft_rx,
            apply_tx,
            raft_status.clone(),
            lessor.clone(),
            transport.clone(),
            Box::new(move |id, err| refuse_waiters.complete(id, Err(err))),
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

    /// Where a client backup is written before it is streamed (removed after; leftovers of a
    /// crash are removed on the next start).
    pub fn backup_scratch_path(&self) -> std::path::PathBuf {
        let dir = self.cfg.data_dir.join("member").join("snap");
        let _ = std::fs::create_dir_all(&dir);
        dir.join(format!("backup-{:016x}.db.tmp", rand::random::<u64>()))
    }

    /// The cluster's downgrade job as the applied log has it.
    pub fn downgrade_info(&self) -> crate::version::Downgrade {
        match self.store.get_record(mvcc::META_DOWNGRADE) {
            Ok(Some(b)) => crate::version::Downgrade::decode(&b),
            _ => crate::version::Downgrade::default(),
        }
    }

    /// This member as the member list has it.
    pub fn member(&self) -> Member {
        self.membership
            .read()
            .get(self.id)
            .cloned()
            .unwrap_or_else(|| self.self_record.clone())
    }

    /// etcd serves a learner's clients only Status and serializable Range.
    pub fn check_not_learner(&self) -> Result<()> {
        // On every request: look the flag up without copying the member record.
        let learner = self.membership.read().get(self.id).map(|m| m.is_learner);
        if learner.unwrap_or(self.self_record.is_learner) {
            return Err(EtcdError::NotSupportedForLearner);
        }
        Ok(())
    }

    pub fn raft_input(&self, input: RaftInput) -> Result<()> {
        self.raft_tx.send(input).map_err(|_| EtcdError::Stopped)
    }

    pub async fn node_status(&self) -> Result<NodeStatus> {
        let (tx, rx) = oneshot::channel();
        self.raft_tx
            .send(RaftInput::Status(tx))
            .map_err(|_| EtcdError::Stopped)?;
        rx.await.map_err(|_| EtcdError::Stopped)
    }

    /// Moves leadership from this member (the leader) to `target` and waits until `target`
    /// leads, within `within` (etcd's `MoveLeader`).
    pub async fn move_leader(&self, target: u64, within: std::time::Duration) -> Result<()> {
        self.raft_input(RaftInput::TransferLeader(target))?;
        let deadline = tokio::time::Instant::now() + within;
        while self.raft_status.leader.load(Ordering::Relaxed) != target {
            if tokio::time::Instant::now() >= deadline {
                return Err(EtcdError::LeaderTransferTimeout);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// etcd's `TransferLeadership` on stop: a leader with other voters hands leadership to
    /// the voter it has been connected to longest, so the cluster does not wait an election
    /// timeout for a new leader.
    pub async fn transfer_leadership(&self) {
        let Ok(st) = self.node_status().await else {
            return;
        };
        if !st.is_leader {
            tracing::info!("skipped leadership transfer; local server is not leader");
            return;
        }
        let transferee = st
            .voters
            .iter()
            .filter(|&&v| v != st.id)
            .filter_map(|&v| self.transport.active_since(v).map(|since| (since, v)))
            .min();
        let Some((_, target)) = transferee else {
            tracing::info!("skipped leadership transfer for single voting member cluster");
            return;
        };
        tracing::info!(
            local_member_id = %format!("{:x}", st.id),
            transferee = %format!("{target:x}"),
            "leadership transfer starting"
        );
        // Raft gives up a transfer after an election timeout; waiting longer (as for a
        // MoveLeader request) would only hold up a stop whose transferee is stopping too.
        match self
            .move_leader(target, 2 * self.cfg.election_timeout())
            .await
        {
            Ok(()) => tracing::info!(
                old_leader = %format!("{:x}", st.id),
                new_leader = %format!("{target:x}"),
                "leadership transfer finished"
            ),
            Err(e) => tracing::warn!(error = %e, "leadership transfer failed"),
        }
    }

    /// Publishes this member's name and client URLs through Raft once it runs (etcd's
    /// attribute publish), retrying until it is applied.
    fn spawn_publish(self: Arc<Self>) {
        tokio::spawn(async move {
            self.publish().await;
            // oxcd speaks the 3.4 API from the first entry on (no cluster version negotiation).
            tracing::info!(
                cluster_version = %crate::version::CLUSTER_VERSION.short(),
                "enabled capabilities for version"
            );
            self.ready_tx.send_replace(true);
        });
    }

    /// Resolves once this member's attributes are in the member list: like etcd, a member
    /// serves clients only from then on.
    pub async fn ready(&self) {
        let mut rx = self.ready_tx.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    async fn publish(&self) {
        {
            loop {
                let want = (
                    self.cfg.name.clone(),
                    self.cfg.advertise_client_urls.clone(),
                );
                let current = self
                    .membership
                    .read()
                    .get(self.id)
                    .map(|m| (m.name.clone(), m.client_ur_ls.clone()));
                if current.as_ref() == Some(&want) {
                    tracing::info!(
                        local_member_id = %format!("{:x}", self.id),
                        cluster_id = %format!("{:x}", self.cluster_id),
                        "local member attributes already published to cluster"
                    );
                    return;
                }
                if self.raft_status.leader.load(Ordering::Relaxed) != 0 && current.is_some() {
                    let attrs = MemberAttributes {
                        id: self.id,
                        attributes: Some(Attributes {
                            name: want.0,
                            client_urls: want.1,
                        }),
                    };
                    match self.propose(Request::MemberAttributes(attrs)).await {
                        Ok(_) => {
                            tracing::info!(
                                local_member_id = %format!("{:x}", self.id),
                                cluster_id = %format!("{:x}", self.cluster_id),
                                "published local member to cluster through raft"
                            );
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "publishing member attributes failed; retrying")
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Replicates a membership change and waits until it is applied.
    pub async fn propose_conf_change(
        &self,
        change: ConfChangeType,
        member: Member,
    ) -> Result<Vec<Member>> {
        let id = self.next_id() as u64;
        let mut single = ConfChangeSingle::default();
        single.set_change_type(change);
        single.node_id = member.id;
        let mut cc = ConfChangeV2::default();
        cc.mut_changes().push(single);
        cc.context = ConfChangeContext {
            request_id: id,
            member: Some(member),
        }
        .encode_to_vec()
        .into();
        let rx = self.waiters.register(id);
        if self
            .raft_tx
            .send(RaftInput::ProposeConfChange { id, cc })
            .is_err()
        {
            self.waiters.forget(id);
            return Err(EtcdError::Stopped);
        }
        match tokio::time::timeout(self.request_timeout(), rx).await {
            Ok(Ok(Ok(Applied::Members(m)))) => Ok(m),
            Ok(Ok(Ok(other))) => Err(EtcdError::Internal(format!(
                "unexpected apply result {other:?}"
            ))),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(EtcdError::Stopped),
            Err(_) => {
                self.waiters.forget(id);
                Err(EtcdError::Timeout)
            }
        }
    }

    /// A keep-alive: the leader renews; any other member forwards it to the leader.
    pub async fn lease_renew(&self, id: i64) -> Result<i64> {
        if self.raft_status.is_leader.load(Ordering::Relaxed) {
            return self.lessor.renew(id);
        }
        let mut client = self.leader_client().await?;
        let req = crate::pb::etcdserverpb::LeaseKeepAliveRequest { id };
        match tokio::time::timeout(self.request_timeout(), client.lease_renew(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner().ttl),
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => Err(EtcdError::LeaseNotFound),
            Ok(Err(_)) => Err(EtcdError::NoLeader),
            Err(_) => Err(EtcdError::Timeout),
        }
    }

    /// TimeToLive as the leader answers it (its lessor runs the clocks).
    pub async fn local_time_to_live(
        &self,
        r: crate::pb::etcdserverpb::LeaseTimeToLiveRequest,
    ) -> Result<crate::pb::etcdserverpb::LeaseTimeToLiveResponse> {
        use crate::pb::etcdserverpb::LeaseTimeToLiveResponse;
        self.read_barrier().await?;
        Ok(match self.lessor.time_to_live(r.id) {
            Some(info) => LeaseTimeToLiveResponse {
                header: None,
                id: r.id,
                ttl: info.remaining,
                granted_ttl: info.granted,
                keys: if r.keys { info.keys } else { vec![] },
            },
            None => LeaseTimeToLiveResponse {
                header: None,
                id: r.id,
                ttl: -1,
                granted_ttl: 0,
                keys: vec![],
            },
        })
    }

    pub async fn time_to_live(
        &self,
        r: crate::pb::etcdserverpb::LeaseTimeToLiveRequest,
    ) -> Result<crate::pb::etcdserverpb::LeaseTimeToLiveResponse> {
        if self.raft_status.is_leader.load(Ordering::Relaxed) {
            return self.local_time_to_live(r).await;
        }
        let mut client = self.leader_client().await?;
        match tokio::time::timeout(self.request_timeout(), client.lease_time_to_live(r)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(_)) => Err(EtcdError::NoLeader),
            Err(_) => Err(EtcdError::Timeout),
        }
    }

    /// A client to the current leader's peer API (lease keep-alives are the leader's).
    pub async fn leader_client(&self) -> Result<PeerClient<tonic::transport::Channel>> {
        let leader = self.raft_status.leader.load(Ordering::Relaxed);
        if leader == 0 {
            return Err(EtcdError::NoLeader);
        }
        let mut cached = self.leader_client.lock().await;
        if let Some((id, c)) = cached.as_ref() {
            if *id == leader {
                return Ok(c.clone());
            }
        }
        let urls = self
            .membership
            .read()
            .get(leader)
            .map(|m| m.peer_ur_ls.clone())
            .ok_or(EtcdError::NoLeader)?;
        let c = connect_peer(&urls, &self.cfg.peer_tls)
            .await
            .ok_or(EtcdError::NoLeader)?;
        *cached = Some((leader, c.clone()));
        Ok(c)
    }

    /// A fresh positive id (request ids, and lease ids when the client names none).
    pub fn next_id(&self) -> i64 {
        (self.next_id.fetch_add(1, Ordering::Relaxed) & (i64::MAX as u64)).max(1) as i64
    }

    pub fn header(&self, rev: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.id,
            revision: rev,
            raft_term: self.raft_status.term.load(Ordering::Relaxed),
        }
    }

    /// Fills a header from the applier: revision kept if set, else the current one (etcd's
    /// `header.fill`).
    pub fn fill(&self, h: &mut Option<ResponseHeader>) {
        let rev = h
            .as_ref()
            .map(|h| h.revision)
            .filter(|r| *r != 0)
            .unwrap_or_else(|| self.store.current_rev());
        *h = Some(self.header(rev));
    }

    fn request_timeout(&self) -> Duration {
        // etcd: 5s plus two election timeouts.
        Duration::from_secs(5) + 2 * self.cfg.election_timeout()
    }

    /// Replicates a request of the server's own and waits for the result of applying it.
    /// Such requests are never checked against the auth store (etcd makes them as root).
    pub async fn propose(&self, req: Request) -> Result<Applied> {
        self.propose_raft(RaftRequest {
            id: self.next_id() as u64,
            request: Some(req),
            internal: true,
            ..Default::default()
        })
        .await
    }

    /// Replicates a client's request, with who sent it, and waits for the result of applying
    /// it; the applier checks it against the auth store as it is then.
    pub async fn propose_as(&self, req: Request, caller: &Caller) -> Result<Applied> {
        let ai = self.auth_info(caller).await?.unwrap_or_default();
        self.propose_raft(RaftRequest {
            id: self.next_id() as u64,
            request: Some(req),
            username: ai.username,
            auth_revision: ai.revision,
            internal: false,
        })
        .await
    }

    /// Who a client request comes from (etcd's `AuthInfoFromCtx`): its token, else, under
    /// `--client-cert-auth`, its certificate's common name; None without either.
    pub async fn auth_info(&self, caller: &Caller) -> Result<Option<AuthInfo>> {
        if let Some(token) = &caller.token {
            if let Some(index) = self.auth.tokens.index_of(token) {
                // A simple token is known once this member applied the entry that made it.
                let mut applied = self.applied_rx.clone();
                let _ =
                    tokio::time::timeout(self.request_timeout(), applied.wait_for(|a| *a >= index))
                        .await;
            }
        }
        self.auth_info_now(caller)
    }

    /// `auth_info` without waiting for a simple token's entry to apply.
    pub fn auth_info_now(&self, caller: &Caller) -> Result<Option<AuthInfo>> {
        // With auth off a token is ignored, whatever it holds (etcd 3.5+).
        if !self.auth.is_enabled() {
            return Ok(None);
        }
        if let Some(token) = &caller.token {
            return self
                .auth
                .tokens
                .info(token, self.auth.revision())
                .map(Some)
                .ok_or(EtcdError::InvalidAuthToken);
        }
        if self.cfg.client_tls.client_cert_auth {
            if let Some(cn) = &caller.common_name {
                return Ok(Some(AuthInfo {
                    username: cn.clone(),
                    revision: self.auth.revision(),
                }));
            }
        }
        Ok(None)
    }

    /// A local read under auth (etcd's `doSerialize`): `check` the caller's permission, `read`,
    /// then refuse the result if the auth store changed meanwhile.
    pub async fn read_as<T>(
        &self,
        caller: &Caller,
        check: impl FnOnce(&AuthStore, &AuthInfo) -> Result<()>,
        read: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let ai = self.auth_info(caller).await?.unwrap_or_default();
        check(&self.auth, &ai)?;
        let out = read()?;
        if ai.revision != 0 && ai.revision != self.auth.revision() {
            return Err(EtcdError::AuthOldRevision);
        }
        Ok(out)
    }

    /// Refuses a caller that is not root when auth is enabled (maintenance and membership
    /// calls, etcd's `IsAdminPermitted` at the API layer).
    /// etcd 3.6's `requireAuthInfo`: with auth on, some user must be named (any user).
    pub async fn require_auth_info(&self, caller: &Caller) -> Result<()> {
        if self.auth.is_enabled() && self.auth_info(caller).await?.is_none() {
            return Err(EtcdError::UserEmpty);
        }
        Ok(())
    }

    /// etcd 3.6's `checkLeaseLeases` and `checkLeaseTimeToLive`: with auth on, a caller who
    /// is not root must be allowed to read every key attached to the leases it asks about.
    pub async fn check_lease_keys_readable(&self, caller: &Caller, leases: &[i64]) -> Result<()> {
        if !self.auth.is_enabled() {
            return Ok(());
        }
        let rev = self.auth.revision();
        let Some(ai) = self.auth_info(caller).await? else {
            return Err(EtcdError::UserEmpty);
        };
        if self.auth.is_admin_permitted(Some(&ai)).is_ok() {
            return Ok(());
        }
        for id in leases {
            for key in self.lessor.keys(*id).unwrap_or_default() {
                self.auth.is_range_permitted(&ai, &key, &[])?;
            }
        }
        if rev != self.auth.revision() {
            return Err(EtcdError::AuthOldRevision);
        }
        Ok(())
    }

    pub async fn check_admin(&self, caller: &Caller) -> Result<()> {
        let ai = self.auth_info(caller).await?;
        self.auth.is_admin_permitted(ai.as_ref())
    }

    async fn propose_raft(&self, req: RaftRequest) -> Result<Applied> {
        let id = req.id;
        let data = req.encode_to_vec();
        if data.len() > self.cfg.max_request_bytes {
            return Err(EtcdError::RequestTooLarge);
        }
        // What the applier would refuse to decode is never proposed: the same measure as
        // apply_entry's (the API's codec refuses such a request before it gets here).
        if crate::pb::nesting::too_deep(&data, crate::pb::nesting::Root::Entry) {
            return Err(EtcdError::TooManyOps);
        }
        let metrics = &crate::metrics::METRICS;
        let rx = self.waiters.register(id);
        if self.raft_tx.send(RaftInput::Propose { id, data }).is_err() {
            self.waiters.forget(id);
            metrics.proposals_failed.inc();
            return Err(EtcdError::Stopped);
        }
        let pending = crate::metrics::PendingProposal::start();
        let result = tokio::time::timeout(self.request_timeout(), rx).await;
        drop(pending);
        match result {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => {
                metrics.proposals_failed.inc();
                Err(EtcdError::Stopped)
            }
            Err(_) => {
                self.waiters.forget(id);
                metrics.proposals_failed.inc();
                Err(EtcdError::Timeout)
            }
        }
    }

    /// Waits until this member has applied everything committed when the read began.
    pub async fn read_barrier(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.raft_tx
            .send(RaftInput::ReadIndex(tx))
            .map_err(|_| EtcdError::Stopped)?;
        let index = tokio::time::timeout(self.request_timeout(), rx)
            .await
            .map_err(|_| EtcdError::Timeout)?
            .map_err(|_| EtcdError::Stopped)??;
        let mut applied = self.applied_rx.clone();
        tokio::time::timeout(self.request_timeout(), applied.wait_for(|a| *a >= index))
            .await
            .map_err(|_| EtcdError::Timeout)?
            .map_err(|_| EtcdError::Stopped)?;
        Ok(())
    }

    pub fn applied_index(&self) -> u64 {
        *self.applied_rx.borrow()
    }

    pub fn has_alarm(&self, alarm: AlarmType) -> bool {
        self.alarms.lock().iter().any(|(_, a)| *a == alarm as i32)
    }

    /// etcd's backend quota: refuse a write that would grow the backend past the quota, and
    /// raise the NOSPACE alarm through Raft.
    pub async fn check_quota(&self, cost: usize) -> Result<()> {
        if self.has_alarm(AlarmType::Nospace) {
            return Err(EtcdError::NoSpace);
        }
        if self.store.size_on_disk() + cost as u64 <= self.cfg.quota_backend_bytes {
            return Ok(());
        }
        let req = AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: self.id,
            alarm: AlarmType::Nospace as i32,
        };
        if let Err(e) = self.propose(Request::Alarm(req)).await {
            tracing::warn!(error = %e, "raising the NOSPACE alarm failed");
        }
        Err(EtcdError::NoSpace)
    }

    /// The leader revokes expired leases through Raft.
    fn spawn_lease_expiry(self: Arc<Self>) {
        tokio::spawn(async move {
            let in_flight: Arc<Mutex<HashSet<i64>>> = Arc::default();
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                if !self.raft_status.is_leader.load(Ordering::Relaxed) {
                    continue;
                }
                for id in self.lessor.expired(500) {
                    if !in_flight.lock().insert(id) {
                        continue;
                    }
                    let (s, inf) = (self.clone(), in_flight.clone());
                    tokio::spawn(async move {
                        let r = s
                            .propose(Request::LeaseRevoke(LeaseRevokeRequest { id }))
                            .await;
                        if let Err(e) = r {
                            if e != EtcdError::LeaseNotFound {
                                tracing::warn!(lease = id, error = %e, "revoking an expired lease failed");
                            }
                        }
                        inf.lock().remove(&id);
                    });
                }
            }
        });
    }

    /// `--auto-compaction-mode` periodic (keep a retention window of history) or revision
    /// (keep the last N revisions), as etcd's compactor does.
    fn spawn_auto_compaction(self: Arc<Self>) {
        let mode = self.cfg.auto_compaction;
        if mode == AutoCompaction::Off {
            return;
        }
        tokio::spawn(async move {
            let (interval, mut samples) = match mode {
                AutoCompaction::Periodic(d) => (
                    (d / 10).max(Duration::from_secs(1)),
                    std::collections::VecDeque::new(),
                ),
                // etcd's revision compactor runs every 5 minutes.
                AutoCompaction::Revision(_) => (
                    Duration::from_secs(5 * 60),
                    std::collections::VecDeque::new(),
                ),
                AutoCompaction::Off => return,
            };
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                if !self.raft_status.is_leader.load(Ordering::Relaxed) {
                    continue;
                }
                let rev = self.store.current_rev();
                let target = match mode {
                    AutoCompaction::Periodic(d) => {
                        let now = tokio::time::Instant::now();
                        samples.push_back((now, rev));
                        let mut target = None;
                        while samples
                            .front()
                            .is_some_and(|(t, _)| now.duration_since(*t) >= d)
                        {
                            target = samples.pop_front().map(|(_, r)| r);
                        }
                        target
                    }
                    AutoCompaction::Revision(keep) => Some(rev - keep),
                    AutoCompaction::Off => None,
                };
                let Some(target) = target else { continue };
                if target <= self.store.compact_rev() || target <= 0 {
                    continue;
                }
                match self
                    .propose(Request::Compaction(CompactionRequest {
                        revision: target,
                        physical: false,
                    }))
                    .await
                {
                    Ok(_) => tracing::info!(revision = target, "auto compaction done"),
                    Err(EtcdError::Compacted) => {}
                    Err(e) => {
                        tracing::warn!(revision = target, error = %e, "auto compaction failed")
                    }
                }
            }
        });
    }
}

/// The committed entries of one Ready being applied together: one backend batch for their
/// writes; their watch events and answers wait until it is written.
struct Group<'s> {
    store: &'s Store,
    txn: Option<mvcc::WriteTxn<'s>>,
    /// The last entry written in `txn`.
    index: u64,
    events: Vec<(i64, Vec<crate::pb::mvccpb::Event>)>,
    done: Vec<(u64, Result<Applied>)>,
}

impl<'s> Group<'s> {
    fn new(store: &'s Store) -> Self {
        Group {
            store,
            txn: None,
            index: 0,
            events: Vec::new(),
            done: Vec::new(),
        }
    }
}

/// Applies committed entries in log order on its own thread.
struct Applier {
    id: u64,
    membership: Arc<parking_lot::RwLock<Membership>>,
    transport: Arc<Transport>,
    store: Arc<Store>,
    lessor: Arc<Lessor>,
    auth: Arc<AuthStore>,
    hub: Arc<WatchHub>,
    waiters: Arc<Waiters>,
    alarms: Alarms,
    applied_tx: watch::Sender<u64>,
    raft_tx: mpsc::Sender<RaftInput>,
    applied: u64,
    released: u64,
    snapshot_count: u64,
    catchup_entries: u64,
    /// `--warning-apply-duration`.
    warn_apply: Duration,
    compaction_pace: mvcc::CompactionPace,
}

impl Applier {
    fn run(mut self, rx: mpsc::Receiver<CommittedBatch>) {
        for batch in rx {
            if let Some(install) = batch.install {
                self.install(install);
                continue;
            }
            let store = self.store.clone();
            let mut g = Group::new(&store);
            for e in batch.entries {
                if e.index <= self.applied {
                    continue;
                }
                match e.get_entry_type() {
                    EntryType::EntryNormal if !e.data.is_empty() => {
                        self.apply_entry(&mut g, e.index, &e.data)
                    }
                    EntryType::EntryConfChangeV2 => {
                        self.flush(&mut g);
                        self.apply_conf_change(&mut g, e.index, &e.data)
                    }
                    EntryType::EntryConfChange => {
                        tracing::error!(
                            index = e.index,
                            "v1 conf change entries are never proposed by oxcd"
                        );
                        std::process::exit(1);
                    }
                    _ => {}
                }
                self.applied = e.index;
            }
            self.flush(&mut g);
            self.store.set_applied(self.applied);
            self.applied_tx.send_replace(self.applied);
            if self.applied - self.released >= self.snapshot_count {
                self.release();
            }
        }
    }

    /// Makes a snapshot received from the leader the whole state: backend, leases, alarms,
    /// members; watchers re-read history from the new backend.
    fn install(&mut self, i: crate::raft_node::Install) {
        let index = i.meta.index;
        crate::failpoint::hit("applyBeforeOpenSnapshot");
        let rec = match self.store.install(&i.name, i.db, index, i.meta.term) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(index, error = %e, "installing a snapshot failed");
                std::process::exit(1);
            }
        };
        self.lessor.reset(&rec.leases, &rec.attached);
        self.auth
            .recover(&self.store.records(auth::AUTH_PREFIX).unwrap_or_default());
        {
            let mut alarms = self.alarms.lock();
            alarms.clear();
            for r in &rec.alarms {
                if r.len() == 12 {
                    let m = u64::from_be_bytes(r[..8].try_into().unwrap_or_default());
                    let a = i32::from_be_bytes(r[8..].try_into().unwrap_or_default());
                    alarms.insert((m, a));
                }
            }
        }
        let members = self
            .store
            .records(membership::MEMBER_PREFIX)
            .unwrap_or_default();
        let removed = self
            .store
            .records(membership::REMOVED_PREFIX)
            .unwrap_or_default();
        let ms = Membership::from_records(&members, &removed);
        for m in ms.members() {
            if m.id != self.id {
                self.transport.set_peer(m.id, m.peer_ur_ls.clone());
            }
        }
        *self.membership.write() = ms;
        self.applied = index;
        self.released = index;
        self.applied_tx.send_replace(index);
        self.hub.resync(self.store.current_rev());
        let _ = i.done.send(());
    }

    /// The state machine is made durable, then the Raft thread drops the log before it.
    fn release(&mut self) {
        match self.store.sync(self.applied) {
            Ok(()) => {
                self.released = self.applied;
                let conf_state = match self.store.get_record(META_CONF_STATE) {
                    Ok(Some(b)) => ConfState::parse_from_bytes(&b).unwrap_or_default(),
                    _ => ConfState::default(),
                };
                let keep_entries = self.catchup_entries.min(self.snapshot_count);
                let _ = self.raft_tx.send(RaftInput::Release {
                    index: self.applied,
                    conf_state,
                    keep_entries,
                });
            }
            Err(e) => tracing::error!(error = %e, "syncing the backend failed"),
        }
    }

    fn apply_entry(&mut self, g: &mut Group<'_>, index: u64, data: &[u8]) {
        // Measured before decoding (prost has no recursion limit): nothing this deep is ever
        // proposed (propose_raft refuses it), so such an entry is damage, as is anything else
        // undecodable: stop.
        let req = match crate::pb::nesting::too_deep(data, crate::pb::nesting::Root::Entry) {
            true => Err("a Txn nested deeper than any proposal may be".to_string()),
            false => RaftRequest::decode(data).map_err(|e| e.to_string()),
        };
        let req = match req {
            Ok(r) => r,
            Err(error) => {
                tracing::error!(index, %error, "undecodable log entry");
                std::process::exit(1);
            }
        };
        let Some(request) = req.request else { return };
        let who = (!req.internal).then_some(AuthInfo {
            username: req.username,
            revision: req.auth_revision,
        });
        // Key writes join the group; anything else sees the store as of the entry before it
        // (it may read the backend or lock the store) and is answered at once.
        let grouped = matches!(
            request,
            Request::Put(_)
                | Request::DeleteRange(_)
                | Request::Txn(_)
                | Request::LeaseGrant(_)
                | Request::LeaseRevoke(_)
        );
        if !grouped {
            self.flush(g);
        }
        let started = Instant::now();
        let kind = request_kind(&request);
        let result = self.check_auth(&request, who.as_ref());
        let result = result.and_then(|()| self.apply_request(g, index, request));
        let took = started.elapsed();
        if took > self.warn_apply {
            // etcd's warning for a slow apply (its `warnOfExpensiveRequest`).
            tracing::warn!(
                took = ?took,
                expected_duration = ?self.warn_apply,
                index,
                request = kind,
                "apply request took too long"
            );
            crate::metrics::METRICS.slow_apply.inc();
        }
        g.done.push((req.id, result));
        if !grouped {
            self.flush(g);
        }
    }

    /// A committed membership change: Raft's configuration first, then the member list, the
    /// peer transport and the persisted configuration (in one batch with the index).
    fn apply_conf_change(&mut self, g: &mut Group<'_>, index: u64, data: &[u8]) {
        crate::failpoint::hit("beforeApplyOneConfChange");
        let cc = match ConfChangeV2::parse_from_bytes(data) {
            Ok(cc) => cc,
            Err(e) => {
                tracing::error!(index, error = %e, "undecodable conf change");
                std::process::exit(1);
            }
        };
        let ctx = ConfChangeContext::decode(cc.get_context()).unwrap_or_default();
        let mut records = Vec::new();
        let mut removed_self = false;
        {
            let mut ms = self.membership.write();
            for ch in cc.get_changes() {
                let id = ch.node_id;
                match ch.get_change_type() {
                    ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                        let mut m = ctx.member.clone().unwrap_or(Member {
                            id,
                            ..Default::default()
                        });
                        m.id = id;
                        m.is_learner = ch.get_change_type() == ConfChangeType::AddLearnerNode;
                        if id != self.id {
                            self.transport.set_peer(id, m.peer_ur_ls.clone());
                        }
                        records.push(ms.add(m));
                    }
                    ConfChangeType::RemoveNode => {
                        records.extend(ms.remove(id));
                        self.transport.remove_peer(id);
                        removed_self |= id == self.id;
                    }
                }
            }
        }
        // A member applying its own removal does not reconfigure its Raft (raft-rs cannot run
        // a leader outside its own configuration); it records the removal and exits.
        let cs_bytes = if removed_self {
            self.store
                .get_record(META_CONF_STATE)
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            if self
                .raft_tx
                .send(RaftInput::ApplyConfChange(cc, tx))
                .is_err()
            {
                return;
            }
            let Ok(cs) = rx.recv() else { return };
            cs.write_to_bytes().unwrap_or_default()
        };
        let r = self.write(g, index, |t| {
            for r in records {
                match r {
                    RecordChange::Put(k, v) => t.put_record(k, v),
                    RecordChange::Remove(k) => t.remove_record(k),
                }
            }
            t.put_record(META_CONF_STATE.to_vec(), cs_bytes);
            Ok(())
        });
        self.flush(g);
        let members = self.membership.read().members();
        self.waiters
            .complete(ctx.request_id, r.map(|_| Applied::Members(members)));
        if removed_self {
            tracing::warn!("this member has been removed from the cluster; shutting down");
            let _ = self.store.sync(index);
            // Let the response to the removal reach its client before going.
            std::thread::sleep(Duration::from_millis(500));
            std::process::exit(0);
        }
    }

    /// etcd's auth applier: a client's request is checked against the auth store as it is
    /// when the entry applies, so every member decides alike. `who` is None for the server's
    /// own requests.
    fn check_auth(&self, request: &Request, who: Option<&AuthInfo>) -> Result<()> {
        let Some(ai) = who else { return Ok(()) };
        // Nothing to check with auth off; skips copying a lease's keys on every leased put.
        if !self.auth.is_enabled() {
            return Ok(());
        }
        let auth = &self.auth;
        // The keys attached to a lease must all be writable to attach more or revoke it.
        let lease_puts = |lease: i64| -> Result<()> {
            for k in self.lessor.keys(lease).unwrap_or_default() {
                auth.is_put_permitted(ai, &k)?;
            }
            Ok(())
        };
        match request {
            Request::AuthEnable(_)
            | Request::AuthDisable(_)
            | Request::UserAdd(_)
            | Request::UserDelete(_)
            | Request::UserChangePassword(_)
            | Request::UserGrantRole(_)
            | Request::UserRevokeRole(_)
            | Request::RoleAdd(_)
            | Request::RoleDelete(_)
            | Request::RoleGrantPermission(_)
            | Request::RoleRevokePermission(_)
            | Request::DowngradeInfoSet(_) => auth.is_admin_permitted(Some(ai)),
            Request::Put(p) => {
                auth.is_put_permitted(ai, &p.key)?;
                lease_puts(p.lease)?;
                if p.prev_kv {
                    auth.is_range_permitted(ai, &p.key, &[])?;
                }
                Ok(())
            }
            Request::DeleteRange(d) => {
                auth.is_delete_range_permitted(ai, &d.key, &d.range_end)?;
                if d.prev_kv {
                    auth.is_range_permitted(ai, &d.key, &d.range_end)?;
                }
                Ok(())
            }
            Request::Txn(t) => apply::check_txn_auth(auth, ai, t),
            Request::LeaseRevoke(r) => lease_puts(r.id),
            _ => Ok(()),
        }
    }

    /// Writes an auth store change with its entry.
    fn write_auth(&self, g: &mut Group<'_>, index: u64, changes: auth::Changes) -> Result<Applied> {
        if !changes.is_empty() {
            self.write(g, index, |t| {
                for c in changes {
                    match c {
                        RecordChange::Put(k, v) => t.put_record(k, v),
                        RecordChange::Remove(k) => t.remove_record(k),
                    }
                }
                Ok(())
            })?;
        }
        Ok(Applied::Auth(None))
    }

    fn apply_auth(&mut self, g: &mut Group<'_>, index: u64, request: Request) -> Result<Applied> {
        let a = self.auth.clone();
        let changes = match request {
            Request::AuthEnable(_) => a.enable()?,
            Request::AuthDisable(_) => a.disable()?,
            Request::Authenticate(r) => {
                let token = a.authenticate(&r.name, &r.simple_token, index)?;
                return Ok(Applied::Auth(Some(token)));
            }
            Request::UserAdd(u) => a.user_add(&u.name, u.hashed_password, u.options)?,
            Request::UserDelete(u) => a.user_delete(&u.name)?,
            Request::UserChangePassword(u) => a.user_change_password(&u.name, u.hashed_password)?,
            Request::UserGrantRole(u) => a.user_grant_role(&u.user, &u.role)?,
            Request::UserRevokeRole(u) => a.user_revoke_role(&u.name, &u.role)?,
            Request::RoleAdd(r) => a.role_add(&r.name)?,
            Request::RoleDelete(r) => a.role_delete(&r.role)?,
            Request::RoleGrantPermission(r) => {
                let perm = r.perm.ok_or(EtcdError::PermissionNotGiven)?;
                a.role_grant_permission(&r.name, perm)?
            }
            Request::RoleRevokePermission(r) => {
                a.role_revoke_permission(&r.role, &r.key, &r.range_end)?
            }
            other => {
                return Err(EtcdError::Internal(format!(
                    "not an auth request: {other:?}"
                )))
            }
        };
        self.write_auth(g, index, changes)
    }

    fn alarmed(&self, alarm: AlarmType) -> bool {
        self.alarms.lock().iter().any(|(_, a)| *a == alarm as i32)
    }

    fn no_space(&self) -> bool {
        self.alarmed(AlarmType::Nospace)
    }

    /// Runs `f` as the next entry of the group's write transaction (committed by `flush`).
    fn write<T>(
        &self,
        g: &mut Group<'_>,
        index: u64,
        f: impl FnOnce(&mut mvcc::WriteTxn) -> Result<T>,
    ) -> Result<T> {
        let store = g.store;
        let txn = g.txn.get_or_insert_with(|| store.write());
        let out = f(txn);
        if out.is_err() {
            if txn.is_dirty() {
                // etcd panics here too: a half-applied transaction cannot be rolled back.
                tracing::error!(index, "write transaction failed after changing the store");
                std::process::exit(1);
            }
            txn.abandon_entry();
        }
        let out = out?;
        let c = txn.end_entry();
        g.index = index;
        // The lessor follows at once: a later entry of the group may revoke the lease.
        for ch in c.lease_changes {
            match ch {
                mvcc::LeaseChange::Attach(id, k) => self.lessor.attach(id, k),
                mvcc::LeaseChange::Detach(id, k) => self.lessor.detach(id, &k),
            }
        }
        if !c.events.is_empty() {
            g.events.push((c.rev, c.events));
        }
        Ok(out)
    }

    /// Commits the group's writes in one backend batch, then tells watchers and waiting
    /// clients, in log order.
    fn flush(&self, g: &mut Group<'_>) {
        if let Some(txn) = g.txn.take() {
            if let Err(e) = txn.commit(g.index) {
                tracing::error!(index = g.index, error = %e, "backend write failed");
                std::process::exit(1);
            }
        }
        for (rev, events) in g.events.drain(..) {
            self.hub.publish(rev, events);
        }
        for (id, result) in g.done.drain(..) {
            self.waiters.complete(id, result);
        }
    }

    fn apply_request(
        &mut self,
        g: &mut Group<'_>,
        index: u64,
        request: Request,
    ) -> Result<Applied> {
        // etcd's corrupt applier: once a member's data is known to differ, nothing changes the
        // key space or leases until an operator disarms the alarm.
        if matches!(
            request,
            Request::Put(_)
                | Request::DeleteRange(_)
                | Request::Txn(_)
                | Request::Compaction(_)
                | Request::LeaseGrant(_)
                | Request::LeaseRevoke(_)
        ) && self.alarmed(AlarmType::Corrupt)
        {
            return Err(EtcdError::Corrupt);
        }
        match request {
            Request::Put(p) => {
                if self.no_space() {
                    return Err(EtcdError::NoSpace);
                }
                if p.lease != 0 && !self.lessor.exists(p.lease) {
                    return Err(EtcdError::LeaseNotFound);
                }
                self.write(g, index, |t| apply::put(t, &p))
                    .map(Applied::Put)
            }
            Request::DeleteRange(d) => self
                .write(g, index, |t| apply::delete_range(t, &d))
                .map(Applied::DeleteRange),
            Request::Txn(t) => {
                // etcd 3.4's capped applier refuses a Txn with puts under NOSPACE (3.5 refuses
                // every Txn that is not read-only; see maintenance.rs).
                if self.no_space() && apply::txn_has_puts(&t) {
                    return Err(EtcdError::NoSpace);
                }
                let lessor = self.lessor.clone();
                self.write(g, index, |w| apply::txn(w, &lessor, &t))
                    .map(Applied::Txn)
            }
            Request::Compaction(c) => {
                let prev = self.store.compact_rev();
                let keep = self.store.schedule_compaction(c.revision)?;
                let (done_tx, done_rx) = oneshot::channel();
                let store = self.store.clone();
                let rev = c.revision;
                let pace = self.compaction_pace;
                std::thread::spawn(move || {
                    if let Err(e) = store.compact_backend(rev, &keep, Some(prev), pace) {
                        tracing::error!(revision = rev, error = %e, "physical compaction failed");
                    }
                    let _ = done_tx.send(());
                });
                let resp = CompactionResponse {
                    header: Some(ResponseHeader {
                        revision: self.store.current_rev(),
                        ..Default::default()
                    }),
                };
                Ok(Applied::Compaction(resp, c.physical.then_some(done_rx)))
            }
            Request::LeaseGrant(grant) => {
                if self.no_space() {
                    return Err(EtcdError::NoSpace);
                }
                let ttl = self.lessor.grant(grant.id, grant.ttl)?;
                let rev = self.write(g, index, |t| {
                    let mut k = mvcc::LEASE_PREFIX.to_vec();
                    k.extend_from_slice(&grant.id.to_be_bytes());
                    t.put_record(k, ttl.to_be_bytes().to_vec());
                    Ok(mvcc::ReadView::rev(t))
                })?;
                Ok(Applied::LeaseGrant(LeaseGrantResponse {
                    header: Some(ResponseHeader {
                        revision: rev,
                        ..Default::default()
                    }),
                    id: grant.id,
                    ttl,
                    error: String::new(),
                }))
            }
            Request::LeaseRevoke(r) => {
                let keys = self.lessor.keys(r.id).ok_or(EtcdError::LeaseNotFound)?;
                let rev = self.write(g, index, |t| {
                    for k in &keys {
                        t.delete_range(k, RangeEnd::Key);
                    }
                    let mut k = mvcc::LEASE_PREFIX.to_vec();
                    k.extend_from_slice(&r.id.to_be_bytes());
                    t.remove_record(k);
                    Ok(mvcc::ReadView::rev(t))
                })?;
                let _ = self.lessor.revoke(r.id);
                Ok(Applied::LeaseRevoke(LeaseRevokeResponse {
                    header: Some(ResponseHeader {
                        revision: rev,
                        ..Default::default()
                    }),
                }))
            }
            Request::Alarm(a) => self.apply_alarm(g, index, a).map(Applied::Alarm),
            Request::MemberAttributes(a) => {
                let attrs = a.attributes.clone().unwrap_or_default();
                let rec = self.membership.write().update(a.id, |m| {
                    m.name = attrs.name;
                    m.client_ur_ls = attrs.client_urls;
                });
                match rec {
                    Some(RecordChange::Put(k, v)) => self.write(g, index, |t| {
                        t.put_record(k, v);
                        Ok(())
                    })?,
                    _ => return Err(EtcdError::MemberNotFound),
                }
                Ok(Applied::MemberUpdated)
            }
            Request::MemberUpdate(u) => {
                let rec = self
                    .membership
                    .write()
                    .update(u.id, |m| m.peer_ur_ls = u.peer_ur_ls.clone());
                match rec {
                    Some(RecordChange::Put(k, v)) => self.write(g, index, |t| {
                        t.put_record(k, v);
                        Ok(())
                    })?,
                    _ => return Err(EtcdError::MemberNotFound),
                }
                if u.id != self.id {
                    self.transport.set_peer(u.id, u.peer_ur_ls.clone());
                }
                Ok(Applied::Members(self.membership.read().members()))
            }
            Request::DowngradeInfoSet(d) => {
                let info = crate::version::Downgrade {
                    enabled: d.enabled,
                    target: if d.enabled { d.ver } else { String::new() },
                };
                tracing::info!(enabled = info.enabled, target = %info.target, "downgrade info set");
                self.write(g, index, |t| {
                    match info.enabled {
                        true => t.put_record(mvcc::META_DOWNGRADE.to_vec(), info.encode()),
                        false => t.remove_record(mvcc::META_DOWNGRADE.to_vec()),
                    }
                    Ok(())
                })?;
                Ok(Applied::Downgrade)
            }
            auth_request => self.apply_auth(g, index, auth_request),
        }
    }

    fn apply_alarm(
        &mut self,
        g: &mut Group<'_>,
        index: u64,
        a: AlarmRequest,
    ) -> Result<AlarmResponse> {
        let action = AlarmAction::try_from(a.action).unwrap_or(AlarmAction::Get);
        let mut changed = Vec::new();
        match action {
            AlarmAction::Get => {}
            AlarmAction::Activate => {
                // An alarm already active is answered as it is (etcd's alarm store).
                if a.alarm != AlarmType::None as i32 {
                    changed.push((a.member_id, a.alarm));
                    if self.alarms.lock().insert((a.member_id, a.alarm)) {
                        tracing::warn!(member = %format!("{:x}", a.member_id), alarm = a.alarm, "alarm raised");
                        self.write(g, index, |t| {
                            t.put_record(alarm_key(a.member_id, a.alarm), vec![]);
                            Ok(())
                        })?;
                    }
                }
            }
            AlarmAction::Deactivate => {
                if self.alarms.lock().remove(&(a.member_id, a.alarm)) {
                    changed.push((a.member_id, a.alarm));
                    self.write(g, index, |t| {
                        t.remove_record(alarm_key(a.member_id, a.alarm));
                        Ok(())
                    })?;
                }
            }
        }
        let alarms = match action {
            AlarmAction::Get => self
                .alarms
                .lock()
                .iter()
                .map(|(m, a)| AlarmMember {
                    member_id: *m,
                    alarm: *a,
                })
                .collect(),
            _ => changed
                .into_iter()
                .map(|(m, a)| AlarmMember {
                    member_id: m,
                    alarm: a,
                })
                .collect(),
        };
        Ok(AlarmResponse {
            header: Some(ResponseHeader::default()),
            alarms,
        })
    }
}

/// The request's kind in a slow-apply warning.
fn request_kind(r: &Request) -> &'static str {
    match r {
        Request::Put(_) => "put",
        Request::DeleteRange(_) => "delete_range",
        Request::Txn(_) => "txn",
        Request::Compaction(_) => "compaction",
        Request::LeaseGrant(_) => "lease_grant",
        Request::LeaseRevoke(_) => "lease_revoke",
        _ => "other",
    }
}
