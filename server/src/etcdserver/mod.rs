//! The etcd server (etcd's `etcdserver` package): the `EtcdServer` that the API layer calls,
//! offering three things: propose a write and wait for its applied result, pass a
//! linearizable read barrier (ReadIndex), and fill response headers. Its bootstrap (open or
//! create the data dir, join or start the cluster, start Raft and the applier) is in
//! `bootstrap.rs`; the applier, which applies committed entries in log order, in `apply.rs`.

mod apply;
mod bootstrap;

use crate::auth::{AuthInfo, AuthStore, Caller};
use crate::config::{AutoCompaction, Config};
use crate::error::{EtcdError, Result};
use crate::lease::Lessor;
use crate::membership::{self, Member, Membership};
use crate::mvcc::{self, Store};
use crate::pb::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmResponse, AlarmType, CompactionRequest,
    CompactionResponse, DeleteRangeResponse, LeaseGrantResponse, LeaseRevokeRequest,
    LeaseRevokeResponse, PutResponse, ResponseHeader, TxnResponse,
};
use crate::pb::oxcdpb::{
    peer_client::PeerClient, raft_request::Request, Attributes, MemberAttributes, RaftRequest,
};
use crate::raft_node::{NodeStatus, RaftInput, RaftStatus};
use crate::schema::{AUTH_PREFIX, META_DOWNGRADE};
use crate::transport::Transport;
use crate::watch::WatchHub;
use parking_lot::Mutex;
use prost::Message;
use raft::prelude::ConfChangeType;
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

/// Rebuilds what lives beside the key space from the backend (leases, auth, alarms and the
/// member list), on start and after a snapshot from the leader is installed.
fn recover(
    store: &Store,
    rec: &mvcc::Recovered,
    lessor: &Lessor,
    auth: &AuthStore,
) -> mvcc::Result<(Membership, BTreeSet<(u64, i32)>)> {
    lessor.reset(&rec.leases, &rec.attached);
    auth.recover(&store.records(AUTH_PREFIX)?);
    let alarms = rec
        .alarms
        .iter()
        .filter_map(|r| {
            let member = u64::from_be_bytes(r.get(..8)?.try_into().ok()?);
            let alarm = i32::from_be_bytes(r.get(8..)?.try_into().ok()?);
            Some((member, alarm))
        })
        .collect();
    Ok((Membership::load(store)?, alarms))
}

impl EtcdServer {
    /// Where a client backup is written before it is streamed (removed after; leftovers of a
    /// crash are removed on the next start).
    pub fn backup_scratch_path(&self) -> std::path::PathBuf {
        let dir = self.cfg.data_dir.join("member").join("snap");
        let _ = std::fs::create_dir_all(&dir);
        dir.join(format!("backup-{:016x}.db.tmp", rand::random::<u64>()))
    }

    /// The cluster's downgrade job as the applied log has it.
    pub fn downgrade_info(&self) -> crate::version::Downgrade {
        match self.store.get_record(META_DOWNGRADE) {
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
        let cc = membership::conf_change(change, member.id, Some(member), id);
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
        let c = crate::transport::connect_peer(&urls, &self.cfg.peer_tls)
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
