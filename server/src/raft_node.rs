//! The Raft node: the one thread that drives `RawNode` — tick, step peer messages, propose,
//! take `Ready`, persist entries and hard state to the WAL with one fdatasync per Ready (group
//! commit), send messages, hand committed entries to the applier, advance.
//!
//! Persisting before acknowledging is what keeps Raft safe: messages that depend on the
//! Ready's entries (`persisted_messages`, e.g. votes and append responses) go out only after
//! the fsync, and the leader counts its own entries as replicated only once persisted.

use crate::error::EtcdError;
use crate::transport::{RaftReports, Transport};
use crate::wal::{Replayed, Wal};
use raft::prelude::*;
use raft::storage::MemStorage;
use raft::{SnapshotStatus, StateRole};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What the rest of the server asks of the Raft thread.
pub enum RaftInput {
    /// Append a command; `id` lets a refusal reach the waiting request.
    Propose {
        id: u64,
        data: Vec<u8>,
    },
    /// Propose a membership change.
    ProposeConfChange {
        id: u64,
        cc: ConfChangeV2,
    },
    /// A linearizable read asks for the index it must wait for (batched per loop turn).
    ReadIndex(oneshot::Sender<Result<u64, EtcdError>>),
    /// A message from a peer.
    Step(Box<Message>),
    /// The applier reached a committed membership change: apply it to Raft's configuration.
    ApplyConfChange(ConfChangeV2, SyncSender<ConfState>),
    Unreachable(u64),
    /// A snapshot to this peer was delivered (true) or failed (false).
    SnapshotDone(u64, bool),
    /// A snapshot arrived from the leader and is staged; step its message.
    SnapshotReceived {
        msg: Box<Message>,
        name: String,
        db: sled::Db,
    },
    TransferLeader(u64),
    Status(oneshot::Sender<NodeStatus>),
    /// The state machine is durable up to this index: the log before it can go.
    Release {
        index: u64,
        conf_state: ConfState,
        keep_entries: u64,
    },
    Stop,
}

/// A received snapshot the applier must make the state before anything else.
pub struct Install {
    pub name: String,
    pub db: sled::Db,
    pub meta: SnapshotMetadata,
    pub done: SyncSender<()>,
}

/// Committed entries on their way to the applier, in log order (or a snapshot to install).
pub struct CommittedBatch {
    pub entries: Vec<Entry>,
    pub install: Option<Install>,
}

/// Raft facts the API reports (Status, response headers).
#[derive(Default)]
pub struct RaftStatus {
    pub term: AtomicU64,
    pub leader: AtomicU64,
    pub commit: AtomicU64,
    pub is_leader: AtomicBool,
}

/// A snapshot of the node's view of the group (membership checks, promotion, move-leader).
#[derive(Clone, Debug, Default)]
pub struct NodeStatus {
    pub id: u64,
    pub leader: u64,
    pub is_leader: bool,
    pub last_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Leader only: per member, (matched index, recently active).
    pub progress: HashMap<u64, (u64, bool)>,
}

pub struct NodeConfig {
    pub id: u64,
    pub election_ticks: usize,
    pub heartbeat: Duration,
}

/// The in-memory Raft log from a replayed WAL, the applier's durable index and the
/// configuration as of that index.
pub fn build_storage(
    rep: &Replayed,
    applied: u64,
    conf_state: Option<ConfState>,
) -> raft::Result<MemStorage> {
    let storage = if rep.snapshot.index == 0 {
        MemStorage::new_with_conf_state(rep.snapshot.get_conf_state().clone())
    } else {
        let s = MemStorage::new();
        let mut snap = Snapshot::default();
        snap.set_metadata(rep.snapshot.clone());
        s.wl().apply_snapshot(snap)?;
        s
    };
    storage.wl().append(&rep.entries)?;
    if let Some(cs) = conf_state {
        storage.wl().set_conf_state(cs);
    }
    let mut hs = rep.hard_state.clone();
    // The commit index may not have reached the WAL before a crash although the entries were
    // applied: what was applied was committed, and is in the log.
    let last = rep
        .entries
        .last()
        .map(|e| e.index)
        .unwrap_or(rep.snapshot.index);
    hs.commit = hs.commit.max(applied.min(last)).max(rep.snapshot.index);
    storage.wl().set_hardstate(hs);
    Ok(storage)
}

