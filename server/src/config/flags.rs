//! etcd's command-line flags and their `ETCD_*` variables (`Flags`), and their validation into
//! a `Config`.

use super::*;

use crate::duration::parse_go_duration;
use crate::listener::ListenAddr;
use clap::Parser;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "oxcd",
    disable_version_flag = true,
    // Go's flag package lets a flag repeat, the last one winning; etcd's users rely on it.
    args_override_self = true,
    about = "etcd-compatible distributed key-value store"
)]
pub struct Flags {
    /// Print the version and exit.
    #[arg(long)]
    pub version: bool,
    /// Path to etcd's YAML configuration file (keys are the flag names); when given, other
    /// flags and ETCD_* variables are ignored, as in etcd.
    #[arg(long, env = "ETCD_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,
    /// Human-readable name for this member.
    #[arg(long, env = "ETCD_NAME", default_value = "default")]
    pub name: String,
    /// Path to the data directory (default: "<name>.oxcd").
    #[arg(long, env = "ETCD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Path to the dedicated WAL directory.
    #[arg(long, env = "ETCD_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// URLs to listen on for client traffic.
    #[arg(
        long,
        env = "ETCD_LISTEN_CLIENT_URLS",
        default_value = "http://127.0.0.1:2379"
    )]
    pub listen_client_urls: String,
    /// URLs to serve HTTP client traffic on (the JSON gateway, /health, /metrics) apart from
    /// gRPC; when given, --listen-client-urls serve gRPC only (etcd 3.5+).
    #[arg(long, env = "ETCD_LISTEN_CLIENT_HTTP_URLS")]
    pub listen_client_http_urls: Option<String>,
    /// Client URLs of this member advertised to the cluster.
    #[arg(
        long,
        env = "ETCD_ADVERTISE_CLIENT_URLS",
        default_value = "http://127.0.0.1:2379"
    )]
    pub advertise_client_urls: String,
    /// URLs to listen on for peer traffic.
    #[arg(
        long,
        env = "ETCD_LISTEN_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub listen_peer_urls: String,
    /// Peer URLs of this member advertised to the cluster.
    #[arg(
        long,
        env = "ETCD_INITIAL_ADVERTISE_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub initial_advertise_peer_urls: String,
    /// Initial cluster configuration for bootstrapping ("name=peerURL,...").
    #[arg(long, env = "ETCD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Initial cluster state ("new" or "existing").
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE", default_value = "new")]
    pub initial_cluster_state: String,
    /// Initial cluster token for the cluster during bootstrap.
    #[arg(
        long,
        env = "ETCD_INITIAL_CLUSTER_TOKEN",
        default_value = "etcd-cluster"
    )]
    pub initial_cluster_token: String,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,
    /// Number of committed transactions to trigger a snapshot (and release the WAL before it).
    /// etcd 3.6's default (3.4: 100,000).
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = 10_000)]
    pub snapshot_count: u64,
    /// Raise alarms when backend size exceeds the given quota (0 defaults to low space quota).
    #[arg(long, env = "ETCD_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: u64,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES", default_value_t = 1_572_864)]
    pub max_request_bytes: u64,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "ETCD_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: u64,
    /// Interpret 'auto-compaction-retention' as 'periodic' or 'revision'.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_MODE", default_value = "periodic")]
    pub auto_compaction_mode: String,
    /// Auto compaction retention (0 disables): hours or a duration for periodic, revisions for revision.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,
    /// Duration of periodic watch progress notifications (default 10m).
    #[arg(long, env = "ETCD_WATCH_PROGRESS_NOTIFY_INTERVAL")]
    pub watch_progress_notify_interval: Option<String>,
    /// Deprecated in etcd 3.6: --watch-progress-notify-interval.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL",
        hide = true
    )]
    pub experimental_watch_progress_notify_interval: Option<String>,
    /// Comma-separated feature gates, `Name=true|false` (etcd 3.6's gates; see `features`).
    #[arg(long, env = "ETCD_FEATURE_GATES", action = clap::ArgAction::Append)]
    pub feature_gates: Vec<String>,
    /// The most learners a cluster may have (etcd 3.6).
    #[arg(long, env = "ETCD_MAX_LEARNERS", default_value_t = 1)]
    pub max_learners: usize,
    /// Reject reconfiguration requests that would cause quorum loss.
    #[arg(
        long,
        env = "ETCD_STRICT_RECONFIG_CHECK",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub strict_reconfig_check: bool,
    /// Disaster recovery: restart this member as a one-member cluster keeping its data
    /// (every other member is removed); add the others back afterwards.
    #[arg(
        long,
        env = "ETCD_FORCE_NEW_CLUSTER",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub force_new_cluster: bool,
    /// Before serving clients, compare this member's HashKV with its peers' and refuse to
    /// start on a mismatch.
    /// Deprecated in etcd 3.6: --feature-gates=InitialCorruptCheck=true.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_INITIAL_CORRUPT_CHECK",
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub experimental_initial_corrupt_check: Option<bool>,
    /// Duration between the leader's checks of the members' HashKV (0s disables); a member
    /// whose hash differs gets the CORRUPT alarm.
    #[arg(long, env = "ETCD_CORRUPT_CHECK_TIME")]
    pub corrupt_check_time: Option<String>,
    /// Deprecated in etcd 3.6: --corrupt-check-time.
    #[arg(long, env = "ETCD_EXPERIMENTAL_CORRUPT_CHECK_TIME", hide = true)]
    pub experimental_corrupt_check_time: Option<String>,
    /// Log level: debug, info, warn, error, panic or fatal.
    #[arg(long, env = "ETCD_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format: json (etcd's zap lines, the default) or console (text; "text" too).
    #[arg(long, env = "ETCD_LOG_FORMAT", default_value = "json")]
    pub log_format: String,
    /// The logger: 'zap' (etcd 3.5 removed 'capnslog').
    #[arg(long, env = "ETCD_LOGGER", default_value = "zap")]
    pub logger: String,
    /// Where logs go: "default" or "stderr" (standard error), or "stdout".
    #[arg(long, env = "ETCD_LOG_OUTPUTS", default_value = "default")]
    pub log_outputs: String,
    /// Maximum concurrent streams that each client can open at a time.
    #[arg(long, env = "ETCD_MAX_CONCURRENT_STREAMS", default_value_t = u32::MAX)]
    pub max_concurrent_streams: u32,
    /// Minimum duration interval that a client should wait before pinging server.
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_MIN_TIME", default_value = "5s")]
    pub grpc_keepalive_min_time: String,
    /// Frequency duration of server-to-client ping to check if a connection is alive (0 to disable).
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_INTERVAL", default_value = "2h")]
    pub grpc_keepalive_interval: String,
    /// Additional duration of wait before closing a non-responsive connection (0 to disable).
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_TIMEOUT", default_value = "20s")]
    pub grpc_keepalive_timeout: String,
    /// Enable runtime profiling (refused: oxcd has no Go runtime to profile).
    #[arg(
        long,
        env = "ETCD_ENABLE_PPROF",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub enable_pprof: bool,

    /// Path to the client server TLS cert file.
    #[arg(long, env = "ETCD_CERT_FILE")]
    pub cert_file: Option<String>,
    /// Path to the client server TLS key file.
    #[arg(long, env = "ETCD_KEY_FILE")]
    pub key_file: Option<String>,
    /// Path to the client server TLS trusted CA cert file (client certificates must be signed by it).
    #[arg(long, env = "ETCD_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<String>,
    /// Enable client cert authentication.
    #[arg(
        long,
        env = "ETCD_CLIENT_CERT_AUTH",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub client_cert_auth: bool,
    /// Path to the client certificate revocation list file.
    #[arg(long, env = "ETCD_CLIENT_CRL_FILE")]
    pub client_crl_file: Option<String>,
    /// Client TLS using generated certificates.
    #[arg(
        long,
        env = "ETCD_AUTO_TLS",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub auto_tls: bool,
    /// Path to the peer server TLS cert file.
    #[arg(long, env = "ETCD_PEER_CERT_FILE")]
    pub peer_cert_file: Option<String>,
    /// Path to the peer server TLS key file.
    #[arg(long, env = "ETCD_PEER_KEY_FILE")]
    pub peer_key_file: Option<String>,
    /// Path to the TLS cert this member presents when it dials its peers (default: the peer
    /// server cert), for certificates made for client or server use only.
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_FILE")]
    pub peer_client_cert_file: Option<String>,
    /// Path to the key of --peer-client-cert-file.
    #[arg(long, env = "ETCD_PEER_CLIENT_KEY_FILE")]
    pub peer_client_key_file: Option<String>,
    /// Path to the peer server TLS trusted CA file.
    #[arg(long, env = "ETCD_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<String>,
    /// Enable peer client cert authentication.
    #[arg(
        long,
        env = "ETCD_PEER_CLIENT_CERT_AUTH",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub peer_client_cert_auth: bool,
    /// Path to the peer certificate revocation list file.
    #[arg(long, env = "ETCD_PEER_CRL_FILE")]
    pub peer_crl_file: Option<String>,
    /// Peer TLS using self-generated certificates.
    #[arg(
        long,
        env = "ETCD_PEER_AUTO_TLS",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub peer_auto_tls: bool,
    /// Allowed CN for inter peer authentication.
    #[arg(long, env = "ETCD_PEER_CERT_ALLOWED_CN")]
    pub peer_cert_allowed_cn: Option<String>,
    /// Allowed TLS hostname for inter peer authentication.
    #[arg(long, env = "ETCD_PEER_CERT_ALLOWED_HOSTNAME")]
    pub peer_cert_allowed_hostname: Option<String>,
    /// Comma-separated list of supported TLS cipher suites between client/server and peers (empty: the defaults).
    #[arg(long, env = "ETCD_CIPHER_SUITES")]
    pub cipher_suites: Option<String>,
    /// Minimum TLS version for client and peer connections (TLS1.2 or TLS1.3; TLS1.0 and
    /// TLS1.1 mean TLS1.2 here).
    #[arg(long, env = "ETCD_TLS_MIN_VERSION", default_value = "")]
    pub tls_min_version: String,
    /// Maximum TLS version for client and peer connections (empty: the newest).
    #[arg(long, env = "ETCD_TLS_MAX_VERSION", default_value = "")]
    pub tls_max_version: String,
    /// A unary request taking longer is logged ("request stats"; default 300ms).
    #[arg(long, env = "ETCD_WARNING_UNARY_REQUEST_DURATION")]
    pub warning_unary_request_duration: Option<String>,
    /// Deprecated in etcd 3.6: --warning-unary-request-duration.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_WARNING_UNARY_REQUEST_DURATION",
        hide = true
    )]
    pub experimental_warning_unary_request_duration: Option<String>,
    /// Applying an entry taking longer is logged ("apply request took too long"; 100ms).
    #[arg(long, env = "ETCD_WARNING_APPLY_DURATION")]
    pub warning_apply_duration: Option<String>,
    /// Deprecated in etcd 3.6: --warning-apply-duration.
    #[arg(long, env = "ETCD_EXPERIMENTAL_WARNING_APPLY_DURATION", hide = true)]
    pub experimental_warning_apply_duration: Option<String>,
    /// Sets the maximum revisions deleted in each compaction batch.
    #[arg(long, env = "ETCD_COMPACTION_BATCH_LIMIT")]
    pub compaction_batch_limit: Option<i64>,
    /// Deprecated in etcd 3.6: --compaction-batch-limit.
    #[arg(long, env = "ETCD_EXPERIMENTAL_COMPACTION_BATCH_LIMIT", hide = true)]
    pub experimental_compaction_batch_limit: Option<i64>,
    /// Sets the sleep interval between each compaction batch.
    #[arg(long, env = "ETCD_COMPACTION_SLEEP_INTERVAL")]
    pub compaction_sleep_interval: Option<String>,
    /// Deprecated in etcd 3.6: --compaction-sleep-interval.
    #[arg(long, env = "ETCD_EXPERIMENTAL_COMPACTION_SLEEP_INTERVAL", hide = true)]
    pub experimental_compaction_sleep_interval: Option<String>,
    /// Entries a slow follower can catch up from after a snapshot, before it is sent one.
    #[arg(long, env = "ETCD_SNAPSHOT_CATCHUP_ENTRIES")]
    pub snapshot_catchup_entries: Option<u64>,
    /// Deprecated in etcd 3.6: --snapshot-catchup-entries.
    #[arg(long, env = "ETCD_EXPERIMENTAL_SNAPSHOT_CATCHUP_ENTRIES", hide = true)]
    pub experimental_snapshot_catchup_entries: Option<u64>,
    /// Deprecated in etcd 3.6, and without effect here: oxcd keeps the snapshot files it
    /// needs (the newest) and removes the rest itself.
    #[arg(long, env = "ETCD_MAX_SNAPSHOTS", hide = true)]
    pub max_snapshots: Option<u64>,
    /// Maximum number of wal files to retain (0 is unlimited).
    #[arg(long, env = "ETCD_MAX_WALS", default_value_t = 5)]
    pub max_wals: u64,
    /// Deprecated in etcd 3.6, which enforces its default and ignores the value; oxcd has no
    /// v2 store at all.
    #[arg(long, env = "ETCD_V2_DEPRECATION", hide = true)]
    pub v2_deprecation: Option<String>,
    /// Specify auth token specific options: simple, or jwt,pub-key=F,priv-key=F,sign-method=M[,ttl=D].
    #[arg(long, env = "ETCD_AUTH_TOKEN", default_value = "simple")]
    pub auth_token: String,
    /// Specify bcrypt algorithm cost factor for auth password hashing.
    #[arg(long, env = "ETCD_BCRYPT_COST", default_value_t = 10)]
    pub bcrypt_cost: u32,
    /// The lifetime in seconds of the auth token.
    #[arg(long, env = "ETCD_AUTH_TOKEN_TTL", default_value_t = 300)]
    pub auth_token_ttl: u64,
    /// Extra URLs serving /metrics and /health (http:// only).
    #[arg(long, env = "ETCD_LISTEN_METRICS_URLS")]
    pub listen_metrics_urls: Option<String>,
}

