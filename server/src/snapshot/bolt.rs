//! etcd's backend file: a bbolt database with etcd's buckets and encodings. A backup
//! (`etcdctl snapshot save`) is this file followed by the sha256 of its bytes.
//!
//! Buckets, as etcd 3.4 writes them, with etcd 3.6's `storageVersion`:
//! - `key`: revision (`main` big-endian, `_`, `sub` big-endian, `t` on tombstones) -> KeyValue
//! - `meta`: `consistent_index` (u64 big-endian), `scheduledCompactRev` and
//!   `finishedCompactRev` (revision bytes), `storageVersion` (`3.6.0`; etcd 3.5 and older
//!   write none)
//! - `lease`: lease ID (big-endian) -> leasepb.Lease
//! - `members`: member ID in hex -> JSON; `members_removed`: member ID in hex -> "removed"
//! - `alarm`: AlarmMember -> empty; `cluster`: `clusterVersion`
//! - `auth`: `authEnabled` ([1] or [0]), `authRevision` (u64 big-endian); `authUsers`: name ->
//!   authpb.User; `authRoles`: name -> authpb.Role
//!
//! Files are written with the `bbolt-rs` crate. They are read by `reader.rs`, a small bbolt
//! reader of our own: etcd writes its files without a freelist (bbolt's `NoFreelistSync`),
//! which `bbolt-rs` cannot open, and a backup from elsewhere must be read with every offset
//! checked, so a damaged file is refused and never trusted.

use super::reader::BoltFile;
use super::{Backup, Result, SnapshotError};
use crate::mvcc::Revision;
use crate::pb::etcdserverpb::{AlarmMember, Member};
use crate::pb::leasepb::Lease;
use crate::schema::{ENABLED_KEY, REVISION_KEY, ROLE_PREFIX, USER_PREFIX};
use bbolt_rs::{BucketRwApi, DbApi, DbRwAPI, TxRwApi, TxRwRefApi};
use prost::Message;
use std::path::Path;

const KEY: &str = "key";
const META: &str = "meta";
const LEASE: &str = "lease";
const MEMBERS: &str = "members";
const MEMBERS_REMOVED: &str = "members_removed";
const ALARM: &str = "alarm";
const CLUSTER: &str = "cluster";
const AUTH: &str = "auth";
const AUTH_USERS: &str = "authUsers";
const AUTH_ROLES: &str = "authRoles";

const CONSISTENT_INDEX: &[u8] = b"consistent_index";
const SCHEDULED_COMPACT: &[u8] = b"scheduledCompactRev";
const FINISHED_COMPACT: &[u8] = b"finishedCompactRev";
const CLUSTER_VERSION: &[u8] = b"clusterVersion";
const STORAGE_VERSION: &[u8] = b"storageVersion";
const AUTH_REVISION: &[u8] = b"authRevision";
const AUTH_ENABLED: &[u8] = b"authEnabled";

fn bolt(e: bbolt_rs::Error) -> SnapshotError {
    SnapshotError::Bolt(e.to_string())
}

/// etcd's `revToBytes`, with the tombstone mark.
pub fn revision_key(rev: Revision, tombstone: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&(rev.main as u64).to_be_bytes());
    k.push(b'_');
    k.extend_from_slice(&(rev.sub as u64).to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k
}

/// etcd's `bytesToRev`; also says whether the key marks a tombstone.
pub fn parse_revision_key(k: &[u8]) -> Option<(Revision, bool)> {
    if (k.len() != 17 && k.len() != 18) || k[8] != b'_' {
        return None;
    }
    let main = u64::from_be_bytes(k[..8].try_into().ok()?) as i64;
    let sub = u64::from_be_bytes(k[9..17].try_into().ok()?) as i64;
    match k.get(17) {
        None => Some((Revision::new(main, sub), false)),
        Some(b't') => Some((Revision::new(main, sub), true)),
        Some(_) => None,
    }
}

