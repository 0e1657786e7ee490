//! Write-ahead log of Raft entries and hard state.
//!
//! Segment files `<seq>-<first index>.wal` in `<data-dir>/member/wal`, each a sequence of
//! records `[len: u32 LE][crc32: u32 LE][type: u8][payload]` (crc over type + payload).
//! `save` appends one Ready's worth of records and fdatasyncs once (group commit). A new
//! segment starts with the current snapshot point and hard state, so older segments can be
//! deleted once the state they cover is durable elsewhere (`release_to`).
//! On open, a torn tail of the last segment is truncated; a bad record followed by a valid
//! one is corruption and a hard error.

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, SnapshotMetadata};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const HEADER: usize = 8;
/// Largest record accepted when reading: anything bigger is a corrupt length.
const MAX_RECORD: usize = 256 * 1024 * 1024;

const REC_ENTRY: u8 = 1;
const REC_HARD_STATE: u8 = 2;
const REC_SNAPSHOT: u8 = 3;
/// A snapshot point that replaces the whole log (a snapshot installed from the leader).
const REC_RESET: u8 = 4;

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
    snapshot: SnapshotMetadata,
    hard_state: HardState,
}

fn segment_name(seq: u64, first_index: u64) -> String {
    format!("{seq:016x}-{first_index:016x}.wal")
}

fn encode_record(buf: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let len = (payload.len() + 1) as u32;
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&h.finalize().to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(payload);
}

