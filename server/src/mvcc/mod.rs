//! MVCC key-value store with etcd's semantics, over `sled`.
//!
//! Every version of every key lives in the backend under its revision (`revision.rs`); an
//! in-memory index (`key_index.rs`, rebuilt on start like etcd's treeIndex) maps each key to
//! its generations of revisions. A read at revision R walks the index and loads values by
//! revision. One write transaction = one main revision; it becomes visible atomically when it
//! commits, together with the Raft index it applies (the consistent index), in one sled batch.

pub mod key_index;
pub mod revision;

use crate::metrics::TxnOps;
use crate::pb::mvccpb::{event::EventType, Event, KeyValue};
use crate::schema::{
    ALARM_PREFIX, LEASE_PREFIX, LOCAL_RECORDS, META_CONSISTENT_INDEX, META_FINISHED_COMPACT,
    META_SCHEDULED_COMPACT, META_SNAPSHOT_INDEX, META_SNAPSHOT_TERM,
};
use key_index::KeyIndex;
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use prost::Message;
pub use revision::Revision;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum MvccError {
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    #[error("mvcc: required revision is a future revision")]
    FutureRev,
    #[error("mvcc backend: {0}")]
    Backend(#[from] sled::Error),
    #[error("mvcc backend holds a corrupt record: {0}")]
    Corrupt(String),
}

impl From<MvccError> for crate::error::EtcdError {
    fn from(e: MvccError) -> Self {
        match e {
            MvccError::Compacted => crate::error::EtcdError::Compacted,
            MvccError::FutureRev => crate::error::EtcdError::FutureRev,
            other => crate::error::EtcdError::Internal(other.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, MvccError>;

/// Raw backend records, (key, value), in key order.
pub type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// sled's page cache. Reads of values that miss it are served from the OS page cache (sled
/// reads its files with pread), so a large one mostly doubles memory: with a million 256-byte
/// keys, 256 MiB of cache made the server's RSS 590 MiB against 380 MiB with 64 MiB, at the
/// same put rate (BENCHMARKS.md, Memory).
const BACKEND_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// The `range_end` that covers every key starting with `prefix` (clientv3's GetPrefixRangeEnd):
/// the prefix with its last byte below 0xff incremented, or "\0" (every key) if there is none.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// How far a range reaches: etcd's `range_end` after `mkGteRange`.
#[derive(Clone, Copy, Debug)]
pub enum RangeEnd<'a> {
    /// Exactly one key.
    Key,
    /// Every key >= the start key (range_end "\0").
    Infinity,
    /// Keys in [key, end).
    Before(&'a [u8]),
}

impl<'a> RangeEnd<'a> {
    /// Interprets a request's `range_end` as etcd does.
    pub fn from_request(range_end: &'a [u8]) -> Self {
        match range_end {
            [] => RangeEnd::Key,
            [0] => RangeEnd::Infinity,
            e => RangeEnd::Before(e),
        }
    }

    pub fn contains(&self, start: &[u8], key: &[u8]) -> bool {
        match self {
            RangeEnd::Key => key == start,
            RangeEnd::Infinity => key >= start,
            RangeEnd::Before(e) => key >= start && key < *e,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RangeOptions {
    /// Maximum number of keys to load (0: all).
    pub limit: i64,
    /// Revision to read at (0: current).
    pub rev: i64,
    /// Only count the keys.
    pub count_only: bool,
}

#[derive(Clone, Debug, Default)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// Number of keys in the range at the revision, whatever the limit.
    pub count: i64,
    /// The store's current revision.
    pub rev: i64,
}

/// The key index (etcd's treeIndex). Keys are boxed slices, not `Vec`s: every node slot of the
/// map holds one, and a million keys is a million slots.
type Index = BTreeMap<Box<[u8]>, KeyIndex>;

struct State {
    index: Index,
    current_rev: i64,
    compact_rev: i64,
    /// Raft index of the last applied entry (also of entries that changed nothing).
    applied: u64,
}

/// What the backend held when the store was opened.
#[derive(Debug, Default)]
pub struct Recovered {
    pub consistent_index: u64,
    /// (lease id, ttl) of every granted lease.
    pub leases: Vec<(i64, i64)>,
    /// (lease id, key) of every live key attached to a lease.
    pub attached: Vec<(i64, Vec<u8>)>,
    /// Raw alarm records.
    pub alarms: Vec<Vec<u8>>,
}

pub struct Store {
    /// Directory holding the state generations and the CURRENT pointer.
    dir: std::path::PathBuf,
    /// The current generation; replaced whole when a Raft snapshot is installed.
    db: RwLock<sled::Db>,
    state: RwLock<State>,
    /// Backend size cache: sled measures it with file system calls, too slow per request.
    size: std::sync::atomic::AtomicU64,
    size_at: parking_lot::Mutex<std::time::Instant>,
    /// Held by the physical compaction and by defragmentation, which must not interleave:
    /// a compaction still deleting from a generation that defragmentation replaced would
    /// leave the new one holding history the index no longer knows.
    maintenance: parking_lot::Mutex<()>,
    /// (revision, hash, previous compaction) of the last compactions (etcd keeps 10): the
    /// hash each took at its revision before removing anything.
    compaction_hashes: parking_lot::Mutex<std::collections::VecDeque<(i64, u32, i64)>>,
}

/// etcd's kvHasher: crc32c over the key space's backend records up to `rev` (revision bytes
/// `main_sub[t]` and the KeyValue record), skipping what a compaction at `compact` removes
/// (unless nothing is kept) and a tombstone at `compact` itself, which etcd 3.5.16+ keeps and
/// older releases remove, so that both hash alike.
struct KvHasher<'a> {
    h: Crc32c,
    compact: i64,
    keep: &'a HashSet<Revision>,
}

impl<'a> KvHasher<'a> {
    fn new(compact: i64, keep: &'a HashSet<Revision>) -> Self {
        let mut h = Crc32c::default();
        h.update(b"key");
        KvHasher { h, compact, keep }
    }

    fn write(&mut self, r: Revision, tomb: bool, v: &[u8]) {
        if r.main < self.compact + 1 && !self.keep.is_empty() && !self.keep.contains(&r) {
            return;
        }
        if tomb && r.main == self.compact {
            return;
        }
        self.h.update(&(r.main as u64).to_be_bytes());
        self.h.update(b"_");
        self.h.update(&(r.sub as u64).to_be_bytes());
        if tomb {
            self.h.update(b"t");
        }
        self.h.update(v);
    }

    fn finish(&self) -> u32 {
        self.h.finish()
    }
}

/// Reads the store at a consistent point: the index cannot change while this is held.
pub trait ReadView {
    /// Revision a read with `rev == 0` sees.
    fn rev(&self) -> i64;
    fn compact_rev(&self) -> i64;
    fn range(&self, key: &[u8], end: RangeEnd, opts: RangeOptions) -> Result<RangeResult>;
}

fn index_range<'s>(
    index: &'s Index,
    key: &'s [u8],
    end: RangeEnd<'s>,
) -> Box<dyn Iterator<Item = (&'s Box<[u8]>, &'s KeyIndex)> + 's> {
    match end {
        RangeEnd::Key => Box::new(index.get_key_value(key).into_iter()),
        RangeEnd::Infinity => {
            Box::new(index.range::<[u8], _>((Bound::Included(key), Bound::Unbounded)))
        }
        RangeEnd::Before(e) if e <= key => Box::new(std::iter::empty()),
        RangeEnd::Before(e) => {
            Box::new(index.range::<[u8], _>((Bound::Included(key), Bound::Excluded(e))))
        }
    }
}

fn decode_kv(bytes: &[u8]) -> Result<KeyValue> {
    KeyValue::decode(bytes).map_err(|e| MvccError::Corrupt(e.to_string()))
}

fn read_u64(db: &sled::Db, key: &[u8]) -> Result<u64> {
    Ok(match db.get(key)? {
        Some(v) if v.len() == 8 => u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])),
        _ => 0,
    })
}

/// Range over the index at `at`, loading values through `load`.
fn range_at(
    state: &State,
    key: &[u8],
    end: RangeEnd,
    cur: i64,
    opts: RangeOptions,
    load: impl Fn(Revision) -> Result<KeyValue>,
) -> Result<RangeResult> {
    if opts.rev > cur {
        return Err(MvccError::FutureRev);
    }
    let at = if opts.rev <= 0 { cur } else { opts.rev };
    if at < state.compact_rev {
        return Err(MvccError::Compacted);
    }
    let revs: Vec<Revision> = index_range(&state.index, key, end)
        .filter_map(|(_, ki)| ki.get(at).map(|f| f.modified))
        .collect();
    let count = revs.len() as i64;
    if opts.count_only {
        return Ok(RangeResult {
            kvs: vec![],
            count,
            rev: cur,
        });
    }
    let take = if opts.limit <= 0 || opts.limit > count {
        count
    } else {
        opts.limit
    };
    let kvs = revs
        .into_iter()
        .take(take as usize)
        .map(load)
        .collect::<Result<Vec<_>>>()?;
    Ok(RangeResult {
        kvs,
        count,
        rev: cur,
    })
}

/// Deletes every state generation in `dir` but `keep` (the one CURRENT names).
fn remove_generations_except(dir: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with("state-") && n != keep {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// How a physical compaction paces itself (etcd's --compaction-batch-limit and
/// --compaction-sleep-interval; their defaults).
#[derive(Clone, Copy, Debug)]
pub struct CompactionPace {
    pub batch_limit: usize,
    pub sleep: std::time::Duration,
}

impl Default for CompactionPace {
    fn default() -> Self {
        CompactionPace {
            batch_limit: 1000,
            sleep: std::time::Duration::from_millis(10),
        }
    }
}

impl Store {
    fn open_db(path: &Path) -> Result<sled::Db> {
        Ok(sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(BACKEND_CACHE_BYTES)
            .open()?)
    }

    /// Rebuilds the in-memory index and reads the replicated records of a backend.
    fn load_state(db: &sled::Db) -> Result<(State, Recovered, i64, i64)> {
        let mut index = Index::new();
        let mut current_rev = 1; // etcd starts at revision 1 with an empty store
        for item in db.scan_prefix([revision::KEY_PREFIX]) {
            let (k, v) = item?;
            let Some((rev, tomb)) = Revision::from_backend_key(&k) else {
                return Err(MvccError::Corrupt(format!("bad revision key {k:?}")));
            };
            let kv = decode_kv(&v)?;
            let ki = index.entry(kv.key.as_slice().into()).or_default();
            if tomb {
                ki.tombstone(rev);
            } else {
                ki.restore(rev, Revision::new(kv.create_revision, 0), kv.version);
                ki.set_lease(kv.lease);
            }
            current_rev = current_rev.max(rev.main);
        }
        let scheduled = read_u64(db, META_SCHEDULED_COMPACT)? as i64;
        let finished = read_u64(db, META_FINISHED_COMPACT)? as i64;
        // etcd's compactMainRev is -1 until the first compaction; txn checks compare with it.
        let compact_rev = if db.contains_key(META_SCHEDULED_COMPACT)? {
            scheduled.max(finished)
        } else {
            -1
        };
        current_rev = current_rev.max(compact_rev);
        let mut rec = Recovered {
            consistent_index: read_u64(db, META_CONSISTENT_INDEX)?,
            ..Default::default()
        };
        for item in db.scan_prefix(LEASE_PREFIX) {
            let (k, v) = item?;
            let id = i64::from_be_bytes(
                k[LEASE_PREFIX.len()..]
                    .try_into()
                    .map_err(|_| MvccError::Corrupt("lease key".into()))?,
            );
            let ttl = i64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| MvccError::Corrupt("lease ttl".into()))?,
            );
            rec.leases.push((id, ttl));
        }
        for item in db.scan_prefix(ALARM_PREFIX) {
            let (k, _) = item?;
            rec.alarms.push(k[ALARM_PREFIX.len()..].to_vec());
        }
        for (key, ki) in &index {
            if ki.lease() != 0 {
                rec.attached.push((ki.lease(), key.to_vec()));
            }
        }
        let state = State {
            index,
            current_rev,
            compact_rev,
            applied: rec.consistent_index,
        };
        Ok((state, rec, scheduled, finished))
    }

    fn current_name(dir: &Path) -> Result<Option<String>> {
        match std::fs::read_to_string(dir.join("CURRENT")) {
            Ok(s) => Ok(Some(s.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(MvccError::Corrupt(format!("reading CURRENT: {e}"))),
        }
    }

    /// Points CURRENT at a generation, atomically and durably.
    fn set_current(dir: &Path, name: &str) -> Result<()> {
        let io = |e: std::io::Error| MvccError::Corrupt(format!("writing CURRENT: {e}"));
        let tmp = dir.join("CURRENT.tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            std::io::Write::write_all(&mut f, name.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, dir.join("CURRENT")).map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }

    /// Opens (or creates) the backend in `dir` and rebuilds the index from it.
    pub fn open(dir: &Path) -> Result<(Arc<Store>, Recovered)> {
        std::fs::create_dir_all(dir)
            .map_err(|e| MvccError::Corrupt(format!("creating {}: {e}", dir.display())))?;
        let name = match Self::current_name(dir)? {
            Some(n) => n,
            None => {
                Self::set_current(dir, "state-0")?;
                "state-0".to_string()
            }
        };
        // Generations left behind by an interrupted snapshot install or defragmentation
        // are garbage.
        remove_generations_except(dir, &name);
        let db = Self::open_db(&dir.join(&name))?;
        let (state, rec, scheduled, finished) = Self::load_state(&db)?;
        let size = db.size_on_disk().unwrap_or(0);
        let store = Arc::new(Store {
            dir: dir.to_path_buf(),
            db: RwLock::new(db),
            state: RwLock::new(state),
            size: std::sync::atomic::AtomicU64::new(size),
            size_at: parking_lot::Mutex::new(std::time::Instant::now()),
            maintenance: parking_lot::Mutex::new(()),
            compaction_hashes: parking_lot::Mutex::new(Default::default()),
        });
        if scheduled > finished {
            // A compaction was cut short by a crash: finish it, as etcd does on start.
            let keep = store.compact_index(scheduled);
            // Nothing is served yet: no writers to leave room for.
            let pace = CompactionPace {
                batch_limit: 10_000,
                sleep: std::time::Duration::ZERO,
            };
            store.compact_backend(scheduled, &keep, None, pace)?;
        }
        Ok((store, rec))
    }

    /// Creates a backend in the empty directory `dir` holding exactly `records` (a member's
    /// state restored from a backup). Durable when it returns.
    pub fn create(dir: &Path, records: Records) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| MvccError::Corrupt(format!("creating {}: {e}", dir.display())))?;
        let name = "state-0";
        let db = Self::open_db(&dir.join(name))?;
        let mut batch = sled::Batch::default();
        for (i, (k, v)) in records.into_iter().enumerate() {
            batch.insert(k, v);
            if i % 10_000 == 9_999 {
                db.apply_batch(std::mem::take(&mut batch))?;
            }
        }
        db.apply_batch(batch)?;
        db.flush()?;
        drop(db);
        Self::set_current(dir, name)
    }

    fn db(&self) -> sled::Db {
        self.db.read().clone()
    }

    /// A fresh backend for a Raft snapshot being received; `install` makes it current.
    pub fn stage(&self, index: u64) -> Result<(String, sled::Db)> {
        let name = format!("state-snap-{index:016x}-{:08x}", rand::random::<u32>());
        let path = self.dir.join(&name);
        let _ = std::fs::remove_dir_all(&path);
        Ok((name, Self::open_db(&path)?))
    }

    /// Replaces the whole state with a staged backend holding the state at Raft index
    /// `index` (a snapshot from the leader). Durable when it returns.
    pub fn install(
        &self,
        name: &str,
        staged: sled::Db,
        index: u64,
        term: u64,
    ) -> Result<Recovered> {
        // The receiver stays who it is, whatever the stream held.
        for key in LOCAL_RECORDS {
            match self.db().get(key)? {
                Some(own) => staged.insert(key, own)?,
                None => staged.remove(key)?,
            };
        }
        staged.insert(META_CONSISTENT_INDEX, &index.to_be_bytes())?;
        staged.insert(META_SNAPSHOT_INDEX, &index.to_be_bytes())?;
        staged.insert(META_SNAPSHOT_TERM, &term.to_be_bytes())?;
        staged.flush()?;
        let (mut state, rec, _, _) = Self::load_state(&staged)?;
        state.applied = index;
        let mut st = self.state.write();
        Self::set_current(&self.dir, name)?;
        let old = std::mem::replace(&mut *self.db.write(), staged);
        *st = state;
        drop(st);
        drop(old);
        remove_generations_except(&self.dir, name);
        Ok(rec)
    }

    /// A consistent copy of the whole state and the Raft index it is at (for a follower
    /// that needs a snapshot). Writers wait while it is taken.
    pub fn snapshot_copy(&self) -> Result<(u64, Records)> {
        let st = self.state.read();
        let db = self.db();
        let mut out = Vec::new();
        for item in db.iter() {
            let (k, v) = item?;
            if LOCAL_RECORDS.contains(&k.as_ref()) {
                continue;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok((st.applied, out))
    }

    /// etcd's HashKV: crc32c over the key space up to `rev` in etcd's backend encoding
    /// (revision bytes `main_sub[t]` and the KeyValue record), skipping what a compaction at
    /// the compacted revision would have removed. Returns (hash, current, compacted revision).
    pub fn hash_kv(&self, rev: i64) -> Result<(u32, i64, i64)> {
        let st = self.state.read();
        let (compact, current) = (st.compact_rev, st.current_rev);
        // etcd keeps the hash each compaction took at its revision (before removing anything,
        // against the compaction before it), and answers with that one,
        // even once a later compaction passed it.
        if let Some(&(_, hash, prev)) = self.compaction_hashes.lock().iter().find(|h| h.0 == rev) {
            return Ok((hash, current, prev));
        }
        // etcd 3.6 hashes at the compacted revision itself (3.4 refused it).
        if rev > 0 && rev < compact {
            return Err(MvccError::Compacted);
        }
        if rev > 0 && rev > current {
            return Err(MvccError::FutureRev);
        }
        let rev = if rev == 0 { current } else { rev };
        let mut keep = HashSet::new();
        for ki in st.index.values() {
            ki.keep(rev, &mut keep);
        }
        let mut h = KvHasher::new(compact, &keep);
        let db = self.db();
        let hi = Revision::backend_lower_bound(rev.saturating_add(1));
        for item in db.range(vec![revision::KEY_PREFIX]..hi) {
            let (k, v) = item?;
            if let Some((r, tomb)) = Revision::from_backend_key(&k) {
                h.write(r, tomb, &v);
            }
        }
        Ok((h.finish(), current, compact))
    }

    /// etcd's Hash (a testing aid): crc32c over every record of the backend, and the
    /// revision it was taken at. Unlike HashKV it covers member-local records too, so members
    /// need not agree on it.
    pub fn hash(&self) -> Result<(u32, i64)> {
        let st = self.state.read();
        let mut h = Crc32c::default();
        for item in self.db().iter() {
            let (k, v) = item?;
            h.update(&(k.len() as u64).to_be_bytes());
            h.update(&k);
            h.update(&v);
        }
        Ok((h.finish(), st.current_rev))
    }

    /// etcd's defragmentation: copies the live records into a new generation and drops the
    /// old one, so the space compaction freed goes back to the file system. Readers and
    /// writers wait while it runs, as on etcd. Every record is copied as it is, the consistent
    /// index among them, so the copy is exactly the state the old generation held.
    pub fn defragment(&self) -> Result<()> {
        let _m = self.maintenance.lock();
        let st = self.state.write();
        let name = format!("state-defrag-{:08x}", rand::random::<u32>());
        let path = self.dir.join(&name);
        let _ = std::fs::remove_dir_all(&path);
        let fresh = Self::open_db(&path)?;
        crate::failpoint::hit("defragBeforeCopy");
        let copied = (|| {
            let mut batch = sled::Batch::default();
            for (i, item) in self.db().iter().enumerate() {
                let (k, v) = item?;
                batch.insert(k, v);
                if i % 10_000 == 9_999 {
                    fresh.apply_batch(std::mem::take(&mut batch))?;
                }
            }
            fresh.apply_batch(batch)?;
            fresh.flush()?;
            Ok::<_, MvccError>(())
        })();
        if copied.is_ok() {
            crate::failpoint::hit("defragBeforeRename");
        }
        if let Err(e) = copied.and_then(|_| Self::set_current(&self.dir, &name)) {
            drop(fresh);
            let _ = std::fs::remove_dir_all(&path);
            return Err(e);
        }
        let old = std::mem::replace(&mut *self.db.write(), fresh);
        drop(st);
        drop(old);
        remove_generations_except(&self.dir, &name);
        self.size.store(
            self.db().size_on_disk().unwrap_or(0),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    /// Records that an entry which changed nothing was applied.
    pub fn set_applied(&self, index: u64) {
        let mut st = self.state.write();
        st.applied = st.applied.max(index);
    }

    /// Every replicated record under a prefix (members, removed members, ...).
    pub fn records(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.db()
            .scan_prefix(prefix)
            .map(|r| {
                r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(MvccError::from)
            })
            .collect()
    }

    pub fn get_record(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db().get(key)?.map(|v| v.to_vec()))
    }

    /// Writes a record outside any transaction and makes it durable (bootstrap identity).
    pub fn put_record_durable(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.db().insert(key, value)?;
        self.db().flush()?;
        Ok(())
    }

    pub fn read(&self) -> ReadTxn<'_> {
        ReadTxn {
            store: self,
            state: self.state.read(),
        }
    }

    /// Starts the one write transaction; applies are serialized by the caller.
    pub fn write(&self) -> WriteTxn<'_> {
        let state = self.state.write();
        let begin_rev = state.current_rev;
        WriteTxn {
            store: self,
            state,
            begin_rev,
            batch: sled::Batch::default(),
            overlay: HashMap::new(),
            events: Vec::new(),
            lease_changes: Vec::new(),
            records_changed: false,
            ops: std::cell::Cell::new(TxnOps::default()),
        }
    }

    /// Keys with a live version now (etcd_debugging_mvcc_keys_total).
    pub fn live_keys(&self) -> usize {
        let state = self.state.read();
        let rev = state.current_rev;
        state
            .index
            .values()
            .filter(|ki| ki.get(rev).is_some())
            .count()
    }

    pub fn current_rev(&self) -> i64 {
        self.state.read().current_rev
    }

    pub fn compact_rev(&self) -> i64 {
        self.state.read().compact_rev
    }

    /// Size of the backend files in bytes (etcd's dbSize).
    pub fn size_on_disk(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let mut at = self.size_at.lock();
        if at.elapsed() >= std::time::Duration::from_millis(100) {
            *at = std::time::Instant::now();
            self.size
                .store(self.db().size_on_disk().unwrap_or(0), Relaxed);
        }
        self.size.load(Relaxed)
    }

    /// Makes every applied batch durable; afterwards the WAL before the consistent index can go.
    pub fn sync(&self, consistent_index: u64) -> Result<()> {
        // The state lock keeps a defragmentation from swapping the generation under us.
        let _st = self.state.read();
        let db = self.db();
        db.insert(META_CONSISTENT_INDEX, &consistent_index.to_be_bytes())?;
        db.flush()?;
        Ok(())
    }

    fn load(&self, rev: Revision) -> Result<KeyValue> {
        match self.db().get(rev.to_backend_key(false))? {
            Some(v) => decode_kv(&v),
            None => Err(MvccError::Corrupt(format!(
                "missing value for revision {rev:?}"
            ))),
        }
    }

    /// Validates and records a compaction at `rev`, compacting the index. Returns the
    /// revisions the backend must keep; `compact_backend` then removes the rest.
    pub fn schedule_compaction(&self, rev: i64) -> Result<HashSet<Revision>> {
        {
            let st = self.state.read();
            if rev <= st.compact_rev {
                return Err(MvccError::Compacted);
            }
            if rev > st.current_rev {
                return Err(MvccError::FutureRev);
            }
            // Written under the state lock so that it lands in the current generation.
            crate::failpoint::hit("compactBeforeCommitScheduledCompact");
            self.db()
                .insert(META_SCHEDULED_COMPACT, &(rev as u64).to_be_bytes())?;
            crate::failpoint::hit("compactAfterCommitScheduledCompact");
        }
        Ok(self.compact_index(rev))
    }

    fn compact_index(&self, rev: i64) -> HashSet<Revision> {
        let mut st = self.state.write();
        st.compact_rev = rev;
        let mut keep = HashSet::new();
        st.index.retain(|_, ki| {
            ki.compact(rev, &mut keep);
            !ki.is_empty()
        });
        keep
    }

    /// Physically removes the history compacted away at `rev` in batches of `pace.batch_limit`
    /// revisions with `pace.sleep` between them, so that writers interleave with it (etcd's
    /// --compaction-batch-limit and --compaction-sleep-interval).
    /// With `prev` (the compaction before this one), it also takes etcd's compaction hash at
    /// `rev` on the way, from the records as they were.
    pub fn compact_backend(
        &self,
        rev: i64,
        keep: &HashSet<Revision>,
        prev: Option<i64>,
        pace: CompactionPace,
    ) -> Result<()> {
        let _m = self.maintenance.lock();
        let end = Revision::backend_lower_bound(rev + 1);
        let mut batch = sled::Batch::default();
        let mut n = 0;
        let mut hasher = prev.map(|p| KvHasher::new(p, keep));
        for item in self.db().range(vec![revision::KEY_PREFIX]..end) {
            let (k, v) = item?;
            if let Some((r, tomb)) = Revision::from_backend_key(&k) {
                if let Some(h) = hasher.as_mut() {
                    h.write(r, tomb, &v);
                }
                if !keep.contains(&r) {
                    batch.remove(k);
                }
            }
            n += 1;
            if n >= pace.batch_limit {
                crate::failpoint::hit("compactBeforeCommitBatch");
                self.db().apply_batch(std::mem::take(&mut batch))?;
                crate::failpoint::hit("compactAfterCommitBatch");
                n = 0;
                if !pace.sleep.is_zero() {
                    std::thread::sleep(pace.sleep);
                }
            }
        }
        batch.insert(META_FINISHED_COMPACT, &(rev as u64).to_be_bytes());
        crate::failpoint::hit("compactBeforeSetFinishedCompact");
        self.db().apply_batch(batch)?;
        crate::failpoint::hit("compactAfterSetFinishedCompact");
        if let (Some(h), Some(prev)) = (hasher, prev) {
            let mut hashes = self.compaction_hashes.lock();
            if hashes.len() == 10 {
                hashes.pop_front();
            }
            hashes.push_back((rev, h.finish(), prev));
        }
        Ok(())
    }

    /// Every event with main revision in [from, to] on keys in the range, in revision order,
    /// read from the backend (watch catch-up).
    pub fn events(&self, key: &[u8], end: RangeEnd, from: i64, to: i64) -> Result<Vec<Event>> {
        let lo = Revision::backend_lower_bound(from);
        let hi = Revision::backend_lower_bound(to.saturating_add(1));
        let mut evs = Vec::new();
        for item in self.db().range(lo..hi) {
            let (k, v) = item?;
            let Some((rev, tomb)) = Revision::from_backend_key(&k) else {
                continue;
            };
            let mut kv = decode_kv(&v)?;
            if !end.contains(key, &kv.key) {
                continue;
            }
            let r#type = if tomb {
                kv.mod_revision = rev.main;
                EventType::Delete
            } else {
                EventType::Put
            };
            evs.push(Event {
                r#type: r#type as i32,
                kv: Some(kv),
                prev_kv: None,
            });
        }
        Ok(evs)
    }

    /// The version of `key` just before revision `rev` (a watch event's prev_kv), if still
    /// in the store's history.
    pub fn prev_kv(&self, key: &[u8], rev: i64) -> Option<KeyValue> {
        let r = self.read();
        let res = r
            .range(
                key,
                RangeEnd::Key,
                RangeOptions {
                    rev: rev - 1,
                    ..Default::default()
                },
            )
            .ok()?;
        res.kvs.into_iter().next()
    }
}

pub struct ReadTxn<'a> {
    store: &'a Store,
    state: RwLockReadGuard<'a, State>,
}

impl ReadView for ReadTxn<'_> {
    fn rev(&self) -> i64 {
        self.state.current_rev
    }
    fn compact_rev(&self) -> i64 {
        self.state.compact_rev
    }
    fn range(&self, key: &[u8], end: RangeEnd, opts: RangeOptions) -> Result<RangeResult> {
        range_at(&self.state, key, end, self.state.current_rev, opts, |r| {
            self.store.load(r)
        })
    }
}

/// A lease attachment that changed in a write transaction, for the lessor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseChange {
    Attach(i64, Vec<u8>),
    Detach(i64, Vec<u8>),
}

