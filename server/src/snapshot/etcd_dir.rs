//! Starting on etcd 3.4's own data dir, so that oxcd replaces etcd in place: a member's dir
//! that etcd wrote, or one that `etcdctl snapshot restore` made (every etcd runbook's
//! disaster recovery ends with "start the member on the restored dir").
//!
//! etcd's layout: `member/snap/db`, the bbolt backend (keys, leases, auth, members), whose
//! `consistent_index` is the last log entry it holds; and `member/wal/*.wal`, the Raft log
//! (member and cluster IDs, hard state, entries). oxcd's data dir is made from both: the
//! backend becomes the state at a snapshot point at `consistent_index`, and the log entries
//! after it are carried over with the same indexes and terms, translated into oxcd's entry
//! format, so the member keeps its identity, term, vote and log in its cluster and applies
//! what etcd had not applied yet as it would have.
//!
//! The switch is crash-safe: oxcd's db and WAL are built under `.importing` names, etcd's
//! WAL directory is renamed to `<wal-dir>.etcd`, and renaming the db to `member/db` commits
//! the import. A crash before that point imports again from the same etcd files, which stay
//! (`member/snap`, `<wal-dir>.etcd`) for going back to etcd by hand.

use super::restore::sync_parent;
use super::{bolt, Result, SnapshotError};
use crate::membership;
use crate::mvcc::{Crc32c, Store};
use crate::pb::etcdserverpb::{Member, MemberUpdateRequest};
use crate::pb::oxcdpb::{
    raft_request::Request, Attributes, Authenticate, MemberAttributes, RaftRequest, UserAdd,
    UserChangePassword,
};
use crate::schema::{
    ALARM_PREFIX, MEMBER_PREFIX, META_CLUSTER_ID, META_CONF_STATE, META_CONSISTENT_INDEX,
    META_MEMBER_ID, META_SNAPSHOT_INDEX, META_SNAPSHOT_TERM, REMOVED_PREFIX,
};
use crate::wal::Wal;
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChangeType, ConfState, Entry, EntryType, HardState, SnapshotMetadata};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// etcd's on-disk messages (walpb, raftpb, etcdserverpb), as far as the import reads them.
mod wire {
    use crate::pb::etcdserverpb as pb;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Record {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(uint32, tag = "2")]
        pub crc: u32,
        #[prost(bytes = "vec", tag = "3")]
        pub data: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Metadata {
        #[prost(uint64, tag = "1")]
        pub node_id: u64,
        #[prost(uint64, tag = "2")]
        pub cluster_id: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WalSnapshot {
        #[prost(uint64, tag = "1")]
        pub index: u64,
        #[prost(uint64, tag = "2")]
        pub term: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Entry {
        #[prost(int32, tag = "1")]
        pub r#type: i32,
        #[prost(uint64, tag = "2")]
        pub term: u64,
        #[prost(uint64, tag = "3")]
        pub index: u64,
        #[prost(bytes = "vec", tag = "4")]
        pub data: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HardState {
        #[prost(uint64, tag = "1")]
        pub term: u64,
        #[prost(uint64, tag = "2")]
        pub vote: u64,
        #[prost(uint64, tag = "3")]
        pub commit: u64,
    }

    /// raftpb.ConfChange (v1, the only kind etcd 3.4 proposes).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ConfChange {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int32, tag = "2")]
        pub r#type: i32,
        #[prost(uint64, tag = "3")]
        pub node_id: u64,
        #[prost(bytes = "vec", tag = "4")]
        pub context: Vec<u8>,
    }

    /// A v2 request (etcdserverpb.Request): members publish their attributes with these.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RequestV2 {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(string, tag = "2")]
        pub method: String,
        #[prost(string, tag = "3")]
        pub path: String,
        #[prost(string, tag = "4")]
        pub val: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RequestHeader {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(string, tag = "2")]
        pub username: String,
        #[prost(uint64, tag = "3")]
        pub auth_revision: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InternalAuthenticateRequest {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub password: String,
        #[prost(string, tag = "3")]
        pub simple_token: String,
    }

    /// etcd 3.4's InternalRaftRequest. The read-only requests it can carry (range, user and
    /// role get/list) change nothing and become empty entries.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InternalRaftRequest {
        #[prost(message, optional, tag = "100")]
        pub header: Option<RequestHeader>,
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(message, optional, tag = "2")]
        pub v2: Option<RequestV2>,
        #[prost(message, optional, tag = "4")]
        pub put: Option<pb::PutRequest>,
        #[prost(message, optional, tag = "5")]
        pub delete_range: Option<pb::DeleteRangeRequest>,
        #[prost(message, optional, tag = "6")]
        pub txn: Option<pb::TxnRequest>,
        #[prost(message, optional, tag = "7")]
        pub compaction: Option<pb::CompactionRequest>,
        #[prost(message, optional, tag = "8")]
        pub lease_grant: Option<pb::LeaseGrantRequest>,
        #[prost(message, optional, tag = "9")]
        pub lease_revoke: Option<pb::LeaseRevokeRequest>,
        #[prost(message, optional, tag = "10")]
        pub alarm: Option<pb::AlarmRequest>,
        #[prost(message, optional, tag = "1000")]
        pub auth_enable: Option<pb::AuthEnableRequest>,
        #[prost(message, optional, tag = "1011")]
        pub auth_disable: Option<pb::AuthDisableRequest>,
        #[prost(message, optional, tag = "1012")]
        pub authenticate: Option<InternalAuthenticateRequest>,
        #[prost(message, optional, tag = "1100")]
        pub user_add: Option<pb::AuthUserAddRequest>,
        #[prost(message, optional, tag = "1101")]
        pub user_delete: Option<pb::AuthUserDeleteRequest>,
        #[prost(message, optional, tag = "1103")]
        pub user_change_password: Option<pb::AuthUserChangePasswordRequest>,
        #[prost(message, optional, tag = "1104")]
        pub user_grant_role: Option<pb::AuthUserGrantRoleRequest>,
        #[prost(message, optional, tag = "1105")]
        pub user_revoke_role: Option<pb::AuthUserRevokeRoleRequest>,
        #[prost(message, optional, tag = "1200")]
        pub role_add: Option<pb::AuthRoleAddRequest>,
        #[prost(message, optional, tag = "1201")]
        pub role_delete: Option<pb::AuthRoleDeleteRequest>,
        #[prost(message, optional, tag = "1203")]
        pub role_grant_permission: Option<pb::AuthRoleGrantPermissionRequest>,
        #[prost(message, optional, tag = "1204")]
        pub role_revoke_permission: Option<pb::AuthRoleRevokePermissionRequest>,
    }
}

