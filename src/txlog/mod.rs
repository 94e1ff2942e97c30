//! The replication log (pure Rust, no `unsafe`): the record and snapshot format, segment files,
//! the durable watermark, retention, verification and offline rebuild. `docs/FORMAT.md` is the
//! specification and the sub-modules mirror its sections:
//!
//! - `record`: one record = one primary transaction or a whole-database snapshot (§3);
//! - `segment`: segment files, their header, and the streaming scanner (§4);
//! - `log`: the `Log` handle: open/create, tail discovery, append, roll, sync;
//! - `retention`: removing old segments and snapshot files;
//! - `iter`: `read_from` iterators for readers;
//! - `snapshot`: snapshot files (§5);
//! - `meta`: `meta.json` (§6), the durable watermark (§7) and small fs helpers;
//! - `checksum`: `DbChecksum`, the incrementally maintained database checksum;
//! - `rebuild` / `verify`: offline tools used by the `sqlite-replica` CLI;
//! - `compress`: page compression (§3.7), the `compress` setting's codecs;
//! - `compact`: a new snapshot file built from the log alone (the primary's periodic snapshots);
//! - `fuzzing`: the single entry point shared by the fuzz target and the seed-corpus test.
//!
//! Invariants kept here (and re-checked by `verify`): LSNs are dense and increasing; a
//! generation increase happens only at a SNAPSHOT record; rolled segments never change; a torn
//! tail exists only at the end of the last segment and is truncated only by a writer, never
//! below the durable watermark.

#![forbid(unsafe_code)]

pub mod acks;
mod checksum;
mod compact;
mod compress;
mod fuzzing;
mod iter;
mod log;
mod meta;
mod rebuild;
mod record;
mod retention;
mod segment;
mod snapshot;
mod verify;

#[cfg(test)]
mod tests;

use crate::types::{Checksum, Epoch, Generation, Lsn, PageNo, PageSize};
use std::path::PathBuf;

/// The directory holding the replication state of the database at `db_path`:
/// `<db>-replica/` (a primary's log, or a replica's position and metadata).
pub fn log_dir(db_path: &str) -> PathBuf {
    PathBuf::from(format!("{db_path}-replica"))
}

pub use checksum::DbChecksum;
pub use compact::{compact, write_streamed};
pub use compress::{
    compress_page, decompress_page, Compression, CODEC_LZ4, CODEC_ZSTD, DEFAULT_ZSTD_LEVEL,
};
pub use fuzzing::exercise_decoders;
pub use iter::{LogIter, LogMetaIter, ReadHint, RecordRange};
pub use log::{Log, LogConfig, PendingSync};
pub use meta::{
    raise_fence, read_fence, sync_dir, write_and_sync as write_file_synced, DurableFile, Fence,
    Meta, DIR_FORMAT_EPOCH,
};
pub use rebuild::{rebuild, RebuildInfo};
pub use record::{
    decode_record, decode_record_meta, encode_record, encode_record_with, record_codec, record_len,
    validate_record, FLAG_COMPRESSED, FLAG_SNAPSHOT, RECORD_HEADER_LEN, RECORD_MAGIC,
    RECORD_TRAILER_LEN, RECORD_VERSION, RECORD_VERSION_COMPRESSED, RECORD_VERSION_EPOCH,
};
pub use retention::{
    newest_snapshot, newest_snapshot_age, remove_segment_files, remove_snapshots_before,
    segment_infos, Policy, SegmentInfo,
};
pub use segment::{
    decode_segment_header, encode_segment_header, parse_segment_file_name, scan_segment_bytes,
    segment_file_name, SegmentHeader, SegmentScan, SEGMENT_HEADER_LEN, SEGMENT_MAGIC,
    SEGMENT_VERSION,
};
pub use snapshot::{
    copy_snapshot_plain, parse_snapshot_file_name, snapshot_entry_pgno, snapshot_etag,
    snapshot_file_name, snapshot_header, stream_snapshot_file, stream_snapshot_from,
    stream_snapshot_rest, SnapshotPrefix,
};
pub use verify::{GenerationRange, SnapshotInfo, VerifyReport};

/// One page image inside a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub pgno: PageNo,
    pub data: Vec<u8>,
}

/// Everything in a record except the page images (the 88-byte header of FORMAT.md §3.1).
#[derive(Clone, Debug, PartialEq)]
pub struct RecordMeta {
    pub lsn: Lsn,
    pub generation: Generation,
    /// FLAG_SNAPSHOT: the pages are the complete database `1..=commit_size` (minus lock-byte page).
    pub snapshot: bool,
    pub page_size: PageSize,
    /// Database size in pages after applying this record.
    pub commit_size: u32,
    /// Unix milliseconds at capture.
    pub timestamp_ms: u64,
    /// WAL position after this transaction: header salts (raw), last frame, cumulative checksum.
    pub wal_salts: [u8; 8],
    pub wal_frame: u32,
    pub wal_cksum: (u32, u32),
    /// Database checksum after applying this record.
    pub db_checksum: Checksum,
    /// Number of page entries (equals `Record::pages.len()`).
    pub page_count: u32,
    /// Epoch of the primary that wrote the record (1 for records of format versions 1 and 2).
    pub epoch: Epoch,
}

/// One record: a primary transaction or a snapshot (`meta.snapshot`).
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub meta: RecordMeta,
    /// Sorted ascending by `pgno`, no duplicates, none above `commit_size`, never the lock-byte page.
    pub pages: Vec<Page>,
}

/// The sequence rule between consecutive records (FORMAT.md §3.5): dense LSNs, generation never
/// decreasing, and a generation increase only at a SNAPSHOT record. `Err` says what is wrong.
pub(crate) fn check_sequence(
    prev: &RecordMeta,
    next: &RecordMeta,
) -> std::result::Result<(), String> {
    if next.lsn != prev.lsn.next() {
        return Err(format!(
            "LSN {} does not follow LSN {} (LSNs must be dense: expected {})",
            next.lsn,
            prev.lsn,
            prev.lsn.next()
        ));
    }
    if next.generation < prev.generation {
        return Err(format!(
            "LSN {}: generation {} is lower than generation {} of LSN {}",
            next.lsn, next.generation, prev.generation, prev.lsn
        ));
    }
    if next.epoch < prev.epoch {
        return Err(format!(
            "LSN {}: epoch {} is older than epoch {} of LSN {} (epochs never decrease)",
            next.lsn, next.epoch, prev.epoch, prev.lsn
        ));
    }
    if next.generation > prev.generation && !next.snapshot {
        return Err(format!(
            "LSN {}: generation {} starts without a SNAPSHOT record (a new generation must \
             begin with a full snapshot)",
            next.lsn, next.generation
        ));
    }
    Ok(())
}
