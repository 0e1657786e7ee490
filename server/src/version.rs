//! Versions oxcd reports, as etcd's `version` packages do: the etcd release whose API and
//! behaviour oxcd matches (server version), the cluster version the members agree on, and the
//! storage schema version. Also the downgrade rule (etcd's `version.AllowedDowngradeVersion`).

/// The etcd release whose API and behaviour oxcd implements. Clients gate features on it:
/// kube-apiserver enables RequestWatchProgress from 3.4.31 / 3.5.13, kubeadm wants 3.5.24+.
pub const SERVER_VERSION: &str = "3.6.16";

/// The cluster version every oxcd member runs at (etcd's `major.minor.0` of the lowest member).
pub const CLUSTER_VERSION: Version = Version { major: 3, minor: 6 };

/// The storage schema version etcd 3.6 writes (`storageVersion` in Status, `/version`'s
/// `storage`, every SnapshotResponse).
pub const STORAGE_VERSION: &str = "3.6.0";

/// A full semver (`3.6.0`, `3.5.0-rc.1`), as Go's `semver.NewVersion` accepts it.
pub fn is_semver(s: &str) -> bool {
    let core = s.split(['-', '+']).next().unwrap_or("");
    core.split('.').count() == 3 && Version::parse_target(s).is_some()
}

/// A `major.minor` version (etcd compares cluster and downgrade versions without the patch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
}

impl Version {
    /// etcd's `convertToClusterVersion`: a semver (`3.5.7`, `3.5.0-rc.1`) or `major.minor`
    /// (`3.5`); the patch and any pre-release are dropped. `v3.5`, `3` and `` are refused.
    pub fn parse_target(s: &str) -> Option<Version> {
        // A pre-release or build suffix is allowed on a full semver only, and must not be empty.
        let (core, suffix) = match s.find(['-', '+']) {
            Some(i) => (&s[..i], Some(&s[i + 1..])),
            None => (s, None),
        };
        if suffix.is_some_and(str::is_empty) {
            return None;
        }
        let num = |p: &str| -> Option<u64> {
            let ok = !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (p == "0" || !p.starts_with('0'));
            if ok {
                p.parse().ok()
            } else {
                None
            }
        };
        let parts: Vec<&str> = core.split('.').collect();
        let (ma, mi) = match parts.as_slice() {
            [ma, mi] if suffix.is_none() => (ma, mi),
            [ma, mi, pa] => {
                num(pa)?;
                (ma, mi)
            }
            _ => return None,
        };
        Some(Version {
            major: num(ma)?,
            minor: num(mi)?,
        })
    }

    /// The only version a cluster at `self` may downgrade to: one minor lower.
    pub fn allowed_downgrade(self) -> Option<Version> {
        self.minor.checked_sub(1).map(|minor| Version {
            major: self.major,
            minor,
        })
    }

    /// `3.6.0`, as `/version`'s `etcdcluster` and the downgrade target are written.
    pub fn full(self) -> String {
        format!("{}.{}.0", self.major, self.minor)
    }

    /// `3.6`, as DowngradeResponse.version is written.
    pub fn short(self) -> String {
        format!("{}.{}", self.major, self.minor)
    }
}

/// The cluster's downgrade job (etcd's `DowngradeInfo`), kept in the store through Raft.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Downgrade {
    pub enabled: bool,
    /// `3.5.0` while enabled, empty otherwise.
    pub target: String,
}

impl Downgrade {
    /// The cluster version: the downgrade target while a downgrade is enabled (etcd's version
    /// monitor lowers it at once, every member being able to run at the lower level).
    pub fn cluster_version(&self) -> Version {
        if self.enabled {
            if let Some(v) = Version::parse_target(&self.target) {
                return v;
            }
        }
        CLUSTER_VERSION
    }

    /// The storage schema follows the cluster version; etcd 3.5 has no storage version key
    /// and etcd 3.6 reports such a backend as 3.5.0.
    pub fn storage_version(&self) -> String {
        let cv = self.cluster_version();
        if cv == CLUSTER_VERSION {
            STORAGE_VERSION.to_string()
        } else {
            cv.full()
        }
    }

    /// The record kept in the store: `1 <target>` when enabled, empty when not.
    pub fn encode(&self) -> Vec<u8> {
        if self.enabled {
            format!("1 {}", self.target).into_bytes()
        } else {
            Vec::new()
        }
    }

    pub fn decode(b: &[u8]) -> Downgrade {
        match std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.strip_prefix("1 "))
        {
            Some(t) => Downgrade {
                enabled: true,
                target: t.to_string(),
            },
            None => Downgrade::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semvers_are_full_versions() {
        assert!(is_semver("3.6.0") && is_semver("3.5.0-rc.1"));
        assert!(!is_semver("3.6") && !is_semver("") && !is_semver("v3.6.0"));
    }

    #[test]
    fn targets_parse_as_etcd_converts_them() {
        let v35 = Some(Version { major: 3, minor: 5 });
        assert_eq!(Version::parse_target("3.5"), v35);
        assert_eq!(Version::parse_target("3.5.0"), v35);
        assert_eq!(Version::parse_target("3.5.7"), v35);
        assert_eq!(Version::parse_target("3.5.0-rc.1"), v35);
        for bad in [
            "", "3", "v3.5", "3.5.", "3.x", "3.5.0.1", "03.5", "3.5-", "3.5.0-",
        ] {
            assert_eq!(Version::parse_target(bad), None, "{bad}");
        }
    }

    #[test]
    fn downgrade_is_one_minor_and_lowers_cluster_and_storage() {
        assert_eq!(
            CLUSTER_VERSION.allowed_downgrade(),
            Some(Version { major: 3, minor: 5 })
        );
        let d = Downgrade {
            enabled: true,
            target: "3.5.0".into(),
        };
        assert_eq!(d.cluster_version().full(), "3.5.0");
        assert_eq!(d.storage_version(), "3.5.0");
        assert_eq!(Downgrade::decode(&d.encode()), d);
        let off = Downgrade::default();
        assert_eq!(off.cluster_version().full(), "3.6.0");
        assert_eq!(off.storage_version(), STORAGE_VERSION);
        assert_eq!(Downgrade::decode(&off.encode()), off);
    }

    #[test]
    fn the_reported_version_passes_kubernetes_gates() {
        let v: Vec<u64> = SERVER_VERSION
            .split('.')
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(v.len(), 3);
        assert!((v[0], v[1], v[2]) >= (3, 5, 24));
    }
}