// walpb record types.
const METADATA: i64 = 1;
const ENTRY: i64 = 2;
const STATE: i64 = 3;
const CRC: i64 = 4;
const SNAPSHOT: i64 = 5;

// raftpb.EntryType and ConfChangeType as etcd numbers them (raft-rs has no UpdateNode).
const ENTRY_NORMAL: i32 = 0;
const ENTRY_CONF_CHANGE: i32 = 1;
const CC_ADD_NODE: i32 = 0;
const CC_REMOVE_NODE: i32 = 1;
const CC_UPDATE_NODE: i32 = 2;
const CC_ADD_LEARNER_NODE: i32 = 3;

fn invalid(what: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid(what.into())
}

/// etcd's data dir found where oxcd's should be.
#[derive(Debug, Clone)]
pub struct EtcdDataDir {
    member_dir: PathBuf,
    /// Where oxcd keeps its WAL (`--wal-dir`, or `member/wal`): etcd's WAL is there too until
    /// the import moves it aside.
    wal_dir: PathBuf,
    /// Where etcd's WAL is now.
    etcd_wal: PathBuf,
}

fn with_suffix(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!("{name}{suffix}"))
}

/// etcd's data dir, if `data_dir` holds one and no oxcd state: etcd's backend without
/// oxcd's db, and etcd's WAL (in place, or already moved aside by an interrupted import).
pub fn detect(data_dir: &Path, wal_dir: &Path) -> Option<EtcdDataDir> {
    let member_dir = data_dir.join("member");
    if !member_dir.join("snap").join("db").is_file() || member_dir.join("db").exists() {
        return None;
    }
    let moved = with_suffix(wal_dir, ".etcd");
    let etcd_wal = if moved.is_dir() {
        moved
    } else if Wal::exists(wal_dir) {
        wal_dir.to_path_buf()
    } else {
        return None;
    };
    Some(EtcdDataDir {
        member_dir,
        wal_dir: wal_dir.to_path_buf(),
        etcd_wal,
    })
}

/// What etcd's WAL holds.
#[derive(Debug, Default)]
struct EtcdWal {
    metadata: Option<wire::Metadata>,
    hard_state: wire::HardState,
    /// Contiguous, later writes of an index replacing earlier ones (as etcd reads its log).
    entries: Vec<wire::Entry>,
    snapshots: Vec<wire::WalSnapshot>,
}

impl EtcdWal {
    fn push(&mut self, e: wire::Entry) -> Result<()> {
        if let Some(first) = self.entries.first().map(|f| f.index) {
            if e.index >= first {
                let at = (e.index - first) as usize;
                if at > self.entries.len() {
                    return Err(invalid(format!(
                        "etcd's WAL skips from entry {} to {}",
                        first + self.entries.len() as u64 - 1,
                        e.index
                    )));
                }
                self.entries.truncate(at);
                self.entries.push(e);
                return Ok(());
            }
            self.entries.clear();
        }
        self.entries.push(e);
        Ok(())
    }

    fn term_at(&self, index: u64) -> Option<u64> {
        if index == 0 {
            return Some(0);
        }
        self.entries
            .iter()
            .find(|e| e.index == index)
            .map(|e| e.term)
            .or_else(|| {
                self.snapshots
                    .iter()
                    .rev()
                    .find(|s| s.index == index)
                    .map(|s| s.term)
            })
    }
}

