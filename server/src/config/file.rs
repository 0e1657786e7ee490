//! `--config-file`: etcd's YAML configuration file, read into the same `Flags` as the command
//! line (keys are flag names; the TLS flags under `client-transport-security` and
//! `peer-transport-security`).

use super::*;

/// etcd's configuration-file keys that oxcd accepts with any value and does not use: snapshot
/// file retention (oxcd manages its own files), CORS, and the v2 proxy's timings.
const IGNORED_FILE_KEYS: &[&str] = &[
    "max-snapshots",
    "cors",
    "proxy-failure-wait",
    "proxy-refresh-interval",
    "proxy-dial-timeout",
    "proxy-write-timeout",
    "proxy-read-timeout",
];

/// Keys oxcd lacks, at the value etcd gives them by default (etcd's sample file sets them;
/// etcd 3.6 writes durations as nanoseconds).
const ETCD_FILE_DEFAULTS: &[(&str, &str)] = &[
    ("discovery-fallback", "proxy"),
    ("compact-hash-check-time", "60000000000ns"),
    ("experimental-compact-hash-check-time", "60000000000ns"),
    ("compaction-sleep-interval", "10000000ns"),
    ("experimental-compaction-sleep-interval", "10000000ns"),
    ("downgrade-check-time", "5000000000ns"),
    ("experimental-downgrade-check-time", "5000000000ns"),
];

/// Configuration-file keys that are Go `time.Duration`s in etcd's `embed.Config`: in a file
/// etcd reads them as JSON numbers, in nanoseconds.
const DURATION_FILE_KEYS: &[&str] = &[
    "backend-batch-interval",
    "grpc-keepalive-min-time",
    "grpc-keepalive-interval",
    "grpc-keepalive-timeout",
    "corrupt-check-time",
    "experimental-corrupt-check-time",
    "compact-hash-check-time",
    "experimental-compact-hash-check-time",
    "compaction-sleep-interval",
    "experimental-compaction-sleep-interval",
    "watch-progress-notify-interval",
    "experimental-watch-progress-notify-interval",
    "warning-apply-duration",
    "experimental-warning-apply-duration",
    "warning-unary-request-duration",
    "experimental-warning-unary-request-duration",
    "downgrade-check-time",
    "experimental-downgrade-check-time",
];

/// A value that means "not set" for a flag oxcd lacks (etcd's sample file lists every key).
fn is_unset(v: &str) -> bool {
    matches!(v, "" | "false" | "off" | "0")
}

/// The flag a configuration-file key stands for: the key itself, and inside
/// `peer-transport-security` the `peer-` flag (`allowed-cn` is `peer-cert-allowed-cn`).
fn file_key_flag(section: Option<&str>, key: &str) -> String {
    match (section, key) {
        (Some("peer-transport-security"), "allowed-cn") => "peer-cert-allowed-cn".to_string(),
        (Some("peer-transport-security"), "allowed-hostname") => {
            "peer-cert-allowed-hostname".to_string()
        }
        (Some("peer-transport-security"), k) => format!("peer-{k}"),
        (Some("client-transport-security"), "crl-file") => "client-crl-file".to_string(),
        (_, k) => k.to_string(),
    }
}

fn yaml_scalar(v: &serde_yaml::Value) -> Option<Result<String, String>> {
    use serde_yaml::Value;
    match v {
        Value::Null => None,
        Value::Bool(b) => Some(Ok(b.to_string())),
        Value::Number(n) => Some(Ok(n.to_string())),
        Value::String(s) => Some(Ok(s.clone())),
        Value::Sequence(items) => Some(
            items
                .iter()
                .filter_map(yaml_scalar)
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.join(",")),
        ),
        _ => Some(Err(
            "a nested value where a flag's value belongs".to_string()
        )),
    }
}

impl Flags {
    /// etcd's YAML configuration file: each key is a flag name; `client-transport-security`
    /// and `peer-transport-security` hold the TLS flags.
    pub fn from_config_file(path: &std::path::Path) -> Result<Flags, ConfigError> {
        let file_err = |why: String| ConfigError::File {
            path: path.display().to_string(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let doc: serde_yaml::Value =
            serde_yaml::from_str(&text).map_err(|e| file_err(e.to_string()))?;
        let mut entries: Vec<(String, serde_yaml::Value)> = Vec::new();
        match doc {
            serde_yaml::Value::Null => {}
            serde_yaml::Value::Mapping(map) => {
                for (k, v) in map {
                    let key = k
                        .as_str()
                        .ok_or_else(|| file_err(format!("key {k:?} is not a string")))?;
                    match (key, v) {
                        (
                            section @ ("client-transport-security" | "peer-transport-security"),
                            serde_yaml::Value::Mapping(inner),
                        ) => {
                            for (ik, iv) in inner {
                                let ik = ik.as_str().unwrap_or_default();
                                entries.push((file_key_flag(Some(section), ik), iv));
                            }
                        }
                        (_, v) => entries.push((file_key_flag(None, key), v)),
                    }
                }
            }
            _ => {
                return Err(file_err(
                    "not a YAML mapping of flag names to values".to_string(),
                ))
            }
        }
        // Only the file counts: ETCD_* variables are not read.
        let cmd = <Flags as clap::CommandFactory>::command().mut_args(|a| a.env(None));
        let known: std::collections::HashSet<String> = cmd
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_string))
            .collect();
        let mut args = vec!["oxcd".to_string()];
        for (flag, value) in entries {
            let nanos = match &value {
                serde_yaml::Value::Number(n) if DURATION_FILE_KEYS.contains(&flag.as_str()) => {
                    n.as_u64()
                }
                _ => None,
            };
            let Some(value) = yaml_scalar(&value) else {
                continue;
            };
            let value = value.map_err(|why| file_err(format!("{flag}: {why}")))?;
            let value = match nanos {
                Some(ns) => format!("{ns}ns"),
                None => value,
            };
            if flag == "config-file" || flag == "version" {
                continue;
            }
            if known.contains(&flag) {
                if !value.is_empty() {
                    args.push(format!("--{flag}={value}"));
                }
            } else if IGNORED_FILE_KEYS.contains(&flag.as_str())
                || is_unset(&value)
                || ETCD_FILE_DEFAULTS.contains(&(flag.as_str(), value.as_str()))
            {
                tracing::debug!(key = %flag, "configuration key not used by oxcd");
            } else {
                return Err(file_err(format!(
                    "{flag}: {value:?} is not supported by oxcd"
                )));
            }
        }
        let matches = cmd
            .try_get_matches_from(&args)
            .map_err(|e| file_err(e.to_string().trim().to_string()))?;
        let mut flags = <Flags as clap::FromArgMatches>::from_arg_matches(&matches)
            .map_err(|e| file_err(e.to_string().trim().to_string()))?;
        flags.config_file = Some(path.to_path_buf());
        Ok(flags)
    }
}
