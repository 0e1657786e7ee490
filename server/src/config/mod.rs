//! Server configuration: the validated `Config` the server runs with, from etcd's flags and
//! their `ETCD_*` variables (`flags.rs`) or etcd's YAML config file (`file.rs`).

use crate::listener::ListenAddr;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

mod file;
mod flags;

pub use flags::{parse_initial_cluster, Flags};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("invalid value {value:?} for --{flag}: {why}")]
    Invalid {
        flag: &'static str,
        value: String,
        why: String,
    },
    #[error("{0}")]
    Tls(String),
    #[error("--{0} is not supported yet by oxcd")]
    Unsupported(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("config file {path}: {why}")]
    File { path: String, why: String },
    /// A value Go's flag package refuses, in its words (etcd's enum flags answer so).
    #[error("invalid value {value:?} for flag -{flag}: invalid value {value:?}")]
    FlagValue { flag: &'static str, value: String },
}

/// Why the server's configuration could not be read.
#[derive(Debug, Error)]
pub enum LoadError {
    /// Bad command line: clap prints it (and `--help`) itself.
    #[error("{0}")]
    Usage(clap::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Default quota when `--quota-backend-bytes` is 0, as etcd's DefaultQuotaBytes.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 * 1024 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoCompaction {
    Off,
    Periodic(Duration),
    Revision(i64),
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub name: String,
    pub data_dir: PathBuf,
    pub wal_dir: PathBuf,
    /// Every client listening address, once, in flag order.
    pub listen_client: Vec<ListenAddr>,
    /// --listen-client-http-urls: HTTP only there, and then gRPC only on `listen_client`.
    pub listen_client_http: Vec<ListenAddr>,
    /// The client addresses named by an http:// URL, and by an https:// URL (etcd serves both
    /// on one port when both name it).
    pub listen_client_plain: Vec<ListenAddr>,
    pub listen_client_tls: Vec<ListenAddr>,
    pub client_tls: crate::tls::TlsInfo,
    /// `--listen-metrics-urls`: HTTP listeners for /metrics and /health only.
    pub listen_metrics: Vec<ListenAddr>,
    /// The https:// and unixs:// ones among them (served with `client_tls`).
    pub listen_metrics_tls: Vec<ListenAddr>,
    pub listen_peer: Vec<ListenAddr>,
    pub listen_peer_plain: Vec<ListenAddr>,
    pub listen_peer_tls: Vec<ListenAddr>,
    pub peer_tls: crate::tls::TlsInfo,
    pub advertise_client_urls: Vec<String>,
    pub initial_advertise_peer_urls: Vec<String>,
    /// (name, peer urls) of the initial cluster.
    pub initial_cluster: Vec<(String, Vec<String>)>,
    pub initial_cluster_token: String,
    /// `--initial-cluster-state new` (bootstrap) or `existing` (join).
    pub new_cluster: bool,
    pub heartbeat: Duration,
    pub election_ticks: usize,
    pub snapshot_count: u64,
    /// WAL segments kept once a snapshot point covers them (0: all).
    pub max_wals: u64,
    /// Revisions a physical compaction deletes per backend batch, and its pause between
    /// batches (etcd's --compaction-batch-limit, --compaction-sleep-interval).
    pub compaction_batch_limit: usize,
    pub compaction_sleep_interval: Duration,
    /// Raft entries kept after a snapshot for slow followers (etcd's SnapshotCatchUpEntries).
    pub snapshot_catchup_entries: u64,
    /// Slow unary requests and slow applies are logged past these.
    pub warning_unary_request_duration: Duration,
    pub warning_apply_duration: Duration,
    pub quota_backend_bytes: u64,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    pub auto_compaction: AutoCompaction,
    pub watch_progress_interval: Duration,
    pub strict_reconfig_check: bool,
    /// `--force-new-cluster`: see `etcdserver::bootstrap`.
    pub force_new_cluster: bool,
    /// `--feature-gates=InitialCorruptCheck=true` (or the old experimental flag): see
    /// `corrupt::initial_check`.
    pub initial_corrupt_check: bool,
    /// `--corrupt-check-time`, when not zero: see `corrupt::periodic_check`.
    pub corrupt_check_interval: Option<Duration>,
    pub feature_gates: crate::features::FeatureGates,
    /// `--max-learners`.
    pub max_learners: usize,
    /// Warnings for deprecated spellings, logged once logging is set up.
    pub deprecations: Vec<String>,
    pub log_level: String,
    /// `--logger zap` (or `--log-format json`): etcd's zap JSON lines.
    pub log_json: bool,
    pub log_output: crate::log::Output,
    pub max_concurrent_streams: u32,
    /// grpc-go's keepalive enforcement policy on client connections (`api/keepalive.rs`).
    pub keepalive_min_time: Duration,
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Option<Duration>,
    /// `--enable-pprof`: accepted so that etcd's configurations start, and ignored with a
    /// warning (there is no Go runtime to profile).
    pub enable_pprof: bool,
    /// `--auth-token`, `--bcrypt-cost`, `--auth-token-ttl`.
    pub auth_token: String,
    pub bcrypt_cost: u32,
    pub auth_token_ttl: Duration,
}

impl Config {
    /// etcd's "starting an etcd server" line: the configuration as the server will run it
    /// (operators and etcd's own tests read it), with the fields oxcd has.
    pub fn log_starting(&self) {
        let member_initialized = std::fs::read_dir(&self.wal_dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        let initial_cluster = self
            .initial_cluster
            .iter()
            .flat_map(|(name, urls)| urls.iter().map(move |u| format!("{name}={u}")))
            .collect::<Vec<_>>()
            .join(",");
        let (mode, retention) = match &self.auto_compaction {
            AutoCompaction::Off => ("periodic", "0s".to_string()),
            AutoCompaction::Periodic(d) => ("periodic", format!("{d:?}")),
            AutoCompaction::Revision(r) => ("revision", r.to_string()),
        };
        tracing::info!(
            "etcd-version" = crate::version::SERVER_VERSION,
            "oxcd-version" = env!("CARGO_PKG_VERSION"),
            "max-cpu-available" = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64,
            "member-initialized" = member_initialized,
            name = %self.name,
            "data-dir" = %self.data_dir.display(),
            "wal-dir" = %self.wal_dir.display(),
            "force-new-cluster" = self.force_new_cluster,
            "heartbeat-interval" = ?self.heartbeat,
            "election-timeout" = ?self.heartbeat * self.election_ticks as u32,
            "snapshot-count" = self.snapshot_count,
            "snapshot-catchup-entries" = self.snapshot_catchup_entries,
            "initial-advertise-peer-urls" = ?self.initial_advertise_peer_urls,
            "advertise-client-urls" = ?self.advertise_client_urls,
            "initial-cluster" = %initial_cluster,
            "initial-cluster-state" = if self.new_cluster { "new" } else { "existing" },
            "initial-cluster-token" = %self.initial_cluster_token,
            "quota-backend-bytes" = self.quota_backend_bytes,
            "max-request-bytes" = self.max_request_bytes as u64,
            "max-concurrent-streams" = u64::from(self.max_concurrent_streams),
            "feature-gates" = %self.feature_gates.changed(),
            "initial-corrupt-check" = self.initial_corrupt_check,
            "auto-compaction-mode" = mode,
            "auto-compaction-retention" = %retention,
            "max-learners" = self.max_learners as u64,
            // etcd 3.6 enforces its default whatever the flag says.
            "v2-deprecation" = "write-only",
            "starting an etcd server"
        );
    }
}

impl Config {
    /// etcd's minimum lease TTL: 1.5 election timeouts, in whole seconds, rounded up.
    pub fn min_lease_ttl(&self) -> i64 {
        let election = self.heartbeat * self.election_ticks as u32;
        ((election.as_secs_f64() * 1.5).ceil() as i64).max(1)
    }

