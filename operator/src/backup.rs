//! Backups: stream `Maintenance.Snapshot` from a member (a follower when there is one), check
//! it, upload it to object storage, read it back and open it as a snapshot before recording
//! it, then apply the retention policy. A backup that fails any step is deleted and reported;
//! it never appears as `lastSuccessfulBackup`.
//!
//! Object names: `<prefix>/<namespace>-<cluster>-<YYYYmmddTHHMMSSZ>-r<revision>.db`, so a
//! listing sorts by time and retention can select this cluster's backups by prefix.

use crate::crd::{BackupRecord, BackupSpec, EtcdCluster, MemberStatus};
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Upload parts of this size (S3's minimum is 5 MiB).
const PART_SIZE: usize = 8 * 1024 * 1024;
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("bad backup schedule {0:?}: {1}")]
    Schedule(String, String),
    #[error("bad backup destination {0:?}: {1}")]
    Destination(String, String),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("{0}")]
    Member(#[from] crate::etcd::EtcdError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("the snapshot is not valid: {0}")]
    Invalid(String),
    #[error("the uploaded backup does not match: {0}")]
    Mismatch(String),
    #[error("no healthy member to take a snapshot from")]
    NoMember,
    #[error("snapshot timed out")]
    Timeout,
}

/// Whether a backup is due now: a new `request` token, or a scheduled time passed since the
/// last backup (or since the cluster was created).
pub fn due(
    spec: &BackupSpec,
    last: Option<&BackupRecord>,
    created: jiff::Timestamp,
    now: jiff::Timestamp,
) -> Result<bool, BackupError> {
    if let Some(req) = &spec.request {
        if last.and_then(|l| l.request.as_ref()) != Some(req) {
            return Ok(true);
        }
    }
    let Some(expr) = &spec.schedule else {
        return Ok(false);
    };
    let schedule = parse_schedule(expr)?;
    let since = last
        .and_then(|l| jiff::Timestamp::from_str(&l.time).ok())
        .unwrap_or(created);
    let since = chrono::DateTime::from_timestamp(since.as_second(), 0).unwrap_or_default();
    Ok(schedule
        .after(&since)
        .next()
        .is_some_and(|next| next.timestamp() <= now.as_second()))
}

/// Standard 5-field cron (minute hour day-of-month month day-of-week), UTC.
pub fn parse_schedule(expr: &str) -> Result<cron::Schedule, BackupError> {
    let fields = expr.split_whitespace().count();
    if fields != 5 {
        return Err(BackupError::Schedule(
            expr.into(),
            format!("want 5 fields (minute hour day month weekday), got {fields}"),
        ));
    }
    cron::Schedule::from_str(&format!("0 {expr}"))
        .map_err(|e| BackupError::Schedule(expr.into(), e.to_string()))
}

/// The object store and key prefix of a destination URL, configured from the credentials
/// Secret's keys (e.g. AWS_ACCESS_KEY_ID, AWS_ENDPOINT, AWS_ALLOW_HTTP, AZURE_STORAGE_*,
/// GOOGLE_SERVICE_ACCOUNT_KEY).
pub fn open_store(
    destination: &str,
    credentials: &BTreeMap<String, String>,
) -> Result<(Arc<dyn ObjectStore>, ObjectPath), BackupError> {
    let url = url::Url::parse(destination)
        .map_err(|e| BackupError::Destination(destination.into(), e.to_string()))?;
    if url.scheme() == "file" {
        std::fs::create_dir_all(url.path())?;
    }
    let opts = credentials
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()));
    let (store, prefix) = object_store::parse_url_opts(&url, opts)
        .map_err(|e| BackupError::Destination(destination.into(), e.to_string()))?;
    Ok((Arc::from(store), prefix))
}

fn object_name(
    prefix: &ObjectPath,
    ns: &str,
    cluster: &str,
    time: jiff::Timestamp,
    rev: i64,
) -> ObjectPath {
    let stamp = time.strftime("%Y%m%dT%H%M%SZ").to_string();
    let file = format!("{ns}-{cluster}-{stamp}-r{rev}.db");
    if prefix.as_ref().is_empty() {
        ObjectPath::from(file)
    } else {
        ObjectPath::from(format!("{}/{file}", prefix.as_ref()))
    }
}

/// A follower when there is one (the leader keeps serving writes undisturbed).
pub fn pick_member(members: &[MemberStatus]) -> Option<&MemberStatus> {
    let healthy = |m: &&MemberStatus| m.healthy && !m.learner && !m.client_url.is_empty();
    members
        .iter()
        .filter(healthy)
        .find(|m| !m.leader)
        .or_else(|| members.iter().find(healthy))
}

