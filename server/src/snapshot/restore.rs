//! `oxcd snapshot restore`: a member's data dir made from a backup, as etcdctl (etcdutl)
//! does it. The keys, revisions, leases and compaction point come from the backup; the member
//! list is the new one from `--initial-cluster`. Like etcd, every member of the new cluster
//! starts from a Raft snapshot at index N (N = number of members) whose configuration holds
//! all of them, so they elect a leader and go on from the backup's revision.
//!
//! The data dir is built under a temporary name and renamed into place at the end: a
//! damaged backup or a failure half-way leaves nothing behind.

use super::{bolt, extract_db, Result, SnapshotError};
use crate::membership::{self, Member};
use crate::mvcc::Store;
use crate::schema::{
    MEMBER_PREFIX, META_CLUSTER_ID, META_CONF_STATE, META_CONSISTENT_INDEX, META_MEMBER_ID,
    META_SCHEDULED_COMPACT, META_SNAPSHOT_INDEX, META_SNAPSHOT_TERM,
};
use crate::wal::Wal;
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, HardState, SnapshotMetadata};
use std::path::{Path, PathBuf};

/// etcdutl's restore flags.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    pub name: String,
    pub initial_cluster: Vec<(String, Vec<String>)>,
    pub initial_cluster_token: String,
    pub initial_advertise_peer_urls: Vec<String>,
    pub data_dir: PathBuf,
    /// Defaults to `<data-dir>/member/wal`.
    pub wal_dir: Option<PathBuf>,
    pub skip_hash_check: bool,
    /// etcdutl's `--bump-revision` with `--mark-compacted`: the restored store starts this
    /// many revisions after the backup's latest, compacted there, so clients that saw later
    /// revisions of the lost cluster never see a revision again (0: as backed up).
    pub bump_revision: u64,
}

/// What a restore produced.
#[derive(Debug, Clone)]
pub struct Restored {
    pub member_id: u64,
    pub cluster_id: u64,
    pub revision: i64,
    pub revisions: usize,
    pub leases: usize,
}

/// A sibling path to build `dir` under before renaming it into place.
fn staging(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    dir.with_file_name(format!(".{name}.restoring-{}", std::process::id()))
}

pub(super) fn sync_parent(dir: &Path) -> std::io::Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::File::open(parent)?.sync_all()
}

pub fn restore(backup_file: &Path, cfg: &RestoreConfig) -> Result<Restored> {
    // As etcdutl 3.6: an empty directory (made by a tool or a volume mount) is fine.
    let empty_dir = |d: &Path| std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_none());
    if cfg.data_dir.exists() && !empty_dir(&cfg.data_dir) {
        return Err(SnapshotError::Invalid(format!(
            "data-dir {:?} not empty or could not be read",
            cfg.data_dir.display().to_string()
        )));
    }
    if let Some(w) = &cfg.wal_dir {
        if w.exists() {
            return Err(SnapshotError::Invalid(format!(
                "wal-dir {:?} exists",
                w.display().to_string()
            )));
        }
    }
    if let Some(p) = cfg.data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p)?;
    }
    let data_tmp = staging(&cfg.data_dir);
    let wal_tmp = cfg.wal_dir.as_deref().map(staging);
    let cleanup = || {
        let _ = std::fs::remove_dir_all(&data_tmp);
        if let Some(w) = &wal_tmp {
            let _ = std::fs::remove_dir_all(w);
        }
    };
    cleanup();
    let built = build(backup_file, cfg, &data_tmp, wal_tmp.as_deref());
    let result = built.and_then(|r| {
        if let (Some(tmp), Some(dst)) = (&wal_tmp, &cfg.wal_dir) {
            std::fs::rename(tmp, dst)?;
            sync_parent(dst)?;
        }
        if cfg.data_dir.exists() {
            std::fs::remove_dir(&cfg.data_dir)?;
        }
        std::fs::rename(&data_tmp, &cfg.data_dir)?;
        sync_parent(&cfg.data_dir)?;
        Ok(r)
    });
    if result.is_err() {
        cleanup();
    }
    result
}

