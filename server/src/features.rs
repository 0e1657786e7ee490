//! etcd 3.6's `--feature-gates` (etcd's `server/features` and `pkg/featuregate`): every gate
//! etcd 3.6 and 3.7 know, parsed and checked as etcd does. A gate oxcd cannot honour is
//! refused when set away from what oxcd does, never accepted silently.

use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Alpha,
    Beta,
}

/// What oxcd does about a gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Support {
    /// Acts as in etcd.
    Honoured,
    /// Only changes how etcd buffers or schedules work; either value behaves the same here.
    NoEffect,
    /// oxcd does what the gate's default says and cannot do the other.
    DefaultOnly,
}

struct Gate {
    name: &'static str,
    default: bool,
    stage: Stage,
    support: Support,
    /// Why `DefaultOnly`, for the refusal.
    why: &'static str,
}

const GATES: &[Gate] = &[
    Gate {
        name: "StopGRPCServiceOnDefrag",
        default: false,
        stage: Stage::Alpha,
        support: Support::DefaultOnly,
        why: "oxcd keeps serving while it defragments",
    },
    Gate {
        name: "InitialCorruptCheck",
        default: false,
        stage: Stage::Alpha,
        support: Support::Honoured,
        why: "",
    },
    Gate {
        name: "CompactHashCheck",
        default: false,
        stage: Stage::Alpha,
        support: Support::DefaultOnly,
        why: "oxcd checks hashes with --corrupt-check-time instead",
    },
    Gate {
        name: "TxnModeWriteWithSharedBuffer",
        default: true,
        stage: Stage::Beta,
        support: Support::NoEffect,
        why: "",
    },
    Gate {
        name: "LeaseCheckpoint",
        default: false,
        stage: Stage::Alpha,
        support: Support::DefaultOnly,
        why: "oxcd does not checkpoint lease TTLs",
    },
    Gate {
        name: "LeaseCheckpointPersist",
        default: false,
        stage: Stage::Alpha,
        support: Support::DefaultOnly,
        why: "oxcd does not checkpoint lease TTLs",
    },
    Gate {
        name: "SetMemberLocalAddr",
        default: false,
        stage: Stage::Alpha,
        support: Support::Honoured,
        why: "",
    },
    // etcd 3.7.
    Gate {
        name: "FastLeaseKeepAlive",
        default: true,
        stage: Stage::Beta,
        support: Support::NoEffect,
        why: "",
    },
    Gate {
        name: "PriorityRequest",
        default: false,
        stage: Stage::Alpha,
        support: Support::DefaultOnly,
        why: "oxcd has no priority request queue",
    },
];

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FeatureGateError {
    #[error("missing bool value for {0}")]
    MissingValue(String),
    #[error("invalid value of {name}={value}, err: strconv.ParseBool: parsing {value:?}: invalid syntax")]
    BadBool { name: String, value: String },
    #[error("unrecognized feature gate: {0}")]
    Unknown(String),
    #[error("feature gate {name}={value} is not supported by oxcd ({why})")]
    Unsupported {
        name: &'static str,
        value: bool,
        why: &'static str,
    },
}

/// Go's `strconv.ParseBool`.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// The gates as set: every known gate's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureGates {
    values: Vec<(&'static str, bool)>,
}

impl Default for FeatureGates {
    fn default() -> Self {
        FeatureGates {
            values: GATES.iter().map(|g| (g.name, g.default)).collect(),
        }
    }
}

impl FeatureGates {
    /// Applies `--feature-gates` values in order (`A=true,B=false`; a repeated flag adds to
    /// the earlier ones), then `AllAlpha`/`AllBeta` to every gate not set by name.
    pub fn parse<S: AsRef<str>>(flags: &[S]) -> Result<FeatureGates, FeatureGateError> {
        let mut set: Vec<(String, bool)> = Vec::new();
        for flag in flags {
            for part in flag.as_ref().split(',') {
                let part = part.trim();
                if part.is_empty() {
                    continue;
                }
                let Some((name, value)) = part.split_once('=') else {
                    return Err(FeatureGateError::MissingValue(part.to_string()));
                };
                let (name, value) = (name.trim(), value.trim());
                let known =
                    name == "AllAlpha" || name == "AllBeta" || GATES.iter().any(|g| g.name == name);
                if !known {
                    return Err(FeatureGateError::Unknown(name.to_string()));
                }
                let v = parse_bool(value).ok_or_else(|| FeatureGateError::BadBool {
                    name: name.to_string(),
                    value: value.to_string(),
                })?;
                set.retain(|(n, _)| n != name);
                set.push((name.to_string(), v));
            }
        }
        let by_name = |n: &str| set.iter().find(|(s, _)| s == n).map(|(_, v)| *v);
        let mut gates = FeatureGates::default();
        for (g, value) in GATES.iter().zip(gates.values.iter_mut()) {
            let all = match g.stage {
                Stage::Alpha => by_name("AllAlpha"),
                Stage::Beta => by_name("AllBeta"),
            };
            if let Some(v) = by_name(g.name).or(all) {
                value.1 = v;
            }
        }
        gates.check()?;
        Ok(gates)
    }

