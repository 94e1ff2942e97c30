//! The bucket's manifest (FORMAT.md §9.3): the one object of a backup prefix that changes. It
//! lists every immutable object (snapshots and log chunks) with its LSN range, commit-time
//! range, generation, epoch and checksums, and names the uploader that wrote it. Pure: encoding,
//! decoding, lookups, the chain check and the retention plan, all unit-tested; the network is
//! elsewhere (`client.rs`, `upload.rs`, `source.rs`).

use crate::error::{Error, Result};
use crate::types::{Checksum, Epoch, Generation, Lsn};
use serde_json::{json, Value};

/// Name of the manifest object under the prefix.
pub const MANIFEST: &str = "manifest.json";
/// The manifest format this build writes and reads.
pub const MANIFEST_FORMAT: u64 = 1;

/// One immutable object: a snapshot file or a log chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    /// Name under the prefix (`snap/…snap` or `log/…seg`).
    pub key: String,
    /// First and last LSN held (a snapshot: both its LSN).
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    /// Generation and epoch of the last record.
    pub generation: Generation,
    pub epoch: Epoch,
    /// Commit times (Unix ms) of the first and last record held.
    pub first_ms: u64,
    pub last_ms: u64,
    /// Stored bytes (sealed when encrypted) and their xxh3-64.
    pub bytes: u64,
    pub xxh3: u64,
    /// Database checksum after the last record.
    pub db_checksum: Checksum,
}

/// The manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub lineage: String,
    pub epoch: Epoch,
    pub page_size: u32,
    /// The uploader that wrote this version (random per uploader start).
    pub writer: String,
    /// Where that uploader runs (host and pid), for error messages only.
    pub writer_host: String,
    /// Which log directory that uploader served (`boot id:device:inode`; empty when unknown):
    /// an uploader of the same directory holds its `backup.lock`, so the one named here is
    /// gone and need not be waited for (FORMAT.md §9.3).
    pub writer_dir: String,
    pub updated_ms: u64,
    /// Encrypted objects: the key check (hex of an AEAD seal of a fixed text; `crypt.rs`).
    pub key_check: Option<String>,
    /// Sorted by LSN.
    pub snapshots: Vec<Object>,
    /// Sorted by LSN, each run contiguous (FORMAT.md §9.4).
    pub chunks: Vec<Object>,
}

impl Object {
    /// The entry of an object holding the records `first..=last` (a snapshot: both its
    /// record), stored as `bytes` bytes whose xxh3-64 is `xxh3`.
    pub fn of_records(
        key: String,
        first: &crate::txlog::RecordMeta,
        last: &crate::txlog::RecordMeta,
        bytes: u64,
        xxh3: u64,
    ) -> Object {
        Object {
            key,
            first_lsn: first.lsn,
            last_lsn: last.lsn,
            generation: last.generation,
            epoch: last.epoch,
            first_ms: first.timestamp_ms,
            last_ms: last.timestamp_ms,
            bytes,
            xxh3,
            db_checksum: last.db_checksum,
        }
    }
}

/// Object key of a chunk holding `first..=last`.
pub fn chunk_key(first: Lsn, last: Lsn) -> String {
    format!("log/{:020}-{:020}.seg", first.0, last.0)
}

/// Object key of a snapshot (the local file name, FORMAT.md §2).
pub fn snapshot_key(lsn: Lsn, generation: Generation) -> String {
    format!("snap/{}", crate::txlog::snapshot_file_name(lsn, generation))
}

fn obj_json(o: &Object) -> Value {
    json!({
        "key": o.key, "first_lsn": o.first_lsn.0, "last_lsn": o.last_lsn.0,
        "generation": o.generation.0, "epoch": o.epoch.0,
        "first_ms": o.first_ms, "last_ms": o.last_ms, "bytes": o.bytes,
        "xxh3": format!("{:016x}", o.xxh3), "db_checksum": format!("{:016x}", o.db_checksum.0),
    })
}