/// A flag etcd 3.6 promoted from `--experimental-<name>`: the new spelling, or the old one with
/// etcd's deprecation warning; both at once is etcd's error.
fn promoted(
    name: &str,
    new: Option<String>,
    old: Option<String>,
    deprecations: &mut Vec<String>,
) -> Result<Option<String>, ConfigError> {
    match (new, old) {
        (Some(_), Some(_)) => Err(ConfigError::Conflict(format!(
            "cannot set --experimental-{name} and --{name} at the same time, please use --{name} only"
        ))),
        (None, Some(v)) => {
            deprecations.push(format!(
                "--experimental-{name} is deprecated in v3.6 and will be decommissioned in v3.7. Use '--{name}' instead."
            ));
            Ok(Some(v))
        }
        (new, None) => Ok(new),
    }
}

fn invalid(flag: &'static str, value: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        value: value.to_string(),
        why: why.into(),
    }
}

fn split_urls(flag: &'static str, s: &str) -> Result<Vec<String>, ConfigError> {
    let urls: Vec<String> = s
        .split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(invalid(flag, s, "no URL given"));
    }
    for u in &urls {
        let parsed = url::Url::parse(u).map_err(|e| invalid(flag, u, e.to_string()))?;
        match parsed.scheme() {
            "http" | "https" => {}
            // etcd takes host:port for a unix socket too (the file is named by both).
            "unix" | "unixs" if !parsed.path().is_empty() => {
                return Err(invalid(flag, u, "URL must not contain a path"))
            }
            "unix" | "unixs" => {}
            other => {
                return Err(invalid(
                    flag,
                    u,
                    format!("URL scheme must be http, https, unix, or unixs: {other}"),
                ))
            }
        }
        if parsed.port().is_none() {
            return Err(invalid(flag, u, "missing port in address"));
        }
    }
    Ok(urls)
}

