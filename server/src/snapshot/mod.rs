//! Backups in etcd's own format: `Maintenance.Snapshot` (what `etcdctl snapshot save`
//! downloads), and the offline tools `oxcd snapshot status` and `oxcd snapshot restore`.
//!
//! A backup is etcd 3.4's backend file (a bbolt database, `bolt.rs`) followed by the sha256
//! of its bytes, so backups move both ways between etcd and oxcd. (Raft snapshots between
//! members are a different thing, streamed by `transport.rs`.)

pub mod bolt;
pub mod cli;
pub mod etcd_dir;
mod reader;
pub mod restore;

use crate::mvcc::{self, Records, Revision, Store};
use crate::pb::etcdserverpb::Member;
use crate::schema::{
    ALARM_PREFIX, AUTH_PREFIX, LEASE_PREFIX, MEMBER_PREFIX, META_DOWNGRADE, META_FINISHED_COMPACT,
    META_SCHEDULED_COMPACT, REMOVED_PREFIX,
};
use prost::Message;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("bolt: {0}")]
    Bolt(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("expected sha256 {expected}, got {got}")]
    HashMismatch { expected: String, got: String },
    #[error("snapshot missing hash but --skip-hash-check=false")]
    MissingHash,
    #[error("snapshot file is damaged: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Store(#[from] mvcc::MvccError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, SnapshotError>;

/// The replicated state a backup holds, independent of how either side stores it.
#[derive(Debug, Default, Clone)]
pub struct Backup {
    /// The key space: (revision, tombstone, KeyValue protobuf), in revision order.
    pub revisions: Vec<(Revision, bool, Vec<u8>)>,
    /// (lease ID, granted TTL).
    pub leases: Vec<(i64, i64)>,
    pub consistent_index: u64,
    pub scheduled_compact: Option<i64>,
    pub finished_compact: Option<i64>,
    pub members: Vec<Member>,
    pub removed: Vec<u64>,
    /// (member ID, alarm type).
    pub alarms: Vec<(u64, i32)>,
    /// `3.6.0`, or the downgrade target while a downgrade is enabled (etcd's cluster bucket).
    pub cluster_version: String,
    /// etcd 3.6's storage schema version (`3.6.0`); none at a 3.5 cluster version.
    pub storage_version: Option<String>,
    /// The auth store, as the backend records `auth` keeps (`au/...`): carried by backups and
    /// restores like etcd's `auth*` buckets.
    pub auth: Records,
}

fn be_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

impl Backup {
    /// A consistent point-in-time copy of a member's state.
    pub fn from_store(store: &Store) -> Result<Backup> {
        let (applied, records) = store.snapshot_copy()?;
        Backup::from_records(applied, &records)
    }

    fn from_records(consistent_index: u64, records: &Records) -> Result<Backup> {
        let corrupt = |what: &str| SnapshotError::Corrupt(format!("backend record {what}"));
        let downgrade = records
            .iter()
            .find(|(k, _)| k.as_slice() == META_DOWNGRADE)
            .map(|(_, v)| crate::version::Downgrade::decode(v))
            .unwrap_or_default();
        let cluster = downgrade.cluster_version();
        let mut b = Backup {
            consistent_index,
            cluster_version: cluster.full(),
            storage_version: (cluster == crate::version::CLUSTER_VERSION)
                .then(|| crate::version::STORAGE_VERSION.to_string()),
            ..Default::default()
        };
        for (k, v) in records {
            if let Some((rev, tomb)) = Revision::from_backend_key(k) {
                b.revisions.push((rev, tomb, v.clone()));
            } else if let Some(id) = k.strip_prefix(LEASE_PREFIX) {
                let id = be_u64(id).ok_or_else(|| corrupt("lease id"))? as i64;
                let ttl = be_u64(v).ok_or_else(|| corrupt("lease ttl"))? as i64;
                b.leases.push((id, ttl));
            } else if let Some(a) = k.strip_prefix(ALARM_PREFIX) {
                if a.len() == 12 {
                    let m = be_u64(&a[..8]).ok_or_else(|| corrupt("alarm"))?;
                    let t = i32::from_be_bytes(a[8..].try_into().map_err(|_| corrupt("alarm"))?);
                    b.alarms.push((m, t));
                }
            } else if k.starts_with(MEMBER_PREFIX) {
                b.members
                    .push(Member::decode(v.as_slice()).map_err(|_| corrupt("member"))?);
            } else if let Some(id) = k.strip_prefix(REMOVED_PREFIX) {
                b.removed
                    .push(be_u64(id).ok_or_else(|| corrupt("removed member"))?);
            } else if k.starts_with(AUTH_PREFIX) {
                b.auth.push((k.clone(), v.clone()));
            } else if k.as_slice() == META_SCHEDULED_COMPACT {
                b.scheduled_compact = Some(be_u64(v).ok_or_else(|| corrupt("compaction"))? as i64);
            } else if k.as_slice() == META_FINISHED_COMPACT {
                b.finished_compact = Some(be_u64(v).ok_or_else(|| corrupt("compaction"))? as i64);
            }
        }
        Ok(b)
    }