/// A write transaction over one or more log entries (a group commit): each entry ends with
/// [`WriteTxn::end_entry`] and gets its own revision, and [`WriteTxn::commit`] writes them all in
/// one backend batch. The backend's fixed cost per batch (sled seals and writes a log buffer
/// for each) is most of a small write's cost, so an applied Ready's entries share one. The
/// store stays locked until the commit: nobody sees a revision before it is in the backend.
pub struct WriteTxn<'a> {
    store: &'a Store,
    state: RwLockWriteGuard<'a, State>,
    /// The revision before the current entry.
    begin_rev: i64,
    batch: sled::Batch,
    /// Values written by this transaction, not yet in the backend.
    overlay: HashMap<Revision, KeyValue>,
    /// The current entry's changes.
    events: Vec<Event>,
    lease_changes: Vec<LeaseChange>,
    /// Whether the current entry changed a non-KV record.
    records_changed: bool,
    /// Ranges, puts and deletes so far, for etcd's mvcc metrics (recorded when the
    /// transaction ends, committed or not, as etcd's End does).
    ops: std::cell::Cell<TxnOps>,
}

impl Drop for WriteTxn<'_> {
    fn drop(&mut self) {
        self.ops.get().record();
    }
}

/// What one entry of a write transaction changed.
#[derive(Debug, Default)]
pub struct EntryChanges {
    /// The store's revision after the entry.
    pub rev: i64,
    pub events: Vec<Event>,
    pub lease_changes: Vec<LeaseChange>,
}

