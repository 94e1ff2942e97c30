//! Resumable snapshot downloads (issue 15, WAL.md §E.10): the source's snapshot file, byte for
//! byte as stored (a compressed snapshot stays compressed), copied into
//! `<db>-replica/snapshot.part`, while `<db>-replica/snapshot.json` names the snapshot (its
//! ETag: LSN, generation, header checksum) and how many of its bytes are durable. An interrupted
//! download (kill -9, a cut connection) continues from there: HTTP `Range` + `If-Range`, a byte
//! offset for a directory source; a source that serves another snapshot now starts it over.
//! Nothing here is trusted: the caller validates the whole file (record and database
//! checksums, decompression) before it uses a page, and removes it when it is invalid.

use super::{lock, log_event, Replica, State};
use crate::error::{Error, Result};
use crate::transport::SnapshotBytes;
use crate::txlog::{DbChecksum, RecordMeta};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Duration;

/// How often the part file is fsynced and its durable length recorded: an interrupted
/// download fetches at most this much (plus what was in flight) again.
const PROGRESS_EVERY: u64 = 16 << 20;
/// Attempts of one call to continue a download whose transfer broke.
const ATTEMPTS: u32 = 4;

/// `<db>-replica/snapshot.json` and `<db>-replica/snapshot.part`.
fn part_paths(db_path: &str) -> (PathBuf, PathBuf) {
    let d = crate::txlog::log_dir(db_path);
    (d.join("snapshot.json"), d.join("snapshot.part"))
}

/// What `snapshot.json` records: the snapshot and the durable prefix of the part file.
struct PartState {
    etag: String,
    lsn: u64,
    generation: u32,
    len: u64,
    bytes: u64,
}

fn read_state(db_path: &str) -> Option<PartState> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(part_paths(db_path).0).ok()?).ok()?;
    if v["format"].as_u64() != Some(1) {
        return None;
    }
    let s = PartState {
        etag: v["etag"].as_str()?.to_string(),
        lsn: v["lsn"].as_u64()?,
        generation: u32::try_from(v["generation"].as_u64()?).ok()?,
        len: v["len"].as_u64()?,
        bytes: v["bytes"].as_u64()?,
    };
    (s.bytes <= s.len).then_some(s)
}

fn write_state(db_path: &str, s: &PartState) -> Result<()> {
    let (json, _) = part_paths(db_path);
    let v = serde_json::json!({
        "format": 1,
        "etag": s.etag,
        "lsn": s.lsn,
        "generation": s.generation,
        "len": s.len,
        "bytes": s.bytes,
    });
    let tmp = json.with_extension("json.tmp");
    let ctx = |e| {
        Error::io(
            format!(
                "recording the snapshot download's progress in {}",
                json.display()
            ),
            e,
        )
    };
    {
        let mut f = std::fs::File::create(&tmp).map_err(ctx)?;
        f.write_all(v.to_string().as_bytes()).map_err(ctx)?;
        f.sync_all().map_err(ctx)?;
    }
    std::fs::rename(&tmp, &json).map_err(ctx)?;
    if let Some(d) = json.parent() {
        crate::txlog::sync_dir(d)?;
    }
    Ok(())
}

/// True when a download is recorded (`snapshot.json`): a bootstrap continues it.
pub(super) fn pending(db_path: &str) -> bool {
    part_paths(db_path).0.exists()
}

/// Forgets a download: the next one starts from zero (its record first, so a crash in between
/// never leaves a record that claims bytes of a removed file).
pub(super) fn remove_part(db_path: &str) {
    let (json, part) = part_paths(db_path);
    let _ = std::fs::remove_file(json);
    let _ = std::fs::remove_file(part);
}

