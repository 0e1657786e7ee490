//! The etcd server: wires the Raft node, the applier, the MVCC store, the lessor and watch,
//! and offers the API layer three things: propose a write and wait for its applied result,
//! pass a linearizable read barrier (ReadIndex), and fill response headers.

use crate::apply;
use crate::config::{AutoCompaction, Config};
use crate::error::{EtcdError, Result};
use crate::lease::Lessor;
use crate::membership::{self, Member};
use crate::mvcc::{self, RangeEnd, Store};
use crate::pb::etcdserverpb::{
    alarm_request::AlarmAction, AlarmMember, AlarmRequest, AlarmResponse, AlarmType,
    CompactionRequest, CompactionResponse, DeleteRangeResponse, LeaseGrantResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, PutResponse, ResponseHeader, TxnResponse,
};
use crate::pb::oxcdpb::{raft_request::Request, RaftRequest};
use crate::raft_node::{self, CommittedBatch, NodeConfig, RaftInput, RaftNode, RaftStatus};
use crate::wal::{Replayed, Wal};
use crate::watch::WatchHub;
use parking_lot::Mutex;
use prost::Message;
use raft::prelude::{ConfState, EntryType, SnapshotMetadata};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
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
    pub member: Member,
    pub cluster_id: u64,
    pub store: Arc<Store>,
    pub lessor: Arc<Lessor>,
    pub hub: Arc<WatchHub>,
    pub raft_status: Arc<RaftStatus>,
    pub alarms: Alarms,
    raft_tx: mpsc::Sender<RaftInput>,
    waiters: Arc<Waiters>,
    next_id: AtomicU64,
    applied_rx: watch::Receiver<u64>,
}

fn alarm_key(member: u64, alarm: i32) -> Vec<u8> {
    let mut k = mvcc::ALARM_PREFIX.to_vec();
    k.extend_from_slice(&member.to_be_bytes());
    k.extend_from_slice(&alarm.to_be_bytes());
    k
}