impl ReadView for WriteTxn<'_> {
    fn rev(&self) -> i64 {
        if self.events.is_empty() {
            self.begin_rev
        } else {
            self.begin_rev + 1
        }
    }
    fn compact_rev(&self) -> i64 {
        self.state.compact_rev
    }
    fn range(&self, key: &[u8], end: RangeEnd, opts: RangeOptions) -> Result<RangeResult> {
        self.count(|o| o.ranges += 1);
        let cur = self.rev();
        range_at(&self.state, key, end, cur, opts, |r| {
            match self.overlay.get(&r) {
                Some(kv) => Ok(kv.clone()),
                None => self.store.load(r),
            }
        })
    }
}

impl WriteTxn<'_> {
    fn count(&self, f: impl FnOnce(&mut TxnOps)) {
        let mut ops = self.ops.get();
        f(&mut ops);
        self.ops.set(ops);
    }

    /// Takes the operations counted so far (a txn's compares, which etcd counts in a read
    /// transaction of their own).
    pub fn take_ops(&self) -> TxnOps {
        self.ops.take()
    }

    /// Whether the current entry changed keys or records (and so cannot be abandoned).
    pub fn is_dirty(&self) -> bool {
        !self.events.is_empty() || self.records_changed
    }

    fn next_rev(&self) -> Revision {
        Revision::new(self.begin_rev + 1, self.events.len() as i64)
    }

    /// Writes a new version of `key`; returns the transaction's revision.
    pub fn put(&mut self, key: &[u8], value: Vec<u8>, lease: i64) -> i64 {
        self.count(|o| o.puts += 1);
        let rev = self.next_rev();
        let (created, version, old_lease) = match self.state.index.get(key) {
            Some(ki) => match ki.get(rev.main) {
                Some(f) => (f.created.main, f.version + 1, ki.lease()),
                None => (rev.main, 1, 0),
            },
            None => (rev.main, 1, 0),
        };
        let kv = KeyValue {
            key: key.to_vec(),
            create_revision: created,
            mod_revision: rev.main,
            version,
            value,
            lease,
        };
        self.batch
            .insert(rev.to_backend_key(false), kv.encode_to_vec());
        let ki = self.state.index.entry(key.into()).or_default();
        ki.put(rev);
        ki.set_lease(lease);
        if old_lease != 0 {
            self.lease_changes
                .push(LeaseChange::Detach(old_lease, key.to_vec()));
        }
        if lease != 0 {
            self.lease_changes
                .push(LeaseChange::Attach(lease, key.to_vec()));
        }
        self.overlay.insert(rev, kv.clone());
        self.events.push(Event {
            r#type: EventType::Put as i32,
            kv: Some(kv),
            prev_kv: None,
        });
        rev.main
    }

    /// Deletes every live key in the range; returns (deleted, revision).
    pub fn delete_range(&mut self, key: &[u8], end: RangeEnd) -> (i64, i64) {
        self.count(|o| o.deletes += 1);
        let at = self.rev();
        let keys: Vec<Box<[u8]>> = index_range(&self.state.index, key, end)
            .filter(|(_, ki)| ki.get(at).is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for k in &keys {
            self.delete(k);
        }
        (keys.len() as i64, self.rev())
    }

    fn delete(&mut self, key: &[u8]) {
        let rev = self.next_rev();
        let tomb = KeyValue {
            key: key.to_vec(),
            ..Default::default()
        };
        self.batch
            .insert(rev.to_backend_key(true), tomb.encode_to_vec());
        let ki = self.state.index.entry(key.into()).or_default();
        let old_lease = ki.lease();
        ki.tombstone(rev);
        ki.set_lease(0);
        if old_lease != 0 {
            self.lease_changes
                .push(LeaseChange::Detach(old_lease, key.to_vec()));
        }
        let kv = KeyValue {
            key: key.to_vec(),
            mod_revision: rev.main,
            ..Default::default()
        };
        self.events.push(Event {
            r#type: EventType::Delete as i32,
            kv: Some(kv),
            prev_kv: None,
        });
    }

    /// Records a replicated non-KV record (lease, alarm) in the same atomic batch.
    pub fn put_record(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.records_changed = true;
        self.batch.insert(key, value);
    }

    pub fn remove_record(&mut self, key: Vec<u8>) {
        self.records_changed = true;
        self.batch.remove(key);
    }

    /// Ends the current entry: its changes take the next revision (if it changed keys), and
    /// its operations are counted in etcd's mvcc metrics as one transaction.
    pub fn end_entry(&mut self) -> EntryChanges {
        self.ops.take().record();
        let rev = self.rev();
        self.begin_rev = rev;
        self.records_changed = false;
        EntryChanges {
            rev,
            events: std::mem::take(&mut self.events),
            lease_changes: std::mem::take(&mut self.lease_changes),
        }
    }

    /// Ends an entry that failed before changing anything (its reads still count, as etcd
    /// counts an ended read transaction).
    pub fn abandon_entry(&mut self) {
        debug_assert!(!self.is_dirty());
        self.ops.take().record();
    }

    /// Writes every ended entry in one backend batch with the Raft index it covers, and makes
    /// their revisions visible. Returns the store's revision.
    pub fn commit(mut self, consistent_index: u64) -> Result<i64> {
        debug_assert!(!self.is_dirty(), "an entry was not ended");
        self.batch
            .insert(META_CONSISTENT_INDEX, &consistent_index.to_be_bytes());
        let timer = crate::metrics::METRICS.backend_commit.start_timer();
        crate::failpoint::hit("beforeCommit");
        self.store
            .db()
            .apply_batch(std::mem::take(&mut self.batch))?;
        crate::failpoint::hit("afterCommit");
        timer.observe_duration();
        self.state.current_rev = self.begin_rev;
        // Under the same lock as the data: a snapshot copy taken after this commit must not
        // claim an index below the writes it holds, or the follower installing it applies
        // them a second time.
        self.state.applied = self.state.applied.max(consistent_index);
        Ok(self.begin_rev)
    }
}