/// Takes, uploads, verifies and records one backup; prunes by retention after a success.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    ec: &EtcdCluster,
    spec: &BackupSpec,
    members: &[MemberStatus],
    access: &crate::etcd::Access,
    credentials: &BTreeMap<String, String>,
    scratch: &std::path::Path,
) -> BackupRecord {
    let started = jiff::Timestamp::now();
    let mut record = BackupRecord {
        time: rfc3339(started),
        request: spec.request.clone(),
        ..Default::default()
    };
    match take(
        ec,
        spec,
        members,
        access,
        credentials,
        scratch,
        started,
        &mut record,
    )
    .await
    {
        Ok(()) => record.succeeded = true,
        Err(e) => {
            record.succeeded = false;
            record.message = Some(e.to_string());
        }
    }
    record
}

/// A backup that failed before it started (bad schedule, unreadable credentials).
pub fn failed(spec: &BackupSpec, message: String) -> BackupRecord {
    BackupRecord {
        time: rfc3339(jiff::Timestamp::now()),
        message: Some(message),
        request: spec.request.clone(),
        ..Default::default()
    }
}

fn rfc3339(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[allow(clippy::too_many_arguments)]
async fn take(
    ec: &EtcdCluster,
    spec: &BackupSpec,
    members: &[MemberStatus],
    access: &crate::etcd::Access,
    credentials: &BTreeMap<String, String>,
    scratch: &std::path::Path,
    started: jiff::Timestamp,
    record: &mut BackupRecord,
) -> Result<(), BackupError> {
    let member = pick_member(members).ok_or(BackupError::NoMember)?;
    let ns = ec
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let cluster = ec.metadata.name.clone().unwrap_or_default();
    std::fs::create_dir_all(scratch)?;
    let file = scratch.join(format!("{ns}-{cluster}-{}.db", started.as_millisecond()));
    let result = async {
        // 1. Stream the snapshot to a scratch file, hashing as it comes.
        let (size, sha) = tokio::time::timeout(
            SNAPSHOT_TIMEOUT,
            download(access, &member.client_url, &file),
        )
        .await
        .map_err(|_| BackupError::Timeout)??;
        // 2. It must be a whole snapshot: sha256 trailer and a readable bbolt file.
        let (revision, keys) = open_snapshot(&file)?;
        record.revision = revision;
        record.size = size;
        record.sha256 = sha.clone();
        record.keys = keys;
        // 3. Upload in parts; an unfinished multipart upload is not an object.
        let (store, prefix) = open_store(&spec.destination, credentials)?;
        let name = object_name(&prefix, &ns, &cluster, started, revision);
        let upload = store.put_multipart(&name).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut f = tokio::fs::File::open(&file).await?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            use tokio::io::AsyncReadExt;
            let n = f.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            writer.wait_for_capacity(4).await?;
            writer.write(&buf[..n]);
        }
        writer.finish().await?;
        record.url = format!(
            "{}/{}",
            spec.destination.trim_end_matches('/'),
            name.filename().unwrap_or_default()
        );
        // 4. Read it back: same bytes, and it opens as a snapshot with the same revision.
        if let Err(e) = verify_upload(store.as_ref(), &name, &sha, revision, &file).await {
            let _ = store.delete(&name).await;
            return Err(e);
        }
        prune(store.as_ref(), &prefix, &ns, &cluster, spec).await?;
        Ok(())
    }
    .await;
    let _ = std::fs::remove_file(&file);
    result
}

async fn download(
    access: &crate::etcd::Access,
    url: &str,
    file: &std::path::Path,
) -> Result<(u64, String), BackupError> {
    let mut client = access.connect(&[url.to_string()]).await?;
    let mut stream = client.snapshot().await?;
    let mut out = tokio::fs::File::create(file).await?;
    let mut h = Sha256::new();
    let mut size = 0u64;
    while let Some(msg) = stream.message().await? {
        h.update(msg.blob());
        out.write_all(msg.blob()).await?;
        size += msg.blob().len() as u64;
    }
    out.sync_all().await?;
    Ok((size, hex(&h.finalize())))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Checks the sha256 trailer and reads the bbolt file: (revision, key count).
pub fn open_snapshot(file: &std::path::Path) -> Result<(i64, u64), BackupError> {
    let db = file.with_extension("check");
    let status = oxcd::snapshot::extract_db(file, &db, false)
        .and_then(|_| oxcd::snapshot::bolt::status(&db))
        .map_err(|e| BackupError::Invalid(e.to_string()));
    let _ = std::fs::remove_file(&db);
    let status = status?;
    Ok((status.revision, status.total_keys))
}

async fn verify_upload(
    store: &dyn ObjectStore,
    name: &ObjectPath,
    sha: &str,
    revision: i64,
    scratch_file: &std::path::Path,
) -> Result<(), BackupError> {
    let mut stream = store.get(name).await?.into_stream();
    let back = scratch_file.with_extension("readback");
    let mut out = tokio::fs::File::create(&back).await?;
    let mut h = Sha256::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        h.update(&chunk);
        out.write_all(&chunk).await?;
    }
    out.sync_all().await?;
    let got = hex(&h.finalize());
    let opened = open_snapshot(&back);
    let _ = std::fs::remove_file(&back);
    if got != sha {
        return Err(BackupError::Mismatch(format!(
            "sha256 {got}, uploaded {sha}"
        )));
    }
    let (rev, _) = opened?;
    if rev != revision {
        return Err(BackupError::Mismatch(format!(
            "revision {rev}, uploaded {revision}"
        )));
    }
    Ok(())
}