impl EtcdServer {
    /// Opens or creates the member's data dir and starts Raft and the applier.
    pub fn start(cfg: Config) -> anyhow::Result<Arc<EtcdServer>> {
        let (name, peer_urls) = cfg
            .initial_cluster
            .iter()
            .find(|(n, _)| *n == cfg.name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("local member missing from the initial cluster"))?;
        let ids: Vec<u64> = cfg
            .initial_cluster
            .iter()
            .map(|(_, urls)| membership::member_id(urls, &cfg.initial_cluster_token))
            .collect();
        let member = Member {
            id: membership::member_id(&peer_urls, &cfg.initial_cluster_token),
            name,
            peer_urls,
            client_urls: cfg.advertise_client_urls.clone(),
            is_learner: false,
        };
        let cluster_id = membership::cluster_id(&ids);
        let member_dir = cfg.data_dir.join("member");
        std::fs::create_dir_all(&member_dir)?;
        let (store, recovered) = Store::open(&member_dir.join("db"))?;
        let (wal, replayed) = if Wal::exists(&cfg.wal_dir) {
            Wal::open(&cfg.wal_dir)?
        } else {
            let mut meta = SnapshotMetadata::default();
            meta.set_conf_state(ConfState::from((ids.clone(), vec![])));
            let wal = Wal::create(&cfg.wal_dir, meta.clone())?;
            (
                wal,
                Replayed {
                    snapshot: meta,
                    ..Default::default()
                },
            )
        };
        let applied = recovered.consistent_index.max(replayed.snapshot.index);
        tracing::info!(
            member_id = %format!("{:x}", member.id),
            cluster_id = %format!("{cluster_id:x}"),
            applied,
            wal_entries = replayed.entries.len(),
            revision = store.current_rev(),
            "starting member"
        );

        let lessor = Arc::new(Lessor::new(cfg.min_lease_ttl()));
        for (id, ttl) in &recovered.leases {
            lessor.recover(*id, *ttl);
        }
        for (id, key) in recovered.attached {
            lessor.attach(id, key);
        }
        let alarms: Alarms = Arc::new(Mutex::new(BTreeSet::new()));
        for rec in &recovered.alarms {
            if rec.len() == 12 {
                let m = u64::from_be_bytes(rec[..8].try_into()?);
                let a = i32::from_be_bytes(rec[8..].try_into()?);
                alarms.lock().insert((m, a));
            }
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

        let storage = raft_node::build_storage(&replayed, applied)?;
        let refuse_waiters = waiters.clone();
        let node = RaftNode::new(
            NodeConfig {
                id: member.id,
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
            Box::new(move |id, err| refuse_waiters.complete(id, Err(err))),
        )?;
        std::thread::Builder::new()
            .name("raft".into())
            .spawn(move || node.run())?;

        let applier = Applier {
            store: store.clone(),
            lessor: lessor.clone(),
            hub: hub.clone(),
            waiters: waiters.clone(),
            alarms: alarms.clone(),
            applied_tx,
            raft_tx: raft_tx.clone(),
            applied,
            released: applied,
            snapshot_count: cfg.snapshot_count,
        };
        std::thread::Builder::new()
            .name("apply".into())
            .spawn(move || applier.run(apply_rx))?;

        let seed: u64 = rand::random::<u64>() >> 2;
        let server = Arc::new(EtcdServer {
            cfg,
            member,
            cluster_id,
            store,
            lessor,
            hub,
            raft_status,
            alarms,
            raft_tx,
            waiters,
            next_id: AtomicU64::new(seed.max(1)),
            applied_rx,
        });
        server.clone().spawn_lease_expiry();
        server.clone().spawn_auto_compaction();
        Ok(server)
    }

    /// A fresh positive id (request ids, and lease ids when the client names none).
    pub fn next_id(&self) -> i64 {
        (self.next_id.fetch_add(1, Ordering::Relaxed) & (i64::MAX as u64)).max(1) as i64
    }

    pub fn header(&self, rev: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member.id,
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

    /// Replicates a request and waits for the result of applying it.
    pub async fn propose(&self, req: Request) -> Result<Applied> {
        let id = self.next_id() as u64;
        let data = RaftRequest {
            id,
            request: Some(req),
        }
        .encode_to_vec();
        if data.len() > self.cfg.max_request_bytes {
            return Err(EtcdError::RequestTooLarge);
        }
        let rx = self.waiters.register(id);
        if self.raft_tx.send(RaftInput::Propose { id, data }).is_err() {
            self.waiters.forget(id);
            return Err(EtcdError::Stopped);
        }
        match tokio::time::timeout(self.request_timeout(), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(EtcdError::Stopped),
            Err(_) => {
                self.waiters.forget(id);
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
            member_id: self.member.id,
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

/// Applies committed entries in log order on its own thread.
struct Applier {
    store: Arc<Store>,
    lessor: Arc<Lessor>,
    hub: Arc<WatchHub>,
    waiters: Arc<Waiters>,
    alarms: Alarms,
    applied_tx: watch::Sender<u64>,
    raft_tx: mpsc::Sender<RaftInput>,
    applied: u64,
    released: u64,
    snapshot_count: u64,
}

impl Applier {
    fn run(mut self, rx: mpsc::Receiver<CommittedBatch>) {
        for batch in rx {
            for e in batch.entries {
                if e.index <= self.applied {
                    continue;
                }
                if e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty() {
                    self.apply_entry(e.index, &e.data);
                }
                self.applied = e.index;
            }
            self.applied_tx.send_replace(self.applied);
            if self.applied - self.released >= self.snapshot_count {
                self.release();
            }
        }
    }

    /// The state machine is made durable, then the Raft thread drops the log before it.
    fn release(&mut self) {
        match self.store.sync(self.applied) {
            Ok(()) => {
                self.released = self.applied;
                let _ = self.raft_tx.send(RaftInput::Release(self.applied));
            }
            Err(e) => tracing::error!(error = %e, "syncing the backend failed"),
        }
    }

    fn apply_entry(&mut self, index: u64, data: &[u8]) {
        let req = match RaftRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(index, error = %e, "undecodable log entry");
                std::process::exit(1);
            }
        };
        let Some(request) = req.request else { return };
        let result = self.apply_request(index, request);
        self.waiters.complete(req.id, result);
    }

    fn no_space(&self) -> bool {
        self.alarms
            .lock()
            .iter()
            .any(|(_, a)| *a == AlarmType::Nospace as i32)
    }

    /// Runs `f` in one write transaction and commits it with the entry's index.
    fn write<T>(&self, index: u64, f: impl FnOnce(&mut mvcc::WriteTxn) -> Result<T>) -> Result<T> {
        let mut txn = self.store.write();
        let out = f(&mut txn);
        if out.is_err() && txn.is_dirty() {
            // etcd panics here too: a half-applied transaction cannot be rolled back.
            tracing::error!(index, "write transaction failed after changing the store");
            std::process::exit(1);
        }
        let out = out?;
        match txn.commit(index) {
            Ok(c) => {
                for ch in c.lease_changes {
                    match ch {
                        mvcc::LeaseChange::Attach(id, k) => self.lessor.attach(id, k),
                        mvcc::LeaseChange::Detach(id, k) => self.lessor.detach(id, &k),
                    }
                }
                if !c.events.is_empty() {
                    self.hub.publish(c.rev, c.events);
                }
                Ok(out)
            }
            Err(e) => {
                tracing::error!(index, error = %e, "backend write failed");
                std::process::exit(1);
            }
        }
    }

    fn apply_request(&mut self, index: u64, request: Request) -> Result<Applied> {
        match request {
            Request::Put(p) => {
                if self.no_space() {
                    return Err(EtcdError::NoSpace);
                }
                if p.lease != 0 && !self.lessor.exists(p.lease) {
                    return Err(EtcdError::LeaseNotFound);
                }
                self.write(index, |t| apply::put(t, &p)).map(Applied::Put)
            }
            Request::DeleteRange(d) => self
                .write(index, |t| apply::delete_range(t, &d))
                .map(Applied::DeleteRange),
            Request::Txn(t) => {
                if self.no_space() && apply::txn_has_puts(&t) {
                    return Err(EtcdError::NoSpace);
                }
                let lessor = self.lessor.clone();
                self.write(index, |w| apply::txn(w, &lessor, &t))
                    .map(Applied::Txn)
            }
            Request::Compaction(c) => {
                let keep = self.store.schedule_compaction(c.revision)?;
                let (done_tx, done_rx) = oneshot::channel();
                let store = self.store.clone();
                let rev = c.revision;
                std::thread::spawn(move || {
                    if let Err(e) = store.compact_backend(rev, &keep) {
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
            Request::LeaseGrant(g) => {
                if self.no_space() {
                    return Err(EtcdError::NoSpace);
                }
                let ttl = self.lessor.grant(g.id, g.ttl)?;
                let rev = self.write(index, |t| {
                    let mut k = mvcc::LEASE_PREFIX.to_vec();
                    k.extend_from_slice(&g.id.to_be_bytes());
                    t.put_record(k, ttl.to_be_bytes().to_vec());
                    Ok(mvcc::ReadView::rev(t))
                })?;
                Ok(Applied::LeaseGrant(LeaseGrantResponse {
                    header: Some(ResponseHeader {
                        revision: rev,
                        ..Default::default()
                    }),
                    id: g.id,
                    ttl,
                    error: String::new(),
                }))
            }
            Request::LeaseRevoke(r) => {
                let keys = self.lessor.keys(r.id).ok_or(EtcdError::LeaseNotFound)?;
                let rev = self.write(index, |t| {
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
            Request::Alarm(a) => self.apply_alarm(index, a).map(Applied::Alarm),
        }
    }

    fn apply_alarm(&mut self, index: u64, a: AlarmRequest) -> Result<AlarmResponse> {
        let action = AlarmAction::try_from(a.action).unwrap_or(AlarmAction::Get);
        let mut changed = Vec::new();
        match action {
            AlarmAction::Get => {}
            AlarmAction::Activate => {
                if a.alarm != AlarmType::None as i32
                    && self.alarms.lock().insert((a.member_id, a.alarm))
                {
                    tracing::warn!(member = %format!("{:x}", a.member_id), alarm = a.alarm, "alarm raised");
                    changed.push((a.member_id, a.alarm));
                    self.write(index, |t| {
                        t.put_record(alarm_key(a.member_id, a.alarm), vec![]);
                        Ok(())
                    })?;
                }
            }
            AlarmAction::Deactivate => {
                if self.alarms.lock().remove(&(a.member_id, a.alarm)) {
                    changed.push((a.member_id, a.alarm));
                    self.write(index, |t| {
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
