//! A read-only bbolt file reader: meta pages, branch and leaf pages, overflow, inline
//! buckets. Every offset is checked against the file, so a damaged file gives an error, never
//! a panic. (bbolt's layout: 16-byte page headers `id u64, flags u16, count u16, overflow
//! u32`; 16-byte elements; little-endian on every platform etcd runs on.)

use super::{Result, SnapshotError};
use std::path::Path;

const PAGE_HEADER: usize = 16;
const ELEMENT: usize = 16;
const BRANCH: u16 = 0x01;
const LEAF: u16 = 0x02;
const META: u16 = 0x04;
const BUCKET_LEAF_FLAG: u32 = 0x01;
const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
/// A B+tree deeper than this is a loop in a damaged file.
const MAX_DEPTH: usize = 64;

fn corrupt(what: impl Into<String>) -> SnapshotError {
    SnapshotError::Corrupt(what.into())
}

fn u16_at(b: &[u8], off: usize) -> Result<u16> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| corrupt("page header out of bounds"))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32> {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| corrupt("field out of bounds"))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64> {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| corrupt("field out of bounds"))
}

fn fnv1a64(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= *x as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

struct Meta {
    page_size: usize,
    root: u64,
    /// High-water mark: pages in use.
    pgid: u64,
    txid: u64,
}

/// Parses the meta page at `off`; None if it is not a valid meta page.
fn meta_at(data: &[u8], off: usize) -> Option<Meta> {
    let page = data.get(off..off + PAGE_HEADER + 64)?;
    if u16_at(page, 8).ok()? != META {
        return None;
    }
    let m = &page[PAGE_HEADER..];
    let magic = u32_at(m, 0).ok()?;
    let version = u32_at(m, 4).ok()?;
    let checksum = u64_at(m, 56).ok()?;
    if magic != MAGIC || version != VERSION || checksum != fnv1a64(&m[..56]) {
        return None;
    }
    Some(Meta {
        page_size: u32_at(m, 8).ok()? as usize,
        root: u64_at(m, 16).ok()?,
        pgid: u64_at(m, 40).ok()?,
        txid: u64_at(m, 48).ok()?,
    })
}

/// Called with each leaf element: (flags, key, value).
type Visit<'a> = dyn FnMut(u32, &[u8], &[u8]) -> Result<()> + 'a;

/// A bucket: its B+tree root page, or its inline page (small buckets live in their parent).
pub(super) enum Bucket {
    Root(u64),
    Inline(Vec<u8>),
}

pub(super) struct BoltFile {
    data: Vec<u8>,
    page_size: usize,
    pgid: u64,
    root: u64,
}

impl BoltFile {
    pub fn open(path: &Path) -> Result<BoltFile> {
        let data = std::fs::read(path)?;
        let m0 = meta_at(&data, 0);
        // Page 1 sits one page in; without a valid page 0, assume the usual 4 KiB pages.
        let size_guess = m0.as_ref().map(|m| m.page_size).unwrap_or(4096);
        let m1 = meta_at(&data, size_guess);
        let meta = match (m0, m1) {
            (Some(a), Some(b)) => {
                if b.txid > a.txid {
                    b
                } else {
                    a
                }
            }
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => {
                return Err(corrupt(
                    "not a bbolt database (no valid meta page): is this an etcd backup?",
                ))
            }
        };
        if !(512..=1 << 20).contains(&meta.page_size) {
            return Err(corrupt(format!("invalid page size {}", meta.page_size)));
        }
        if meta.pgid.saturating_mul(meta.page_size as u64) > data.len() as u64 {
            return Err(corrupt(format!(
                "file is truncated: the database spans {} bytes but the file has {}",
                meta.pgid * meta.page_size as u64,
                data.len()
            )));
        }
        Ok(BoltFile {
            page_size: meta.page_size,
            pgid: meta.pgid,
            root: meta.root,
            data,
        })
    }

    /// The database size as bbolt reports it (`tx.Size()`).
    pub fn size(&self) -> u64 {
        self.pgid * self.page_size as u64
    }

    /// The bytes of page `id` including its overflow pages.
    fn page(&self, id: u64) -> Result<&[u8]> {
        if id < 2 || id >= self.pgid {
            return Err(corrupt(format!("page {id} out of range")));
        }
        let start = id as usize * self.page_size;
        let overflow = u32_at(&self.data, start + 12)? as usize;
        let end = start + (1 + overflow) * self.page_size;
        if u64_at(&self.data, start)? != id {
            return Err(corrupt(format!("page {id} has a wrong id")));
        }
        self.data
            .get(start..end)
            .ok_or_else(|| corrupt(format!("page {id} runs past the end of the file")))
    }

    /// Visits every leaf element under a page in key order: (flags, key, value).
    fn walk(&self, page: &[u8], depth: usize, f: &mut Visit) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(corrupt("B+tree too deep (a loop in a damaged file)"));
        }
        let flags = u16_at(page, 8)?;
        let count = u16_at(page, 10)? as usize;
        for i in 0..count {
            let e = PAGE_HEADER + i * ELEMENT;
            match flags {
                BRANCH => {
                    let child = u64_at(page, e + 8)?;
                    let child = self.page(child)?;
                    self.walk(child, depth + 1, f)?;
                }
                LEAF => {
                    let eflags = u32_at(page, e)?;
                    let pos = u32_at(page, e + 4)? as usize;
                    let ksize = u32_at(page, e + 8)? as usize;
                    let vsize = u32_at(page, e + 12)? as usize;
                    let k0 = e + pos;
                    let (key, value) = page
                        .get(k0..k0 + ksize)
                        .zip(page.get(k0 + ksize..k0 + ksize + vsize))
                        .ok_or_else(|| corrupt("leaf element out of bounds"))?;
                    f(eflags, key, value)?;
                }
                other => return Err(corrupt(format!("unexpected page type {other:#x}"))),
            }
        }
        Ok(())
    }

    fn bucket_from_value(value: &[u8]) -> Result<Bucket> {
        let root = u64_at(value, 0)?;
        if root == 0 {
            let inline = value
                .get(PAGE_HEADER..)
                .ok_or_else(|| corrupt("inline bucket too short"))?;
            Ok(Bucket::Inline(inline.to_vec()))
        } else {
            Ok(Bucket::Root(root))
        }
    }

    /// The top-level buckets, in name order.
    pub fn buckets(&self) -> Result<Vec<(Vec<u8>, Bucket)>> {
        let mut out = Vec::new();
        let root = self.page(self.root)?;
        self.walk(root, 0, &mut |flags, k, v| {
            if flags & BUCKET_LEAF_FLAG == 0 {
                return Err(corrupt("a key outside any bucket"));
            }
            out.push((k.to_vec(), Self::bucket_from_value(v)?));
            Ok(())
        })?;
        Ok(out)
    }

    /// Visits a bucket's keys and values in order (nested buckets are skipped; etcd has none).
    pub fn for_each(
        &self,
        bucket: &Bucket,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        let page = match bucket {
            Bucket::Root(id) => self.page(*id)?,
            Bucket::Inline(p) => p.as_slice(),
        };
        self.walk(page, 0, &mut |flags, k, v| {
            if flags & BUCKET_LEAF_FLAG != 0 {
                return Ok(());
            }
            f(k, v)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.db");
        std::fs::write(&p, vec![0x5a; 3 * 4096]).unwrap();
        assert!(matches!(BoltFile::open(&p), Err(SnapshotError::Corrupt(_))));
        std::fs::write(&p, b"short").unwrap();
        assert!(matches!(BoltFile::open(&p), Err(SnapshotError::Corrupt(_))));
    }
}
