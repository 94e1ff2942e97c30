//! Resumable snapshot downloads (issue 15, WAL.md §E.10): the source's snapshot file, byte for
//! byte as stored (a compressed snapshot stays compressed), copied into
//! `<db>-replica/snapshot.part`, while `<db>-replica/snapshot.json` names the snapshot (its
//! ETag: LSN, generation, header checksum) and how many of its bytes are durable. An interrupted
//! download (kill -9, a cut connection) continues from there: HTTP `Range` + `If-Range`, a byte
//! offset for a directory source; a source that serves another snapshot now starts it over.
//! Nothing here is trusted: the caller validates the whole file (record and database
//! checksums, decompression) before it uses a page, and removes it when it is invalid.

use super::{log_event, Replica, State};
use crate::error::{Error, Result};
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

/// Forgets a download: the next one starts from zero (its record first, so a crash in between
/// never leaves a record that claims bytes of a removed file).
pub(super) fn remove_part(db_path: &str) {
    let (json, part) = part_paths(db_path);
    let _ = std::fs::remove_file(json);
    let _ = std::fs::remove_file(part);
}

impl Replica {
    /// The source's newest snapshot file, complete and durable in `<db>-replica/snapshot.part`
    /// (not validated yet); continues a download an earlier call or process left, and a broken
    /// transfer up to `ATTEMPTS` times within the call (backoff 0.5, 1, 2 s,
    /// `event=snapshot_download_retry`); after that the error, with what arrived kept.
    pub(super) fn download_snapshot(&self, st: &State, what: &'static str) -> Result<PathBuf> {
        let mut attempt = 1;
        loop {
            let mut broke = false;
            match self.download_attempt(st, what, &mut broke) {
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
        broke_out: &mut bool,
    ) -> Result<PathBuf> {
        let db = self.db_path.as_str();
        let (_, part) = part_paths(db);
        let part_len = std::fs::metadata(&part).map_or(0, |m| m.len());
        // What is kept: the bytes the record claims durable (more may be on disk, unsynced).
        // A complete file re-fetches its last byte: the source then says whether it still
        // serves that snapshot (a range past the end would not name it).
        let saved = read_state(db).filter(|s| !s.etag.is_empty() && part_len >= s.bytes);
        let resume = saved
            .as_ref()
            .filter(|s| s.bytes > 0 && s.len > 0)
            .map(|s| (s.etag.as_str(), s.bytes.min(s.len - 1)));
        let _net = self.network_call(st);
        let src = st.source.as_ref().expect("set");
        let got = src.snapshot_bytes(resume)?;
        let (start, len) = (got.start, got.len);
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
        let mut body = got.body;
        let mut buf = vec![0u8; 1 << 20];
        let (mut done, mut since) = (start, 0u64);
        let mut broke = |done: u64, e: String| {
            *broke_out = true;
            Error::Other(format!(
                "the snapshot download from {} broke at byte {done} of {len} ({e}); the bytes that arrived \
                 are kept in {}, retry repl_sync() to continue from there",
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
        f.sync_data().map_err(ctx)?;
        if state.bytes != len {
            state.bytes = len;
            write_state(db, &state)?;
        }
        progress(len, len);
        Ok(part)
    }
}
