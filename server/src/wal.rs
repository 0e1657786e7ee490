//! Write-ahead log of Raft entries and hard state, in etcd's WAL format.
//!
//! Segment files `<seq>-<index>.wal` (`%016x-%016x`) in `<data-dir>/member/wal`, as etcd names
//! them: the first is `0-0`, a new one is named after the index of the first entry it holds.
//! Each is a sequence of 8-byte-aligned frames: a little-endian u64 whose low 56 bits are the
//! record length and whose top byte, when its high bit is set, gives the zero padding after
//! it; the record is a `walpb.Record` (type, CRC-32C, data). The CRC rolls across every record
//! of the log; a segment starts with a CRC record carrying the previous segment's value, then
//! the metadata (member and cluster ID), the snapshot point and the hard state. Entries are
//! raftpb entries whose data is a `RaftRequest` numbered like etcd's `InternalRaftRequest`, so
//! etcd's own readers (`wal.OpenForRead`/`ReadAll`, etcd-dump-logs, the robustness suite's
//! persisted-request check) read an oxcd member's log.
//!
//! `save` appends one Ready's worth of records and fdatasyncs once (group commit). Snapshot
//! records mark what the state machine holds durably; replay starts after the last one.
//! Segments wholly before it are deleted once more than `max_segments` (etcd's --max-wals)
//! exist. On open, a torn tail of the last segment is truncated; a bad record followed by a
//! valid one is corruption and a hard error.

use crate::mvcc::Crc32c;
use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, SnapshotMetadata};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Largest record accepted when reading: anything bigger is a corrupt length.
const MAX_RECORD: usize = 256 * 1024 * 1024;
/// Segments kept when their entries are all covered by a snapshot point (etcd's --max-wals).
pub const DEFAULT_MAX_SEGMENTS: usize = 5;
/// A segment that restarts the log at a snapshot from the leader is written under this suffix
/// and renamed once every older segment is gone.
const RESET_SUFFIX: &str = ".tmp";

/// walpb record types.
pub mod record_type {
    pub const METADATA: i64 = 1;
    pub const ENTRY: i64 = 2;
    pub const STATE: i64 = 3;
    pub const CRC: i64 = 4;
    pub const SNAPSHOT: i64 = 5;
}
use record_type::*;

/// etcd's WAL messages (walpb.Record, walpb.Snapshot, etcdserverpb.Metadata).
pub mod walpb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Record {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(uint32, tag = "2")]
        pub crc: u32,
        #[prost(bytes = "vec", tag = "3")]
        pub data: Vec<u8>,
    }

    /// The member and cluster a log belongs to.
    #[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
    pub struct Metadata {
        #[prost(uint64, tag = "1")]
        pub node_id: u64,
        #[prost(uint64, tag = "2")]
        pub cluster_id: u64,
    }

    /// A snapshot point; `conf_state` is an encoded raftpb.ConfState.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Snapshot {
        #[prost(uint64, tag = "1")]
        pub index: u64,
        #[prost(uint64, tag = "2")]
        pub term: u64,
        #[prost(bytes = "vec", optional, tag = "3")]
        pub conf_state: Option<Vec<u8>>,
    }
}
pub use walpb::Metadata;

#[derive(Debug, Error)]
pub enum WalError {
    #[error("wal io: {0}")]
    Io(#[from] std::io::Error),
    #[error("wal: corrupt record in {file} at offset {offset}: {why}")]
    Corrupt {
        file: String,
        offset: u64,
        why: String,
    },
    #[error("wal: bad protobuf: {0}")]
    Decode(#[from] protobuf::ProtobufError),
    #[error(
        "wal: {0} holds a log in the format of oxcd before it wrote etcd's WAL format; \
         move the data with a backup (`etcdctl snapshot save` against the old version, \
         `oxcd snapshot restore` with this one)"
    )]
    OldFormat(String),
}

pub type Result<T> = std::result::Result<T, WalError>;

/// What the log holds after replay.
#[derive(Debug, Default)]
pub struct Replayed {
    pub snapshot: SnapshotMetadata,
    pub hard_state: HardState,
    /// Entries after `snapshot.index`, in order.
    pub entries: Vec<Entry>,
}

struct Segment {
    seq: u64,
    path: PathBuf,
    /// Highest entry index written to this segment (0: none).
    last_index: u64,
}

pub struct Wal {
    dir: PathBuf,
    segments: Vec<Segment>,
    file: File,
    size: u64,
    buf: Vec<u8>,
    /// The CRC of the last record written (it rolls into the next).
    crc: u32,
    metadata: Metadata,
    snapshot: SnapshotMetadata,
    hard_state: HardState,
    max_segments: usize,
}