/// etcd's member record in the `members` bucket.
fn member_json(m: &Member) -> Vec<u8> {
    let mut v = serde_json::json!({
        "id": m.id,
        "peerURLs": m.peer_ur_ls,
    });
    if m.is_learner {
        v["isLearner"] = true.into();
    }
    if !m.name.is_empty() {
        v["name"] = m.name.clone().into();
    }
    if !m.client_ur_ls.is_empty() {
        v["clientURLs"] = m.client_ur_ls.clone().into();
    }
    v.to_string().into_bytes()
}

pub(super) fn parse_member(v: &[u8]) -> Result<Member> {
    let j: serde_json::Value = serde_json::from_slice(v)
        .map_err(|e| SnapshotError::Corrupt(format!("member record: {e}")))?;
    let strings = |k: &str| -> Vec<String> {
        j[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(Member {
        id: j["id"]
            .as_u64()
            .ok_or_else(|| SnapshotError::Corrupt("member record without id".into()))?,
        name: j["name"].as_str().unwrap_or_default().to_string(),
        peer_ur_ls: strings("peerURLs"),
        client_ur_ls: strings("clientURLs"),
        is_learner: j["isLearner"].as_bool().unwrap_or(false),
    })
}

/// Writes `backup` as a new bbolt file at `path` (which must not exist).
pub fn write(path: &Path, backup: &Backup) -> Result<()> {
    let mut db = bbolt_rs::Bolt::open(path).map_err(bolt)?;
    {
        let mut tx = db.begin_rw().map_err(bolt)?;
        {
            let mut b = tx.create_bucket_if_not_exists(KEY).map_err(bolt)?;
            // Keys arrive in order: fill pages like etcd's sequential key writes do.
            b.set_fill_percent(0.9);
            for (rev, tomb, kv) in &backup.revisions {
                b.put(revision_key(*rev, *tomb), kv).map_err(bolt)?;
            }
        }
        {
            let mut b = tx.create_bucket_if_not_exists(META).map_err(bolt)?;
            b.put(CONSISTENT_INDEX, backup.consistent_index.to_be_bytes())
                .map_err(bolt)?;
            if let Some(r) = backup.scheduled_compact {
                b.put(SCHEDULED_COMPACT, revision_key(Revision::new(r, 0), false))
                    .map_err(bolt)?;
            }
            if let Some(r) = backup.finished_compact {
                b.put(FINISHED_COMPACT, revision_key(Revision::new(r, 0), false))
                    .map_err(bolt)?;
            }
            if let Some(v) = &backup.storage_version {
                b.put(STORAGE_VERSION, v.as_bytes()).map_err(bolt)?;
            }
        }
        {
            let mut b = tx.create_bucket_if_not_exists(LEASE).map_err(bolt)?;
            for (id, ttl) in &backup.leases {
                let l = Lease {
                    id: *id,
                    ttl: *ttl,
                    remaining_ttl: 0,
                };
                b.put(id.to_be_bytes(), l.encode_to_vec()).map_err(bolt)?;
            }
        }
        {
            let mut b = tx.create_bucket_if_not_exists(MEMBERS).map_err(bolt)?;
            for m in &backup.members {
                b.put(format!("{:016x}", m.id), member_json(m))
                    .map_err(bolt)?;
            }
        }
        {
            let mut b = tx
                .create_bucket_if_not_exists(MEMBERS_REMOVED)
                .map_err(bolt)?;
            for id in &backup.removed {
                b.put(format!("{id:016x}"), b"removed").map_err(bolt)?;
            }
        }
        {
            let mut b = tx.create_bucket_if_not_exists(ALARM).map_err(bolt)?;
            for (member_id, alarm) in &backup.alarms {
                let a = AlarmMember {
                    member_id: *member_id,
                    alarm: *alarm,
                };
                b.put(a.encode_to_vec(), b"").map_err(bolt)?;
            }
        }
        {
            let mut b = tx.create_bucket_if_not_exists(CLUSTER).map_err(bolt)?;
            b.put(CLUSTER_VERSION, backup.cluster_version.as_bytes())
                .map_err(bolt)?;
        }
        {
            // A store that never changed auth holds revision 1, as etcd 3.4 writes it.
            let mut b = tx.create_bucket_if_not_exists(AUTH).map_err(bolt)?;
            let revision = backup
                .auth
                .iter()
                .find(|(k, _)| k.as_slice() == REVISION_KEY)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| 1u64.to_be_bytes().to_vec());
            b.put(AUTH_REVISION, revision).map_err(bolt)?;
            if let Some((_, v)) = backup
                .auth
                .iter()
                .find(|(k, _)| k.as_slice() == ENABLED_KEY)
            {
                b.put(AUTH_ENABLED, v.clone()).map_err(bolt)?;
            }
        }
        for (bucket, prefix) in [(AUTH_USERS, USER_PREFIX), (AUTH_ROLES, ROLE_PREFIX)] {
            let mut b = tx.create_bucket_if_not_exists(bucket).map_err(bolt)?;
            for (k, v) in &backup.auth {
                if let Some(name) = k.strip_prefix(prefix) {
                    b.put(name, v.clone()).map_err(bolt)?;
                }
            }
        }
        tx.commit().map_err(bolt)?;
    }
    db.sync().map_err(bolt)?;
    db.close();
    Ok(())
}

/// Reads the state etcd (or oxcd) wrote into a backend file at `path`.
pub fn read(path: &Path) -> Result<Backup> {
    let file = BoltFile::open(path)?;
    // The root is walked once; each bucket is then taken by name.
    let mut buckets: std::collections::HashMap<Vec<u8>, _> = file.buckets()?.into_iter().collect();
    let mut bucket = |name: &str| buckets.remove(name.as_bytes());
    let mut out = Backup::default();
    let keys = bucket(KEY)
        .ok_or_else(|| SnapshotError::Corrupt("no \"key\" bucket: not an etcd backend".into()))?;
    file.for_each(&keys, |k, v| {
        let (rev, tomb) = parse_revision_key(k)
            .ok_or_else(|| SnapshotError::Corrupt(format!("bad revision key {k:?}")))?;
        out.revisions.push((rev, tomb, v.to_vec()));
        Ok(())
    })?;
    if let Some(meta) = bucket(META) {
        file.for_each(&meta, |k, v| {
            let rev = || {
                parse_revision_key(v)
                    .map(|(r, _)| r.main)
                    .ok_or_else(|| SnapshotError::Corrupt(String::from_utf8_lossy(k).into()))
            };
            match k {
                CONSISTENT_INDEX => {
                    out.consistent_index = u64::from_be_bytes(
                        v.try_into()
                            .map_err(|_| SnapshotError::Corrupt("consistent_index".into()))?,
                    )
                }
                SCHEDULED_COMPACT => out.scheduled_compact = Some(rev()?),
                FINISHED_COMPACT => out.finished_compact = Some(rev()?),
                STORAGE_VERSION => {
                    out.storage_version = Some(String::from_utf8_lossy(v).into_owned())
                }
                _ => {}
            }
            Ok(())
        })?;
    }
    if let Some(leases) = bucket(LEASE) {
        file.for_each(&leases, |_, v| {
            let l = Lease::decode(v)
                .map_err(|e| SnapshotError::Corrupt(format!("lease record: {e}")))?;
            out.leases.push((l.id, l.ttl));
            Ok(())
        })?;
    }
    if let Some(members) = bucket(MEMBERS) {
        file.for_each(&members, |_, v| {
            out.members.push(parse_member(v)?);
            Ok(())
        })?;
    }
    if let Some(removed) = bucket(MEMBERS_REMOVED) {
        file.for_each(&removed, |k, _| {
            let id = std::str::from_utf8(k)
                .ok()
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or_else(|| SnapshotError::Corrupt("removed member record".into()))?;
            out.removed.push(id);
            Ok(())
        })?;
    }
    if let Some(alarms) = bucket(ALARM) {
        file.for_each(&alarms, |k, _| {
            let a = AlarmMember::decode(k)
                .map_err(|e| SnapshotError::Corrupt(format!("alarm record: {e}")))?;
            out.alarms.push((a.member_id, a.alarm));
            Ok(())
        })?;
    }
    if let Some(cluster) = bucket(CLUSTER) {
        file.for_each(&cluster, |k, v| {
            if k == CLUSTER_VERSION {
                out.cluster_version = String::from_utf8_lossy(v).into_owned();
            }
            Ok(())
        })?;
    }
    if let Some(b) = bucket(AUTH) {
        file.for_each(&b, |k, v| {
            if k == AUTH_ENABLED {
                out.auth.push((ENABLED_KEY.to_vec(), v.to_vec()));
            } else if k == AUTH_REVISION {
                out.auth.push((REVISION_KEY.to_vec(), v.to_vec()));
            }
            Ok(())
        })?;
    }
    for (name, prefix) in [(AUTH_USERS, USER_PREFIX), (AUTH_ROLES, ROLE_PREFIX)] {
        if let Some(b) = bucket(name) {
            file.for_each(&b, |k, v| {
                out.auth.push(([prefix, k].concat(), v.to_vec()));
                Ok(())
            })?;
        }
    }
    Ok(out)
}

/// What etcd 3.6's `etcdutl snapshot status` reports about a backend file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStatus {
    /// crc32c over every bucket name, key and value, in order.
    pub hash: u32,
    /// Main revision of the last record in the `key` bucket.
    pub revision: i64,
    /// Keys alive at that revision (etcd 3.4's etcdctl counted every record of every bucket).
    pub total_keys: u64,
    /// Size of the database as bbolt sees it (pages in use times page size).
    pub total_size: u64,
    /// The storage version in `meta` (`3.6.0`), empty when there is none (etcd 3.5 and older).
    pub version: String,
}