    pub fn election_timeout(&self) -> Duration {
        self.heartbeat * self.election_ticks as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["oxcd"];
        v.extend_from_slice(args);
        Flags::try_parse_from(v).expect("flags parse").into_config()
    }

    #[test]
    fn defaults_match_etcd() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("default.oxcd"));
        assert_eq!(
            c.listen_client,
            vec![ListenAddr::Tcp("127.0.0.1:2379".parse().unwrap())]
        );
        assert_eq!(
            c.initial_cluster,
            vec![("default".into(), vec!["http://localhost:2380".into()])]
        );
        assert_eq!(c.max_txn_ops, 128);
        assert_eq!(c.max_request_bytes, 1_572_864);
        assert_eq!(c.min_lease_ttl(), 2);
        assert_eq!(c.auto_compaction, AutoCompaction::Off);
        assert!(c.strict_reconfig_check);
    }

    fn from_file(yaml: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("etcd.conf.yml");
        std::fs::write(&path, yaml).expect("write config");
        Flags::from_config_file(&path)?.into_config()
    }

    #[test]
    fn config_file_keys_are_flag_names() {
        let c = from_file(
            "name: infra9\n\
             data-dir: /var/lib/x\n\
             listen-client-urls: http://127.0.0.1:12379\n\
             advertise-client-urls: http://127.0.0.1:12379\n\
             listen-peer-urls: http://127.0.0.1:12380\n\
             initial-advertise-peer-urls: http://127.0.0.1:12380\n\
             initial-cluster: infra9=http://127.0.0.1:12380\n\
             heartbeat-interval: 50\n\
             election-timeout: 500\n\
             quota-backend-bytes: 1048576\n\
             strict-reconfig-check: false\n\
             log-outputs: [stderr]\n\
             logger: zap\n\
             max-wals: 5\n\
             enable-v2: false\n\
             discovery:\n\
             proxy: 'off'\n\
             client-transport-security:\n  client-cert-auth: false\n  cert-file:\n\
             peer-transport-security:\n  auto-tls: false\n",
        )
        .unwrap();
        assert_eq!(c.name, "infra9");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/x"));
        assert_eq!(
            c.listen_client,
            vec![ListenAddr::Tcp("127.0.0.1:12379".parse().unwrap())]
        );
        assert_eq!(c.quota_backend_bytes, 1_048_576);
        assert!(!c.strict_reconfig_check);
    }

