//! Compaction: a new snapshot file built from the log alone (the newest snapshot plus the
//! records after it, up to a chosen LSN), so the primary takes periodic snapshots without
//! holding the database's write lock or reading its file. The state is rebuilt into a plain
//! database file with every record's `db_checksum` verified (`rebuild`), then streamed page by
//! page into the snapshot format and checked once more against the rebuilt checksum before the
//! snapshot file is renamed into place. Memory: O(pages) for the checksums, never the database.

use super::checksum::DbChecksum;
use super::compress::{compress_page, Compression};
use super::meta::{now_ms, sync_dir};
use super::rebuild::rebuild_to;
use super::record::{encode_header_codec, full_page_count, record_len, RECORD_HEADER_LEN};
use super::segment::SEGMENT_HEADER_LEN;
use super::segment::{encode_segment_header, SegmentHeader};
use super::snapshot::snapshot_file_name;
use super::RecordMeta;
use crate::error::{Error, Result};
use crate::types::{Lsn, PageNo};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::Xxh3;

/// Builds `snap/<upto>-<generation>.snap` in `dir` from the log. Returns the new snapshot's
/// record metadata and path. `upto` must be a record in the log (normally the durable LSN).
pub fn compact(dir: &Path, upto: Lsn, c: Compression) -> Result<(RecordMeta, PathBuf)> {
    let snap_dir = dir.join("snap");
    std::fs::create_dir_all(&snap_dir)
        .map_err(|e| Error::io(format!("creating {}", snap_dir.display()), e))?;
    let pid = std::process::id();
    let db_path = snap_dir.join(format!("compact-{pid}.db"));
    let res = (|| {
        let (info, last) = rebuild_to(dir, Some(upto), &db_path)?;
        let db = File::open(&db_path)
            .map_err(|e| Error::io(format!("opening {}", db_path.display()), e))?;
        let meta = RecordMeta {
            lsn: info.lsn,
            generation: info.generation,
            snapshot: true,
            page_size: last.page_size,
            commit_size: info.pages,
            timestamp_ms: last.timestamp_ms,
            wal_salts: last.wal_salts,
            wal_frame: last.wal_frame,
            wal_cksum: last.wal_cksum,
            db_checksum: info.checksum,
            page_count: full_page_count(last.page_size, info.pages),
            epoch: last.epoch,
        };
        let path = write_streamed(&snap_dir, &meta, c, &mut |pgno, buf| {
            db.read_exact_at(buf, u64::from(pgno - 1) * u64::from(last.page_size.get()))
                .map_err(|e| Error::io("reading the rebuilt database", e))
        })?;
        Ok((meta, path))
    })();
    let _ = std::fs::remove_file(&db_path);
    res
}

/// Streams pages 1..=`meta.commit_size` (the lock-byte page skipped), each read into the
/// buffer by `read_page(pgno, buf)`, into a snapshot file for `meta` in `snap_dir`, verifying
/// the database checksum of what was written against `meta.db_checksum` before the rename.
/// Memory: one page and the per-page checksums.
pub fn write_streamed(
    snap_dir: &Path,
    meta: &RecordMeta,
    c: Compression,
    read_page: &mut dyn FnMut(u32, &mut [u8]) -> Result<()>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(snap_dir)
        .map_err(|e| Error::io(format!("creating {}", snap_dir.display()), e))?;
    let name = snapshot_file_name(meta.lsn, meta.generation);
    let path = snap_dir.join(&name);
    let tmp = snap_dir.join(format!("{name}.{}.tmp", std::process::id()));
    let res = (|| {
        // Read back too: a compressed record's checksum is computed over the written bytes.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        let io = |e| Error::io(format!("writing {}", tmp.display()), e);
        let mut out = BufWriter::with_capacity(1 << 20, &f);
        out.write_all(&encode_segment_header(&SegmentHeader {
            first_lsn: meta.lsn,
            created_ms: now_ms(),
        }))
        .map_err(io)?;
        // A compressed record's length is known only after its pages: its header is written
        // last, and the record checksum (header first) hashed in a second pass over the file.
        let codec = c.codec();
        let mut total = record_len(meta.page_size, meta.page_count);
        let mut hasher = Xxh3::new();
        let mut put = |b: &[u8], out: &mut BufWriter<&File>| -> Result<()> {
            if codec.is_none() {
                hasher.update(b);
            }
            out.write_all(b).map_err(io)
        };
        put(
            &encode_header_codec(meta, meta.page_count, total, None),
            &mut out,
        )?;
        let mut stored = RECORD_HEADER_LEN as u64;
        let ps = meta.page_size;
        let lock_page = ps.lock_byte_page().get();
        let mut sums = DbChecksum::new(ps);
        let mut buf = vec![0u8; ps.bytes()];
        let mut written = 0u32;
        for pgno in 1..=meta.commit_size {
            if pgno == lock_page {
                continue;
            }
            read_page(pgno, &mut buf)?;
            sums.set_page(PageNo::new(pgno).expect("pgno >= 1"), &buf);
            put(&pgno.to_be_bytes(), &mut out)?;
            if codec.is_some() {
                let z = compress_page(c, &buf);
                let entry = z.as_deref().unwrap_or(&buf);
                put(&(entry.len() as u32).to_be_bytes(), &mut out)?;
                put(entry, &mut out)?;
                stored += 8 + entry.len() as u64;
            } else {
                put(&buf, &mut out)?;
            }
            written += 1;
        }
        sums.truncate(meta.commit_size);
        if written != meta.page_count || sums.total() != meta.db_checksum {
            return Err(Error::Corrupt(format!(
                "snapshot at LSN {}: the pages read give checksum {} over {written} pages, \
                 expected {} over {}: snapshot not written",
                meta.lsn,
                sums.total(),
                meta.db_checksum,
                meta.page_count
            )));
        }
        if codec.is_some() {
            out.flush().map_err(io)?;
            drop(out);
            total = stored + 8;
            let header = encode_header_codec(meta, meta.page_count, total, codec);
            f.write_all_at(&header, SEGMENT_HEADER_LEN as u64)
                .map_err(io)?;
            let mut rd = BufReader::with_capacity(1 << 20, &f);
            rd.seek(SeekFrom::Start(SEGMENT_HEADER_LEN as u64))
                .map_err(io)?;
            let mut left = stored;
            let mut chunk = vec![0u8; 1 << 20];
            while left > 0 {
                let n = (left as usize).min(chunk.len());
                rd.read_exact(&mut chunk[..n]).map_err(io)?;
                hasher.update(&chunk[..n]);
                left -= n as u64;
            }
            drop(rd);
            f.write_all_at(
                &hasher.digest().to_be_bytes(),
                SEGMENT_HEADER_LEN as u64 + stored,
            )
            .map_err(io)?;
        } else {
            let trailer = hasher.digest().to_be_bytes();
            out.write_all(&trailer).map_err(io)?;
            out.flush().map_err(io)?;
            drop(out);
        }
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| Error::io(format!("renaming to {}", path.display()), e))
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(snap_dir)?;
    Ok(path)
}