fn obj_from(v: &Value, what: &str) -> Result<Object> {
    let bad = |f: &str| Error::Corrupt(format!("{what}: field {f:?} missing or invalid"));
    let u = |f: &str| v.get(f).and_then(Value::as_u64).ok_or_else(|| bad(f));
    let h = |f: &str| {
        v.get(f)
            .and_then(Value::as_str)
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or_else(|| bad(f))
    };
    let key = v
        .get("key")
        .and_then(Value::as_str)
        .filter(|k| valid_key(k))
        .ok_or_else(|| bad("key"))?
        .to_string();
    let o = Object {
        key,
        first_lsn: Lsn(u("first_lsn")?),
        last_lsn: Lsn(u("last_lsn")?),
        generation: Generation(u32::try_from(u("generation")?).map_err(|_| bad("generation"))?),
        epoch: Epoch(u32::try_from(u("epoch")?).map_err(|_| bad("epoch"))?),
        first_ms: u("first_ms")?,
        last_ms: u("last_ms")?,
        bytes: u("bytes")?,
        xxh3: h("xxh3")?,
        db_checksum: Checksum(h("db_checksum")?),
    };
    if o.last_lsn < o.first_lsn {
        return Err(bad("last_lsn"));
    }
    Ok(o)
}

/// Keys are ours (`snap/` or `log/` plus a file name): never a path that climbs out.
fn valid_key(k: &str) -> bool {
    (k.starts_with("snap/") || k.starts_with("log/"))
        && !k.contains("..")
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-._".contains(&b))
}

impl Manifest {
    pub fn new(lineage: &str, epoch: Epoch, page_size: u32, writer: &str, host: &str) -> Manifest {
        Manifest {
            lineage: lineage.to_string(),
            epoch,
            page_size,
            writer: writer.to_string(),
            writer_host: host.to_string(),
            writer_dir: String::new(),
            updated_ms: 0,
            key_check: None,
            snapshots: Vec::new(),
            chunks: Vec::new(),
        }
    }

    pub fn to_json(&self) -> String {
        let v = json!({
            "format": MANIFEST_FORMAT,
            "lineage": self.lineage,
            "epoch": self.epoch.0,
            "page_size": self.page_size,
            "writer": self.writer,
            "writer_host": self.writer_host,
            "writer_dir": self.writer_dir,
            "updated_ms": self.updated_ms,
            "key_check": self.key_check,
            "last_lsn": self.last_lsn().map(|l| l.0),
            "snapshots": self.snapshots.iter().map(obj_json).collect::<Vec<_>>(),
            "chunks": self.chunks.iter().map(obj_json).collect::<Vec<_>>(),
        });
        serde_json::to_string_pretty(&v).expect("serialisable") + "\n"
    }