    /// The backend records of the replicated key space, leases and compaction marks (what a
    /// restored member starts from; members and alarms belong to the old cluster).
    pub fn state_records(&self) -> Records {
        let mut out: Records = Vec::with_capacity(self.revisions.len() + self.leases.len() + 2);
        for (rev, tomb, kv) in &self.revisions {
            out.push((rev.to_backend_key(*tomb), kv.clone()));
        }
        for (id, ttl) in &self.leases {
            let mut k = LEASE_PREFIX.to_vec();
            k.extend_from_slice(&id.to_be_bytes());
            out.push((k, ttl.to_be_bytes().to_vec()));
        }
        if let Some(r) = self.scheduled_compact {
            out.push((
                META_SCHEDULED_COMPACT.to_vec(),
                (r as u64).to_be_bytes().to_vec(),
            ));
        }
        if let Some(r) = self.finished_compact {
            out.push((
                META_FINISHED_COMPACT.to_vec(),
                (r as u64).to_be_bytes().to_vec(),
            ));
        }
        out.extend(self.auth.iter().cloned());
        out
    }
}

/// Whether a file of this size carries etcd's sha256 trailer: bbolt files are whole pages,
/// so a trailing 32 bytes leave `size % 512 == 32`.
fn has_hash(size: u64) -> bool {
    size % 512 == 32
}

