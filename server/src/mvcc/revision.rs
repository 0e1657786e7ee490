//! etcd's revision: `main` grows by one per write transaction, `sub` numbers the changes in it.

/// A point in the store's history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    pub main: i64,
    pub sub: i64,
}

/// Backend key of a revision: `k`, main and sub big-endian (so byte order is revision order),
/// and a trailing `t` for tombstones, as in etcd's key bucket.
pub const KEY_PREFIX: u8 = b'k';
const TOMBSTONE_MARK: u8 = b't';

impl Revision {
    pub fn new(main: i64, sub: i64) -> Self {
        Revision { main, sub }
    }

    pub fn to_backend_key(self, tombstone: bool) -> Vec<u8> {
        let mut k = Vec::with_capacity(18);
        k.push(KEY_PREFIX);
        k.extend_from_slice(&(self.main as u64).to_be_bytes());
        k.extend_from_slice(&(self.sub as u64).to_be_bytes());
        if tombstone {
            k.push(TOMBSTONE_MARK);
        }
        k
    }

    /// Lower bound of all backend keys with main revision >= `main`.
    pub fn backend_lower_bound(main: i64) -> Vec<u8> {
        Revision::new(main, 0).to_backend_key(false)
    }

    /// Parses a backend key; returns the revision and whether it is a tombstone.
    pub fn from_backend_key(k: &[u8]) -> Option<(Revision, bool)> {
        if (k.len() != 17 && k.len() != 18) || k[0] != KEY_PREFIX {
            return None;
        }
        let main = u64::from_be_bytes(k[1..9].try_into().ok()?) as i64;
        let sub = u64::from_be_bytes(k[9..17].try_into().ok()?) as i64;
        let tomb = k.len() == 18 && k[17] == TOMBSTONE_MARK;
        Some((Revision { main, sub }, tomb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_keys_sort_in_revision_order_and_round_trip() {
        let a = Revision::new(2, 5).to_backend_key(false);
        let b = Revision::new(10, 0).to_backend_key(true);
        assert!(a < b);
        assert_eq!(
            Revision::from_backend_key(&b),
            Some((Revision::new(10, 0), true))
        );
        assert_eq!(
            Revision::from_backend_key(&a),
            Some((Revision::new(2, 5), false))
        );
    }
}