fn segment_name(seq: u64, index: u64) -> String {
    format!("{seq:016x}-{index:016x}.wal")
}

fn parse_name(p: &Path) -> Option<u64> {
    let name = p.file_name()?.to_str()?;
    let stem = name.strip_suffix(".wal")?;
    let (seq, index) = stem.split_once('-')?;
    if seq.len() != 16 || index.len() != 16 {
        return None;
    }
    u64::from_str_radix(index, 16).ok()?;
    u64::from_str_radix(seq, 16).ok()
}

/// Appends one framed record to `buf`, rolling `crc` over its data.
fn encode_record(buf: &mut Vec<u8>, crc: &mut u32, rtype: i64, data: &[u8]) {
    if rtype != CRC {
        let mut h = Crc32c::resume(*crc);
        h.update(data);
        *crc = h.finish();
    }
    let rec = walpb::Record {
        r#type: rtype,
        crc: *crc,
        data: data.to_vec(),
    }
    .encode_to_vec();
    let pad = (8 - rec.len() % 8) % 8;
    let mut len_field = rec.len() as u64;
    if pad != 0 {
        len_field |= (0x80 | pad as u64) << 56;
    }
    buf.extend_from_slice(&len_field.to_le_bytes());
    buf.extend_from_slice(&rec);
    buf.resize(buf.len() + pad, 0);
}

/// One segment's records as read: the valid ones, and where the valid data ends when the
/// segment ends in damage that nothing valid follows (a torn write).
pub struct DecodedSegment {
    pub records: Vec<walpb::Record>,
    pub torn_at: Option<(usize, String)>,
}

/// Parses the frame at `off` into a record whose CRC continues `crc`.
fn parse_frame(
    data: &[u8],
    off: usize,
    crc: u32,
) -> std::result::Result<(walpb::Record, usize), String> {
    let Some(head) = data.get(off..off + 8) else {
        return Err("truncated frame header".into());
    };
    let len_field = u64::from_le_bytes(head.try_into().unwrap_or_default());
    if len_field == 0 {
        return Err("zero frame".into());
    }
    let len = (len_field & 0x00ff_ffff_ffff_ffff) as usize;
    let pad = if len_field >> 63 == 1 {
        ((len_field >> 56) & 0x7) as usize
    } else {
        0
    };
    if len > MAX_RECORD {
        return Err(format!("bad record length {len}"));
    }
    let Some(body) = data.get(off + 8..off + 8 + len) else {
        return Err("truncated record".into());
    };
    if data.len() < off + 8 + len + pad {
        return Err("truncated padding".into());
    }
    let rec = walpb::Record::decode(body).map_err(|e| format!("bad record: {e}"))?;
    if rec.r#type != CRC {
        let mut h = Crc32c::resume(crc);
        h.update(&rec.data);
        if h.finish() != rec.crc {
            return Err("crc mismatch".into());
        }
    } else if crc != 0 && rec.crc != crc {
        return Err("crc chain broken".into());
    }
    Ok((rec, off + 8 + len + pad))
}

/// Decodes one segment, continuing the log's rolling `crc`. Damage is a torn write (reported
/// in `torn_at` for the caller to judge: truncated when it is the log's end) when the frame runs
/// past the end of the file (and no chained records follow it), its length is zero, or a
/// 512-byte sector of it is all zeros, as etcd's decoder decides; any other bad record is
/// corruption (`Err`).
pub fn decode_segment(
    data: &[u8],
    crc: &mut u32,
) -> std::result::Result<DecodedSegment, (usize, String)> {
    let mut records = Vec::new();
    let mut off = 0;
    while off < data.len() {
        match parse_frame(data, off, *crc) {
            Ok((rec, next)) => {
                *crc = rec.crc;
                records.push(rec);
                off = next;
            }
            Err(why) => {
                let torn = match torn_frame(data, off) {
                    Torn::Zeroed => true,
                    // A damaged length field reads past the end too: only the end of the
                    // log when nothing valid follows.
                    Torn::PastEnd => !chained_records_follow(data, off),
                    Torn::No => false,
                };
                if torn {
                    return Ok(DecodedSegment {
                        records,
                        torn_at: Some((off, why)),
                    });
                }
                return Err((off, why));
            }
        }
    }
    Ok(DecodedSegment {
        records,
        torn_at: None,
    })
}