/// Copies the bbolt database out of a backup file into `dst`, checking the sha256 trailer
/// etcd appends. A file without one is accepted only with `skip_hash_check`.
pub fn extract_db(src: &Path, dst: &Path, skip_hash_check: bool) -> Result<()> {
    let mut f = std::fs::File::open(src)?;
    let size = f.metadata()?.len();
    let hashed = has_hash(size);
    if !hashed && !skip_hash_check {
        return Err(SnapshotError::MissingHash);
    }
    let db_len = if hashed { size - 32 } else { size };
    let mut out = std::fs::File::create(dst)?;
    let mut h = Sha256::new();
    let mut left = db_len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        f.read_exact(&mut buf[..n])?;
        h.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.sync_all()?;
    if hashed && !skip_hash_check {
        let mut want = [0u8; 32];
        f.read_exact(&mut want)?;
        let got: [u8; 32] = h.finalize().into();
        if got != want {
            return Err(SnapshotError::HashMismatch {
                expected: hex(&want),
                got: hex(&got),
            });
        }
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `snapshot status` of a backup file: the bbolt part is read from a scratch copy (without
/// the sha256 trailer, which `status` does not check, as in etcdctl).
pub fn bolt_status_of_backup(file: &Path) -> Result<bolt::FileStatus> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let scratch = std::env::temp_dir().join(format!("oxcd-status-{}-{name}", std::process::id()));
    let r = extract_db(file, &scratch, true).and_then(|_| bolt::status(&scratch));
    let _ = std::fs::remove_file(&scratch);
    r
}

/// Writes this member's state as etcd's backend file at `path` and returns its size.
pub fn write_backend(store: &Store, path: &Path) -> Result<u64> {
    let backup = Backup::from_store(store)?;
    bolt::write(path, &backup)?;
    Ok(std::fs::metadata(path)?.len())
}

/// go-humanize's `Bytes`, which etcdctl uses for sizes ("20 kB", "2.1 MB").
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    if n < 10 {
        return format!("{n} B");
    }
    let e = ((n as f64).ln() / 1000f64.ln()).floor() as usize;
    let e = e.min(UNITS.len() - 1);
    let val = ((n as f64) / 1000f64.powi(e as i32) * 10.0 + 0.5).floor() / 10.0;
    if val < 10.0 {
        format!("{val:.1} {}", UNITS[e])
    } else {
        format!("{val:.0} {}", UNITS[e])
    }
}

/// `snapshot status` output in etcdctl's formats: `simple`, `table` or `json`.
pub fn format_status(st: &bolt::FileStatus, format: &str) -> Result<String> {
    match format {
        "simple" => Ok(format!(
            "{:x}, {}, {}, {}, {}\n",
            st.hash,
            st.revision,
            st.total_keys,
            human_bytes(st.total_size),
            st.version
        )),
        "json" => Ok(format!(
            "{}\n",
            serde_json::json!({
                "hash": st.hash,
                "revision": st.revision,
                "totalKey": st.total_keys,
                "totalSize": st.total_size,
                "version": st.version,
            })
        )),
        "table" => Ok(table(
            &["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE", "VERSION"],
            &[
                format!("{:x}", st.hash),
                st.revision.to_string(),
                st.total_keys.to_string(),
                human_bytes(st.total_size),
                st.version.clone(),
            ],
        )),
        other => Err(SnapshotError::Invalid(format!(
            "unknown output format {other:?} (use simple, json or table)"
        ))),
    }
}

/// One-row table the way etcdctl's tablewriter draws it: headers centred, cells right-aligned.
fn table(headers: &[&str], row: &[String]) -> String {
    let widths: Vec<usize> = headers
        .iter()
        .zip(row)
        .map(|(h, c)| h.len().max(c.len()))
        .collect();
    let line = {
        let mut s = String::from("+");
        for w in &widths {
            s.push_str(&"-".repeat(w + 2));
            s.push('+');
        }
        s.push('\n');
        s
    };
    let mut out = line.clone();
    out.push('|');
    for (h, w) in headers.iter().zip(&widths) {
        let gap = w - h.len();
        let left = gap / 2;
        out.push_str(&format!(
            " {}{}{} |",
            " ".repeat(left),
            h,
            " ".repeat(gap - left)
        ));
    }
    out.push('\n');
    out.push_str(&line);
    out.push('|');
    for (c, w) in row.iter().zip(&widths) {
        out.push_str(&format!(" {c:>w$} |"));
    }
    out.push('\n');
    out.push_str(&line);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{ENABLED_KEY, REVISION_KEY, ROLE_PREFIX, USER_PREFIX};

    #[test]
    fn sizes_read_like_go_humanize() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(9), "9 B");
        assert_eq!(human_bytes(20480), "20 kB");
        assert_eq!(human_bytes(2_138_112), "2.1 MB");
        assert_eq!(human_bytes(999), "999 B");
    }

    #[test]
    fn hash_trailer_is_detected_by_size() {
        assert!(has_hash(20480 + 32));
        assert!(!has_hash(20480));
    }

    #[test]
    fn revision_keys_round_trip_in_etcd_layout() {
        let k = bolt::revision_key(Revision::new(5, 2), true);
        assert_eq!(k.len(), 18);
        assert_eq!(k[8], b'_');
        assert_eq!(
            bolt::parse_revision_key(&k),
            Some((Revision::new(5, 2), true))
        );
        assert_eq!(bolt::parse_revision_key(b"short"), None);
    }

    #[test]
    fn backup_file_round_trips() {
        let kv = |key: &[u8]| {
            crate::pb::mvccpb::KeyValue {
                key: key.to_vec(),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        let b = Backup {
            revisions: vec![
                (Revision::new(2, 0), false, kv(b"a")),
                (Revision::new(3, 0), false, kv(b"b")),
                (Revision::new(4, 0), true, kv(b"a")),
            ],
            leases: vec![(7, 60)],
            consistent_index: 42,
            scheduled_compact: Some(2),
            finished_compact: Some(2),
            members: vec![Member {
                id: u64::MAX - 3,
                name: "a".into(),
                peer_ur_ls: vec!["http://a:2380".into()],
                client_ur_ls: vec![],
                is_learner: true,
            }],
            removed: vec![9],
            alarms: vec![(1, 1)],
            cluster_version: "3.6.0".into(),
            storage_version: Some("3.6.0".into()),
            auth: vec![
                (ENABLED_KEY.to_vec(), vec![1]),
                (REVISION_KEY.to_vec(), 7u64.to_be_bytes().to_vec()),
                ([USER_PREFIX, b"root"].concat(), b"user".to_vec()),
                ([ROLE_PREFIX, b"app"].concat(), b"role".to_vec()),
            ],
        };
        bolt::write(&path, &b).unwrap();
        let r = bolt::read(&path).unwrap();
        assert_eq!(r.revisions, b.revisions);
        assert_eq!(r.leases, b.leases);
        assert_eq!(r.consistent_index, 42);
        assert_eq!(
            (r.scheduled_compact, r.finished_compact),
            (Some(2), Some(2))
        );
        assert_eq!(r.members, b.members);
        assert_eq!(r.removed, b.removed);
        assert_eq!(r.alarms, b.alarms);
        assert_eq!(r.cluster_version, "3.6.0");
        assert_eq!(r.storage_version.as_deref(), Some("3.6.0"));
        let mut auth = r.auth.clone();
        auth.sort();
        let mut want = b.auth.clone();
        want.sort();
        assert_eq!(auth, want);
        let st = bolt::status(&path).unwrap();
        assert_eq!(st.revision, 4);
        // "a" was deleted at 4: only "b" is alive.
        assert_eq!((st.total_keys, st.version.as_str()), (1, "3.6.0"));
    }
}