/// Parses the record at `off`; None when it is not a whole valid record.
fn parse_record(data: &[u8], off: usize) -> std::result::Result<(u8, &[u8], usize), String> {
    if data.len() - off < HEADER {
        return Err("truncated header".into());
    }
    let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap_or_default()) as usize;
    let crc = u32::from_le_bytes(data[off + 4..off + 8].try_into().unwrap_or_default());
    if len == 0 || len > MAX_RECORD {
        return Err(format!("bad record length {len}"));
    }
    if data.len() - off - HEADER < len {
        return Err("truncated record".into());
    }
    let body = &data[off + HEADER..off + HEADER + len];
    if crc32fast::hash(body) != crc {
        return Err("crc mismatch".into());
    }
    Ok((body[0], &body[1..], off + HEADER + len))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Wal {
    pub fn exists(dir: &Path) -> bool {
        fs::read_dir(dir)
            .map(|mut d| {
                d.any(|e| {
                    e.map(|e| e.path().extension().is_some_and(|x| x == "wal"))
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false)
    }

    /// Creates a new log whose history starts at `snapshot` (index 0 for a new member).
    pub fn create(dir: &Path, snapshot: SnapshotMetadata) -> Result<Wal> {
        fs::create_dir_all(dir)?;
        let mut wal = Wal::open_segment(
            dir,
            0,
            snapshot.index + 1,
            Vec::new(),
            snapshot,
            HardState::default(),
        )?;
        wal.write_segment_header()?;
        wal.sync()?;
        Ok(wal)
    }

    fn open_segment(
        dir: &Path,
        seq: u64,
        first_index: u64,
        mut segments: Vec<Segment>,
        snapshot: SnapshotMetadata,
        hard_state: HardState,
    ) -> Result<Wal> {
        let path = dir.join(segment_name(seq, first_index));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        sync_dir(dir)?;
        segments.push(Segment {
            seq,
            path,
            last_index: 0,
        });
        Ok(Wal {
            dir: dir.to_path_buf(),
            segments,
            file,
            size: 0,
            buf: Vec::new(),
            snapshot,
            hard_state,
        })
    }

    fn write_segment_header(&mut self) -> Result<()> {
        let snap = self.snapshot.write_to_bytes()?;
        encode_record(&mut self.buf, REC_SNAPSHOT, &snap);
        if self.hard_state != HardState::default() {
            let hs = self.hard_state.write_to_bytes()?;
            encode_record(&mut self.buf, REC_HARD_STATE, &hs);
        }
        Ok(())
    }

    /// Opens an existing log and replays it.
    pub fn open(dir: &Path) -> Result<(Wal, Replayed)> {
        let mut names: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .filter_map(|p| {
                let stem = p.file_stem()?.to_str()?.to_string();
                let seq = u64::from_str_radix(stem.split('-').next()?, 16).ok()?;
                Some((seq, p))
            })
            .collect();
        names.sort();
        let mut rep = Replayed::default();
        let mut segments = Vec::new();
        let count = names.len();
        for (i, (seq, path)) in names.into_iter().enumerate() {
            let last = i + 1 == count;
            let mut data = Vec::new();
            File::open(&path)?.read_to_end(&mut data)?;
            let mut off = 0;
            let mut last_index = 0;
            while off < data.len() {
                match parse_record(&data, off) {
                    Ok((kind, payload, next)) => {
                        match kind {
                            REC_ENTRY => {
                                let e = Entry::parse_from_bytes(payload)?;
                                last_index = last_index.max(e.index);
                                if e.index <= rep.snapshot.index {
                                    // already covered by the snapshot point
                                } else {
                                    let first =
                                        rep.entries.first().map(|f| f.index).unwrap_or(e.index);
                                    if e.index < first {
                                        rep.entries.clear();
                                    } else {
                                        // A rewritten index replaces everything after it.
                                        rep.entries.truncate((e.index - first) as usize);
                                    }
                                    rep.entries.push(e);
                                }
                            }
                            REC_HARD_STATE => {
                                rep.hard_state = HardState::parse_from_bytes(payload)?
                            }
                            REC_SNAPSHOT => {
                                let s = SnapshotMetadata::parse_from_bytes(payload)?;
                                rep.entries.retain(|e| e.index > s.index);
                                rep.snapshot = s;
                            }
                            REC_RESET => {
                                rep.entries.clear();
                                rep.snapshot = SnapshotMetadata::parse_from_bytes(payload)?;
                            }
                            other => {
                                return Err(WalError::Corrupt {
                                    file: path.display().to_string(),
                                    offset: off as u64,
                                    why: format!("unknown record type {other}"),
                                })
                            }
                        }
                        off = next;
                    }
                    Err(why) => {
                        let corrupt = WalError::Corrupt {
                            file: path.display().to_string(),
                            offset: off as u64,
                            why: why.clone(),
                        };
                        if !last || Self::valid_record_follows(&data, off) {
                            return Err(corrupt);
                        }
                        tracing::warn!(file = %path.display(), offset = off, %why, "truncating torn WAL tail");
                        let f = OpenOptions::new().write(true).open(&path)?;
                        f.set_len(off as u64)?;
                        f.sync_all()?;
                        data.truncate(off);
                        break;
                    }
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
            return Err(WalError::Corrupt {
                file: dir.display().to_string(),
                offset: 0,
                why: format!(
                    "gap in the log: snapshot at {} but first entry {}",
                    rep.snapshot.index, rep.entries[0].index
                ),
            });
        }
        let Some(cur) = segments.last() else {
            return Err(WalError::Corrupt {
                file: dir.display().to_string(),
                offset: 0,
                why: "no segment".into(),
            });
        };
        let file = OpenOptions::new().append(true).open(&cur.path)?;
        let size = file.metadata()?.len();
        let wal = Wal {
            dir: dir.to_path_buf(),
            segments,
            file,
            size,
            buf: Vec::new(),
            snapshot: rep.snapshot.clone(),
            hard_state: rep.hard_state.clone(),
        };
        Ok((wal, rep))
    }

    /// Is there any valid record after the bad one at `off`? Then the damage is not a torn
    /// tail but corruption. Every later offset is tried, since a damaged length field hides
    /// where the next record starts (a false crc match is a 1 in 2^32 event).
    fn valid_record_follows(data: &[u8], off: usize) -> bool {
        (off + 1..data.len().saturating_sub(HEADER)).any(|o| parse_record(data, o).is_ok())
    }

    /// Appends entries and hard state; durable after `sync`.
    pub fn append(&mut self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<()> {
        if self.size + self.buf.len() as u64 >= SEGMENT_BYTES {
            self.rotate()?;
        }
        for e in entries {
            let bytes = e.write_to_bytes()?;
            encode_record(&mut self.buf, REC_ENTRY, &bytes);
            if let Some(s) = self.segments.last_mut() {
                s.last_index = s.last_index.max(e.index);
            }
        }
        if let Some(hs) = hard_state {
            if *hs != self.hard_state {
                self.hard_state = hs.clone();
                let bytes = hs.write_to_bytes()?;
                encode_record(&mut self.buf, REC_HARD_STATE, &bytes);
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
        let first = self.segments.last().map(|s| s.last_index + 1).unwrap_or(1);
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

    /// The state machine holds everything up to `index` durably: start a new segment that
    /// records this point and delete the segments holding nothing after it.
    pub fn release_to(&mut self, index: u64, term: u64, conf_state: &ConfState) -> Result<()> {
        if index <= self.snapshot.index {
            return Ok(());
        }
        self.snapshot.index = index;
        self.snapshot.term = term;
        self.snapshot.set_conf_state(conf_state.clone());
        self.rotate()?;
        let cur = self.segments.len() - 1;
        let mut kept = Vec::new();
        for (i, s) in std::mem::take(&mut self.segments).into_iter().enumerate() {
            if i < cur && s.last_index <= index {
                fs::remove_file(&s.path)?;
            } else {
                kept.push(s);
            }
        }
        self.segments = kept;
        sync_dir(&self.dir)?;
        Ok(())
    }

    /// Restarts the log at a snapshot installed from the leader: everything before is gone,
    /// including entries after the snapshot point that the leader's log does not have.
    pub fn reset_to(&mut self, snapshot: SnapshotMetadata, hard_state: HardState) -> Result<()> {
        self.sync()?;
        let seq = self.segments.last().map(|s| s.seq + 1).unwrap_or(0);
        let path = self.dir.join(segment_name(seq, snapshot.index + 1));
        self.file = OpenOptions::new().create(true).append(true).open(&path)?;
        let bytes = snapshot.write_to_bytes()?;
        encode_record(&mut self.buf, REC_RESET, &bytes);
        let hs = hard_state.write_to_bytes()?;
        encode_record(&mut self.buf, REC_HARD_STATE, &hs);
        self.size = 0;
        self.sync()?;
        sync_dir(&self.dir)?;
        for s in std::mem::take(&mut self.segments) {
            fs::remove_file(&s.path)?;
        }
        sync_dir(&self.dir)?;
        self.segments.push(Segment {
            seq,
            path,
            last_index: snapshot.index,
        });
        self.snapshot = snapshot;
        self.hard_state = hard_state;
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

    fn hs(term: u64, commit: u64) -> HardState {
        let mut h = HardState::default();
        h.term = term;
        h.commit = commit;
        h
    }

    #[test]
    fn replays_entries_hard_state_and_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::create(dir.path(), SnapshotMetadata::default()).unwrap();
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
        let mut w = Wal::create(dir.path(), SnapshotMetadata::default()).unwrap();
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
        let mut w = Wal::create(dir.path(), SnapshotMetadata::default()).unwrap();
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
        let mut w = Wal::create(dir.path(), SnapshotMetadata::default()).unwrap();
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
}