/// Whether two records whose CRCs chain start at an 8-byte boundary after `off`: the log goes
/// on past the damage, so it is not the end of an unfinished write (a false match is a 1 in
/// 2^32 event). A damaged length field hides where the next record starts, hence the scan.
fn chained_records_follow(data: &[u8], off: usize) -> bool {
    (off + 8..data.len().saturating_sub(16))
        .step_by(8)
        .any(|o| {
            let Some(head) = data.get(o..o + 8) else {
                return false;
            };
            let len_field = u64::from_le_bytes(head.try_into().unwrap_or_default());
            let len = (len_field & 0x00ff_ffff_ffff_ffff) as usize;
            if len_field == 0 || len > MAX_RECORD {
                return false;
            }
            let first = data
                .get(o + 8..o + 8 + len)
                .and_then(|b| walpb::Record::decode(b).ok());
            let Some(first) = first.filter(|r| (METADATA..=SNAPSHOT).contains(&r.r#type)) else {
                return false;
            };
            let pad = if len_field >> 63 == 1 {
                ((len_field >> 56) & 0x7) as usize
            } else {
                0
            };
            parse_frame(data, o + 8 + len + pad, first.crc).is_ok_and(|(r, _)| r.r#type != CRC)
        })
}

enum Torn {
    /// The frame's length is zero or a 512-byte sector of it (by file offset) is all zeros.
    Zeroed,
    /// The frame runs past the end of the file.
    PastEnd,
    No,
}

/// Whether the frame at `off` looks like what a write cut short leaves, as etcd's decoder
/// judges (`isTornEntry`).
fn torn_frame(data: &[u8], off: usize) -> Torn {
    const SECTOR: usize = 512;
    let Some(head) = data.get(off..off + 8) else {
        return Torn::PastEnd;
    };
    let len_field = u64::from_le_bytes(head.try_into().unwrap_or_default());
    let len = (len_field & 0x00ff_ffff_ffff_ffff) as usize;
    if len_field == 0 {
        return Torn::Zeroed;
    }
    let end = off.saturating_add(8).saturating_add(len);
    if end > data.len() {
        return Torn::PastEnd;
    }
    let mut start = off;
    while start < end {
        let stop = ((start / SECTOR + 1) * SECTOR).min(end);
        if data[start..stop].iter().all(|b| *b == 0) {
            return Torn::Zeroed;
        }
        start = stop;
    }
    Torn::No
}

/// oxcd's log format before etcd's: `[len u32][crc32 u32][type u8][payload]`, starting with a
/// snapshot record (type 3).
fn is_old_format(data: &[u8]) -> bool {
    if data.len() < 9 {
        return false;
    }
    let len = u32::from_le_bytes(data[0..4].try_into().unwrap_or_default()) as usize;
    let crc = u32::from_le_bytes(data[4..8].try_into().unwrap_or_default());
    len > 0 && data.len() >= 8 + len && data[8] == 3 && crc32fast::hash(&data[8..8 + len]) == crc
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn corrupt(path: &Path, offset: usize, why: impl Into<String>) -> WalError {
    WalError::Corrupt {
        file: path.display().to_string(),
        offset: offset as u64,
        why: why.into(),
    }
}

fn snapshot_bytes(s: &SnapshotMetadata) -> Result<Vec<u8>> {
    Ok(walpb::Snapshot {
        index: s.index,
        term: s.term,
        conf_state: Some(s.get_conf_state().write_to_bytes()?),
    }
    .encode_to_vec())
}

fn parse_snapshot(data: &[u8]) -> std::result::Result<SnapshotMetadata, String> {
    let s = walpb::Snapshot::decode(data).map_err(|e| e.to_string())?;
    let mut meta = SnapshotMetadata {
        index: s.index,
        term: s.term,
        ..Default::default()
    };
    if let Some(cs) = s.conf_state {
        meta.set_conf_state(ConfState::parse_from_bytes(&cs).map_err(|e| e.to_string())?);
    }
    Ok(meta)
}

/// The segment files of a log, in sequence order.
fn segment_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut names: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter_map(|p| Some((parse_name(&p)?, p)))
        .collect();
    names.sort();
    Ok(names)
}

impl Wal {
    pub fn exists(dir: &Path) -> bool {
        fs::read_dir(dir)
            .map(|mut d| {
                d.any(|e| {
                    e.map(|e| {
                        let name = e.file_name();
                        let name = name.to_string_lossy();
                        name.ends_with(".wal") || name.ends_with(&format!(".wal{RESET_SUFFIX}"))
                    })
                    .unwrap_or(false)
                })
            })
            .unwrap_or(false)
    }

    /// Creates a new log whose history starts at `snapshot` (index 0 for a new member). Like
    /// etcd's, its first segment is `0-0` and starts with an empty snapshot point.
    pub fn create(dir: &Path, snapshot: SnapshotMetadata, metadata: Metadata) -> Result<Wal> {
        fs::create_dir_all(dir)?;
        let path = dir.join(segment_name(0, 0));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        sync_dir(dir)?;
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            segments: vec![Segment {
                seq: 0,
                path,
                last_index: 0,
            }],
            file,
            size: 0,
            buf: Vec::new(),
            crc: 0,
            metadata,
            snapshot: SnapshotMetadata::default(),
            hard_state: HardState::default(),
            max_segments: DEFAULT_MAX_SEGMENTS,
        };
        wal.write_segment_header()?;
        if snapshot.index > 0 {
            wal.snapshot = snapshot;
            let bytes = snapshot_bytes(&wal.snapshot)?;
            wal.push(SNAPSHOT, &bytes);
        }
        wal.sync()?;
        Ok(wal)
    }

    /// How many segments to keep once their entries are covered by a snapshot point
    /// (etcd's --max-wals; 0 keeps all).
    pub fn set_max_segments(&mut self, n: usize) {
        self.max_segments = n;
    }

    fn push(&mut self, rtype: i64, data: &[u8]) {
        encode_record(&mut self.buf, &mut self.crc, rtype, data);
    }

    /// CRC (carrying the previous segment's), metadata, snapshot point, hard state.
    fn write_segment_header(&mut self) -> Result<()> {
        self.push(CRC, &[]);
        let meta = self.metadata.encode_to_vec();
        self.push(METADATA, &meta);
        let snap = snapshot_bytes(&self.snapshot)?;
        self.push(SNAPSHOT, &snap);
        if self.hard_state != HardState::default() {
            let hs = self.hard_state.write_to_bytes()?;
            self.push(STATE, &hs);
        }
        Ok(())
    }

    /// Opens an existing log and replays it.
    pub fn open(dir: &Path) -> Result<(Wal, Replayed)> {
        Self::finish_reset(dir)?;
        let names = segment_files(dir)?;
        let mut rep = Replayed::default();
        let mut segments = Vec::new();
        let mut metadata = None;
        let mut crc = 0u32;
        let count = names.len();
        for (i, (seq, path)) in names.into_iter().enumerate() {
            let last = i + 1 == count;
            let data = fs::read(&path)?;
            if i == 0 && is_old_format(&data) {
                return Err(WalError::OldFormat(dir.display().to_string()));
            }
            let decoded =
                decode_segment(&data, &mut crc).map_err(|(off, why)| corrupt(&path, off, why))?;
            if let Some((off, why)) = &decoded.torn_at {
                // Only the last segment can be torn: rotation synced the others whole.
                if !last {
                    return Err(corrupt(&path, *off, why.clone()));
                }
                tracing::warn!(file = %path.display(), offset = off, %why, "truncating torn WAL tail");
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(*off as u64)?;
                f.sync_all()?;
            }
            let mut last_index = 0;
            for rec in decoded.records {
                let bad = |why: String| corrupt(&path, 0, why);
                match rec.r#type {
                    ENTRY => {
                        let e = Entry::parse_from_bytes(&rec.data)?;
                        last_index = last_index.max(e.index);
                        if e.index > rep.snapshot.index {
                            let first = rep.entries.first().map(|f| f.index).unwrap_or(e.index);
                            if e.index < first {
                                rep.entries.clear();
                            } else {
                                // A rewritten index replaces everything after it.
                                rep.entries.truncate((e.index - first) as usize);
                            }
                            rep.entries.push(e);
                        }
                    }
                    STATE => {
                        let hs = HardState::parse_from_bytes(&rec.data)?;
                        if hs != HardState::default() {
                            rep.hard_state = hs;
                        }
                    }
                    SNAPSHOT => {
                        let s = parse_snapshot(&rec.data).map_err(bad)?;
                        if s.index >= rep.snapshot.index {
                            rep.entries.retain(|e| e.index > s.index);
                            rep.snapshot = s;
                        }
                    }
                    METADATA => {
                        let m = Metadata::decode(rec.data.as_slice())
                            .map_err(|e| bad(format!("metadata: {e}")))?;
                        if metadata.is_some_and(|old| old != m) {
                            return Err(bad("metadata differs between segments".into()));
                        }
                        metadata = Some(m);
                    }
                    CRC => {}
                    other => return Err(bad(format!("unknown record type {other}"))),
                }
            }
            segments.push(Segment {
                seq,
                path,
                last_index,
            });
        }
        if rep
            .entries
            .first()
            .is_some_and(|e| e.index != rep.snapshot.index + 1)
        {
            return Err(corrupt(
                dir,
                0,
                format!(
                    "gap in the log: snapshot at {} but first entry {}",
                    rep.snapshot.index, rep.entries[0].index
                ),
            ));
        }
        let Some(cur) = segments.last() else {
            return Err(corrupt(dir, 0, "no segment"));
        };
        let file = OpenOptions::new().append(true).open(&cur.path)?;
        let size = file.metadata()?.len();
        let wal = Wal {
            dir: dir.to_path_buf(),
            segments,
            file,
            size,
            buf: Vec::new(),
            crc,
            metadata: metadata.unwrap_or_default(),
            snapshot: rep.snapshot.clone(),
            hard_state: rep.hard_state.clone(),
            max_segments: DEFAULT_MAX_SEGMENTS,
        };
        Ok((wal, rep))
    }

    /// Completes or undoes a restart at a leader's snapshot that a crash interrupted. The new
    /// segment was synced before any old one was deleted: whole, it replaces them; torn (the
    /// crash came while writing it), the old segments are all still there.
    fn finish_reset(dir: &Path) -> Result<()> {
        let suffix = format!(".wal{RESET_SUFFIX}");
        let pending: Vec<PathBuf> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(&suffix))
            .collect();
        for tmp in pending {
            let data = fs::read(&tmp)?;
            let mut crc = 0;
            let whole = decode_segment(&data, &mut crc).is_ok_and(|d| {
                d.torn_at.is_none()
                    && d.records.iter().any(|r| r.r#type == SNAPSHOT)
                    && d.records.iter().any(|r| r.r#type == STATE)
            });
            if whole {
                for (_, old) in segment_files(dir)? {
                    fs::remove_file(old)?;
                }
                sync_dir(dir)?;
                let name = tmp.to_string_lossy();
                let final_name = PathBuf::from(&name[..name.len() - RESET_SUFFIX.len()]);
                fs::rename(&tmp, final_name)?;
                tracing::warn!(dir = %dir.display(), "finished an interrupted restart of the log at a snapshot");
            } else {
                fs::remove_file(&tmp)?;
            }
            sync_dir(dir)?;
        }
        Ok(())
    }

    /// Appends entries and hard state; durable after `sync`.
    pub fn append(&mut self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<()> {
        if self.size + self.buf.len() as u64 >= SEGMENT_BYTES {
            self.rotate()?;
        }
        for e in entries {
            let bytes = e.write_to_bytes()?;
            self.push(ENTRY, &bytes);
            if let Some(s) = self.segments.last_mut() {
                s.last_index = s.last_index.max(e.index);
            }
        }
        if let Some(hs) = hard_state {
            if *hs != self.hard_state {
                self.hard_state = hs.clone();
                let bytes = hs.write_to_bytes()?;
                self.push(STATE, &bytes);
            }
        }
        Ok(())
    }

    /// Writes buffered records and fdatasyncs: one fsync for a whole Ready.
    pub fn sync(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.buf)?;
        let fsync = crate::metrics::METRICS.wal_fsync.start_timer();
        self.file.sync_data()?;
        fsync.observe_duration();
        self.size += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    fn rotate(&mut self) -> Result<()> {
        self.sync()?;
        let seq = self.segments.last().map(|s| s.seq + 1).unwrap_or(0);
        let first = self.last_index() + 1;
        let path = self.dir.join(segment_name(seq, first));
        self.file = OpenOptions::new().create(true).append(true).open(&path)?;
        sync_dir(&self.dir)?;
        self.segments.push(Segment {
            seq,
            path,
            last_index: 0,
        });
        self.size = 0;
        self.write_segment_header()?;
        self.sync()
    }

    /// The state machine holds everything up to `index` durably: record the point (etcd's
    /// snapshot record) and delete the oldest segments that hold nothing after it while more
    /// than `max_segments` exist.
    pub fn release_to(&mut self, index: u64, term: u64, conf_state: &ConfState) -> Result<()> {
        if index <= self.snapshot.index {
            return Ok(());
        }
        self.snapshot.index = index;
        self.snapshot.term = term;
        self.snapshot.set_conf_state(conf_state.clone());
        let bytes = snapshot_bytes(&self.snapshot)?;
        self.push(SNAPSHOT, &bytes);
        self.sync()?;
        let mut removed = false;
        while self.max_segments > 0
            && self.segments.len() > self.max_segments
            && self.segments[0].last_index <= index
        {
            let s = self.segments.remove(0);
            fs::remove_file(&s.path)?;
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Restarts the log at a snapshot installed from the leader: everything before is gone,
    /// including entries after the snapshot point that the leader's log does not have.
    pub fn reset_to(&mut self, snapshot: SnapshotMetadata, hard_state: HardState) -> Result<()> {
        self.sync()?;
        let seq = self.segments.last().map(|s| s.seq + 1).unwrap_or(0);
        let path = self.dir.join(segment_name(seq, snapshot.index + 1));
        let tmp = PathBuf::from(format!("{}{RESET_SUFFIX}", path.display()));
        self.snapshot = snapshot;
        self.hard_state = hard_state;
        // A chain of its own: the segments it continues from are about to go.
        self.crc = 0;
        self.write_segment_header()?;
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(&self.buf)?;
        file.sync_all()?;
        self.size = self.buf.len() as u64;
        self.buf.clear();
        sync_dir(&self.dir)?;
        for s in std::mem::take(&mut self.segments) {
            fs::remove_file(&s.path)?;
        }
        sync_dir(&self.dir)?;
        fs::rename(&tmp, &path)?;
        sync_dir(&self.dir)?;
        self.file = OpenOptions::new().append(true).open(&path)?;
        self.segments.push(Segment {
            seq,
            path,
            last_index: self.snapshot.index,
        });
        Ok(())
    }

    pub fn last_index(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.last_index)
            .max()
            .unwrap_or(0)
            .max(self.snapshot.index)
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn snapshot(&self) -> &SnapshotMetadata {
        &self.snapshot
    }

    pub fn metadata(&self) -> Metadata {
        self.metadata
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = vec![index as u8; 10].into();
        e
    }

    const META: Metadata = Metadata {
        node_id: 0x11,
        cluster_id: 0x22,
    };

    fn hs(term: u64, commit: u64) -> HardState {
        let mut h = HardState::default();
        h.term = term;
        h.commit = commit;
        h
    }

    #[test]
    fn replays_entries_hard_state_and_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::create(dir.path(), SnapshotMetadata::default(), META).unwrap();
        w.append(&[entry(1, 1), entry(2, 1), entry(3, 1)], Some(&hs(1, 2)))
            .unwrap();
        w.sync().unwrap();
        // A new leader rewrites index 3 onwards.
        w.append(&[entry(3, 2), entry(4, 2)], Some(&hs(2, 4)))
            .unwrap();
        w.sync().unwrap();
        drop(w);
        let (_, rep) = Wal::open(dir.path()).unwrap();
        let got: Vec<(u64, u64)> = rep.entries.iter().map(|e| (e.index, e.term)).collect();
        assert_eq!(got, vec![(1, 1), (2, 1), (3, 2), (4, 2)]);
        assert_eq!(rep.hard_state, hs(2, 4));
    }

    #[test]
    fn torn_tail_is_truncated_but_corruption_in_the_middle_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::create(dir.path(), SnapshotMetadata::default(), META).unwrap();
        for i in 1..=5 {
            w.append(&[entry(i, 1)], Some(&hs(1, i))).unwrap();
            w.sync().unwrap();
        }
        drop(w);
        let seg = fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let good = fs::read(&seg).unwrap();

        // Torn tail: half a record at the end.
        let mut torn = good.clone();
        torn.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3]);
        fs::write(&seg, &torn).unwrap();
        let (_, rep) = Wal::open(dir.path()).unwrap();
        assert_eq!(rep.entries.len(), 5);
        assert_eq!(
            fs::read(&seg).unwrap(),
            good,
            "tail truncated to the last valid record"
        );

        // A flipped byte in the middle, valid records after it.
        let mut bad = good.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        fs::write(&seg, &bad).unwrap();
        let err = Wal::open(dir.path()).err().expect("corruption must fail");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn reset_drops_every_entry_before_and_after_the_snapshot_point() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::create(dir.path(), SnapshotMetadata::default(), META).unwrap();
        w.append(&[entry(1, 1), entry(2, 1), entry(3, 1)], Some(&hs(1, 1)))
            .unwrap();
        w.sync().unwrap();
        let mut meta = SnapshotMetadata::default();
        meta.index = 2;
        meta.term = 2;
        w.reset_to(meta, hs(2, 2)).unwrap();
        w.append(&[entry(3, 2)], None).unwrap();
        w.sync().unwrap();
        drop(w);
        let (_, rep) = Wal::open(dir.path()).unwrap();
        assert_eq!(rep.snapshot.index, 2);
        assert_eq!(
            rep.entries
                .iter()
                .map(|e| (e.index, e.term))
                .collect::<Vec<_>>(),
            vec![(3, 2)]
        );
        assert_eq!(rep.hard_state, hs(2, 2));
    }

    #[test]
    fn release_deletes_old_segments_and_keeps_later_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::create(dir.path(), SnapshotMetadata::default(), META).unwrap();
        w.append(&[entry(1, 1), entry(2, 1)], Some(&hs(1, 2)))
            .unwrap();
        w.sync().unwrap();
        w.release_to(2, 1, &ConfState::default()).unwrap();
        w.append(&[entry(3, 1)], Some(&hs(1, 3))).unwrap();
        w.sync().unwrap();
        assert_eq!(w.segment_count(), 1);
        drop(w);
        let (_, rep) = Wal::open(dir.path()).unwrap();
        assert_eq!(rep.snapshot.index, 2);
        assert_eq!(
            rep.entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![3]
        );
        assert_eq!(rep.hard_state, hs(1, 3));
    }

    /// The frames as etcd's decoder reads them: (type, data), checking alignment and the
    /// rolling CRC independently of the reader above.
    fn frames(data: &[u8]) -> Vec<(i64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 0;
        let mut crc = 0u32;
        while off < data.len() {
            let lf = u64::from_le_bytes(data[off..off + 8].try_into().unwrap());
            let len = (lf & 0x00ff_ffff_ffff_ffff) as usize;
            let pad = if lf >> 63 == 1 {
                ((lf >> 56) & 7) as usize
            } else {
                0
            };
            assert_eq!((len + pad) % 8, 0, "frames are 8-byte aligned");
            let r = walpb::Record::decode(&data[off + 8..off + 8 + len]).unwrap();
            if r.r#type == CRC {
                assert_eq!(r.crc, crc);
            } else {
                let mut h = Crc32c::resume(crc);
                h.update(&r.data);
                crc = h.finish();
                assert_eq!(r.crc, crc, "CRC-32C rolls across records");
            }
            out.push((r.r#type, r.data));
            off += 8 + len + pad;
        }
        out
    }

    #[test]
    fn writes_etcds_wal_layout() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::create(dir.path(), SnapshotMetadata::default(), META).unwrap();
        w.append(&[entry(1, 1), entry(2, 1)], Some(&hs(1, 2)))
            .unwrap();
        w.sync().unwrap();
        drop(w);
        let seg = dir.path().join("0000000000000000-0000000000000000.wal");
        let recs = frames(&fs::read(seg).unwrap());
        let types: Vec<i64> = recs.iter().map(|r| r.0).collect();
        assert_eq!(types, vec![CRC, METADATA, SNAPSHOT, ENTRY, ENTRY, STATE]);
        assert_eq!(Metadata::decode(recs[1].1.as_slice()).unwrap(), META);
        let snap = walpb::Snapshot::decode(recs[2].1.as_slice()).unwrap();
        assert_eq!((snap.index, snap.term), (0, 0));
        let e = Entry::parse_from_bytes(&recs[4].1).unwrap();
        assert_eq!((e.index, e.term, e.data.to_vec()), (2, 1, vec![2u8; 10]));
        let (w, _) = Wal::open(dir.path()).unwrap();
        assert_eq!(w.metadata(), META);
    }

    #[test]
    fn rotation_continues_the_crc_and_names_segments_by_first_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::create(dir.path(), SnapshotMetadata::default(), META).unwrap();
        w.append(&[entry(1, 1)], Some(&hs(1, 1))).unwrap();
        w.sync().unwrap();
        w.rotate().unwrap();
        w.append(&[entry(2, 1)], Some(&hs(1, 2))).unwrap();
        w.sync().unwrap();
        drop(w);
        let second = dir.path().join("0000000000000001-0000000000000002.wal");
        let first = dir.path().join("0000000000000000-0000000000000000.wal");
        let mut both = fs::read(&first).unwrap();
        both.extend(fs::read(&second).unwrap());
        let types: Vec<i64> = frames(&both).iter().map(|r| r.0).collect();
        assert_eq!(
            types,
            vec![
                CRC, METADATA, SNAPSHOT, ENTRY, STATE, CRC, METADATA, SNAPSHOT, STATE, ENTRY, STATE
            ]
        );
        let (_, rep) = Wal::open(dir.path()).unwrap();
        assert_eq!(
            rep.entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![1, 2]
        );
        // A segment that does not continue the chain is corruption, not a torn tail.
        fs::write(&first, fs::read(&second).unwrap()).unwrap();
        assert!(Wal::open(dir.path()).is_err());
    }

    #[test]
    fn release_keeps_max_segments_and_never_one_with_entries_after_the_point() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::create(dir.path(), SnapshotMetadata::default(), META).unwrap();
        w.set_max_segments(2);
        for i in 1..=4 {
            w.append(&[entry(i, 1)], Some(&hs(1, i))).unwrap();
            w.sync().unwrap();
            w.rotate().unwrap();
        }
        assert_eq!(w.segment_count(), 5);
        // Segment 2 holds entry 2, which the point at 1 does not cover.
        w.release_to(1, 1, &ConfState::default()).unwrap();
        assert_eq!(w.segment_count(), 4);
        w.release_to(4, 1, &ConfState::default()).unwrap();
        assert_eq!(w.segment_count(), 2);
        drop(w);
        let (_, rep) = Wal::open(dir.path()).unwrap();
        assert_eq!(rep.snapshot.index, 4);
        assert!(rep.entries.is_empty());
    }

    #[test]
    fn an_interrupted_reset_is_finished_when_whole_and_undone_when_torn() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::create(dir.path(), SnapshotMetadata::default(), META).unwrap();
        w.append(&[entry(1, 1), entry(2, 1)], Some(&hs(1, 1)))
            .unwrap();
        w.sync().unwrap();
        drop(w);
        let old = fs::read_dir(dir.path()).unwrap().count();
        // What reset_to leaves if the crash comes before it deletes anything.
        let mut meta = SnapshotMetadata::default();
        meta.index = 5;
        meta.term = 2;
        let scratch = tempfile::tempdir().unwrap();
        let mut tmp_wal = Wal::create(scratch.path(), SnapshotMetadata::default(), META).unwrap();
        tmp_wal.snapshot = meta;
        tmp_wal.hard_state = hs(2, 5);
        tmp_wal.crc = 0;
        tmp_wal.write_segment_header().unwrap();
        let whole = std::mem::take(&mut tmp_wal.buf);
        let tmp = dir
            .path()
            .join(format!("{}{RESET_SUFFIX}", segment_name(1, 6)));

        fs::write(&tmp, &whole[..whole.len() - 5]).unwrap();
        let (_, rep) = Wal::open(dir.path()).unwrap();
        assert_eq!(rep.entries.len(), 2, "a torn reset segment is dropped");
        assert!(!tmp.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), old);

        fs::write(&tmp, &whole).unwrap();
        let (_, rep) = Wal::open(dir.path()).unwrap();
        assert_eq!(rep.snapshot.index, 5);
        assert!(rep.entries.is_empty());
        assert_eq!(rep.hard_state, hs(2, 5));
        assert!(dir.path().join(segment_name(1, 6)).exists());
        assert!(!dir.path().join(segment_name(0, 0)).exists());
    }

    #[test]
    fn a_log_in_the_old_format_is_refused_with_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let payload = [3u8, 1, 2, 3];
        let mut old = (payload.len() as u32).to_le_bytes().to_vec();
        old.extend(crc32fast::hash(&payload).to_le_bytes());
        old.extend(payload);
        fs::write(dir.path().join(segment_name(0, 1)), old).unwrap();
        let err = Wal::open(dir.path()).err().expect("old format");
        assert!(err.to_string().contains("snapshot restore"), "{err}");
    }

    #[test]
    fn a_zeroed_sector_is_a_torn_write_and_other_damage_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::create(dir.path(), SnapshotMetadata::default(), META).unwrap();
        w.append(&[entry(1, 1)], Some(&hs(1, 1))).unwrap();
        w.sync().unwrap();
        let mut big = entry(2, 1);
        big.data = vec![7u8; 2000].into();
        w.append(&[big], Some(&hs(1, 2))).unwrap();
        w.sync().unwrap();
        drop(w);
        let seg = dir.path().join(segment_name(0, 0));
        let good = fs::read(&seg).unwrap();
        // The big entry's second sector never reached the disk.
        let mut torn = good.clone();
        for b in &mut torn[1024..1536] {
            *b = 0;
        }
        fs::write(&seg, &torn).unwrap();
        let (_, rep) = Wal::open(dir.path()).unwrap();
        assert_eq!(rep.entries.len(), 1);
        assert_eq!(rep.hard_state, hs(1, 1));
    }
}