/// The distinct addresses of `urls`, and which of them http:// and https:// URLs name.
#[allow(clippy::type_complexity)]
fn listeners(
    flag: &'static str,
    urls: &[String],
) -> Result<(Vec<ListenAddr>, Vec<ListenAddr>, Vec<ListenAddr>), ConfigError> {
    let (mut all, mut plain, mut tls) = (Vec::new(), Vec::new(), Vec::new());
    for u in urls {
        let https = u.starts_with("https://") || u.starts_with("unixs://");
        for a in resolve(flag, u)? {
            if !all.contains(&a) {
                all.push(a.clone());
            }
            let list = if https { &mut tls } else { &mut plain };
            if !list.contains(&a) {
                list.push(a);
            }
        }
    }
    Ok((all, plain, tls))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Peer,
}

struct TlsFlags<'a> {
    cert: &'a Option<String>,
    key: &'a Option<String>,
    ca: &'a Option<String>,
    cert_auth: bool,
    crl: &'a Option<String>,
    auto: bool,
}

/// One side's TLS settings from its flags; `--auto-tls` generates the pair when no
/// certificate is given (etcd ignores it when one is).
fn tls_info(
    side: Side,
    f: TlsFlags,
    data_dir: &std::path::Path,
    urls: &[String],
    serves_tls: bool,
    cipher_suites: &[String],
) -> Result<crate::tls::TlsInfo, ConfigError> {
    let (prefix, what) = match side {
        Side::Client => ("", "client"),
        Side::Peer => ("peer-", "peer"),
    };
    let path = |v: &Option<String>| v.as_deref().filter(|s| !s.is_empty()).map(PathBuf::from);
    let mut info = crate::tls::TlsInfo {
        cert_file: path(f.cert),
        key_file: path(f.key),
        trusted_ca_file: path(f.ca),
        client_cert_auth: f.cert_auth,
        crl_file: path(f.crl),
        cipher_suites: cipher_suites.to_vec(),
        ..Default::default()
    };
    if info.cert_file.is_some() != info.key_file.is_some() {
        return Err(ConfigError::Tls(format!(
            "--{prefix}cert-file and --{prefix}key-file must be given together"
        )));
    }
    if f.auto && info.is_empty() {
        let dir = data_dir.join("fixtures").join(what);
        let (cert, key) = crate::tls::self_signed(&dir, urls)
            .map_err(|e| ConfigError::Tls(format!("--{prefix}auto-tls: {e}")))?;
        info.cert_file = Some(cert);
        info.key_file = Some(key);
        info.self_signed = true;
    }
    if serves_tls && info.is_empty() {
        let url = urls
            .iter()
            .find(|u| u.starts_with("https://"))
            .cloned()
            .unwrap_or_default();
        return Err(ConfigError::Tls(format!(
            "TLS key/cert (--{prefix}cert-file, --{prefix}key-file) must be provided for {what} url {url} with HTTPS scheme"
        )));
    }
    if info.client_cert_auth && info.trusted_ca_file.is_none() && !info.self_signed {
        return Err(ConfigError::Tls(format!(
            "--{prefix}client-cert-auth needs --{prefix}trusted-ca-file"
        )));
    }
    Ok(info)
}

