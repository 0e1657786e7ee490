//! `oxcd snapshot status|restore`: the offline backup tools, with etcdctl 3.4's (etcdutl's)
//! flags and output.

use super::restore::{restore, RestoreConfig};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "oxcd snapshot",
    about = "Offline tools for etcd-format backups"
)]
struct SnapshotCli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Hash, revision, total keys and size of a backup file (as `etcdctl snapshot status`).
    Status {
        file: PathBuf,
        /// simple, json or table.
        #[arg(short = 'w', long = "write-out", default_value = "simple")]
        write_out: String,
    },
    /// Creates a member's data dir from a backup taken from etcd or oxcd.
    Restore {
        file: PathBuf,
        /// Human-readable name of the member being restored.
        #[arg(long, default_value = "default")]
        name: String,
        /// Data dir to create (default "<name>.oxcd"); it must not exist.
        #[arg(long = "data-dir")]
        data_dir: Option<PathBuf>,
        /// WAL dir to create (default "<data-dir>/member/wal").
        #[arg(long = "wal-dir")]
        wal_dir: Option<PathBuf>,
        /// The new cluster's members, name=peerURL,...
        #[arg(
            long = "initial-cluster",
            default_value = "default=http://localhost:2380"
        )]
        initial_cluster: String,
        /// The new cluster's token (member and cluster IDs derive from it).
        #[arg(long = "initial-cluster-token", default_value = "etcd-cluster")]
        initial_cluster_token: String,
        /// This member's peer URLs, as in --initial-cluster.
        #[arg(
            long = "initial-advertise-peer-urls",
            default_value = "http://localhost:2380"
        )]
        initial_advertise_peer_urls: String,
        /// Accept a file without etcd's sha256 trailer (such as a copied member/snap/db).
        #[arg(long = "skip-hash-check")]
        skip_hash_check: bool,
    },
}

/// Runs `oxcd snapshot ...`; `args` starts with the program name.
pub fn run(args: Vec<String>) -> anyhow::Result<()> {
    // "oxcd snapshot <cmd>" parses as "oxcd-snapshot <cmd>".
    let args: Vec<String> = std::iter::once("oxcd snapshot".to_string())
        .chain(args.into_iter().skip(2))
        .collect();
    let cli = match SnapshotCli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.cmd {
        Cmd::Status { file, write_out } => {
            let st = super::bolt_status_of_backup(&file)?;
            print!("{}", super::format_status(&st, &write_out)?);
        }
        Cmd::Restore {
            file,
            name,
            data_dir,
            wal_dir,
            initial_cluster,
            initial_cluster_token,
            initial_advertise_peer_urls,
            skip_hash_check,
        } => {
            let advertise: Vec<String> = initial_advertise_peer_urls
                .split(',')
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect();
            let initial_cluster =
                crate::config::parse_initial_cluster(&name, &initial_cluster, &advertise)?;
            let cfg = RestoreConfig {
                data_dir: data_dir.unwrap_or_else(|| PathBuf::from(format!("{name}.oxcd"))),
                name,
                initial_cluster,
                initial_cluster_token,
                initial_advertise_peer_urls: advertise,
                wal_dir,
                skip_hash_check,
            };
            eprintln!(
                "restoring snapshot {} to data-dir {}",
                file.display(),
                cfg.data_dir.display()
            );
            let r = restore(&file, &cfg)?;
            eprintln!(
                "restored snapshot: member {:x} of cluster {:x}, revision {}, {} key revisions, {} leases, data-dir {}",
                r.member_id,
                r.cluster_id,
                r.revision,
                r.revisions,
                r.leases,
                cfg.data_dir.display()
            );
        }
    }
    Ok(())
}