/// CRC-32C (Castagnoli), the checksum etcd's HashKV and `snapshot status` use.
pub(crate) struct Crc32c {
    crc: u32,
}

impl Default for Crc32c {
    fn default() -> Self {
        Crc32c { crc: !0 }
    }
}

const CRC32C_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0x82F6_3B78 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

impl Crc32c {
    /// Continues a checksum from its finished value (etcd's WAL rolls one CRC across records).
    pub(crate) fn resume(finished: u32) -> Self {
        Crc32c { crc: !finished }
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        for b in data {
            self.crc = CRC32C_TABLE[((self.crc ^ *b as u32) & 0xff) as usize] ^ (self.crc >> 8);
        }
    }

    pub(crate) fn finish(&self) -> u32 {
        !self.crc
    }
}

#[cfg(test)]
mod crc_tests {
    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C.
        let mut h = super::Crc32c::default();
        h.update(b"123456789");
        assert_eq!(h.finish(), 0xE306_9283);
    }
}

#[cfg(test)]
mod maintenance_tests {
    use super::*;

    fn fill(store: &Store, index: &mut u64, rounds: usize) {
        for i in 0..rounds {
            let mut t = store.write();
            t.put(format!("k{}", i % 10).as_bytes(), vec![i as u8; 4096], 0);
            *index += 1;
            t.end_entry();
            t.commit(*index).unwrap();
        }
    }