fn build(
    backup_file: &Path,
    cfg: &RestoreConfig,
    data_dir: &Path,
    wal_dir: Option<&Path>,
) -> Result<Restored> {
    let member_dir = data_dir.join("member");
    std::fs::create_dir_all(&member_dir)?;
    let db_file = member_dir.join("backup.db");
    extract_db(backup_file, &db_file, cfg.skip_hash_check)?;
    let backup = bolt::read(&db_file)?;
    std::fs::remove_file(&db_file)?;

    let members: Vec<Member> = cfg
        .initial_cluster
        .iter()
        .map(|(name, urls)| Member {
            id: membership::member_id(urls, &cfg.initial_cluster_token, None),
            name: name.clone(),
            peer_ur_ls: urls.clone(),
            client_ur_ls: vec![],
            is_learner: false,
        })
        .collect();
    let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    let member_id = membership::member_id(
        &cfg.initial_advertise_peer_urls,
        &cfg.initial_cluster_token,
        None,
    );
    let cluster_id = membership::cluster_id(&ids);
    // etcd's restore: the log starts at a snapshot at index N, term 1, holding every member.
    let index = members.len() as u64;
    let term = 1u64;
    let mut conf_state = ConfState::default();
    conf_state.set_voters(ids.clone());
    let conf_bytes = conf_state
        .write_to_bytes()
        .map_err(|e| SnapshotError::Invalid(e.to_string()))?;

    let mut records = backup.state_records();
    for m in &members {
        records.push((
            membership::record_key(MEMBER_PREFIX, m.id),
            m.encode_to_vec(),
        ));
    }
    for (k, v) in [
        (META_MEMBER_ID, member_id.to_be_bytes().to_vec()),
        (META_CLUSTER_ID, cluster_id.to_be_bytes().to_vec()),
        (META_CONF_STATE, conf_bytes),
        (META_CONSISTENT_INDEX, index.to_be_bytes().to_vec()),
        (META_SNAPSHOT_INDEX, index.to_be_bytes().to_vec()),
        (META_SNAPSHOT_TERM, term.to_be_bytes().to_vec()),
    ] {
        records.push((k.to_vec(), v));
    }
    let latest = backup
        .revisions
        .last()
        .map(|(r, _, _)| r.main)
        .unwrap_or(1)
        .max(backup.finished_compact.unwrap_or(0))
        .max(backup.scheduled_compact.unwrap_or(0));
    let revision = latest + cfg.bump_revision as i64;
    if cfg.bump_revision > 0 {
        // A compaction scheduled at the bumped revision: the store finishes it when it opens,
        // as etcd does with the one etcdutl schedules.
        records.retain(|(k, _)| k.as_slice() != META_SCHEDULED_COMPACT);
        records.push((
            META_SCHEDULED_COMPACT.to_vec(),
            (revision as u64).to_be_bytes().to_vec(),
        ));
    }
    Store::create(&member_dir.join("db"), records)?;

    let mut meta = SnapshotMetadata {
        index,
        term,
        ..Default::default()
    };
    meta.set_conf_state(conf_state);
    let wal_path = match wal_dir {
        Some(w) => w.to_path_buf(),
        None => member_dir.join("wal"),
    };
    let mut wal = Wal::create(
        &wal_path,
        meta,
        crate::wal::Metadata {
            node_id: member_id,
            cluster_id,
        },
    )
    .map_err(|e| SnapshotError::Invalid(e.to_string()))?;
    let hs = HardState {
        term,
        commit: index,
        ..Default::default()
    };
    wal.append(&[], Some(&hs))
        .and_then(|_| wal.sync())
        .map_err(|e| SnapshotError::Invalid(format!("writing the WAL: {e}")))?;

    Ok(Restored {
        member_id,
        cluster_id,
        revision,
        revisions: backup.revisions.len(),
        leases: backup.leases.len(),
    })
}
