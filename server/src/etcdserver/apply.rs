//! The applier (etcd's `apply` package): applies committed Raft entries in log order on a
//! thread of its own, a group of entries per backend batch, and answers the waiting proposals.

use super::*;
use crate::auth::{self, AuthInfo, AuthStore};
use crate::error::{EtcdError, Result};
use crate::lease::Lessor;
use crate::membership::{Member, Membership, RecordChange};
use crate::mvcc::{self, RangeEnd, Store};
use crate::pb::etcdserverpb::{
    alarm_request::AlarmAction, AlarmMember, AlarmRequest, AlarmResponse, AlarmType,
    CompactionResponse, LeaseGrantResponse, LeaseRevokeResponse, ResponseHeader,
};
use crate::pb::oxcdpb::{raft_request::Request, ConfChangeContext, RaftRequest};
use crate::raft_node::{CommittedBatch, RaftInput};
use crate::schema::{ALARM_PREFIX, LEASE_PREFIX, META_CONF_STATE, META_DOWNGRADE};
use crate::transport::Transport;
use crate::txn;
use crate::watch::WatchHub;
use prost::Message;
use protobuf::Message as _;
use raft::prelude::{ConfChangeType, ConfChangeV2, ConfState, EntryType};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

fn alarm_key(member: u64, alarm: i32) -> Vec<u8> {
    let mut k = ALARM_PREFIX.to_vec();
    k.extend_from_slice(&member.to_be_bytes());
    k.extend_from_slice(&alarm.to_be_bytes());
    k
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
pub(super) struct Applier {
    pub(super) id: u64,
    pub(super) membership: Arc<parking_lot::RwLock<Membership>>,
    pub(super) transport: Arc<Transport>,
    pub(super) store: Arc<Store>,
    pub(super) lessor: Arc<Lessor>,
    pub(super) auth: Arc<AuthStore>,
    pub(super) hub: Arc<WatchHub>,
    pub(super) waiters: Arc<Waiters>,
    pub(super) alarms: Alarms,
    pub(super) applied_tx: watch::Sender<u64>,
    pub(super) raft_tx: mpsc::Sender<RaftInput>,
    pub(super) applied: u64,
    pub(super) released: u64,
    pub(super) snapshot_count: u64,
    pub(super) catchup_entries: u64,
    /// `--warning-apply-duration`.
    pub(super) warn_apply: Duration,
    pub(super) compaction_pace: mvcc::CompactionPace,
}

impl Applier {
    pub(super) fn run(mut self, rx: mpsc::Receiver<CommittedBatch>) {
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
        let (ms, alarms) = match recover(&self.store, &rec, &self.lessor, &self.auth) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(index, error = %e, "reading an installed snapshot failed");
                std::process::exit(1);
            }
        };
        *self.alarms.lock() = alarms;
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
            Request::Txn(t) => txn::check_txn_auth(auth, ai, t),
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
                self.write(g, index, |t| txn::put(t, &p)).map(Applied::Put)
            }
            Request::DeleteRange(d) => self
                .write(g, index, |t| txn::delete_range(t, &d))
                .map(Applied::DeleteRange),
            Request::Txn(t) => {
                // etcd 3.4's capped applier refuses a Txn with puts under NOSPACE (3.5 refuses
                // every Txn that is not read-only; see maintenance.rs).
                if self.no_space() && txn::txn_has_puts(&t) {
                    return Err(EtcdError::NoSpace);
                }
                let lessor = self.lessor.clone();
                self.write(g, index, |w| txn::txn(w, &lessor, &t))
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
                    let mut k = LEASE_PREFIX.to_vec();
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
                    let mut k = LEASE_PREFIX.to_vec();
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
                        true => t.put_record(META_DOWNGRADE.to_vec(), info.encode()),
                        false => t.remove_record(META_DOWNGRADE.to_vec()),
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