    fn check(&self) -> Result<(), FeatureGateError> {
        for (g, (_, v)) in GATES.iter().zip(&self.values) {
            if g.support == Support::DefaultOnly && *v != g.default {
                return Err(FeatureGateError::Unsupported {
                    name: g.name,
                    value: *v,
                    why: g.why,
                });
            }
        }
        Ok(())
    }

    /// The gates set away from their defaults as `A=true,B=false`, sorted (how etcd's startup
    /// log shows its feature gates).
    pub fn changed(&self) -> String {
        let mut v: Vec<String> = GATES
            .iter()
            .zip(&self.values)
            .filter(|(g, (_, v))| *v != g.default)
            .map(|(_, (n, v))| format!("{n}={v}"))
            .collect();
        v.sort();
        v.join(",")
    }

    pub fn enabled(&self, name: &str) -> bool {
        self.values.iter().any(|(n, v)| *n == name && *v)
    }

    /// Whether `name` was set, by name, in these flags (for etcd's conflict check with the old
    /// `--experimental-*` spelling).
    pub fn named_in<S: AsRef<str>>(flags: &[S], name: &str) -> bool {
        flags.iter().any(|f| {
            f.as_ref()
                .split(',')
                .any(|p| p.split_once('=').is_some_and(|(n, _)| n.trim() == name))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeadm_gate_and_defaults() {
        let g = FeatureGates::parse(&["InitialCorruptCheck=true"]).unwrap();
        assert!(g.enabled("InitialCorruptCheck"));
        assert!(g.enabled("TxnModeWriteWithSharedBuffer"));
        assert!(!FeatureGates::parse::<&str>(&[])
            .unwrap()
            .enabled("InitialCorruptCheck"));
        // Later values win; a repeated flag adds to the earlier one.
        let g = FeatureGates::parse(&[
            "InitialCorruptCheck=true",
            "TxnModeWriteWithSharedBuffer=false,InitialCorruptCheck=false",
        ])
        .unwrap();
        assert!(!g.enabled("InitialCorruptCheck"));
        assert!(!g.enabled("TxnModeWriteWithSharedBuffer"));
    }

    #[test]
    fn etcd_errors() {
        assert_eq!(
            FeatureGates::parse(&["Foo=true"]).unwrap_err().to_string(),
            "unrecognized feature gate: Foo"
        );
        assert_eq!(
            FeatureGates::parse(&["InitialCorruptCheck"])
                .unwrap_err()
                .to_string(),
            "missing bool value for InitialCorruptCheck"
        );
        assert_eq!(
            FeatureGates::parse(&["InitialCorruptCheck=maybe"])
                .unwrap_err()
                .to_string(),
            "invalid value of InitialCorruptCheck=maybe, err: strconv.ParseBool: parsing \"maybe\": invalid syntax"
        );
        // Gate names are case-sensitive, as in etcd.
        assert!(FeatureGates::parse(&["initialcorruptcheck=true"]).is_err());
    }

    #[test]
    fn gates_oxcd_cannot_honour_are_refused_not_ignored() {
        for gate in [
            "StopGRPCServiceOnDefrag",
            "CompactHashCheck",
            "LeaseCheckpoint",
            "PriorityRequest",
        ] {
            let e = FeatureGates::parse(&[format!("{gate}=true")]).unwrap_err();
            assert!(e.to_string().contains("not supported by oxcd"), "{e}");
            // Their default value is what oxcd does.
            FeatureGates::parse(&[format!("{gate}=false")]).unwrap();
        }
        assert!(FeatureGates::parse(&["AllAlpha=true"]).is_err());
        // AllAlpha does not override a gate set by name.
        assert!(
            FeatureGates::parse(&["AllBeta=false,AllAlpha=false,InitialCorruptCheck=true"])
                .unwrap()
                .enabled("InitialCorruptCheck")
        );
    }

    #[test]
    fn named_in_finds_exact_gate_names() {
        assert!(FeatureGates::named_in(
            &["A=1,InitialCorruptCheck=true"],
            "InitialCorruptCheck"
        ));
        assert!(!FeatureGates::named_in(
            &["LeaseCheckpointPersist=true"],
            "LeaseCheckpoint"
        ));
    }
}
