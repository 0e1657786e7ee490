//! A user's key permissions merged over all their roles (etcd's `range_perm_cache.go`), and
//! the checks of a requested key or range against them.
//!
//! Intervals are etcd's "affine" byte intervals: [begin, end), where an end of `None` is
//! unbounded. A permission with an empty range end is the single key, one ending in "\0"
//! reaches to the end of the key space.

use crate::pb::authpb::{permission::Type as PermType, Role, User};

type Interval = (Vec<u8>, Option<Vec<u8>>);

#[derive(Debug, Default, Clone)]
pub struct UnifiedPerms {
    read: Vec<Interval>,
    write: Vec<Interval>,
}

/// The next key after `k` in byte order: the end of the single-key interval.
fn point_end(k: &[u8]) -> Vec<u8> {
    let mut e = k.to_vec();
    e.push(0);
    e
}

/// `a < b` where `None` is +infinity.
fn end_lt(a: &Option<Vec<u8>>, b: &Option<Vec<u8>>) -> bool {
    match (a, b) {
        (_, None) => a.is_some(),
        (None, Some(_)) => false,
        (Some(a), Some(b)) => a < b,
    }
}

/// Whether `begin` lies before `end` (`None` is +infinity).
fn before(begin: &[u8], end: &Option<Vec<u8>>) -> bool {
    end.as_deref().is_none_or(|e| begin < e)
}

impl UnifiedPerms {
    pub fn merge(user: &User, role: impl Fn(&str) -> Option<Role>) -> Self {
        let mut p = UnifiedPerms::default();
        for name in &user.roles {
            let Some(role) = role(name) else { continue };
            for perm in &role.key_permission {
                let ivl: Interval = if perm.range_end.is_empty() {
                    (perm.key.clone(), Some(point_end(&perm.key)))
                } else if perm.range_end == [0] {
                    (perm.key.clone(), None)
                } else {
                    (perm.key.clone(), Some(perm.range_end.clone()))
                };
                match PermType::try_from(perm.perm_type).unwrap_or(PermType::Read) {
                    PermType::Read => p.read.push(ivl),
                    PermType::Write => p.write.push(ivl),
                    PermType::Readwrite => {
                        p.read.push(ivl.clone());
                        p.write.push(ivl);
                    }
                }
            }
        }
        // Visited in order of their start, as etcd's interval tree visits them.
        p.read.sort();
        p.write.sort();
        p
    }

    /// Whether the permissions of kind `write` (else read) allow `key` alone (an empty
    /// `range_end`) or the range [key, range_end) ("\0": to the end of the key space).
    pub fn allows(&self, write: bool, key: &[u8], range_end: &[u8]) -> bool {
        let set = if write { &self.write } else { &self.read };
        if range_end.is_empty() {
            return set
                .iter()
                .any(|(b, e)| b.as_slice() <= key && before(key, e));
        }
        let end = if range_end == [0] {
            None
        } else {
            Some(range_end.to_vec())
        };
        covers(set, key, &end)
    }
}

/// etcd's `IntervalTree.Contains`: the intervals that intersect [begin, end), taken in order
/// of their start, must join without a gap and reach from at or before `begin` to at or past
/// `end`.
fn covers(set: &[Interval], begin: &[u8], end: &Option<Vec<u8>>) -> bool {
    let mut span: Option<(Vec<u8>, Option<Vec<u8>>)> = None;
    for (b, e) in set {
        // Intersects [begin, end): b < end && begin < e.
        if !(before(b, end) && before(begin, e)) {
            continue;
        }
        match &mut span {
            None => span = Some((b.clone(), e.clone())),
            Some((_, max_end)) => {
                if !before(b, max_end) && max_end.as_deref() != Some(b.as_slice()) {
                    return false;
                }
                if end_lt(max_end, e) {
                    *max_end = e.clone();
                }
            }
        }
    }
    match span {
        None => false,
        Some((min_begin, max_end)) => min_begin.as_slice() <= begin && !end_lt(&max_end, end),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::authpb::Permission;

    fn perms(list: &[(&str, &str, PermType)]) -> UnifiedPerms {
        let role = Role {
            name: b"r".to_vec(),
            key_permission: list
                .iter()
                .map(|(k, e, t)| Permission {
                    perm_type: *t as i32,
                    key: k.as_bytes().to_vec(),
                    range_end: e.as_bytes().to_vec(),
                })
                .collect(),
        };
        let user = User {
            roles: vec!["r".into()],
            ..Default::default()
        };
        UnifiedPerms::merge(&user, |_| Some(role.clone()))
    }

    #[test]
    fn single_keys_ranges_prefixes_and_from_key() {
        let p = perms(&[
            ("a", "", PermType::Read),
            ("b", "d", PermType::Readwrite),
            ("x", "\0", PermType::Write),
        ]);
        assert!(p.allows(false, b"a", b""));
        assert!(!p.allows(true, b"a", b""));
        assert!(!p.allows(false, b"a0", b""));
        assert!(p.allows(false, b"b", b"d"));
        assert!(p.allows(true, b"c", b"c5"));
        assert!(!p.allows(false, b"b", b"e"));
        assert!(!p.allows(false, b"a", b"c"), "a gap after the single key a");
        assert!(p.allows(true, b"y", b"\0"));
        assert!(p.allows(true, b"zzz", b""));
        assert!(!p.allows(false, b"y", b""));
        assert!(!p.allows(true, b"w", b"\0"));
    }

    #[test]
    fn ranges_of_several_roles_join() {
        let p = perms(&[("a", "c", PermType::Read), ("c", "e", PermType::Read)]);
        assert!(p.allows(false, b"a", b"e"));
        assert!(p.allows(false, b"b", b"d"));
        assert!(!p.allows(false, b"a", b"f"));
        let gap = perms(&[("a", "c", PermType::Read), ("d", "e", PermType::Read)]);
        assert!(!gap.allows(false, b"a", b"e"));
        let overlapping = perms(&[("a", "d", PermType::Read), ("b", "c", PermType::Read)]);
        assert!(overlapping.allows(false, b"a", b"d"));
    }
}