fn resolve(flag: &'static str, u: &str) -> Result<Vec<ListenAddr>, ConfigError> {
    let parsed = url::Url::parse(u).map_err(|e| invalid(flag, u, e.to_string()))?;
    if matches!(parsed.scheme(), "unix" | "unixs") {
        return Ok(vec![ListenAddr::Unix(crate::listener::unix_socket_path(
            &parsed,
        ))]);
    }
    let host = parsed.host_str().unwrap_or("");
    let port = parsed.port().unwrap_or(0);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| invalid(flag, u, e.to_string()))?
        .collect();
    // "localhost" resolves to both families; etcd listens on the first, so do we.
    Ok(addrs.into_iter().take(1).map(ListenAddr::Tcp).collect())
}

/// Parses `--initial-cluster` (`name=url,name=url`) and checks that `name` is in it with
/// exactly its advertised peer URLs, as etcd does.
pub fn parse_initial_cluster(
    name: &str,
    ic: &str,
    advertise: &[String],
) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
    let mut initial_cluster: Vec<(String, Vec<String>)> = Vec::new();
    for part in ic.split(',').filter(|p| !p.trim().is_empty()) {
        let (n, u) = part
            .split_once('=')
            .ok_or_else(|| invalid("initial-cluster", ic, format!("{part:?} is not name=URL")))?;
        let u = split_urls("initial-cluster", u)?;
        match initial_cluster.iter_mut().find(|(name, _)| name == n) {
            Some((_, urls)) => urls.extend(u),
            None => initial_cluster.push((n.to_string(), u)),
        }
    }
    let Some((_, my_urls)) = initial_cluster.iter().find(|(n, _)| *n == name) else {
        return Err(invalid(
            "initial-cluster",
            ic,
            format!(
                "couldn't find local name {:?} in the initial cluster configuration",
                name
            ),
        ));
    };
    let mut a = my_urls.clone();
    let mut b = advertise.to_vec();
    a.sort();
    b.sort();
    if a != b {
        return Err(invalid(
            "initial-cluster",
            ic,
            format!(
                "--initial-cluster has {} but missing from --initial-advertise-peer-urls={}",
                a.join(","),
                b.join(",")
            ),
        ));
    }
    Ok(initial_cluster)
}