    fn all(store: &Store) -> Vec<(Vec<u8>, Vec<u8>)> {
        let r = store.read();
        let res = r
            .range(b"\0", RangeEnd::Infinity, RangeOptions::default())
            .unwrap();
        res.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
    }

    /// Found by etcd's robustness suite (Issue15271, a member blackholed until it gets a
    /// snapshot): the applier marks entries applied only after its whole batch, so a copy
    /// taken between a group's commit and that mark named an index below the writes it held,
    /// and the follower installing it applied those entries again (its revisions ran ahead of
    /// the leader's). The copy's index must cover every write in it.
    #[test]
    fn a_snapshot_copy_names_the_index_of_the_writes_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let mut index = 0;
        fill(&store, &mut index, 3);
        // No set_applied yet, as between the applier's flush and the end of its batch.
        let (copied_at, records) = store.snapshot_copy().unwrap();
        let ci = records
            .iter()
            .find(|(k, _)| k.as_slice() == META_CONSISTENT_INDEX)
            .map(|(_, v)| u64::from_be_bytes(v.as_slice().try_into().unwrap()));
        assert_eq!(ci, Some(index));
        assert_eq!(
            copied_at, index,
            "the copy holds the writes of entries 1..={index}"
        );
    }

    #[test]
    fn defragment_returns_compacted_space_and_keeps_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let mut index = 0;
        fill(&store, &mut index, 2_000);
        let rev = store.current_rev();
        let keep = store.schedule_compaction(rev).unwrap();
        store
            .compact_backend(rev, &keep, None, CompactionPace::default())
            .unwrap();
        store.sync(index).unwrap();
        let before_kv = store.hash_kv(0).unwrap();
        let before_keys = all(&store);
        let before = store.db().size_on_disk().unwrap();

        store.defragment().unwrap();

        let after = store.db().size_on_disk().unwrap();
        assert!(after < before / 2, "{before} bytes before, {after} after");
        assert_eq!(store.hash_kv(0).unwrap(), before_kv);
        assert_eq!(all(&store), before_keys);
        // Writes go on in the new generation, and it is the one found after a restart.
        fill(&store, &mut index, 5);
        let expect = (store.hash_kv(0).unwrap(), all(&store));
        store.sync(index).unwrap();
        drop(store);
        let gens: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("state-"))
            .collect();
        assert_eq!(gens.len(), 1, "old generations are deleted");
        let (store, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.consistent_index, index);
        assert_eq!((store.hash_kv(0).unwrap(), all(&store)), expect);
    }
}

