//! `oxcd snapshot status|restore`: the offline backup tools, with etcdctl 3.4's (etcdutl's)
//! flags and output.

use super::restore::{restore, RestoreConfig};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// etcdutl's command line: `oxcd` answers to it when started as `etcdutl` (a link to the
/// binary), and `oxcd snapshot ...` is its `snapshot` group.
#[derive(Parser, Debug)]
#[command(
    name = "etcdutl",
    about = "Offline tools for oxcd data dirs and etcd-format backups"
)]
struct Etcdutl {
    /// simple, json or table (etcdutl's global flag).
    #[arg(
        short = 'w',
        long = "write-out",
        global = true,
        default_value = "simple"
    )]
    write_out: String,
    #[command(subcommand)]
    cmd: UtlCmd,
}

#[derive(Subcommand, Debug)]
enum UtlCmd {
    /// Inspects and restores backups.
    #[command(subcommand)]
    Snapshot(Cmd),
    /// Defragments a stopped member's backend (as the online Defragment does).
    Defrag {
        #[arg(long = "data-dir")]
        data_dir: PathBuf,
    },
    /// Prints the version.
    Version,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Hash, revision, total keys and size of a backup file (as `etcdctl snapshot status`).
    Status { file: PathBuf },
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
        /// How much to increase the latest revision after restore.
        #[arg(long = "bump-revision", default_value_t = 0)]
        bump_revision: u64,
        /// Mark the latest revision after restore as compacted (required with
        /// --bump-revision > 0, refused otherwise).
        #[arg(long = "mark-compacted")]
        mark_compacted: bool,
    },
}

/// Runs `oxcd snapshot ...`; `args` starts with the program name.
pub fn run(args: Vec<String>) -> anyhow::Result<()> {
    // "oxcd snapshot <cmd>" is "etcdutl snapshot <cmd>".
    let args = std::iter::once("etcdutl".to_string()).chain(args.into_iter().skip(1));
    run_etcdutl(args.collect())
}

/// An etcd-style log line on stderr, as etcdutl writes them (zap's console encoder).
fn log_line(msg: &str, fields: &[(&str, String)]) {
    let ts = crate::log::zap_time(time::OffsetDateTime::now_utc());
    let fields: Vec<String> = fields.iter().map(|(k, v)| format!("{k:?}: {v}")).collect();
    eprintln!("{ts}\tinfo\t{msg}\t{{{}}}", fields.join(", "));
}

fn quoted(p: &std::path::Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Runs etcdutl's command line; `args` starts with the program name.
pub fn run_etcdutl(args: Vec<String>) -> anyhow::Result<()> {
    let cli = match Etcdutl::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let write_out = cli.write_out;
    let cmd = match cli.cmd {
        UtlCmd::Snapshot(cmd) => cmd,
        UtlCmd::Version => {
            println!("etcdutl version: {}", crate::version::SERVER_VERSION);
            let api = crate::version::CLUSTER_VERSION;
            println!("API version: {}.{}", api.major, api.minor);
            println!("oxcd version: {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        UtlCmd::Defrag { data_dir } => {
            let db = data_dir.join("member").join("db");
            anyhow::ensure!(db.exists(), "no oxcd backend in {}", data_dir.display());
            let (store, _) = crate::mvcc::Store::open(&db)?;
            let before = store.size_on_disk();
            log_line(
                "defragmenting",
                &[
                    ("path", quoted(&db)),
                    ("current-db-size-bytes", before.to_string()),
                ],
            );
            store.defragment()?;
            let after = store.size_on_disk();
            log_line(
                "finished defragmenting directory",
                &[
                    ("path", quoted(&db)),
                    (
                        "current-db-size-bytes-diff",
                        (after as i64 - before as i64).to_string(),
                    ),
                    ("current-db-size-bytes", after.to_string()),
                ],
            );
            return Ok(());
        }
    };
    match cmd {
        Cmd::Status { file } => {
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
            bump_revision,
            mark_compacted,
        } => {
            // etcdutl's words (it names the flag --revision-bump here).
            anyhow::ensure!(
                (bump_revision > 0) == mark_compacted,
                "--mark-compacted required if --revision-bump > 0"
            );
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
                bump_revision,
            };
            let data_dir = cfg.data_dir.clone();
            log_line(
                "restoring snapshot",
                &[("path", quoted(&file)), ("data-dir", quoted(&data_dir))],
            );
            let r = restore(&file, &cfg)?;
            for (name, urls) in &cfg.initial_cluster {
                log_line(
                    "added member",
                    &[
                        ("cluster-id", format!("\"{:x}\"", r.cluster_id)),
                        ("added-peer-name", format!("{name:?}")),
                        ("added-peer-peer-urls", format!("{urls:?}")),
                    ],
                );
            }
            log_line(
                "restored snapshot",
                &[
                    ("path", quoted(&file)),
                    ("data-dir", quoted(&data_dir)),
                    ("member-id", format!("\"{:x}\"", r.member_id)),
                    ("revision", r.revision.to_string()),
                    ("key-revisions", r.revisions.to_string()),
                    ("leases", r.leases.to_string()),
                ],
            );
        }
    }
    Ok(())
}
