//! The lessor: leases, their expiry clocks and the keys attached to them.
//!
//! Grant and revoke are replicated (applied from the Raft log); expiry and keep-alive are the
//! leader's business, as in etcd: only the primary (leader) runs expiry clocks, and on becoming
//! primary every lease is refreshed (`promote`) so none expires early because of an election.

use crate::error::{EtcdError, Result};
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// etcd's upper bound on a lease TTL, in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

struct Lease {
    ttl: i64,
    /// None while not primary: a follower never expires leases.
    expiry: Option<Instant>,
    keys: BTreeSet<Vec<u8>>,
}

impl Lease {
    fn refresh(&mut self, extend: Duration) {
        self.expiry = Some(Instant::now() + extend + Duration::from_secs(self.ttl as u64));
    }
}

struct Inner {
    leases: HashMap<i64, Lease>,
    primary: bool,
}

pub struct Lessor {
    inner: Mutex<Inner>,
    min_ttl: i64,
}

/// What `time_to_live` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    pub remaining: i64,
    pub granted: i64,
    pub keys: Vec<Vec<u8>>,
}

impl Lessor {
    /// `min_ttl`: etcd's minimum lease TTL (1.5 election timeouts, rounded up to seconds).
    pub fn new(min_ttl: i64) -> Self {
        Lessor {
            inner: Mutex::new(Inner {
                leases: HashMap::new(),
                primary: false,
            }),
            min_ttl,
        }
    }

    /// Applies a grant; returns the TTL actually granted.
    pub fn grant(&self, id: i64, ttl: i64) -> Result<i64> {
        if id == 0 {
            return Err(EtcdError::LeaseNotFound);
        }
        if ttl > MAX_LEASE_TTL {
            return Err(EtcdError::LeaseTtlTooLarge);
        }
        let mut inner = self.inner.lock();
        if inner.leases.contains_key(&id) {
            return Err(EtcdError::LeaseExists);
        }
        let ttl = ttl.max(self.min_ttl);
        let mut l = Lease {
            ttl,
            expiry: None,
            keys: BTreeSet::new(),
        };
        if inner.primary {
            l.refresh(Duration::ZERO);
        }
        inner.leases.insert(id, l);
        let m = &crate::metrics::METRICS;
        m.lease_granted.inc();
        m.lease_ttl.observe(ttl as f64);
        Ok(ttl)
    }

    /// Replaces every lease with those the backend holds (on start, and after a snapshot was
    /// installed): (id, ttl) and (id, key) attachments.
    pub fn reset(&self, leases: &[(i64, i64)], attached: &[(i64, Vec<u8>)]) {
        let mut inner = self.inner.lock();
        let primary = inner.primary;
        inner.leases.clear();
        for (id, ttl) in leases {
            let mut l = Lease {
                ttl: (*ttl).max(self.min_ttl),
                expiry: None,
                keys: BTreeSet::new(),
            };
            if primary {
                l.refresh(Duration::ZERO);
            }
            inner.leases.insert(*id, l);
        }
        for (id, key) in attached {
            if let Some(l) = inner.leases.get_mut(id) {
                l.keys.insert(key.clone());
            }
        }
    }

    /// Removes a lease; returns its keys in ascending order (to delete in one revision).
    pub fn revoke(&self, id: i64) -> Result<Vec<Vec<u8>>> {
        let mut inner = self.inner.lock();
        let l = inner.leases.remove(&id).ok_or(EtcdError::LeaseNotFound)?;
        crate::metrics::METRICS.lease_revoked.inc();
        Ok(l.keys.into_iter().collect())
    }

    pub fn exists(&self, id: i64) -> bool {
        self.inner.lock().leases.contains_key(&id)
    }

    /// Keys attached to a lease, ascending (for a revoke about to be applied).
    pub fn keys(&self, id: i64) -> Option<Vec<Vec<u8>>> {
        self.inner
            .lock()
            .leases
            .get(&id)
            .map(|l| l.keys.iter().cloned().collect())
    }

    pub fn attach(&self, id: i64, key: Vec<u8>) {
        if let Some(l) = self.inner.lock().leases.get_mut(&id) {
            l.keys.insert(key);
        }
    }

    pub fn detach(&self, id: i64, key: &[u8]) {
        if let Some(l) = self.inner.lock().leases.get_mut(&id) {
            l.keys.remove(key);
        }
    }

    /// A keep-alive: restarts the lease's clock; returns its TTL. Only the primary renews.
    pub fn renew(&self, id: i64) -> Result<i64> {
        let mut inner = self.inner.lock();
        if !inner.primary {
            return Err(EtcdError::NoLeader);
        }
        let l = inner.leases.get_mut(&id).ok_or(EtcdError::LeaseNotFound)?;
        if l.expiry.is_some_and(|e| e <= Instant::now()) {
            // Expired and about to be revoked: etcd answers as if it were gone.
            return Err(EtcdError::LeaseNotFound);
        }
        l.refresh(Duration::ZERO);
        crate::metrics::METRICS.lease_renewed.inc();
        Ok(l.ttl)
    }

    pub fn time_to_live(&self, id: i64) -> Option<LeaseInfo> {
        let inner = self.inner.lock();
        let l = inner.leases.get(&id)?;
        let remaining = match l.expiry {
            // etcd truncates the remaining duration to whole seconds.
            Some(e) => {
                let now = Instant::now();
                if e >= now {
                    (e - now).as_secs() as i64
                } else {
                    -((now - e).as_secs_f64().ceil() as i64)
                }
            }
            None => l.ttl,
        };
        Some(LeaseInfo {
            remaining,
            granted: l.ttl,
            keys: l.keys.iter().cloned().collect(),
        })
    }

    pub fn ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.inner.lock().leases.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Becoming leader: every lease gets a full TTL plus `extend` from now.
    pub fn promote(&self, extend: Duration) {
        let mut inner = self.inner.lock();
        inner.primary = true;
        for l in inner.leases.values_mut() {
            l.refresh(extend);
        }
    }

    pub fn demote(&self) {
        let mut inner = self.inner.lock();
        inner.primary = false;
        for l in inner.leases.values_mut() {
            l.expiry = None;
        }
    }

    /// Leases whose clock ran out (the leader proposes their revocation).
    pub fn expired(&self, max: usize) -> Vec<i64> {
        let now = Instant::now();
        let inner = self.inner.lock();
        inner
            .leases
            .iter()
            .filter(|(_, l)| l.expiry.is_some_and(|e| e <= now))
            .map(|(id, _)| *id)
            .take(max)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_enforces_min_and_max_ttl_and_unique_ids() {
        let l = Lessor::new(2);
        assert_eq!(l.grant(1, 1).unwrap(), 2);
        assert_eq!(l.grant(1, 5), Err(EtcdError::LeaseExists));
        assert_eq!(
            l.grant(2, MAX_LEASE_TTL + 1),
            Err(EtcdError::LeaseTtlTooLarge)
        );
    }

    #[test]
    fn only_the_primary_expires_and_renews() {
        let l = Lessor::new(1);
        l.grant(7, 1).unwrap();
        assert_eq!(l.renew(7), Err(EtcdError::NoLeader));
        l.promote(Duration::ZERO);
        assert_eq!(l.renew(7).unwrap(), 1);
        assert!(l.expired(10).is_empty());
        l.attach(7, b"b".to_vec());
        l.attach(7, b"a".to_vec());
        assert_eq!(l.revoke(7).unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(l.revoke(7), Err(EtcdError::LeaseNotFound));
    }
}