/// Reads etcd's WAL segments (`%016x-%016x.wal`, in name order): 8-byte frames whose low 56
/// bits are the record length and whose top byte may carry padding, each a walpb.Record whose
/// CRC-32C rolls across records. A damaged record at the end of the last segment is a torn
/// write (etcd repairs it away); anywhere else it is corruption.
fn read_wal(dir: &Path) -> Result<EtcdWal> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(invalid(format!("no WAL segments in {}", dir.display())));
    }
    let mut wal = EtcdWal::default();
    let mut crc = 0u32;
    for (n, path) in files.iter().enumerate() {
        let last = n + 1 == files.len();
        let data = std::fs::read(path)?;
        let damaged = |off: usize, why: &str| {
            invalid(format!(
                "etcd's WAL segment {} is damaged at offset {off}: {why}",
                path.display()
            ))
        };
        let mut off = 0usize;
        while off + 8 <= data.len() {
            let mut len_field = [0u8; 8];
            len_field.copy_from_slice(&data[off..off + 8]);
            let len_field = u64::from_le_bytes(len_field);
            if len_field == 0 {
                break; // the preallocated rest of the segment
            }
            let len = (len_field & 0x00ff_ffff_ffff_ffff) as usize;
            let pad = if len_field >> 63 == 1 {
                ((len_field >> 56) & 0x7) as usize
            } else {
                0
            };
            let body = off
                .checked_add(8 + len)
                .filter(|end| end.saturating_add(pad) <= data.len())
                .map(|end| &data[off + 8..end]);
            let record = body.and_then(|b| wire::Record::decode(b).ok());
            let valid = record.as_ref().is_some_and(|r| {
                r.r#type == CRC || {
                    let mut h = Crc32c::resume(crc);
                    h.update(&r.data);
                    h.finish() == r.crc
                }
            });
            let (Some(record), true) = (record, valid) else {
                // A torn write leaves nothing valid after it.
                let rest = off + 8 + len.min(data.len());
                let torn = data.get(rest..).is_none_or(|r| r.iter().all(|b| *b == 0));
                if last && torn {
                    tracing::warn!(segment = %path.display(), offset = off, "ignoring a torn record at the end of etcd's WAL");
                    break;
                }
                return Err(damaged(off, "bad record"));
            };
            off += 8 + len + pad;
            if record.r#type == CRC {
                if crc != 0 && record.crc != crc {
                    return Err(damaged(off, "CRC chain broken"));
                }
                crc = record.crc;
                continue;
            }
            crc = record.crc;
            let bad = |what: &str| damaged(off, what);
            match record.r#type {
                METADATA => {
                    let m = wire::Metadata::decode(record.data.as_slice())
                        .map_err(|_| bad("metadata"))?;
                    if wal.metadata.as_ref().is_some_and(|old| *old != m) {
                        return Err(bad("metadata differs between segments"));
                    }
                    wal.metadata = Some(m);
                }
                ENTRY => wal
                    .push(wire::Entry::decode(record.data.as_slice()).map_err(|_| bad("entry"))?)?,
                STATE => {
                    let hs = wire::HardState::decode(record.data.as_slice())
                        .map_err(|_| bad("hard state"))?;
                    if hs != wire::HardState::default() {
                        wal.hard_state = hs;
                    }
                }
                SNAPSHOT => wal.snapshots.push(
                    wire::WalSnapshot::decode(record.data.as_slice())
                        .map_err(|_| bad("snapshot"))?,
                ),
                other => return Err(bad(&format!("unknown record type {other}"))),
            }
        }
    }
    Ok(wal)
}

/// A conf change's context: the member as JSON (etcd's `ConfigChangeContext`: the member's
/// fields, and `isPromote` when a learner is promoted).
fn context_member(cc: &wire::ConfChange) -> Result<(Member, bool)> {
    let mut m = bolt::parse_member(&cc.context)
        .map_err(|e| invalid(format!("conf change for member {:x}: {e}", cc.node_id)))?;
    m.id = cc.node_id;
    let promote = serde_json::from_slice::<serde_json::Value>(&cc.context)
        .ok()
        .and_then(|j| j["isPromote"].as_bool())
        .unwrap_or(false);
    Ok((m, promote))
}