    /// Decodes and checks a manifest (`what` names it in errors).
    pub fn from_json(text: &[u8], what: &str) -> Result<Manifest> {
        let v: Value = serde_json::from_slice(text)
            .map_err(|e| Error::Corrupt(format!("{what} is not valid JSON ({e})")))?;
        let bad = |f: &str| Error::Corrupt(format!("{what}: field {f:?} missing or invalid"));
        let format = v
            .get("format")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("format"))?;
        if format != MANIFEST_FORMAT {
            return Err(Error::Unsupported(format!(
                "{what}: manifest format {format} is not supported by this build (it reads {MANIFEST_FORMAT}); upgrade sqlite-replica"
            )));
        }
        let s = |f: &str| {
            v.get(f)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(f))
        };
        let list = |f: &str| -> Result<Vec<Object>> {
            let a = v.get(f).and_then(Value::as_array).ok_or_else(|| bad(f))?;
            a.iter()
                .enumerate()
                .map(|(i, o)| obj_from(o, &format!("{what}: {f}[{i}]")))
                .collect()
        };
        let m = Manifest {
            lineage: s("lineage")?,
            epoch: Epoch(
                v.get("epoch")
                    .and_then(Value::as_u64)
                    .and_then(|e| u32::try_from(e).ok())
                    .ok_or_else(|| bad("epoch"))?,
            ),
            page_size: v
                .get("page_size")
                .and_then(Value::as_u64)
                .and_then(|e| u32::try_from(e).ok())
                .ok_or_else(|| bad("page_size"))?,
            writer: s("writer")?,
            writer_host: s("writer_host").unwrap_or_default(),
            writer_dir: s("writer_dir").unwrap_or_default(),
            updated_ms: v.get("updated_ms").and_then(Value::as_u64).unwrap_or(0),
            key_check: v
                .get("key_check")
                .and_then(Value::as_str)
                .map(str::to_string),
            snapshots: list("snapshots")?,
            chunks: list("chunks")?,
        };
        m.check_chain()
            .map_err(|e| Error::Corrupt(format!("{what}: {e}")))?;
        Ok(m)
    }

    /// The newest LSN a restore can reach (None: nothing uploaded yet).
    pub fn last_lsn(&self) -> Option<Lsn> {
        let s = self.snapshots.last().map(|s| s.last_lsn);
        let c = self.chunks.last().map(|c| c.last_lsn);
        s.max(c)
    }

    /// The oldest LSN whose record is held (a replica behind it re-snapshots).
    pub fn first_record_lsn(&self) -> Option<Lsn> {
        self.chunks.first().map(|c| c.first_lsn)
    }

    /// The newest snapshot at or before `at` (None = the newest).
    pub fn snapshot_at_or_before(&self, at: Option<Lsn>) -> Option<&Object> {
        self.snapshots
            .iter()
            .rev()
            .find(|s| at.is_none_or(|a| s.first_lsn <= a))
    }

    /// The chunk holding `lsn`.
    pub fn chunk_for(&self, lsn: Lsn) -> Option<&Object> {
        let i = self.chunks.partition_point(|c| c.last_lsn < lsn);
        self.chunks.get(i).filter(|c| c.first_lsn <= lsn)
    }

    /// The chunk whose records decide which is the last transaction committed at or before
    /// `ms`: the last one that starts at or before it (None: every chunk starts later).
    pub fn chunk_at_time(&self, ms: u64) -> Option<&Object> {
        self.chunks.iter().rev().find(|c| c.first_ms <= ms)
    }

    /// The chain rule (FORMAT.md §9.4): snapshots and chunks sorted, chunks never overlap, and
    /// where one run of chunks ends and another begins, a snapshot at the LSN just before the
    /// new run covers the break. `Err` names the object.
    pub fn check_chain(&self) -> std::result::Result<(), String> {
        for w in self.snapshots.windows(2) {
            if w[1].first_lsn <= w[0].first_lsn {
                return Err(format!(
                    "snapshot {} is not after snapshot {}",
                    w[1].key, w[0].key
                ));
            }
        }
        for w in self.chunks.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            if b.first_lsn == a.last_lsn.next() {
                continue;
            }
            if b.first_lsn <= a.last_lsn {
                return Err(format!("chunk {} overlaps chunk {}", b.key, a.key));
            }
            let covered = self
                .snapshots
                .iter()
                .any(|s| s.first_lsn.next() == b.first_lsn);
            if !covered {
                return Err(format!(
                    "gap: LSN {}..{} is missing between chunk {} and chunk {}, and no snapshot at LSN {} covers it",
                    a.last_lsn.next(),
                    Lsn(b.first_lsn.0 - 1),
                    a.key,
                    b.key,
                    Lsn(b.first_lsn.0 - 1)
                ));
            }
        }
        if let (Some(c), Some(s)) = (self.chunks.first(), self.snapshots.first()) {
            if c.first_lsn > s.first_lsn.next()
                && !self
                    .snapshots
                    .iter()
                    .any(|x| x.first_lsn.next() == c.first_lsn)
            {
                return Err(format!(
                    "gap: the first chunk {} starts at LSN {} but no snapshot is at LSN {}",
                    c.key,
                    c.first_lsn,
                    Lsn(c.first_lsn.0 - 1)
                ));
            }
        }
        Ok(())
    }

    /// Chunk compaction (FORMAT.md §9.7): the first run of at least 2 contiguous chunks, each
    /// under half of `target` bytes and together at most `target`, that is `min_chunks` long
    /// or holds at least half of `target`, leaving the newest `keep_newest` chunks alone (the
    /// ones followers read). None: nothing worth merging.
    pub fn plan_compaction(
        &self,
        min_chunks: usize,
        target: u64,
        keep_newest: usize,
    ) -> Option<std::ops::Range<usize>> {
        let n = self.chunks.len().saturating_sub(keep_newest);
        let small = |c: &Object| c.bytes < target / 2;
        let (mut s, mut total) = (0usize, 0u64);
        for j in 0..n {
            let c = &self.chunks[j];
            if j > s {
                let contiguous = c.first_lsn == self.chunks[j - 1].last_lsn.next();
                let fits = total + c.bytes <= target;
                if contiguous && small(c) && fits {
                    total += c.bytes;
                    continue;
                }
                if j - s >= 2 && (j - s >= min_chunks || total * 2 >= target) {
                    return Some(s..j);
                }
                s = j;
            }
            if small(c) {
                total = c.bytes;
            } else {
                s = j + 1;
                total = 0;
            }
        }
        (n > s + 1 && (n - s >= min_chunks || total * 2 >= target)).then_some(s..n)
    }

    /// Retention (FORMAT.md §9.5): keeps every object needed to restore any point of the last
    /// `retain_ms` before `now_ms`. The base is the newest snapshot committed at or before the
    /// window's start; objects wholly before it are removed from the manifest and returned (to
    /// be deleted once the manifest without them is written). Nothing goes while no snapshot
    /// old enough exists, so an object is deleted only when a newer snapshot covers it.
    pub fn plan_retention(&mut self, now_ms: u64, retain_ms: u64) -> Vec<String> {
        if retain_ms == 0 {
            return Vec::new();
        }
        let start = now_ms.saturating_sub(retain_ms);
        let Some(base) = self
            .snapshots
            .iter()
            .rev()
            .find(|s| s.last_ms <= start)
            .map(|s| s.first_lsn)
        else {
            return Vec::new();
        };
        let mut gone = Vec::new();
        self.snapshots.retain(|s| {
            let keep = s.first_lsn >= base;
            if !keep {
                gone.push(s.key.clone());
            }
            keep
        });
        self.chunks.retain(|c| {
            let keep = c.last_lsn > base;
            if !keep {
                gone.push(c.key.clone());
            }
            keep
        });
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(a: u64, b: u64, ms: u64) -> Object {
        Object {
            key: chunk_key(Lsn(a), Lsn(b)),
            first_lsn: Lsn(a),
            last_lsn: Lsn(b),
            generation: Generation(1),
            epoch: Epoch(1),
            first_ms: ms,
            last_ms: ms + 10,
            bytes: 100,
            xxh3: 0xabc,
            db_checksum: Checksum(7),
        }
    }

    fn snap(l: u64, ms: u64) -> Object {
        Object {
            key: snapshot_key(Lsn(l), Generation(1)),
            ..chunk(l, l, ms)
        }
    }

    fn manifest() -> Manifest {
        let mut m = Manifest::new("lin", Epoch(1), 4096, "w1", "h");
        m.snapshots = vec![snap(0, 0), snap(20, 2000)];
        m.chunks = vec![chunk(1, 10, 1000), chunk(11, 20, 1500), chunk(21, 30, 3000)];
        m
    }

    #[test]
    fn round_trip_and_lookups() {
        let m = manifest();
        let back = Manifest::from_json(m.to_json().as_bytes(), "m").unwrap();
        assert_eq!(back, m);
        assert_eq!(m.last_lsn(), Some(Lsn(30)));
        assert_eq!(m.first_record_lsn(), Some(Lsn(1)));
        assert_eq!(m.chunk_for(Lsn(11)).unwrap().first_lsn, Lsn(11));
        assert_eq!(m.chunk_for(Lsn(30)).unwrap().first_lsn, Lsn(21));
        assert!(m.chunk_for(Lsn(31)).is_none());
        assert_eq!(
            m.snapshot_at_or_before(Some(Lsn(19))).unwrap().first_lsn,
            Lsn(0)
        );
        assert_eq!(m.snapshot_at_or_before(None).unwrap().first_lsn, Lsn(20));
        assert_eq!(m.chunk_at_time(1600).unwrap().first_lsn, Lsn(11));
        assert!(m.chunk_at_time(999).is_none());
    }

    #[test]
    fn chain_gaps_are_named() {
        let mut m = manifest();
        m.chunks.remove(1);
        // 11..20 missing, but the snapshot at 20 covers the restart at 21.
        assert!(m.check_chain().is_ok());
        m.snapshots.pop();
        let e = m.check_chain().unwrap_err();
        assert!(e.contains("LSN 11..20 is missing"), "{e}");
        assert!(
            e.contains("log/00000000000000000021-00000000000000000030.seg"),
            "{e}"
        );
        let mut m = manifest();
        m.chunks[1].first_lsn = Lsn(10);
        assert!(m.check_chain().unwrap_err().contains("overlaps"));
        let text = manifest().to_json().replace("\"log/", "\"../");
        assert!(Manifest::from_json(text.as_bytes(), "m").is_err());
        assert!(Manifest::from_json(b"{}", "m").is_err());
    }

    #[test]
    fn compaction_plans_contiguous_small_runs() {
        let mut m = Manifest::new("lin", Epoch(1), 4096, "w1", "h");
        m.snapshots = vec![snap(0, 0), snap(40, 0)];
        // 1..=10 small, 11..=12 big, 13..=20 small, then a break (bridged by the snapshot at
        // 40), 41..=60 small.
        let mut c = |a: u64, b: u64, bytes: u64| {
            let mut o = chunk(a, b, 0);
            o.bytes = bytes;
            m.chunks.push(o);
        };
        for i in 1..=10 {
            c(i, i, 10);
        }
        c(11, 12, 600);
        for i in 13..=20 {
            c(i, i, 10);
        }
        for i in 41..=60 {
            c(i, i, 10);
        }
        assert!(m.check_chain().is_ok());
        // Runs of at least 10: 1..=10 (indices 0..10); the big chunk and the break split runs.
        assert_eq!(m.plan_compaction(10, 1000, 4), Some(0..10));
        assert_eq!(m.plan_compaction(11, 1000, 4), Some(19..35));
        // The newest chunks are left alone: 41..=60 minus 15 kept is 5 long.
        assert_eq!(m.plan_compaction(11, 1000, 15), None);
        // Cut by size: 100 bytes hold 10 chunks of 10.
        assert_eq!(m.plan_compaction(50, 100, 0), Some(0..10));
        assert_eq!(m.plan_compaction(50, 1000, 0), None);
    }

    #[test]
    fn retention_keeps_what_the_window_needs() {
        let mut m = manifest();
        // Window starts at 1500: no snapshot newer than LSN 0 is that old: nothing goes.
        assert!(m.plan_retention(2500, 1000).is_empty());
        assert!(m.plan_retention(10_000, 0).is_empty());
        // Window starts at 2500: the snapshot at 20 (ms 2000) is the base.
        let gone = m.plan_retention(3500, 1000);
        assert_eq!(gone.len(), 3, "{gone:?}");
        assert_eq!(m.snapshots.len(), 1);
        assert_eq!(m.chunks.len(), 1);
        assert!(m.check_chain().is_ok());
        assert_eq!(m.last_lsn(), Some(Lsn(30)));
    }
}