#[cfg(test)]
mod group_commit_tests {
    use super::*;

    #[test]
    fn entries_of_one_transaction_get_their_own_revisions_and_commit_together() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            let mut t = store.write();
            t.put(b"a", b"1".to_vec(), 0);
            let first = t.end_entry();
            assert_eq!(first.rev, 2);
            assert_eq!(first.events.len(), 1);
            // The second entry reads the first one's write, not yet in the backend.
            let seen = t
                .range(b"a", RangeEnd::Key, RangeOptions::default())
                .unwrap();
            assert_eq!(seen.kvs[0].value, b"1");
            assert_eq!(seen.rev, 2);
            t.put(b"a", b"2".to_vec(), 0);
            t.put(b"b", b"3".to_vec(), 0);
            let second = t.end_entry();
            assert_eq!(second.rev, 3);
            assert_eq!(second.events.len(), 2);
            // An entry that changed nothing takes no revision.
            let none = t.end_entry();
            assert_eq!((none.rev, none.events.len()), (3, 0));
            assert_eq!(t.commit(12).unwrap(), 3);
            assert_eq!(store.current_rev(), 3);
            let old = store
                .read()
                .range(
                    b"a",
                    RangeEnd::Key,
                    RangeOptions {
                        rev: 2,
                        ..Default::default()
                    },
                )
                .unwrap();
            assert_eq!(old.kvs[0].value, b"1");
            store.sync(12).unwrap();
        }
        // One backend batch: both revisions and the last entry's index survive a restart.
        let (store, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.consistent_index, 12);
        assert_eq!(store.current_rev(), 3);
        let all = store
            .read()
            .range(b"a", RangeEnd::Infinity, RangeOptions::default())
            .unwrap();
        let kvs: Vec<_> = all
            .kvs
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone(), kv.version))
            .collect();
        assert_eq!(
            kvs,
            vec![
                (b"a".to_vec(), b"2".to_vec(), 2),
                (b"b".to_vec(), b"3".to_vec(), 1)
            ]
        );
    }
}