/// `/0/members/<hex id>/attributes`: the member's published name and client URLs.
fn published_attributes(r: &wire::RequestV2) -> Option<MemberAttributes> {
    if r.method != "PUT" {
        return None;
    }
    let id = r
        .path
        .strip_prefix("/0/members/")?
        .strip_suffix("/attributes")?;
    let id = u64::from_str_radix(id, 16).ok()?;
    let j: serde_json::Value = serde_json::from_str(&r.val).ok()?;
    Some(MemberAttributes {
        id,
        attributes: Some(Attributes {
            name: j["name"].as_str().unwrap_or_default().to_string(),
            client_urls: j["clientURLs"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
        }),
    })
}

/// A normal entry's payload as etcd 3.4 applies it: an InternalRaftRequest, or else a bare v2
/// request (etcd's `pbutil.MaybeUnmarshal` order).
enum Payload {
    V3(Box<wire::InternalRaftRequest>),
    V2(wire::RequestV2),
}

fn payload(data: &[u8]) -> Option<Payload> {
    // A v2 request's method parses as a malformed message in field 2, so InternalRaftRequest
    // fails on it, as gogoproto's does.
    // Txns nested deeper than oxcd applies are measured before decoding (no recursion limit).
    if crate::pb::nesting::too_deep(data, crate::pb::nesting::Root::Entry) {
        return None;
    }
    match wire::InternalRaftRequest::decode(data) {
        Ok(r) => match r.v2 {
            Some(v2) => Some(Payload::V2(v2)),
            None => Some(Payload::V3(Box::new(r))),
        },
        Err(_) => wire::RequestV2::decode(data).ok().map(Payload::V2),
    }
}

/// etcd's request as oxcd's log entry. Passwords travel in plain text in etcd 3.4's log and
/// are hashed at apply; oxcd's log carries the hash, made here.
fn translate(r: wire::InternalRaftRequest, bcrypt_cost: u32) -> Result<Option<RaftRequest>> {
    let header = r.header.unwrap_or_default();
    let hash =
        |p: &str| crate::auth::hash_password(p, bcrypt_cost).map_err(|e| invalid(e.to_string()));
    let request = if let Some(x) = r.put {
        Request::Put(x)
    } else if let Some(x) = r.delete_range {
        Request::DeleteRange(x)
    } else if let Some(x) = r.txn {
        Request::Txn(x)
    } else if let Some(x) = r.compaction {
        Request::Compaction(x)
    } else if let Some(x) = r.lease_grant {
        Request::LeaseGrant(x)
    } else if let Some(x) = r.lease_revoke {
        Request::LeaseRevoke(x)
    } else if let Some(x) = r.alarm {
        Request::Alarm(x)
    } else if let Some(x) = r.auth_enable {
        Request::AuthEnable(x)
    } else if let Some(x) = r.auth_disable {
        Request::AuthDisable(x)
    } else if let Some(x) = r.authenticate {
        Request::Authenticate(Authenticate {
            name: x.name,
            simple_token: x.simple_token,
        })
    } else if let Some(x) = r.user_add {
        let no_password = x.options.as_ref().is_some_and(|o| o.no_password);
        Request::UserAdd(UserAdd {
            hashed_password: if no_password {
                vec![]
            } else {
                hash(&x.password)?
            },
            name: x.name,
            options: x.options,
        })
    } else if let Some(x) = r.user_delete {
        Request::UserDelete(x)
    } else if let Some(x) = r.user_change_password {
        Request::UserChangePassword(UserChangePassword {
            hashed_password: hash(&x.password)?,
            name: x.name,
        })
    } else if let Some(x) = r.user_grant_role {
        Request::UserGrantRole(x)
    } else if let Some(x) = r.user_revoke_role {
        Request::UserRevokeRole(x)
    } else if let Some(x) = r.role_add {
        Request::RoleAdd(x)
    } else if let Some(x) = r.role_delete {
        Request::RoleDelete(x)
    } else if let Some(x) = r.role_grant_permission {
        Request::RoleGrantPermission(x)
    } else if let Some(x) = r.role_revoke_permission {
        Request::RoleRevokePermission(x)
    } else {
        // Reads, lease checkpoints: nothing to apply.
        return Ok(None);
    };
    Ok(Some(RaftRequest {
        id: 0,
        request: Some(request),
        // etcd checks every logged request against the auth store with the header's user
        // (empty for the server's own requests, which pass only with auth off): so does oxcd.
        username: header.username,
        auth_revision: header.auth_revision,
        internal: false,
    }))
}

fn normal_entry(index: u64, term: u64, data: Vec<u8>) -> Entry {
    let mut e = Entry::default();
    e.set_entry_type(EntryType::EntryNormal);
    e.index = index;
    e.term = term;
    e.data = data.into();
    e
}

fn conf_change_entry(index: u64, term: u64, change: ConfChangeType, m: Member) -> Result<Entry> {
    let cc = membership::conf_change(change, m.id, Some(m), 0);
    membership::conf_change_entry(index, term, &cc).map_err(|e| invalid(e.to_string()))
}

/// The member list as the log changes it: the backend's list, then every membership change
/// and published attributes up to the snapshot point, applied as etcd applies them.
#[derive(Default)]
struct Members {
    members: BTreeMap<u64, Member>,
    removed: std::collections::BTreeSet<u64>,
}

impl Members {
    fn conf_change(&mut self, cc: &wire::ConfChange) -> Result<()> {
        match cc.r#type {
            CC_ADD_NODE | CC_ADD_LEARNER_NODE => {
                let (mut m, promote) = context_member(cc)?;
                if promote {
                    if let Some(old) = self.members.get_mut(&m.id) {
                        old.is_learner = false;
                    }
                    return Ok(());
                }
                m.is_learner = cc.r#type == CC_ADD_LEARNER_NODE;
                if let Some(old) = self.members.get(&m.id) {
                    // The backend may already hold what the member published since.
                    if m.name.is_empty() {
                        m.name = old.name.clone();
                    }
                    if m.client_ur_ls.is_empty() {
                        m.client_ur_ls = old.client_ur_ls.clone();
                    }
                }
                self.members.insert(m.id, m);
            }
            CC_REMOVE_NODE => {
                self.members.remove(&cc.node_id);
                self.removed.insert(cc.node_id);
            }
            CC_UPDATE_NODE => {
                let (m, _) = context_member(cc)?;
                if let Some(old) = self.members.get_mut(&m.id) {
                    old.peer_ur_ls = m.peer_ur_ls;
                }
            }
            other => return Err(invalid(format!("unknown conf change type {other}"))),
        }
        Ok(())
    }

    fn publish(&mut self, a: MemberAttributes) {
        if let (Some(m), Some(attrs)) = (self.members.get_mut(&a.id), a.attributes) {
            m.name = attrs.name;
            m.client_ur_ls = attrs.client_urls;
        }
    }

    fn conf_state(&self) -> ConfState {
        let mut cs = ConfState::default();
        for m in self.members.values() {
            if m.is_learner {
                cs.learners.push(m.id);
            } else {
                cs.voters.push(m.id);
            }
        }
        cs
    }
}

