//! Test support: `Model`, a plain in-memory database (pages as byte vectors) that applies
//! writes, produces the corresponding `Record`s with correct `db_checksum`s, and yields the bytes a
//! rebuilt database file must have.

use crate::txlog::{Log, LogConfig, Meta, Page, Record, RecordMeta};
use crate::types::{page_checksum, Checksum, Generation, Lsn, PageNo, PageSize};
use std::path::Path;

pub const PS: u32 = 512;

pub fn ps() -> PageSize {
    PageSize::new(PS).unwrap()
}

pub fn pn(n: u32) -> PageNo {
    PageNo::new(n).unwrap()
}

/// Deterministic page contents.
pub fn page_bytes(page_size: PageSize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..page_size.bytes())
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Deterministic compressible contents: words in varying order, like rows of text.
pub fn text_page(page_size: PageSize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 8] = [
        "replica ",
        "commit ",
        "page ",
        "segment ",
        "user42 ",
        "2026-12-06 ",
        "error ",
        "ok ",
    ];
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(page_size.bytes());
    while out.len() < page_size.bytes() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.extend_from_slice(WORDS[(x >> 61) as usize].as_bytes());
    }
    out.truncate(page_size.bytes());
    out
}

#[derive(Clone)]
pub struct Model {
    pub page_size: PageSize,
    pub pages: Vec<Vec<u8>>,
    pub lsn: Lsn,
    pub generation: Generation,
    /// Write compressible (text-like) pages instead of random ones.
    pub text: bool,
    seed: u64,
}

impl Model {
    pub fn new(page_size: PageSize) -> Model {
        Model {
            page_size,
            pages: Vec::new(),
            lsn: Lsn(0),
            generation: Generation(1),
            text: false,
            seed: 1,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.pages.concat()
    }

    /// Full recompute of the database checksum (FORMAT.md §1).
    pub fn checksum(&self) -> Checksum {
        let lock = self.page_size.lock_byte_page().get();
        let mut x = 0;
        for (i, p) in self.pages.iter().enumerate() {
            let n = i as u32 + 1;
            if n != lock {
                x ^= page_checksum(pn(n), p).0;
            }
        }
        Checksum(x)
    }

    fn meta(&self, snapshot: bool, page_count: u32) -> RecordMeta {
        RecordMeta {
            lsn: self.lsn,
            generation: self.generation,
            snapshot,
            page_size: self.page_size,
            commit_size: self.pages.len() as u32,
            timestamp_ms: 1_700_000_000_000 + self.lsn.0,
            wal_salts: [self.lsn.0 as u8; 8],
            wal_frame: self.lsn.0 as u32 * 3,
            wal_cksum: (0xdead_0000 | self.lsn.0 as u32, 0xbeef),
            db_checksum: self.checksum(),
            page_count,
            epoch: crate::types::Epoch::FIRST,
        }
    }

    /// Writes fresh contents to `pgnos` (any order), resizes to `commit_size`, returns the record.
    pub fn txn(&mut self, pgnos: &[u32], commit_size: u32) -> Record {
        self.lsn = self.lsn.next();
        let mut sorted: Vec<u32> = pgnos
            .iter()
            .copied()
            .filter(|&n| n <= commit_size)
            .collect();
        sorted.sort_unstable();
        sorted.dedup();
        self.pages
            .resize(commit_size as usize, vec![0; self.page_size.bytes()]);
        let mut pages = Vec::new();
        for n in sorted {
            self.seed += 1;
            let data = if self.text {
                text_page(self.page_size, self.seed)
            } else {
                page_bytes(self.page_size, self.seed)
            };
            self.pages[n as usize - 1] = data.clone();
            pages.push(Page { pgno: pn(n), data });
        }
        Record {
            meta: self.meta(false, pages.len() as u32),
            pages,
        }
    }

    /// A SNAPSHOT record of the current state as the next LSN (optionally a new generation).
    pub fn snapshot_record(&mut self, new_generation: bool) -> Record {
        self.lsn = self.lsn.next();
        if new_generation {
            self.generation = Generation(self.generation.0 + 1);
        }
        self.snapshot_of_current()
    }

    /// A SNAPSHOT record of the current state at the current LSN (for snapshot files).
    pub fn snapshot_of_current(&self) -> Record {
        let pages: Vec<Page> = self
            .pages
            .iter()
            .enumerate()
            .map(|(i, d)| Page {
                pgno: pn(i as u32 + 1),
                data: d.clone(),
            })
            .collect();
        Record {
            meta: self.meta(true, pages.len() as u32),
            pages,
        }
    }
}

pub fn new_log(dir: &Path, segment_bytes: u64) -> Log {
    let meta = Meta::new("primary", ps()).unwrap();
    Log::create(
        dir,
        &meta,
        LogConfig {
            segment_bytes,
            ..LogConfig::default()
        },
    )
    .unwrap()
}

pub fn cfg(segment_bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes,
        ..LogConfig::default()
    }
}

/// The segment files of a log directory, sorted.
pub fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

pub fn err_text<T>(r: crate::error::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}