/// The transport's reports reach the Raft thread as inputs.
impl RaftReports for Sender<RaftInput> {
    fn report_unreachable(&self, id: u64) {
        let _ = self.send(RaftInput::Unreachable(id));
    }

    fn report_snapshot(&self, id: u64, ok: bool) {
        let _ = self.send(RaftInput::SnapshotDone(id, ok));
    }
}

type Reads = Vec<oneshot::Sender<Result<u64, EtcdError>>>;

pub struct RaftNode {
    node: RawNode<MemStorage>,
    wal: Wal,
    inputs: Receiver<RaftInput>,
    apply_tx: Sender<CommittedBatch>,
    status: Arc<RaftStatus>,
    transport: Arc<Transport>,
    refuse: Box<dyn Fn(u64, EtcdError) + Send>,
    /// Called when this member becomes leader (true) or stops being it: the server above
    /// (its lessor) follows, as etcd's raft loop tells its ready handler.
    on_leadership: Box<dyn Fn(bool) + Send>,
    heartbeat: Duration,
    pending_reads: Reads,
    /// The staged state of a snapshot stepped into Raft, until Raft asks to install it.
    staged: Option<(u64, String, sled::Db)>,
    reads_in_flight: HashMap<Vec<u8>, Reads>,
    read_seq: u64,
}