/// What an import made of etcd's data dir.
#[derive(Debug, Clone)]
pub struct Imported {
    pub member_id: u64,
    pub cluster_id: u64,
    /// The snapshot point: the last entry etcd's backend held.
    pub index: u64,
    pub term: u64,
    pub commit: u64,
    /// etcd's log entries after the snapshot point, carried into oxcd's log.
    pub entries: usize,
    pub members: usize,
    pub revision: i64,
    /// Where etcd's WAL was moved.
    pub etcd_wal: PathBuf,
}

/// oxcd's log entry for each of etcd's entries after the snapshot point.
fn translate_entries(
    wal: &EtcdWal,
    after: u64,
    bcrypt_cost: u32,
    members: &Members,
) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    for e in wal.entries.iter().filter(|e| e.index > after) {
        let entry = match e.r#type {
            ENTRY_NORMAL if e.data.is_empty() => normal_entry(e.index, e.term, vec![]),
            ENTRY_NORMAL => {
                let request = match payload(&e.data) {
                    Some(Payload::V3(r)) => translate(*r, bcrypt_cost)?,
                    Some(Payload::V2(r)) => published_attributes(&r).map(|a| RaftRequest {
                        request: Some(Request::MemberAttributes(a)),
                        internal: true,
                        ..Default::default()
                    }),
                    None => {
                        return Err(invalid(format!(
                            "etcd's log entry {} is neither a v3 nor a v2 request",
                            e.index
                        )))
                    }
                };
                let data = request.map(|r| r.encode_to_vec()).unwrap_or_default();
                normal_entry(e.index, e.term, data)
            }
            ENTRY_CONF_CHANGE => {
                let cc = wire::ConfChange::decode(e.data.as_slice())
                    .map_err(|_| invalid(format!("etcd's conf change entry {}", e.index)))?;
                match cc.r#type {
                    CC_ADD_NODE | CC_ADD_LEARNER_NODE => {
                        let (mut m, promote) = context_member(&cc)?;
                        if promote {
                            // oxcd promotes with AddNode of the learner, as etcd does.
                            if let Some(old) = members.members.get(&m.id) {
                                m.name = old.name.clone();
                                m.client_ur_ls = old.client_ur_ls.clone();
                            }
                        }
                        let change = if cc.r#type == CC_ADD_LEARNER_NODE {
                            ConfChangeType::AddLearnerNode
                        } else {
                            ConfChangeType::AddNode
                        };
                        conf_change_entry(e.index, e.term, change, m)?
                    }
                    CC_REMOVE_NODE => conf_change_entry(
                        e.index,
                        e.term,
                        ConfChangeType::RemoveNode,
                        Member {
                            id: cc.node_id,
                            ..Default::default()
                        },
                    )?,
                    CC_UPDATE_NODE => {
                        // oxcd changes peer URLs with a normal request, not a Raft change.
                        let (m, _) = context_member(&cc)?;
                        let r = RaftRequest {
                            request: Some(Request::MemberUpdate(MemberUpdateRequest {
                                id: m.id,
                                peer_ur_ls: m.peer_ur_ls,
                            })),
                            internal: true,
                            ..Default::default()
                        };
                        normal_entry(e.index, e.term, r.encode_to_vec())
                    }
                    other => return Err(invalid(format!("unknown conf change type {other}"))),
                }
            }
            other => {
                return Err(invalid(format!(
                    "etcd's log entry {} has type {other}, which etcd 3.4 does not write",
                    e.index
                )))
            }
        };
        out.push(entry);
    }
    Ok(out)
}