impl Replica {
    /// The source's newest snapshot file, complete in `<db>-replica/snapshot.part` (not
    /// validated yet; durable up to what `snapshot.json` claims). Continues a download an
    /// earlier call or process left, and a broken transfer up to `ATTEMPTS` times within the
    /// call (backoff 0.5, 1, 2 s, `event=snapshot_download_retry`); after that the error, with
    /// what arrived kept.
    ///
    /// `opened`: a fresh answer of the source (`start` 0) whose first bytes (`head`) were read
    /// already (a bootstrap that looked at the record header first).
    pub(super) fn download_snapshot(
        &self,
        st: &State,
        what: &'static str,
        mut opened: Option<(SnapshotBytes, Vec<u8>)>,
    ) -> Result<PathBuf> {
        let mut attempt = 1;
        loop {
            let mut broke = false;
            match self.download_attempt(st, what, opened.take(), &mut broke) {
                Err(e) if broke && attempt < ATTEMPTS => {
                    log_event(&format!(
                        "event=snapshot_download_retry db={:?} attempt={attempt} error={:?}",
                        self.db_path,
                        e.to_string()
                    ));
                    std::thread::sleep(Duration::from_millis(250 << attempt));
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    /// One attempt of `download_snapshot`; `broke` says the transfer itself broke (retried).
    fn download_attempt(
        &self,
        st: &State,
        what: &'static str,
        opened: Option<(SnapshotBytes, Vec<u8>)>,
        broke_out: &mut bool,
    ) -> Result<PathBuf> {
        let db = self.db_path.as_str();
        let (_, part) = part_paths(db);
        let part_len = std::fs::metadata(&part).map_or(0, |m| m.len());
        // What is kept: the bytes the record claims durable (more may be on disk, unsynced).
        // A record of the whole file (a record that fell on the last byte) re-fetches its last
        // byte: the source then says whether it still serves that snapshot (a range past
        // the end would not name it).
        let saved = read_state(db).filter(|s| !s.etag.is_empty() && part_len >= s.bytes);
        let resume = saved
            .as_ref()
            .filter(|s| s.bytes > 0 && s.len > 0 && opened.is_none())
            .map(|s| (s.etag.as_str(), s.bytes.min(s.len - 1)));
        let _net = self.network_call(st);
        let src = st.source.as_ref().expect("set");
        let (got, head) = match opened {
            Some((got, head)) => (got, head),
            None => (src.snapshot_bytes(resume)?, Vec::new()),
        };
        let (start, len) = (got.start, got.len);
        if start > 0 && saved.as_ref().map(|s| s.len) != Some(len) {
            // The same ETag names the same header, hence the same length: a source that says
            // otherwise is not trusted with the rest. Start over (at once: `broke`).
            remove_part(db);
            *broke_out = true;
            return Err(Error::Other(format!(
                "{} serves the snapshot being continued with another length ({len} bytes, {} recorded);                  the download starts over",
                src.describe(),
                saved.as_ref().map_or(0, |s| s.len)
            )));
        }
        if let Some((_, at)) = resume {
            if start == 0 {
                log_event(&format!(
                    "event=snapshot_download_restart db={db:?} lsn={} reason=\"the source serves another snapshot now\"",
                    got.lsn
                ));
            } else {
                log_event(&format!(
                    "event=snapshot_download_resume db={db:?} lsn={} bytes={at} total={len}",
                    got.lsn
                ));
            }
        }
        let mut state = PartState {
            etag: got.etag,
            lsn: got.lsn.0,
            generation: got.generation.0,
            len,
            bytes: start,
        };
        if start == 0 {
            // The snapshot is named before any of its bytes is kept.
            remove_part(db);
            write_state(db, &state)?;
        }
        let ctx = |e| Error::io(format!("writing {}", part.display()), e);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part)
            .map_err(ctx)?;
        f.set_len(start).map_err(ctx)?;
        f.seek(SeekFrom::Start(start)).map_err(ctx)?;
        self.start_progress(what, start);
        let mut progress = self.progress_reporter(what);
        let mut body = std::io::Cursor::new(head).chain(got.body);
        let mut buf = vec![0u8; 1 << 20];
        let (mut done, mut since) = (start, 0u64);
        let mut broke = |done: u64, e: String| {
            *broke_out = true;
            Error::Other(format!(
                "the snapshot download from {} broke at byte {done} of {len} ({e}); what arrived is kept \
                 in {}, retry repl_sync() to continue from there",
                src.describe(),
                part.display()
            ))
        };
        while done < len {
            let n = match body.read(&mut buf) {
                Ok(0) => return Err(broke(done, "the transfer ended early".into())),
                Ok(n) => n.min((len - done) as usize),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(broke(done, e.to_string())),
            };
            f.write_all(&buf[..n]).map_err(ctx)?;
            done += n as u64;
            since += n as u64;
            progress(done, len);
            if since >= PROGRESS_EVERY {
                since = 0;
                // Durable first, then claimed.
                f.sync_data().map_err(ctx)?;
                state.bytes = done;
                write_state(db, &state)?;
            }
        }
        // No fsync of the end: the caller validates the file and deletes it once used, so
        // flushing it would only cost time; a crash before that continues from the last
        // record (the unclaimed tail is fetched again).
        progress(len, len);
        Ok(part)
    }
}

/// How a fresh bootstrap goes on after reading the snapshot's headers.
pub(super) enum Fresh {
    /// Streamed straight into the database file (uncompressed: resumable page by page).
    Streamed(Result<(RecordMeta, DbChecksum)>),
    /// A compressed snapshot: continue with `download_snapshot(.., Some(opened))`.
    Compressed(SnapshotBytes, Vec<u8>),
}

impl Replica {
    /// A fresh bootstrap's download: one request for the snapshot file as stored; its segment
    /// and record headers decide. Uncompressed, it is streamed page by page to `on_meta` /
    /// `on_page` (validated as `txlog::stream_snapshot_from` does: trustworthy only on `Ok`);
    /// compressed, the answer is handed back to be downloaded into the part file (its record
    /// checksum covers the compressed bytes, which the database file does not keep, so only a
    /// copy of them can be continued).
    pub(super) fn bootstrap_fresh(
        &self,
        st: &State,
        on_meta: &mut dyn FnMut(&RecordMeta) -> Result<()>,
        on_page: &mut dyn FnMut(crate::types::PageNo, &[u8]) -> Result<()>,
    ) -> Result<Fresh> {
        const WHAT: &str = "bootstrap download";
        let _net = self.network_call(st);
        let src = st.source.as_ref().expect("set");
        let shown = src.describe();
        let mut got = src.snapshot_bytes(None)?;
        let broke = |e: std::io::Error| {
            Error::Other(format!(
                "the snapshot download from {shown} broke: {e}; what arrived so far is kept, retry repl_sync() to continue"
            ))
        };
        let mut head =
            vec![0u8; crate::txlog::SEGMENT_HEADER_LEN + crate::txlog::RECORD_HEADER_LEN];
        let n = head.len().min(got.len as usize);
        got.body.read_exact(&mut head[..n]).map_err(broke)?;
        head.truncate(n);
        if crate::transport::head_compressed(&head) {
            return Ok(Fresh::Compressed(got, head));
        }
        self.start_progress(WHAT, 0);
        let mut progress = self.progress_reporter(WHAT);
        let reader = crate::transport::http::Counted::new(
            std::io::BufReader::with_capacity(1 << 20, std::io::Cursor::new(head).chain(got.body)),
            0,
            got.len,
            &mut progress,
        );
        let r = crate::txlog::stream_snapshot_from(reader, &shown, got.len, on_meta, on_page)
            .map_err(|e| match e {
                Error::Io { .. } => Error::Other(format!(
                    "the snapshot download from {shown} broke: {e}; what arrived so far is kept, retry repl_sync() to continue"
                )),
                Error::Corrupt(m) => Error::Corrupt(format!(
                    "{shown}: the snapshot is invalid or was cut short ({m}); nothing was applied"
                )),
                other => other,
            });
        if r.is_err() {
            *lock(&self.progress) = None;
        }
        Ok(Fresh::Streamed(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_round_trips_and_never_claims_more_than_the_file() {
        let dir = std::env::temp_dir().join(format!("repl-download-{}", std::process::id()));
        let db = dir.join("r.db");
        let db = db.to_str().unwrap();
        std::fs::create_dir_all(crate::txlog::log_dir(db)).unwrap();
        assert!(!pending(db) && read_state(db).is_none());
        let s = PartState {
            etag: "\"7-1-00000000000000ff\"".into(),
            lsn: 7,
            generation: 1,
            len: 100,
            bytes: 40,
        };
        write_state(db, &s).unwrap();
        let got = read_state(db).unwrap();
        assert!(pending(db));
        assert_eq!(
            (got.etag, got.lsn, got.generation, got.len, got.bytes),
            (s.etag.clone(), 7, 1, 100, 40)
        );
        write_state(db, &PartState { bytes: 101, ..s }).unwrap();
        assert!(
            read_state(db).is_none(),
            "a record past the length is not used"
        );
        remove_part(db);
        assert!(!pending(db));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn compressed_heads_are_recognised() {
        let mut head =
            vec![0u8; crate::txlog::SEGMENT_HEADER_LEN + crate::txlog::RECORD_HEADER_LEN];
        assert!(!crate::transport::head_compressed(&head));
        let at = crate::txlog::SEGMENT_HEADER_LEN + 6;
        head[at..at + 2].copy_from_slice(&crate::txlog::FLAG_COMPRESSED.to_be_bytes());
        assert!(crate::transport::head_compressed(&head));
        assert!(!crate::transport::head_compressed(&head[..at]));
    }
}