/// etcd's `snapshot status`: hashes every bucket name, key and value in order, and counts the
/// keys the last revision holds.
pub fn status(path: &Path) -> Result<FileStatus> {
    let file = BoltFile::open(path)?;
    let mut st = FileStatus {
        hash: 0,
        revision: 0,
        total_keys: 0,
        total_size: file.size(),
        version: String::new(),
    };
    let mut h = crate::mvcc::Crc32c::default();
    let mut alive = std::collections::HashSet::new();
    for (name, bucket) in file.buckets()? {
        h.update(&name);
        let is_key = name == KEY.as_bytes();
        let is_meta = name == META.as_bytes();
        file.for_each(&bucket, |k, v| {
            h.update(k);
            h.update(v);
            if is_key {
                let (rev, tomb) = parse_revision_key(k).ok_or_else(|| {
                    SnapshotError::Corrupt(format!("cannot parse revision key: {k:?}"))
                })?;
                st.revision = rev.main;
                let kv = crate::pb::mvccpb::KeyValue::decode(v).map_err(|e| {
                    SnapshotError::Corrupt(format!("cannot unmarshal value, key {k:?}: {e}"))
                })?;
                if tomb {
                    alive.remove(&kv.key);
                } else {
                    alive.insert(kv.key);
                }
            }
            if is_meta && k == STORAGE_VERSION {
                // etcd shows the version only when it parses as semver.
                let v = String::from_utf8_lossy(v);
                if crate::version::is_semver(&v) {
                    st.version = v.into_owned();
                }
            }
            Ok(())
        })?;
    }
    st.total_keys = alive.len() as u64;
    st.hash = h.finish();
    Ok(st)
}
