//! `oxcd-operator restore-member`: the init container of a cluster created with
//! `spec.restore`. Every member of the new cluster runs it before oxcd starts: it fetches the
//! snapshot, checks it (sha256 trailer, readable bbolt), and builds the member's data dir from
//! it with the member's own flags (`oxcd snapshot restore`), so all members start from the
//! same data. Works for oxcd backups and etcd 3.4 snapshots alike.
//!
//! It does nothing when the member already has data (a restarted pod) or when the member is
//! joining an existing cluster (a scale-up after the restore): those get their data from the
//! leader.

use crate::backup::{open_snapshot, open_store, BackupError};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tokio::io::AsyncWriteExt;

#[derive(clap::Args, Debug)]
pub struct RestoreMemberArgs {
    /// URL of the snapshot (s3://, gs://, az://, file:///).
    #[arg(long, env = "OXCD_RESTORE_SOURCE")]
    pub source: String,
    #[arg(long, env = "ETCD_NAME")]
    pub name: String,
    #[arg(long, env = "ETCD_DATA_DIR")]
    pub data_dir: PathBuf,
    #[arg(long, env = "ETCD_INITIAL_CLUSTER")]
    pub initial_cluster: String,
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_TOKEN")]
    pub initial_cluster_token: String,
    #[arg(long, env = "ETCD_INITIAL_ADVERTISE_PEER_URLS")]
    pub initial_advertise_peer_urls: String,
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE", default_value = "new")]
    pub initial_cluster_state: String,
}

/// Object store settings from the environment (the credentials Secret is mounted with
/// envFrom): AWS_*, GOOGLE_*, AZURE_*.
fn credentials_from_env() -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("AZURE_")
        })
        .collect()
}

pub async fn run(args: RestoreMemberArgs) -> anyhow::Result<()> {
    if args.initial_cluster_state == "existing" {
        eprintln!(
            "{}: joining an existing cluster; nothing to restore",
            args.name
        );
        return Ok(());
    }
    if args.data_dir.join("member").exists() {
        eprintln!(
            "{}: {} already holds a member; nothing to restore",
            args.name,
            args.data_dir.display()
        );
        return Ok(());
    }
    let download = args.data_dir.with_extension("download");
    fetch(&args.source, &download).await?;
    let result = (|| -> anyhow::Result<()> {
        let (revision, keys) = open_snapshot(&download)?;
        let advertise: Vec<String> = args
            .initial_advertise_peer_urls
            .split(',')
            .map(str::to_string)
            .collect();
        let initial_cluster =
            oxcd::config::parse_initial_cluster(&args.name, &args.initial_cluster, &advertise)?;
        // A data dir left half-built by an earlier attempt (no member/ inside) goes first.
        if args.data_dir.exists() {
            std::fs::remove_dir_all(&args.data_dir)?;
        }
        let cfg = oxcd::snapshot::restore::RestoreConfig {
            name: args.name.clone(),
            initial_cluster,
            initial_cluster_token: args.initial_cluster_token.clone(),
            initial_advertise_peer_urls: advertise,
            data_dir: args.data_dir.clone(),
            wal_dir: None,
            skip_hash_check: false,
            bump_revision: 0,
        };
        let restored = oxcd::snapshot::restore::restore(&download, &cfg)?;
        eprintln!(
            "{}: restored {} (revision {revision}, {keys} keys) into {}, member {:x}",
            args.name,
            args.source,
            args.data_dir.display(),
            restored.member_id
        );
        Ok(())
    })();
    let _ = std::fs::remove_file(&download);
    result
}

async fn fetch(source: &str, to: &std::path::Path) -> Result<(), BackupError> {
    // The URL names the object: its directory is the store, its last segment the object.
    let (dir, file) = source
        .rsplit_once('/')
        .ok_or_else(|| BackupError::Destination(source.into(), "no object name".into()))?;
    let (store, prefix) = open_store(dir, &credentials_from_env())?;
    let name = if prefix.as_ref().is_empty() {
        object_store::path::Path::from(file)
    } else {
        object_store::path::Path::from(format!("{}/{file}", prefix.as_ref()))
    };
    let mut stream = store.get(&name).await?.into_stream();
    if let Some(p) = to.parent() {
        std::fs::create_dir_all(p)?;
    }
    let mut out = tokio::fs::File::create(to).await?;
    while let Some(chunk) = stream.next().await {
        out.write_all(&chunk?).await?;
    }
    out.sync_all().await?;
    Ok(())
}
