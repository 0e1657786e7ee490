//! In-memory index of one key's history, as etcd's `keyIndex`: generations of revisions, each
//! ended by a tombstone (the last generation is the live one, or empty after a delete).

use super::revision::Revision;
use smallvec::{smallvec, SmallVec};
use std::collections::HashSet;

#[derive(Clone, Debug, Default)]
struct Generation {
    /// Number of puts in this generation (also those compacted away).
    ver: i64,
    created: Revision,
    /// Inline for one revision: most keys in a large store are written once, and a `Vec`
    /// would allocate room for four.
    revs: SmallVec<[Revision; 1]>,
}

#[derive(Clone, Debug)]
pub struct KeyIndex {
    /// Inline for one generation: a key never deleted has one; a deleted key has two until
    /// a compaction drops the ended one.
    generations: SmallVec<[Generation; 1]>,
    /// Lease of the live version (0: none), so puts can detach it without a backend read.
    lease: i64,
}

/// What a read at some revision finds for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    pub modified: Revision,
    pub created: Revision,
    pub version: i64,
}

impl Default for KeyIndex {
    fn default() -> Self {
        KeyIndex {
            generations: smallvec![Generation::default()],
            lease: 0,
        }
    }
}

impl KeyIndex {
    pub fn put(&mut self, rev: Revision) {
        let g = self
            .generations
            .last_mut()
            .expect("a key index always has a generation");
        if g.revs.is_empty() {
            g.created = rev;
        }
        g.revs.push(rev);
        g.ver += 1;
    }

    /// Restores a key seen in the backend after a restart, whose generation may have been
    /// partly compacted: `created` and `version` come from the stored value.
    pub fn restore(&mut self, rev: Revision, created: Revision, version: i64) {
        let g = self
            .generations
            .last_mut()
            .expect("a key index always has a generation");
        if g.revs.is_empty() {
            g.created = created;
        }
        g.revs.push(rev);
        g.ver = version;
    }

    /// Ends the live generation with a tombstone at `rev`.
    pub fn tombstone(&mut self, rev: Revision) {
        self.put(rev);
        self.generations.push(Generation::default());
    }

    pub fn lease(&self) -> i64 {
        self.lease
    }

    pub fn set_lease(&mut self, lease: i64) {
        self.lease = lease;
    }

    pub fn is_empty(&self) -> bool {
        self.generations.len() == 1 && self.generations[0].revs.is_empty()
    }

    fn find_generation(&self, rev: i64) -> Option<&Generation> {
        let last = self.generations.len() - 1;
        for (i, g) in self.generations.iter().enumerate().rev() {
            if g.revs.is_empty() {
                continue;
            }
            if i != last {
                let tomb = g.revs[g.revs.len() - 1].main;
                if tomb <= rev {
                    return None;
                }
            }
            if g.revs[0].main <= rev {
                return Some(g);
            }
        }
        None
    }

    /// The live version of the key at `at`, if any.
    pub fn get(&self, at: i64) -> Option<Found> {
        let g = self.find_generation(at)?;
        let n = g.revs.iter().rposition(|r| r.main <= at)?;
        Some(Found {
            modified: g.revs[n],
            created: g.created,
            version: g.ver - (g.revs.len() - n - 1) as i64,
        })
    }

    /// The first generation a compaction at `at` leaves: generations ended by a tombstone at or
    /// before `at` are gone (etcd's `doCompact`); the last generation always stays.
    fn compaction_generation(&self, at: i64) -> usize {
        let last = self.generations.len() - 1;
        self.generations[..last]
            .iter()
            .position(|g| g.revs[g.revs.len() - 1].main > at)
            .unwrap_or(last)
    }

    /// The revisions a compaction at `at` would keep (etcd's `keep`, used by HashKV):
    /// like `compact` without changing anything, and without a tombstone ending a generation.
    pub fn keep(&self, at: i64, available: &mut HashSet<Revision>) {
        if self.is_empty() {
            return;
        }
        let gen_idx = self.compaction_generation(at);
        let g = &self.generations[gen_idx];
        if let Some(n) = g.revs.iter().rposition(|r| r.main <= at) {
            let tombstone = n == g.revs.len() - 1 && gen_idx != self.generations.len() - 1;
            if !tombstone {
                available.insert(g.revs[n]);
            }
        }
    }

    /// Drops history before `at`, keeping for a key live at `at` its newest revision at or
    /// below it. Revisions to keep in the backend are added to `available`.
    pub fn compact(&mut self, at: i64, available: &mut HashSet<Revision>) {
        let mut gen_idx = self.compaction_generation(at);
        let last = self.generations.len() - 1;
        let g = &mut self.generations[gen_idx];
        if !g.revs.is_empty() {
            if let Some(n) = g.revs.iter().rposition(|r| r.main <= at) {
                available.insert(g.revs[n]);
                g.revs.drain(..n);
            }
            if g.revs.len() == 1 && gen_idx != last {
                available.remove(&g.revs[0]);
                gen_idx += 1;
            }
        }
        self.generations.drain(..gen_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(main: i64) -> Revision {
        Revision::new(main, 0)
    }

    #[test]
    fn get_follows_generations_and_tombstones() {
        let mut ki = KeyIndex::default();
        ki.put(r(2));
        ki.put(r(4));
        ki.tombstone(r(6));
        ki.put(r(8));
        assert_eq!(ki.get(1), None);
        let f = ki.get(5).unwrap();
        assert_eq!((f.modified, f.created, f.version), (r(4), r(2), 2));
        assert_eq!(ki.get(6), None);
        assert_eq!(ki.get(7), None);
        let f = ki.get(9).unwrap();
        assert_eq!((f.modified, f.created, f.version), (r(8), r(8), 1));
    }

    #[test]
    fn compact_keeps_newest_live_revision_and_drops_dead_generations() {
        let mut ki = KeyIndex::default();
        ki.put(r(2));
        ki.put(r(4));
        ki.tombstone(r(6));
        ki.put(r(8));
        ki.put(r(10));
        let mut avail = HashSet::new();
        ki.compact(5, &mut avail);
        assert_eq!(avail, HashSet::from([r(4)]));
        assert_eq!(ki.get(5).unwrap().modified, r(4));
        let mut avail = HashSet::new();
        ki.compact(6, &mut avail);
        assert!(
            avail.is_empty(),
            "tombstone at the compact revision is dropped"
        );
        assert_eq!(ki.get(9).unwrap().version, 1);
        let mut avail = HashSet::new();
        ki.compact(9, &mut avail);
        assert_eq!(avail, HashSet::from([r(8)]));
        assert_eq!(ki.get(10).unwrap().version, 2);
        ki.tombstone(r(11));
        let mut avail = HashSet::new();
        ki.compact(12, &mut avail);
        assert!(ki.is_empty());
    }
}