#[cfg(test)]
mod snapshot_identity_tests {
    use super::*;
    use crate::schema::{META_CLUSTER_ID, META_MEMBER_ID};

    /// A member that installs another's state stays who it is (issue 17: a follower that
    /// caught up by snapshot restarted with the leader's member ID).
    #[test]
    fn a_snapshot_neither_carries_nor_replaces_the_members_identity() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (leader, _) = Store::open(a_dir.path()).unwrap();
        let (follower, _) = Store::open(b_dir.path()).unwrap();
        leader
            .put_record_durable(META_MEMBER_ID, &1u64.to_be_bytes())
            .unwrap();
        leader
            .put_record_durable(META_CLUSTER_ID, &9u64.to_be_bytes())
            .unwrap();
        follower
            .put_record_durable(META_MEMBER_ID, &2u64.to_be_bytes())
            .unwrap();
        follower
            .put_record_durable(META_CLUSTER_ID, &8u64.to_be_bytes())
            .unwrap();
        let mut t = leader.write();
        t.put(b"k", b"v".to_vec(), 0);
        t.end_entry();
        t.commit(7).unwrap();

        let (_, records) = leader.snapshot_copy().unwrap();
        let index = 7;
        for key in LOCAL_RECORDS {
            assert!(
                !records.iter().any(|(k, _)| k.as_slice() == key),
                "the snapshot carries {}",
                String::from_utf8_lossy(key)
            );
        }
        // Even a stream that does carry another member's identity (an older sender) leaves the
        // receiver's own.
        let (name, staged) = follower.stage(index).unwrap();
        for (k, v) in &records {
            staged.insert(k.as_slice(), v.as_slice()).unwrap();
        }
        staged.insert(META_MEMBER_ID, &1u64.to_be_bytes()).unwrap();
        staged.insert(META_CLUSTER_ID, &9u64.to_be_bytes()).unwrap();
        follower.install(&name, staged, index, 3).unwrap();
        assert_eq!(
            follower.get_record(META_MEMBER_ID).unwrap(),
            Some(2u64.to_be_bytes().to_vec())
        );
        assert_eq!(
            follower.get_record(META_CLUSTER_ID).unwrap(),
            Some(8u64.to_be_bytes().to_vec())
        );
        assert_eq!(
            follower
                .read()
                .range(b"k", RangeEnd::Key, RangeOptions::default())
                .unwrap()
                .kvs
                .len(),
            1
        );
        // And after a restart on the installed state.
        drop(follower);
        let (reopened, _) = Store::open(b_dir.path()).unwrap();
        assert_eq!(
            reopened.get_record(META_MEMBER_ID).unwrap(),
            Some(2u64.to_be_bytes().to_vec())
        );
    }
}