    #[test]
    fn etcd_3_6_config_files_write_durations_in_nanoseconds() {
        let c = from_file(
            "feature-gates: InitialCorruptCheck=true\n\
             watch-progress-notify-interval: 5000000000\n\
             corrupt-check-time: 120000000000\n\
             grpc-keepalive-min-time: 5000000000\n\
             warning-apply-duration: 100000000\n\
             max-learners: 2\n",
        )
        .unwrap();
        assert_eq!(c.watch_progress_interval, Duration::from_secs(5));
        assert_eq!(c.corrupt_check_interval, Some(Duration::from_secs(120)));
        assert_eq!(c.max_learners, 2);
        assert_eq!(c.warning_apply_duration, Duration::from_millis(100));
        // A knob oxcd lacks is taken at etcd's default only.
        let e = from_file("downgrade-check-time: 200000000\n").unwrap_err();
        assert!(e.to_string().contains("not supported by oxcd"), "{e}");
    }

    #[test]
    fn config_file_refuses_what_oxcd_lacks_and_bad_yaml() {
        let e = from_file("enable-v2: true\n").unwrap_err().to_string();
        assert!(
            e.contains("enable-v2") && e.contains("not supported"),
            "{e}"
        );
        let e = from_file("client-transport-security:\n  cert-file: /x.pem\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "--cert-file and --key-file must be given together");
        let e = from_file("name: [a\n").unwrap_err().to_string();
        assert!(e.starts_with("config file "), "{e}");
        let e = from_file("snapshot-count: many\n").unwrap_err().to_string();
        assert!(e.contains("snapshot-count"), "{e}");
    }

    #[test]
    fn operations_flags() {
        let c = parse(&[]).unwrap();
        assert!(c.log_json, "etcd 3.6 logs zap JSON lines by default");
        assert!(!parse(&["--log-format=console"]).unwrap().log_json);
        let e = parse(&["--logger=capnslog"]).unwrap_err().to_string();
        assert_eq!(e, "--logger=capnslog is removed in v3.5");
        assert_eq!(c.max_concurrent_streams, u32::MAX);
        assert_eq!(c.keepalive_interval, Some(Duration::from_secs(7200)));
        assert_eq!(c.keepalive_timeout, Some(Duration::from_secs(20)));
        assert_eq!(c.keepalive_min_time, Duration::from_secs(5));
        let c = parse(&[
            "--logger=zap",
            "--log-outputs=stdout",
            "--grpc-keepalive-interval=0",
            "--max-concurrent-streams=8",
        ])
        .unwrap();
        assert!(c.log_json);
        assert_eq!(c.log_output, crate::log::Output::Stdout);
        assert_eq!(c.keepalive_interval, None);
        assert_eq!(c.max_concurrent_streams, 8);
        assert!(parse(&["--enable-pprof"]).unwrap().enable_pprof);
        let e = parse(&["--logger=log4j"]).unwrap_err().to_string();
        assert!(e.contains("--logger"), "{e}");
        let e = parse(&["--grpc-keepalive-timeout=soon"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--grpc-keepalive-timeout"), "{e}");
    }

    #[test]
    fn boolean_flags_take_go_forms() {
        assert!(
            !parse(&["--strict-reconfig-check=false"])
                .unwrap()
                .strict_reconfig_check
        );
        assert!(
            parse(&["--strict-reconfig-check"])
                .unwrap()
                .strict_reconfig_check
        );
    }

    #[test]
    fn separate_http_metrics_tls_and_peer_client_pairs() {
        // --listen-client-http-urls: its own listener, told TLS or not like client URLs.
        let c = parse(&["--listen-client-http-urls", "http://127.0.0.1:2390"]).unwrap();
        assert_eq!(c.listen_client_http.len(), 1);
        assert!(c.listen_client_plain.contains(&c.listen_client_http[0]));
        // A secure metrics URL needs the client pair, in etcd's words.
        let e = parse(&["--listen-metrics-urls", "https://127.0.0.1:2391"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "client TLS key/cert (--cert-file, --key-file) must be provided for metrics secure url"
        );
        let c = parse(&["--listen-metrics-urls", "http://127.0.0.1:2391"]).unwrap();
        assert!(c.listen_metrics_tls.is_empty() && c.listen_metrics.len() == 1);
        // The dialing pair goes together.
        let e = parse(&["--peer-client-cert-file", "/x.crt"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--peer-client-key-file"), "{e}");
        let c = parse(&[
            "--peer-client-cert-file",
            "/x.crt",
            "--peer-client-key-file",
            "/x.key",
        ])
        .unwrap();
        assert_eq!(c.peer_tls.client_cert_file, Some(PathBuf::from("/x.crt")));
        // SetMemberLocalAddr: the first advertised IP that is neither loopback nor unspecified.
        let urls = "http://127.0.0.1:2380,http://10.1.2.3:2380";
        let c = parse(&["--initial-advertise-peer-urls", urls]).unwrap();
        assert_eq!(c.peer_tls.dial_from, None);
        let gate = "--feature-gates=SetMemberLocalAddr=true";
        let c = parse(&[gate, "--initial-advertise-peer-urls", urls]).unwrap();
        assert_eq!(c.peer_tls.dial_from, Some("10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = parse(&["--auto-compaction-mode", "weekly"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--auto-compaction-mode"), "{e}");
        let e = parse(&["--listen-client-urls", "https://127.0.0.1:2379"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "TLS key/cert (--cert-file, --key-file) must be provided for client url https://127.0.0.1:2379 with HTTPS scheme"
        );
        let e = parse(&["--cipher-suites", "TLS_RSA_WITH_RC4_128_SHA"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unexpected TLS cipher suite"), "{e}");
        assert!(Flags::try_parse_from(["oxcd", "--no-such-flag"]).is_err());
        assert_eq!(
            parse(&["--auto-compaction-retention", "90m"])
                .unwrap()
                .auto_compaction,
            AutoCompaction::Periodic(Duration::from_secs(5400))
        );
        assert_eq!(
            parse(&[
                "--auto-compaction-mode",
                "revision",
                "--auto-compaction-retention",
                "100"
            ])
            .unwrap()
            .auto_compaction,
            AutoCompaction::Revision(100)
        );
    }
}