/// Builds oxcd's db and WAL from etcd's files, then switches the data dir over (see the
/// module comment). Nothing of etcd's is changed until everything has been read and built.
pub fn import(dir: &EtcdDataDir, bcrypt_cost: u32) -> Result<Imported> {
    let wal = read_wal(&dir.etcd_wal)?;
    let meta = wal
        .metadata
        .clone()
        .ok_or_else(|| invalid("etcd's WAL has no metadata record (member and cluster ID)"))?;
    let backend = bolt::read(&dir.member_dir.join("snap").join("db"))?;
    let index = backend.consistent_index;
    if let Some(first) = wal.entries.first().map(|e| e.index) {
        if first > index + 1 {
            return Err(invalid(format!(
                "etcd's WAL starts at entry {first}, after the backend's consistent index {index}"
            )));
        }
    }
    let term = wal.term_at(index).ok_or_else(|| {
        invalid(format!(
            "etcd's WAL does not say the term of entry {index} (the backend's consistent index)"
        ))
    })?;

    // Members as of the snapshot point.
    let mut members = Members {
        members: backend.members.iter().map(|m| (m.id, m.clone())).collect(),
        removed: backend.removed.iter().copied().collect(),
    };
    for e in wal.entries.iter().filter(|e| e.index <= index) {
        match e.r#type {
            ENTRY_CONF_CHANGE => members.conf_change(
                &wire::ConfChange::decode(e.data.as_slice())
                    .map_err(|_| invalid(format!("etcd's conf change entry {}", e.index)))?,
            )?,
            ENTRY_NORMAL if !e.data.is_empty() => {
                if let Some(Payload::V2(r)) = payload(&e.data) {
                    if let Some(a) = published_attributes(&r) {
                        members.publish(a);
                    }
                }
            }
            _ => {}
        }
    }
    if !members.members.contains_key(&meta.node_id) && !members.removed.contains(&meta.node_id) {
        return Err(invalid(format!(
            "etcd's member list does not hold this member ({:x})",
            meta.node_id
        )));
    }
    let entries = translate_entries(&wal, index, bcrypt_cost, &members)?;
    let hs = &wal.hard_state;
    let commit = hs.commit.max(index);

    let conf_state = members.conf_state();
    let mut records = backend.state_records();
    for m in members.members.values() {
        records.push((
            membership::record_key(MEMBER_PREFIX, m.id),
            m.encode_to_vec(),
        ));
    }
    for id in &members.removed {
        records.push((membership::record_key(REMOVED_PREFIX, *id), vec![]));
    }
    for (m, a) in &backend.alarms {
        let mut k = ALARM_PREFIX.to_vec();
        k.extend_from_slice(&m.to_be_bytes());
        k.extend_from_slice(&a.to_be_bytes());
        records.push((k, vec![]));
    }
    let conf_bytes = conf_state
        .write_to_bytes()
        .map_err(|e| invalid(e.to_string()))?;
    for (k, v) in [
        (META_MEMBER_ID, meta.node_id.to_be_bytes().to_vec()),
        (META_CLUSTER_ID, meta.cluster_id.to_be_bytes().to_vec()),
        (META_CONF_STATE, conf_bytes),
        (META_CONSISTENT_INDEX, index.to_be_bytes().to_vec()),
        (META_SNAPSHOT_INDEX, index.to_be_bytes().to_vec()),
        (META_SNAPSHOT_TERM, term.to_be_bytes().to_vec()),
    ] {
        records.push((k.to_vec(), v));
    }

    // Build oxcd's files beside etcd's.
    let db_staging = dir.member_dir.join("db.importing");
    let wal_staging = with_suffix(&dir.wal_dir, ".importing");
    for p in [&db_staging, &wal_staging] {
        if p.exists() {
            std::fs::remove_dir_all(p)?;
        }
    }
    Store::create(&db_staging, records)?;
    let mut snapshot = SnapshotMetadata {
        index,
        term,
        ..Default::default()
    };
    snapshot.set_conf_state(conf_state);
    let mut oxcd_wal = Wal::create(
        &wal_staging,
        snapshot,
        crate::wal::Metadata {
            node_id: meta.node_id,
            cluster_id: meta.cluster_id,
        },
    )
    .map_err(|e| invalid(format!("oxcd's WAL: {e}")))?;
    let hard_state = HardState {
        term: hs.term.max(term),
        vote: hs.vote,
        commit,
        ..Default::default()
    };
    oxcd_wal
        .append(&entries, Some(&hard_state))
        .and_then(|_| oxcd_wal.sync())
        .map_err(|e| invalid(format!("oxcd's WAL: {e}")))?;
    drop(oxcd_wal);

    // Switch: etcd's WAL aside, oxcd's WAL in, and the db last (the commit point).
    let moved = with_suffix(&dir.wal_dir, ".etcd");
    if dir.etcd_wal != moved {
        std::fs::rename(&dir.etcd_wal, &moved)?;
    } else if dir.wal_dir.exists() {
        // oxcd's WAL from an interrupted import.
        std::fs::remove_dir_all(&dir.wal_dir)?;
    }
    sync_parent(&dir.wal_dir)?;
    std::fs::rename(&wal_staging, &dir.wal_dir)?;
    sync_parent(&dir.wal_dir)?;
    std::fs::rename(&db_staging, dir.member_dir.join("db"))?;
    sync_parent(&db_staging)?;

    Ok(Imported {
        member_id: meta.node_id,
        cluster_id: meta.cluster_id,
        index,
        term,
        commit,
        entries: entries.len(),
        members: members.members.len(),
        revision: backend
            .revisions
            .last()
            .map(|(r, _, _)| r.main)
            .unwrap_or(1)
            .max(backend.finished_compact.unwrap_or(0)),
        etcd_wal: moved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(out: &mut Vec<u8>, crc: &mut u32, r#type: i64, data: Vec<u8>) {
        let crc_value = if r#type == CRC {
            *crc
        } else {
            let mut h = Crc32c::resume(*crc);
            h.update(&data);
            *crc = h.finish();
            *crc
        };
        let rec = wire::Record {
            r#type,
            crc: crc_value,
            data,
        }
        .encode_to_vec();
        let pad = (8 - rec.len() % 8) % 8;
        let mut len = rec.len() as u64;
        if pad != 0 {
            len |= (0x80 | pad as u64) << 56;
        }
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&rec);
        out.extend(std::iter::repeat_n(0u8, pad));
    }

    fn entry(index: u64, term: u64, data: &[u8]) -> Vec<u8> {
        wire::Entry {
            r#type: ENTRY_NORMAL,
            term,
            index,
            data: data.to_vec(),
        }
        .encode_to_vec()
    }

    fn segment() -> Vec<u8> {
        let mut out = Vec::new();
        let mut crc = 0;
        frame(&mut out, &mut crc, CRC, vec![]);
        let meta = wire::Metadata {
            node_id: 7,
            cluster_id: 9,
        };
        frame(&mut out, &mut crc, METADATA, meta.encode_to_vec());
        frame(
            &mut out,
            &mut crc,
            SNAPSHOT,
            wire::WalSnapshot::default().encode_to_vec(),
        );
        for i in 1..=3 {
            frame(
                &mut out,
                &mut crc,
                ENTRY,
                entry(i, 1, format!("payload-{i}").as_bytes()),
            );
        }
        // A new leader overwrites entry 3.
        frame(&mut out, &mut crc, ENTRY, entry(3, 2, b""));
        let hs = wire::HardState {
            term: 2,
            vote: 7,
            commit: 3,
        };
        frame(&mut out, &mut crc, STATE, hs.encode_to_vec());
        out
    }

    #[test]
    fn reads_etcds_framing_crc_chain_and_overwritten_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = segment();
        // etcd preallocates segments: zeros after the last record.
        seg.extend(std::iter::repeat_n(0u8, 4096));
        std::fs::write(
            dir.path().join("0000000000000000-0000000000000000.wal"),
            &seg,
        )
        .unwrap();
        let wal = read_wal(dir.path()).unwrap();
        let meta = wal.metadata.clone().unwrap();
        assert_eq!((meta.node_id, meta.cluster_id), (7, 9));
        assert_eq!(wal.entries.len(), 3);
        assert_eq!(wal.term_at(3), Some(2));
        assert_eq!(wal.hard_state.commit, 3);
    }

    #[test]
    fn a_torn_tail_is_ignored_but_damage_before_valid_records_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0000000000000000-0000000000000000.wal");
        let seg = segment();
        // Torn: the last record cut short.
        std::fs::write(&path, &seg[..seg.len() - 5]).unwrap();
        let wal = read_wal(dir.path()).unwrap();
        assert_eq!(wal.hard_state, wire::HardState::default());
        assert_eq!(wal.entries.len(), 3);
        // A flipped byte inside an early entry, with valid records after it.
        let mut bad = seg.clone();
        let at = bad.windows(9).position(|w| w == b"payload-1").unwrap();
        bad[at] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        let err = read_wal(dir.path()).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
    }

    /// A dir as `etcdctl snapshot restore` leaves it (the member list only in the log's conf
    /// changes), plus a tail etcd had committed but not applied: a put and a publish.
    #[test]
    fn imports_a_restored_dir_and_carries_the_unapplied_tail_into_oxcds_log() {
        use crate::mvcc::Revision;
        use crate::pb::mvccpb::KeyValue;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let member = data.join("member");
        std::fs::create_dir_all(member.join("snap")).unwrap();
        std::fs::create_dir_all(member.join("wal")).unwrap();
        let backup = super::super::Backup {
            consistent_index: 2,
            revisions: vec![(
                Revision::new(2, 0),
                false,
                KeyValue {
                    key: b"a".to_vec(),
                    value: b"1".to_vec(),
                    create_revision: 2,
                    mod_revision: 2,
                    version: 1,
                    lease: 0,
                }
                .encode_to_vec(),
            )],
            ..Default::default()
        };
        bolt::write(&member.join("snap").join("db"), &backup).unwrap();

        let id = 0x10u64;
        let mut seg = Vec::new();
        let mut crc = 0;
        frame(&mut seg, &mut crc, CRC, vec![]);
        let meta = wire::Metadata {
            node_id: id,
            cluster_id: 0x20,
        };
        frame(&mut seg, &mut crc, METADATA, meta.encode_to_vec());
        let cc = wire::ConfChange {
            id: 0,
            r#type: CC_ADD_NODE,
            node_id: id,
            context: br#"{"id":16,"peerURLs":["http://127.0.0.1:2380"],"name":"n1"}"#.to_vec(),
        };
        let entries = [
            (1, 1, ENTRY_CONF_CHANGE, cc.encode_to_vec()),
            (2, 2, ENTRY_NORMAL, vec![]),
            (
                3,
                2,
                ENTRY_NORMAL,
                wire::InternalRaftRequest {
                    header: Some(wire::RequestHeader::default()),
                    put: Some(crate::pb::etcdserverpb::PutRequest {
                        key: b"b".to_vec(),
                        value: b"2".to_vec(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                4,
                2,
                ENTRY_NORMAL,
                wire::RequestV2 {
                    id: 9,
                    method: "PUT".into(),
                    path: "/0/members/10/attributes".into(),
                    val: r#"{"name":"n1","clientURLs":["http://127.0.0.1:2379"]}"#.into(),
                }
                .encode_to_vec(),
            ),
        ];
        for (index, term, r#type, data) in entries {
            let e = wire::Entry {
                r#type,
                term,
                index,
                data,
            };
            frame(&mut seg, &mut crc, ENTRY, e.encode_to_vec());
        }
        let hs = wire::HardState {
            term: 2,
            vote: id,
            commit: 4,
        };
        frame(&mut seg, &mut crc, STATE, hs.encode_to_vec());
        std::fs::write(
            member
                .join("wal")
                .join("0000000000000000-0000000000000000.wal"),
            &seg,
        )
        .unwrap();

        let found = detect(&data, &member.join("wal")).expect("etcd's layout");
        let i = import(&found, 4).unwrap();
        assert_eq!((i.member_id, i.cluster_id), (id, 0x20));
        assert_eq!((i.index, i.term, i.commit, i.entries), (2, 2, 4, 2));
        assert!(member.join("wal.etcd").is_dir(), "etcd's WAL moved aside");
        assert!(
            detect(&data, &member.join("wal")).is_none(),
            "imported once"
        );

        let (_, replayed) = Wal::open(&member.join("wal")).unwrap();
        assert_eq!(replayed.snapshot.index, 2);
        assert_eq!(replayed.snapshot.get_conf_state().voters, [id]);
        assert_eq!(
            (
                replayed.hard_state.term,
                replayed.hard_state.vote,
                replayed.hard_state.commit
            ),
            (2, id, 4)
        );
        let tail: Vec<RaftRequest> = replayed
            .entries
            .iter()
            .map(|e| RaftRequest::decode(&e.data[..]).unwrap())
            .collect();
        assert_eq!(replayed.entries[0].index, 3);
        assert!(matches!(&tail[0].request, Some(Request::Put(p)) if p.key == b"b"));
        assert!(
            matches!(&tail[1].request, Some(Request::MemberAttributes(a)) if a.id == id && a.attributes.as_ref().is_some_and(|x| x.name == "n1"))
        );

        let (store, recovered) = Store::open(&member.join("db")).unwrap();
        assert_eq!(recovered.consistent_index, 2);
        let members = store.records(MEMBER_PREFIX).unwrap();
        assert_eq!(members.len(), 1);
        let m = Member::decode(&members[0].1[..]).unwrap();
        assert_eq!(m.name, "n1");
        assert_eq!(m.peer_ur_ls, ["http://127.0.0.1:2380"]);
    }

    #[test]
    fn v2_publish_and_v3_requests_are_told_apart() {
        let v2 = wire::RequestV2 {
            id: 1,
            method: "PUT".into(),
            path: "/0/members/8e9e05c52164694d/attributes".into(),
            val: r#"{"name":"default","clientURLs":["http://localhost:2379"]}"#.into(),
        };
        let Some(Payload::V2(r)) = payload(&v2.encode_to_vec()) else {
            panic!("a v2 request")
        };
        let a = published_attributes(&r).unwrap();
        assert_eq!(a.id, 0x8e9e05c52164694d);
        assert_eq!(a.attributes.as_ref().unwrap().name, "default");
        assert_eq!(
            a.attributes.as_ref().unwrap().client_urls,
            ["http://localhost:2379"]
        );

        let v3 = wire::InternalRaftRequest {
            header: Some(wire::RequestHeader {
                id: 5,
                username: "alice".into(),
                auth_revision: 3,
            }),
            put: Some(crate::pb::etcdserverpb::PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let Some(Payload::V3(r)) = payload(&v3.encode_to_vec()) else {
            panic!("a v3 request")
        };
        let t = translate(*r, 4).unwrap().unwrap();
        assert_eq!(t.username, "alice");
        assert_eq!(t.auth_revision, 3);
        assert!(!t.internal);
        assert!(matches!(t.request, Some(Request::Put(p)) if p.key == b"k"));
    }
}