/// Deletes this cluster's backups beyond `maxCount` (oldest first) or older than `maxAgeHours`.
async fn prune(
    store: &dyn ObjectStore,
    prefix: &ObjectPath,
    ns: &str,
    cluster: &str,
    spec: &BackupSpec,
) -> Result<(), BackupError> {
    let Some(retention) = &spec.retention else {
        return Ok(());
    };
    let mine = format!("{ns}-{cluster}-");
    let listed: Vec<object_store::ObjectMeta> = store
        .list(Some(prefix))
        .filter_map(|m| async move { m.ok() })
        .collect()
        .await;
    let mut ours: Vec<object_store::ObjectMeta> = listed
        .into_iter()
        .filter(|m| {
            m.location
                .filename()
                .is_some_and(|f| f.starts_with(&mine) && f.ends_with(".db"))
        })
        .collect();
    ours.sort_by(|a, b| b.location.as_ref().cmp(a.location.as_ref()));
    let now = chrono::Utc::now();
    for (i, m) in ours.iter().enumerate() {
        let too_many = retention.max_count.is_some_and(|n| i >= n as usize);
        let too_old = retention
            .max_age_hours
            .is_some_and(|h| now - m.last_modified > chrono::Duration::hours(h as i64));
        // Never the newest: a backup that just succeeded stays whatever the policy says.
        if i > 0 && (too_many || too_old) {
            store.delete(&m.location).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn schedule_and_requests_decide_when_a_backup_is_due() {
        let spec = BackupSpec {
            schedule: Some("0 */6 * * *".into()),
            destination: "file:///tmp/x".into(),
            ..Default::default()
        };
        let created = at("2026-11-23T00:30:00Z");
        assert!(!due(&spec, None, created, at("2026-11-23T05:59:00Z")).unwrap());
        assert!(due(&spec, None, created, at("2026-11-23T06:00:00Z")).unwrap());
        let last = BackupRecord {
            time: "2026-11-23T06:00:05Z".into(),
            ..Default::default()
        };
        assert!(!due(&spec, Some(&last), created, at("2026-11-23T11:00:00Z")).unwrap());
        assert!(due(&spec, Some(&last), created, at("2026-11-23T12:00:00Z")).unwrap());

        let on_demand = BackupSpec {
            request: Some("a".into()),
            ..spec.clone()
        };
        assert!(due(&on_demand, Some(&last), created, at("2026-11-23T07:00:00Z")).unwrap());
        let done = BackupRecord {
            request: Some("a".into()),
            ..last.clone()
        };
        assert!(!due(&on_demand, Some(&done), created, at("2026-11-23T07:00:00Z")).unwrap());
    }

    #[test]
    fn bad_schedules_are_refused() {
        assert!(parse_schedule("0 * * *").is_err());
        assert!(parse_schedule("61 * * * *").is_err());
        assert!(parse_schedule("*/5 * * * *").is_ok());
    }

    #[test]
    fn a_follower_is_preferred() {
        let m = |name: &str, leader: bool, healthy: bool| MemberStatus {
            name: name.into(),
            client_url: format!("http://{name}:2379"),
            leader,
            healthy,
            ..Default::default()
        };
        let members = [
            m("a", true, true),
            m("b", false, false),
            m("c", false, true),
        ];
        assert_eq!(pick_member(&members).unwrap().name, "c");
        assert_eq!(pick_member(&members[..2]).unwrap().name, "a");
        assert!(pick_member(&[m("b", false, false)]).is_none());
    }

    #[test]
    fn object_names_sort_by_time() {
        let p = ObjectPath::from("prod");
        let n = object_name(&p, "ns", "demo", at("2026-11-23T06:00:00Z"), 42);
        assert_eq!(n.as_ref(), "prod/ns-demo-20261123T060000Z-r42.db");
        let root = object_name(
            &ObjectPath::from(""),
            "ns",
            "demo",
            at("2026-11-23T06:00:00Z"),
            1,
        );
        assert_eq!(root.as_ref(), "ns-demo-20261123T060000Z-r1.db");
    }
}