impl Flags {
    /// Parses the command line and `ETCD_*` variables; with `--config-file`, the file's keys
    /// replace them all, as in etcd.
    pub fn load() -> Result<Flags, LoadError> {
        let flags = Flags::try_parse().map_err(LoadError::Usage)?;
        match &flags.config_file {
            Some(path) => Flags::from_config_file(path).map_err(LoadError::Config),
            None => Ok(flags),
        }
    }

    pub fn into_config(self) -> Result<Config, ConfigError> {
        // Key files are read and checked here, so a bad option fails at startup as in etcd.
        crate::auth::Tokens::from_flag(&self.auth_token, Duration::ZERO)
            .map_err(|e| invalid("auth-token", &self.auth_token, e.to_string()))?;
        let log_output = match self.log_outputs.as_str() {
            "default" | "stderr" => crate::log::Output::Stderr,
            "stdout" => crate::log::Output::Stdout,
            other => {
                return Err(invalid(
                    "log-outputs",
                    other,
                    "oxcd logs to one stream: default, stderr or stdout",
                ))
            }
        };
        let duration = |flag: &'static str, v: &str| {
            parse_go_duration(v).ok_or_else(|| invalid(flag, v, "not a duration"))
        };
        let keepalive_min_time =
            duration("grpc-keepalive-min-time", &self.grpc_keepalive_min_time)?;
        let keepalive_interval =
            duration("grpc-keepalive-interval", &self.grpc_keepalive_interval)?;
        let keepalive_timeout = duration("grpc-keepalive-timeout", &self.grpc_keepalive_timeout)?;
        if self.max_concurrent_streams == 0 {
            return Err(invalid("max-concurrent-streams", "0", "must be positive"));
        }
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.oxcd", self.name)));
        let wal_dir = self
            .wal_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("member").join("wal"));
        let client_urls = split_urls("listen-client-urls", &self.listen_client_urls)?;
        let (listen_client, mut listen_client_plain, mut listen_client_tls) =
            listeners("listen-client-urls", &client_urls)?;
        let client_http_urls = match &self.listen_client_http_urls {
            Some(urls) if !urls.is_empty() => split_urls("listen-client-http-urls", urls)?,
            _ => Vec::new(),
        };
        let (listen_client_http, http_plain, http_tls) =
            listeners("listen-client-http-urls", &client_http_urls)?;
        // Whether a client listener speaks TLS is told by the same lists for both flags.
        listen_client_plain.extend(http_plain);
        listen_client_tls.extend(http_tls);
        let metrics_urls = match &self.listen_metrics_urls {
            Some(urls) if !urls.is_empty() => split_urls("listen-metrics-urls", urls)?,
            _ => Vec::new(),
        };
        let (listen_metrics, _, listen_metrics_tls) =
            listeners("listen-metrics-urls", &metrics_urls)?;
        let advertise_client_urls =
            split_urls("advertise-client-urls", &self.advertise_client_urls)?;
        let peer_urls = split_urls("listen-peer-urls", &self.listen_peer_urls)?;
        let (listen_peer, listen_peer_plain, listen_peer_tls) =
            listeners("listen-peer-urls", &peer_urls)?;
        let cipher_suites: Vec<String> = self
            .cipher_suites
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect();
        crate::tls::check_cipher_suites(&cipher_suites)
            .map_err(|why| invalid("cipher-suites", &cipher_suites.join(","), why))?;
        let only_tls_version = crate::tls::versions_from_flags(
            &self.tls_min_version,
            &self.tls_max_version,
            &cipher_suites,
        )
        .map_err(ConfigError::Tls)?;
        let mut client_tls = tls_info(
            Side::Client,
            TlsFlags {
                cert: &self.cert_file,
                key: &self.key_file,
                ca: &self.trusted_ca_file,
                cert_auth: self.client_cert_auth,
                crl: &self.client_crl_file,
                auto: self.auto_tls,
            },
            &data_dir,
            &[client_urls.as_slice(), client_http_urls.as_slice()].concat(),
            !listen_client_tls.is_empty(),
            &cipher_suites,
        )?;
        // Secure metrics URLs serve with the client certificate, as etcd does.
        if !listen_metrics_tls.is_empty() && client_tls.is_empty() {
            return Err(ConfigError::Tls(
                "client TLS key/cert (--cert-file, --key-file) must be provided for metrics secure url"
                    .into(),
            ));
        }
        let mut peer_tls = tls_info(
            Side::Peer,
            TlsFlags {
                cert: &self.peer_cert_file,
                key: &self.peer_key_file,
                ca: &self.peer_trusted_ca_file,
                cert_auth: self.peer_client_cert_auth,
                crl: &self.peer_crl_file,
                auto: self.peer_auto_tls,
            },
            &data_dir,
            &peer_urls,
            !listen_peer_tls.is_empty(),
            &cipher_suites,
        )?;
        let path = |v: &Option<String>| v.as_deref().filter(|s| !s.is_empty()).map(PathBuf::from);
        client_tls.only_version = only_tls_version;
        peer_tls.only_version = only_tls_version;
        peer_tls.client_cert_file = path(&self.peer_client_cert_file);
        peer_tls.client_key_file = path(&self.peer_client_key_file);
        if peer_tls.client_cert_file.is_some() != peer_tls.client_key_file.is_some() {
            return Err(ConfigError::Tls(
                "--peer-client-cert-file and --peer-client-key-file must be given together".into(),
            ));
        }
        peer_tls.allowed_cn = self.peer_cert_allowed_cn.clone().filter(|s| !s.is_empty());
        // SetMemberLocalAddr: dial peers from the first advertised peer URL whose host is an
        // IP neither loopback nor unspecified (etcd's InferLocalAddr).
        if gates_named(&self.feature_gates, "SetMemberLocalAddr") {
            peer_tls.dial_from = split_urls(
                "initial-advertise-peer-urls",
                &self.initial_advertise_peer_urls,
            )?
            .iter()
            .filter_map(|u| url::Url::parse(u).ok())
            .filter_map(|u| match u.host() {
                Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
                Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
                _ => None,
            })
            .find(|ip| !ip.is_unspecified() && !ip.is_loopback());
        }
        peer_tls.allowed_hostname = self
            .peer_cert_allowed_hostname
            .clone()
            .filter(|s| !s.is_empty());
        if peer_tls.allowed_cn.is_some() && peer_tls.allowed_hostname.is_some() {
            return Err(invalid(
                "peer-cert-allowed-cn",
                peer_tls.allowed_cn.as_deref().unwrap_or_default(),
                "cannot be given together with --peer-cert-allowed-hostname",
            ));
        }
        let initial_advertise_peer_urls = split_urls(
            "initial-advertise-peer-urls",
            &self.initial_advertise_peer_urls,
        )?;
        let ic = self.initial_cluster.clone().unwrap_or_else(|| {
            format!(
                "{}={}",
                self.name,
                initial_advertise_peer_urls.join(&format!(",{}=", self.name))
            )
        });
        let initial_cluster = parse_initial_cluster(&self.name, &ic, &initial_advertise_peer_urls)?;
        let new_cluster = match self.initial_cluster_state.as_str() {
            "new" => true,
            "existing" => false,
            other => {
                return Err(invalid(
                    "initial-cluster-state",
                    other,
                    "must be \"new\" or \"existing\"",
                ))
            }
        };
        if self.heartbeat_interval == 0 {
            return Err(invalid("heartbeat-interval", "0", "must be positive"));
        }
        if self.election_timeout < 5 * self.heartbeat_interval {
            return Err(invalid(
                "election-timeout",
                &self.election_timeout.to_string(),
                format!(
                    "should be at least as 5 times as --heartbeat-interval ({})",
                    self.heartbeat_interval
                ),
            ));
        }
        if self.election_timeout > 50_000 {
            return Err(invalid(
                "election-timeout",
                &self.election_timeout.to_string(),
                "is too long, and should be set less than 50 seconds",
            ));
        }
        if self.max_txn_ops == 0 {
            return Err(invalid("max-txn-ops", "0", "must be positive"));
        }
        if self.snapshot_count == 0 {
            return Err(invalid("snapshot-count", "0", "must be positive"));
        }
        let r = self.auto_compaction_retention.trim();
        let auto_compaction = match self.auto_compaction_mode.as_str() {
            "periodic" => {
                let d = match r.parse::<u64>() {
                    Ok(h) => Duration::from_secs(h * 3600),
                    Err(_) => parse_go_duration(r).ok_or_else(|| {
                        invalid(
                            "auto-compaction-retention",
                            r,
                            "not an integer or a duration",
                        )
                    })?,
                };
                if d.is_zero() {
                    AutoCompaction::Off
                } else {
                    AutoCompaction::Periodic(d)
                }
            }
            "revision" => {
                let n: i64 = r.parse().map_err(|_| {
                    invalid(
                        "auto-compaction-retention",
                        r,
                        "revision mode needs an integer",
                    )
                })?;
                if n < 0 {
                    return Err(invalid(
                        "auto-compaction-retention",
                        r,
                        "must not be negative",
                    ));
                }
                if n == 0 {
                    AutoCompaction::Off
                } else {
                    AutoCompaction::Revision(n)
                }
            }
            other => {
                return Err(invalid(
                    "auto-compaction-mode",
                    other,
                    "must be \"periodic\" or \"revision\"",
                ))
            }
        };
        let mut deprecations = Vec::new();
        let watch_progress = promoted(
            "watch-progress-notify-interval",
            self.watch_progress_notify_interval.clone(),
            self.experimental_watch_progress_notify_interval.clone(),
            &mut deprecations,
        )?
        .unwrap_or_else(|| "10m".to_string());
        let watch_progress_interval = parse_go_duration(&watch_progress)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                invalid(
                    "watch-progress-notify-interval",
                    &watch_progress,
                    "not a positive duration",
                )
            })?;
        let corrupt_check = promoted(
            "corrupt-check-time",
            self.corrupt_check_time.clone(),
            self.experimental_corrupt_check_time.clone(),
            &mut deprecations,
        )?
        .unwrap_or_else(|| "0s".to_string());
        let corrupt_check_interval = parse_go_duration(&corrupt_check)
            .ok_or_else(|| invalid("corrupt-check-time", &corrupt_check, "not a duration"))?;
        let mut warning = |name: &'static str,
                           new: &Option<String>,
                           old: &Option<String>,
                           default: &str|
         -> Result<Duration, ConfigError> {
            let v = promoted(name, new.clone(), old.clone(), &mut deprecations)?
                .unwrap_or_else(|| default.to_string());
            parse_go_duration(&v)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| invalid(name, &v, "not a positive duration"))
        };
        let warning_unary_request_duration = warning(
            "warning-unary-request-duration",
            &self.warning_unary_request_duration,
            &self.experimental_warning_unary_request_duration,
            "300ms",
        )?;
        let warning_apply_duration = warning(
            "warning-apply-duration",
            &self.warning_apply_duration,
            &self.experimental_warning_apply_duration,
            "100ms",
        )?;
        let batch_limit = promoted(
            "compaction-batch-limit",
            self.compaction_batch_limit.map(|n| n.to_string()),
            self.experimental_compaction_batch_limit
                .map(|n| n.to_string()),
            &mut deprecations,
        )?;
        // etcd takes any value; one below 1 deletes a revision per batch.
        let compaction_batch_limit = batch_limit
            .map_or(Ok(1000), |v| v.parse::<i64>())
            .map_err(|_| invalid("compaction-batch-limit", "", "not an integer"))?
            .max(1) as usize;
        let sleep = promoted(
            "compaction-sleep-interval",
            self.compaction_sleep_interval.clone(),
            self.experimental_compaction_sleep_interval.clone(),
            &mut deprecations,
        )?
        .unwrap_or_else(|| "10ms".to_string());
        let compaction_sleep_interval = parse_go_duration(&sleep)
            .ok_or_else(|| invalid("compaction-sleep-interval", &sleep, "not a duration"))?;
        let catchup = promoted(
            "snapshot-catchup-entries",
            self.snapshot_catchup_entries.map(|n| n.to_string()),
            self.experimental_snapshot_catchup_entries
                .map(|n| n.to_string()),
            &mut deprecations,
        )?;
        let snapshot_catchup_entries = catchup
            .map_or(Ok(5000), |v| v.parse::<u64>())
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| invalid("snapshot-catchup-entries", "0", "must be positive"))?;
        // etcd 3.6's words for the flags it deprecates and no longer honours.
        if self.max_snapshots.is_some() {
            deprecations.push(
                "--max-snapshots is deprecated in 3.6 and will be decommissioned in 3.8.".into(),
            );
        }
        if let Some(v) = &self.v2_deprecation {
            // etcd 3.6 has no v2 store left to keep: "not-yet" is no longer a value.
            if !matches!(v.as_str(), "write-only" | "write-only-drop-data" | "gone") {
                return Err(ConfigError::FlagValue {
                    flag: "v2-deprecation",
                    value: v.clone(),
                });
            }
            deprecations.push("--v2-deprecation is deprecated and scheduled for removal in v3.8. The default value is enforced, ignoring user input.".into());
        }
        let gates = crate::features::FeatureGates::parse(&self.feature_gates).map_err(|e| {
            ConfigError::Invalid {
                flag: "feature-gates",
                value: self.feature_gates.join(","),
                why: e.to_string(),
            }
        })?;
        // etcd 3.6 maps the old boolean flag to its gate and refuses both at once.
        let initial_corrupt_check = match self.experimental_initial_corrupt_check {
            Some(v)
                if crate::features::FeatureGates::named_in(
                    &self.feature_gates,
                    "InitialCorruptCheck",
                ) =>
            {
                let gate = gates.enabled("InitialCorruptCheck");
                return Err(ConfigError::Conflict(format!(
                    "cannot specify both flags: --experimental-initial-corrupt-check={v} and \
                     --feature-gates=InitialCorruptCheck={gate} at the same time, please just \
                     use --feature-gates=InitialCorruptCheck={gate}"
                )));
            }
            Some(v) => v,
            None => gates.enabled("InitialCorruptCheck"),
        };
        let log_level = match self.log_level.as_str() {
            "debug" | "info" | "warn" | "error" => self.log_level.clone(),
            "panic" | "fatal" | "dpanic" => "error".to_string(),
            other => {
                return Err(invalid(
                    "log-level",
                    other,
                    "must be debug, info, warn, error, panic or fatal",
                ))
            }
        };
        // etcd 3.6's rules and words.
        match self.logger.as_str() {
            "zap" => {}
            "capnslog" => {
                return Err(ConfigError::Conflict(
                    "--logger=capnslog is removed in v3.5".into(),
                ))
            }
            other => return Err(invalid("logger", other, "must be \"zap\"")),
        }
        let log_json = match self.log_format.as_str() {
            "json" => true,
            "console" | "text" => false,
            other => {
                return Err(ConfigError::Conflict(format!(
                    "unknown log format: {other}, supported values json, console"
                )))
            }
        };
        Ok(Config {
            name: self.name,
            data_dir,
            wal_dir,
            listen_client,
            listen_client_http,
            listen_client_plain,
            listen_client_tls,
            client_tls,
            listen_metrics,
            listen_metrics_tls,
            listen_peer,
            listen_peer_plain,
            listen_peer_tls,
            peer_tls,
            advertise_client_urls,
            initial_advertise_peer_urls,
            initial_cluster,
            initial_cluster_token: self.initial_cluster_token,
            new_cluster,
            heartbeat: Duration::from_millis(self.heartbeat_interval),
            election_ticks: (self.election_timeout / self.heartbeat_interval) as usize,
            snapshot_count: self.snapshot_count,
            max_wals: self.max_wals,
            compaction_batch_limit,
            compaction_sleep_interval,
            snapshot_catchup_entries,
            warning_unary_request_duration,
            warning_apply_duration,
            quota_backend_bytes: if self.quota_backend_bytes == 0 {
                DEFAULT_QUOTA_BYTES
            } else {
                self.quota_backend_bytes
            },
            max_request_bytes: self.max_request_bytes as usize,
            max_txn_ops: self.max_txn_ops as usize,
            auto_compaction,
            watch_progress_interval,
            strict_reconfig_check: self.strict_reconfig_check,
            force_new_cluster: self.force_new_cluster,
            initial_corrupt_check,
            feature_gates: gates,
            max_learners: self.max_learners,
            deprecations,
            corrupt_check_interval: Some(corrupt_check_interval).filter(|d| !d.is_zero()),
            log_level,
            log_json,
            log_output,
            max_concurrent_streams: self.max_concurrent_streams,
            keepalive_min_time,
            keepalive_interval: Some(keepalive_interval).filter(|d| !d.is_zero()),
            keepalive_timeout: Some(keepalive_timeout).filter(|d| !d.is_zero()),
            enable_pprof: self.enable_pprof,
            auth_token: self.auth_token,
            bcrypt_cost: self.bcrypt_cost,
            auth_token_ttl: Duration::from_secs(self.auth_token_ttl),
        })
    }
}

/// Whether the --feature-gates values turn `gate` on (the full check is in `features`).
fn gates_named(values: &[String], gate: &str) -> bool {
    crate::features::FeatureGates::parse(values).is_ok_and(|g| g.enabled(gate))
}