impl RaftNode {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: NodeConfig,
        storage: MemStorage,
        applied: u64,
        wal: Wal,
        inputs: Receiver<RaftInput>,
        apply_tx: Sender<CommittedBatch>,
        status: Arc<RaftStatus>,
        transport: Arc<Transport>,
        refuse: Box<dyn Fn(u64, EtcdError) + Send>,
        on_leadership: Box<dyn Fn(bool) + Send>,
    ) -> raft::Result<Self> {
        let rc = Config {
            id: cfg.id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: 1,
            applied,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            max_committed_size_per_ready: 16 * 1024 * 1024,
            ..Default::default()
        };
        let logger = slog::Logger::root(crate::log::SlogToTracing, slog::o!());
        let node = RawNode::new(&rc, storage, &logger)?;
        Ok(RaftNode {
            node,
            wal,
            inputs,
            apply_tx,
            status,
            transport,
            refuse,
            on_leadership,
            heartbeat: cfg.heartbeat,
            pending_reads: Vec::new(),
            staged: None,
            reads_in_flight: HashMap::new(),
            read_seq: 0,
        })
    }

    /// A sole voter need not wait an election timeout to lead.
    fn campaign_if_alone(&mut self) {
        let conf = self.node.raft.prs().conf();
        let voters = conf.voters().ids();
        if voters.len() == 1
            && voters.contains(self.node.raft.id)
            && self.node.raft.state != StateRole::Leader
        {
            if let Err(e) = self.node.campaign() {
                tracing::error!(error = %e, "campaign failed");
            }
        }
    }

    /// Runs until `Stop` or until every sender is gone.
    pub fn run(mut self) {
        self.campaign_if_alone();
        let mut next_tick = Instant::now() + self.heartbeat;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.inputs.recv_timeout(wait) {
                Ok(input) => {
                    if !self.handle(input) {
                        break;
                    }
                    // Group commit: take every request already queued into this one Ready.
                    let mut stop = false;
                    while let Ok(input) = self.inputs.try_recv() {
                        if !self.handle(input) {
                            stop = true;
                            break;
                        }
                    }
                    if stop {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_tick {
                self.node.tick();
                next_tick = Instant::now() + self.heartbeat;
            }
            self.issue_reads();
            if let Err(e) = self.on_ready() {
                // Failing to persist is fatal: continuing could acknowledge lost writes.
                tracing::error!(error = %e, "raft storage failure, stopping");
                std::process::exit(1);
            }
        }
        self.fail_reads(EtcdError::Stopped);
    }

    fn fail_reads(&mut self, err: EtcdError) {
        for (_, senders) in self.reads_in_flight.drain() {
            for s in senders {
                let _ = s.send(Err(err.clone()));
            }
        }
    }

    fn refuse_error(e: raft::Error) -> EtcdError {
        match e {
            raft::Error::ProposalDropped => EtcdError::NoLeader,
            other => EtcdError::Internal(other.to_string()),
        }
    }

    fn handle(&mut self, input: RaftInput) -> bool {
        match input {
            RaftInput::Propose { id, data } => {
                if let Err(e) = self.node.propose(vec![], data) {
                    (self.refuse)(id, Self::refuse_error(e));
                }
            }
            RaftInput::ProposeConfChange { id, cc } => {
                if let Err(e) = self.node.propose_conf_change(vec![], cc) {
                    (self.refuse)(id, Self::refuse_error(e));
                }
            }
            RaftInput::ReadIndex(tx) => self.pending_reads.push(tx),
            RaftInput::Step(m) => {
                if let Err(e) = self.node.step(*m) {
                    tracing::debug!(error = %e, "stepping a peer message failed");
                }
            }
            RaftInput::ApplyConfChange(cc, reply) => {
                match self.node.apply_conf_change(&cc) {
                    Ok(cs) => {
                        let _ = reply.send(cs);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "applying a committed conf change failed");
                        std::process::exit(1);
                    }
                }
                self.campaign_if_alone();
            }
            RaftInput::Unreachable(id) => self.node.report_unreachable(id),
            RaftInput::SnapshotDone(id, ok) => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.node.report_snapshot(id, status);
            }
            RaftInput::SnapshotReceived { msg, name, db } => {
                let index = msg.get_snapshot().get_metadata().index;
                self.staged = Some((index, name, db));
                if let Err(e) = self.node.step(*msg) {
                    tracing::warn!(error = %e, "stepping a snapshot failed");
                }
            }
            RaftInput::TransferLeader(id) => self.node.transfer_leader(id),
            RaftInput::Status(tx) => {
                let _ = tx.send(self.node_status());
            }
            RaftInput::Release {
                index,
                conf_state,
                keep_entries,
            } => {
                if let Err(e) = self.release(index, conf_state, keep_entries) {
                    tracing::error!(error = %e, index, "releasing the WAL failed");
                }
            }
            RaftInput::Stop => return false,
        }
        true
    }

    fn node_status(&self) -> NodeStatus {
        let raft = &self.node.raft;
        let conf = raft.prs().conf();
        let mut progress = HashMap::new();
        if raft.state == StateRole::Leader {
            for (id, pr) in raft.prs().iter() {
                progress.insert(*id, (pr.matched, pr.recent_active || *id == raft.id));
            }
        }
        NodeStatus {
            id: raft.id,
            leader: raft.leader_id,
            is_leader: raft.state == StateRole::Leader,
            last_index: raft.raft_log.last_index(),
            voters: conf.voters().ids().iter().collect(),
            learners: conf.learners().iter().copied().collect(),
            progress,
        }
    }

    /// One ReadIndex request covers every read that arrived since the last one.
    fn issue_reads(&mut self) {
        if self.pending_reads.is_empty() {
            return;
        }
        if self.node.raft.leader_id == raft::INVALID_ID {
            for tx in self.pending_reads.drain(..) {
                let _ = tx.send(Err(EtcdError::NoLeader));
            }
            return;
        }
        self.read_seq += 1;
        // The leader keys pending reads by context and ignores a duplicate: contexts must be
        // unique across members, not just here (member ID + sequence, like etcd's request IDs).
        let mut ctx = self.node.raft.id.to_be_bytes().to_vec();
        ctx.extend_from_slice(&self.read_seq.to_be_bytes());
        self.node.read_index(ctx.clone());
        self.reads_in_flight
            .insert(ctx, std::mem::take(&mut self.pending_reads));
    }

    fn release(
        &mut self,
        index: u64,
        conf_state: ConfState,
        keep_entries: u64,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let store = self.node.store().clone();
        let term = store.term(index)?;
        self.wal.release_to(index, term, &conf_state)?;
        let keep_from = index.saturating_sub(keep_entries);
        if keep_from > store.first_index()? {
            store.wl().compact(keep_from)?;
        }
        Ok(())
    }

    fn send_committed(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        if let Some(last) = entries.last() {
            self.status.commit.fetch_max(last.index, Ordering::Relaxed);
        }
        let _ = self.apply_tx.send(CommittedBatch {
            entries,
            install: None,
        });
    }

    fn on_ready(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();
        if let Some(ss) = ready.ss() {
            self.on_soft_state(ss.leader_id, ss.raft_state);
        }
        let leading = self.node.raft.state == raft::StateRole::Leader;
        // Messages that do not depend on this Ready's entries go out before the fsync.
        if leading {
            crate::failpoint::hit("raftBeforeLeaderSend");
        }
        self.transport.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone())?;
        }
        let committed = ready.take_committed_entries();
        self.send_committed(committed);
        if !ready.entries().is_empty() {
            self.node.mut_store().wl().append(ready.entries())?;
        }
        let hs = ready.hs().cloned();
        if let Some(hs) = &hs {
            self.node.mut_store().wl().set_hardstate(hs.clone());
            self.status.term.store(hs.term, Ordering::Relaxed);
        }
        crate::failpoint::hit("raftBeforeSave");
        self.wal.append(ready.entries(), hs.as_ref())?;
        self.wal.sync()?;
        crate::failpoint::hit("raftAfterSave");
        if !leading {
            crate::failpoint::hit("raftBeforeFollowerSend");
        }
        self.transport.send(ready.take_persisted_messages());
        for rs in ready.take_read_states() {
            if let Some(senders) = self.reads_in_flight.remove(&rs.request_ctx) {
                for s in senders {
                    let _ = s.send(Ok(rs.index));
                }
            }
        }
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.node.store().rl().hard_state().clone();
            hs.commit = commit;
            self.node.mut_store().wl().set_hardstate(hs.clone());
            // Written now, made durable by the next sync; recovery also derives it.
            self.wal.append(&[], Some(&hs))?;
        }
        self.transport.send(light.take_messages());
        let committed = light.take_committed_entries();
        self.send_committed(committed);
        self.node.advance_apply();
        Ok(())
    }

    /// Raft accepted a snapshot from the leader: the applier swaps in the staged state
    /// (durably), then the log restarts at the snapshot point. In that order, so that a crash
    /// in between leaves a state ahead of the log, which start-up repairs.
    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), Box<dyn std::error::Error>> {
        let meta = snap.get_metadata().clone();
        let Some((index, name, db)) = self.staged.take() else {
            return Err(format!(
                "raft asked to install snapshot {} that was not staged",
                meta.index
            )
            .into());
        };
        if index != meta.index {
            return Err(format!(
                "staged snapshot {index} is not the one raft installs ({})",
                meta.index
            )
            .into());
        }
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        self.apply_tx.send(CommittedBatch {
            entries: vec![],
            install: Some(Install {
                name,
                db,
                meta: meta.clone(),
                done,
            }),
        })?;
        wait.recv()?;
        let mut hs = self.node.store().rl().hard_state().clone();
        hs.commit = hs.commit.max(meta.index);
        crate::failpoint::hit("raftBeforeSaveSnap");
        self.wal.reset_to(meta.clone(), hs)?;
        crate::failpoint::hit("raftAfterSaveSnap");
        crate::failpoint::hit("raftBeforeApplySnap");
        self.node.mut_store().wl().apply_snapshot(snap)?;
        crate::failpoint::hit("raftAfterApplySnap");
        // The log before the snapshot went with the reset.
        crate::failpoint::hit("raftAfterWALRelease");
        self.status.commit.fetch_max(meta.index, Ordering::Relaxed);
        tracing::info!(
            index = meta.index,
            term = meta.term,
            "installed snapshot from the leader"
        );
        Ok(())
    }

    fn on_soft_state(&mut self, leader: u64, role: StateRole) {
        let was_leader = self.status.is_leader.load(Ordering::Relaxed);
        let old_leader = self.status.leader.swap(leader, Ordering::Relaxed);
        let is_leader = role == StateRole::Leader;
        self.status.is_leader.store(is_leader, Ordering::Relaxed);
        crate::metrics::on_leader(old_leader, leader);
        if old_leader != leader {
            tracing::info!(leader = %format!("{leader:x}"), term = self.node.raft.term, "leader changed");
            // Reads waiting on the old leader will not be answered.
            self.fail_reads(EtcdError::LeaderChanged);
        }
        if is_leader != was_leader {
            (self.on_leadership)(is_leader);
        }
    }
}
