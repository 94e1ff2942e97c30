//! The read endpoints of one database's log: `/v1/info`, `/v1/log` (a run of whole records,
//! parked at the durable end) and `/v1/snapshot` (docs/FORMAT.md §8.2–§8.4).

use super::httpd::{Body, Ctx, Outcome, Reply, Request};
use super::metrics::{ack_follower, touch_follower};
use super::request::{header, num, query};
use super::server::{
    Shared, DEFAULT_MAX_BYTES, MAX_MAX_BYTES, MAX_WAIT_MS, RECORDS_TYPE, SNAPSHOT_TYPE,
};
use crate::error::{Error, Result};
use crate::txlog::{self, Log};
use crate::types::Lsn;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub(super) fn info(sh: &Shared) -> Result<serde_json::Value> {
    let meta = Log::read_meta(&sh.dir)?;
    let durable = Log::read_durable(&sh.dir)?;
    // The snapshot /v1/snapshot serves: the newest one at or below the durable LSN.
    let snap = sh
        .log
        .latest_snapshot(durable.map(|d| d.0))?
        .map(|(m, path)| {
            let bytes = std::fs::metadata(&path).map_or(0, |md| md.len());
            serde_json::json!({"lsn": m.lsn.0, "bytes": bytes, "page_size": m.page_size.get()})
        });
    Ok(serde_json::json!({
        "format": 1,
        "db": sh.db,
        "lineage": meta.lineage,
        "epoch": meta.epoch.0,
        "epoch_start": meta.epoch_start.map(|(l, c)| serde_json::json!({
            "lsn": l.0, "checksum": format!("{:016x}", c.0)})),
        "page_size": meta.page_size,
        "generation": durable.map(|d| d.1 .0),
        "durable_lsn": durable.map(|d| d.0 .0),
        "first_lsn": Log::first_segment_lsn(&sh.dir)?.map(|l| l.0),
        "snapshot": snap,
    }))
}

pub(super) fn common_headers(
    meta: &txlog::Meta,
    durable: (Lsn, u32),
    first: Option<Lsn>,
) -> Vec<(String, String)> {
    let mut h = vec![
        header("X-Repl-Lineage", &meta.lineage),
        header("X-Repl-Durable-Lsn", durable.0 .0),
        header("X-Repl-Generation", durable.1),
        header("X-Repl-Epoch", meta.epoch),
    ];
    if let Some(s) = meta.epoch_start {
        h.push(header("X-Repl-Epoch-Start", super::format_epoch_start(s)));
    }
    if let Some(f) = first {
        h.push(header("X-Repl-First-Lsn", f.0));
    }
    h
}

pub(super) fn serve_log(
    sh: &Shared,
    req: &Request,
    params: &[(&str, &str)],
    ctx: Ctx,
) -> Result<Outcome> {
    let reply = |r: Reply| Ok(Outcome::Reply(r));
    let (from, wait, max, generation) = match log_params(params) {
        Ok(p) => p,
        Err(msg) => return reply(Reply::error(400, &msg)),
    };
    let follower = req
        .header("X-Repl-Follower")
        .map(str::to_string)
        .unwrap_or_else(|| req.peer.map_or("?".into(), |a| a.to_string()));
    let Some(durable) = Log::read_durable(&sh.dir)?.map(|(l, g)| (l, g.0)) else {
        return reply(Reply::error(
            503,
            "the primary has no durable records yet; retry in a moment",
        ));
    };
    if let Some(g) = generation {
        if g as u32 > durable.1 {
            return reply(Reply::error(
                409,
                &format!(
                    "generation {g} is unknown here (this primary is at generation {}): the replica follows \
                     another history; bootstrap it again",
                    durable.1
                ),
            ));
        }
    }
    if from.0 > durable.0 .0 + 1 {
        return reply(Reply::error(
            409,
            &format!(
                "LSN {from} is ahead of this primary (its durable LSN is {}): the replica follows another history; \
                 bootstrap it again",
                durable.0
            ),
        ));
    }
    if from.0 > 1 {
        ack_follower(sh, &follower, from.0 - 1);
    }
    // At the durable end with a wait: park (no thread, no polling) until the log directory
    // changes or the wait ends. Only a request that can be served registers its follower (a
    // refused one would list a position the follower never had).
    if from.0 == durable.0 .0 + 1 && wait > 0 && !ctx.expired {
        let deadline = ctx
            .parked_until
            .unwrap_or_else(|| Instant::now() + Duration::from_millis(wait));
        if Instant::now() < deadline {
            touch_follower(sh, &follower, from.0.saturating_sub(1), Some(deadline));
            return Ok(Outcome::Park {
                dir: sh.dir.clone(),
                deadline,
            });
        }
    }
    touch_follower(sh, &follower, from.0.saturating_sub(1), None);
    // Followers woken by the same commit ask the same question: the first answer is kept and
    // streamed again (same headers, same file range, one shared descriptor) until the durable
    // LSN moves.
    let key = (from.0, durable.0 .0, durable.1, max, takes_compressed(req));
    if let Some(a) = sh
        .answer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .filter(|a| a.key == key)
    {
        sh.served_records.fetch_add(a.count, Ordering::Relaxed);
        sh.served_bytes.fetch_add(a.len, Ordering::Relaxed);
        touch_follower(sh, &follower, a.last, None);
        return reply(Reply::new(
            200,
            a.headers.clone(),
            Body::File {
                file: a.file.clone(),
                offset: a.start,
                len: a.len,
            },
        ));
    }
    let meta = Log::read_meta(&sh.dir)?;
    let first = Log::first_segment_lsn(&sh.dir)?;
    // `from` older than the first retained LSN: 410 with `first_lsn` (also when retention
    // removes the segment while this request reads it).
    let gone = |f: Lsn| {
        let mut r = Reply::json(
            410,
            &serde_json::json!({
                "error": format!(
                    "LSN {from} is no longer retained (the log starts at LSN {f}): re-snapshot from /v1/snapshot"
                ),
                "first_lsn": f.0,
            }),
        );
        r.headers.extend(common_headers(&meta, durable, Some(f)));
        Outcome::Reply(r)
    };
    // No segment at all (a promoted primary before its first commit, or one whose every
    // segment retention removed): whatever precedes the durable end is only in a snapshot.
    // Without this, a follower behind answered "0 records" re-asked at once, forever.
    if let Some(f) = first.or(Some(Lsn(durable.0 .0 + 1))).filter(|f| from < *f) {
        return Ok(gone(f));
    }
    let mut headers = common_headers(&meta, durable, first);
    headers.push(header("Content-Type", RECORDS_TYPE));
    if from > durable.0 {
        headers.push(header("X-Repl-Records", 0));
        return reply(Reply::new(200, headers, Body::Bytes(Vec::new())));
    }
    let hint = sh
        .hints
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&from.0)
        .cloned();
    // A hint is an offset into a segment as it was; a primary that lost its log tail and
    // re-wrote it (FORMAT.md §7) can leave it pointing into a record: locate again from the
    // segment's start before answering with an error.
    let located = match sh.log.locate(from, durable.0, max, hint.as_ref()) {
        Err(_) if hint.is_some() => {
            sh.hints.lock().unwrap_or_else(|e| e.into_inner()).clear();
            sh.log.locate(from, durable.0, max, None)
        }
        r => r,
    };
    let range = match located {
        Ok(r) => r,
        Err(e) => {
            // Retention may have removed the segment meanwhile.
            if let Some(f) = Log::first_segment_lsn(&sh.dir)?.filter(|f| from < *f) {
                return Ok(gone(f));
            }
            return Err(e);
        }
    };
    let Some(range) = range else {
        headers.push(header("X-Repl-Records", 0));
        return reply(Reply::new(200, headers, Body::Bytes(Vec::new())));
    };
    {
        let mut h = sh.hints.lock().unwrap_or_else(|e| e.into_inner());
        if h.len() > 1024 {
            h.clear();
        }
        // The hint for `from` stays: every follower parked at the same LSN reads from it (a
        // removed hint sent all but the first of N woken followers back to scanning the
        // segment from its start: 9 ms instead of 0.2 ms per answer at 3,000 records).
        h.insert(range.last.0 + 1, range.next.clone());
    }
    let f = std::sync::Arc::new(
        std::fs::File::open(&range.path)
            .map_err(|e| Error::io(format!("opening {}", range.path.display()), e))?,
    );
    headers.push(header("X-Repl-Records", range.count));
    headers.push(header("X-Repl-Last-Lsn", range.last.0));
    if let Some(c) = range.codec {
        if !accepts(req, c) {
            // A client that does not read compressed records (older builds): the run decoded,
            // verified and re-encoded uncompressed (memory: the run, about max_bytes).
            let body = plain_records(&f, range.start, range.len)?;
            headers.push(header("X-Repl-Encoding", "identity"));
            sh.served_records
                .fetch_add(range.count as u64, Ordering::Relaxed);
            sh.served_bytes
                .fetch_add(body.len() as u64, Ordering::Relaxed);
            touch_follower(sh, &follower, range.last.0, None);
            return reply(Reply::new(200, headers, Body::Bytes(body)));
        }
        headers.push(header("X-Repl-Encoding", codec_name(c)));
    }
    *sh.answer.lock().unwrap_or_else(|e| e.into_inner()) = Some(Answer {
        key,
        headers: headers.clone(),
        file: f.clone(),
        start: range.start,
        len: range.len,
        count: range.count as u64,
        last: range.last.0,
    });
    sh.served_records
        .fetch_add(range.count as u64, Ordering::Relaxed);
    sh.served_bytes.fetch_add(range.len, Ordering::Relaxed);
    touch_follower(sh, &follower, range.last.0, None);
    reply(Reply::new(
        200,
        headers,
        Body::File {
            file: f,
            offset: range.start,
            len: range.len,
        },
    ))
}

/// The last `/v1/log` answer with records, keyed by (from, durable LSN, generation, max_bytes).
pub(super) struct Answer {
    key: (u64, u64, u32, u64, bool),
    headers: Vec<(String, String)>,
    file: std::sync::Arc<std::fs::File>,
    start: u64,
    len: u64,
    count: u64,
    last: u64,
}

/// The name of a codec id in `X-Repl-Accept-Encoding` / `X-Repl-Encoding` (FORMAT.md §8.9).
fn codec_name(codec: u8) -> &'static str {
    match codec {
        txlog::CODEC_ZSTD => "zstd",
        txlog::CODEC_LZ4 => "lz4",
        _ => "unknown",
    }
}

/// Whether the client named `codec` in `X-Repl-Accept-Encoding` (a comma-separated list).
fn accepts(req: &Request, codec: u8) -> bool {
    let name = codec_name(codec);
    req.headers_named("X-Repl-Accept-Encoding")
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(name))
}

/// Whether the client takes every codec (the cached answer is shared only among such clients).
fn takes_compressed(req: &Request) -> bool {
    accepts(req, txlog::CODEC_ZSTD) && accepts(req, txlog::CODEC_LZ4)
}

/// The records of `file[start..start + len]` decoded (every check of §3.4, decompression
/// included) and re-encoded uncompressed, for a client that does not read compressed records.
fn plain_records(file: &std::fs::File, start: u64, len: u64) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, start)
        .map_err(|e| Error::io("reading log records to decompress", e))?;
    let mut out = Vec::with_capacity(buf.len() * 2);
    let mut b = &buf[..];
    while !b.is_empty() {
        let (r, used) = txlog::decode_record(b)?;
        out.extend_from_slice(&txlog::encode_record(&r));
        b = &b[used..];
    }
    Ok(out)
}

/// The `/v1/log` parameters: (from, wait_ms, max_bytes, generation), or the 400 message.
pub(super) fn log_params(
    params: &[(&str, &str)],
) -> std::result::Result<(Lsn, u64, u64, Option<u64>), String> {
    let from = num(params, "from", 0..=(i64::MAX as u64))?
        .ok_or_else(|| "from is required: GET /v1/log?from=<first LSN wanted>".to_string())?;
    let wait = num(params, "wait_ms", 0..=MAX_WAIT_MS)?.unwrap_or(0);
    let max = num(params, "max_bytes", 1..=MAX_MAX_BYTES)?.unwrap_or(DEFAULT_MAX_BYTES);
    let generation = num(params, "generation", 0..=(u32::MAX as u64))?;
    Ok((Lsn(from.max(1)), wait, max, generation))
}

/// Fuzzing entry (transport::fuzzing): a request URL through the path/query split and the
/// `/v1/log` parameter rules. Properties: accepted values are inside their ranges.
pub(crate) fn fuzz_url(url: &str) {
    let (_, params) = query(url);
    if let Ok((from, wait, max, generation)) = log_params(&params) {
        assert!(from.0 >= 1 && from.0 <= i64::MAX as u64);
        assert!(wait <= MAX_WAIT_MS && (1..=MAX_MAX_BYTES).contains(&max));
        assert!(generation.is_none_or(|g| g <= u32::MAX as u64));
    }
}

/// `snapshot` copied uncompressed (txlog::copy_snapshot_plain) into a scratch file in `dir`,
/// unlinked at once (the descriptor keeps it until the answer is sent; its `.tmp` name is
/// ignored by every reader of the log meanwhile). Returns the file and its length.
fn plain_snapshot(
    dir: &std::path::Path,
    snapshot: &std::path::Path,
) -> Result<(std::fs::File, u64)> {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        "plain-snapshot.{}.{}.tmp",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let io = |e| Error::io(format!("writing {}", tmp.display()), e);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io)?;
    let _ = std::fs::remove_file(&tmp);
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
    let len = txlog::copy_snapshot_plain(snapshot, &mut w)?;
    std::io::Write::flush(&mut w).map_err(io)?;
    drop(w);
    Ok((file, len))
}

/// The codec of a snapshot file's record, from its header (`None`: uncompressed).
fn snapshot_codec(f: &std::fs::File) -> Result<Option<u8>> {
    use std::os::unix::fs::FileExt;
    let mut h = [0u8; txlog::SEGMENT_HEADER_LEN + txlog::RECORD_HEADER_LEN];
    f.read_exact_at(&mut h, 0)
        .map_err(|e| Error::io("reading a snapshot file's header", e))?;
    // The header parser knows where each record version keeps its codec (FORMAT.md §3.7, §3.1).
    txlog::record_codec(&h[txlog::SEGMENT_HEADER_LEN..])
}

/// `Range: bytes=N-` or `bytes=N-M` (one range; FORMAT.md §8.4): `Some((first, last))` with
/// `last` = `None` for an open end. Anything else (several ranges, suffix ranges, another
/// unit, garbage) is `None`: the whole body is served, as RFC 9110 §14.2 allows.
fn parse_range(v: &str) -> Option<(u64, Option<u64>)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|c| c.is_ascii_digit());
    if !digits(a) || !(b.is_empty() || digits(b)) {
        return None;
    }
    let first = a.parse().ok()?;
    let last = if b.is_empty() {
        None
    } else {
        Some(b.parse().ok()?)
    };
    if last.is_some_and(|l| l < first) {
        return None;
    }
    Some((first, last))
}

pub(super) fn serve_snapshot(sh: &Shared, req: &Request) -> Result<Reply> {
    let durable = Log::read_durable(&sh.dir)?;
    let Some((meta, path)) = sh.log.latest_snapshot(durable.map(|d| d.0))? else {
        return Ok(Reply::error(
            503,
            "the primary has no durable snapshot yet; retry in a moment",
        ));
    };
    let f = std::fs::File::open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        .len();
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let (lsn, generation) = txlog::parse_snapshot_file_name(name).unwrap_or_default();
    let dir_meta = Log::read_meta(&sh.dir)?;
    let lineage = dir_meta.lineage.clone();
    let mut hdr = [0u8; txlog::SEGMENT_HEADER_LEN + txlog::RECORD_HEADER_LEN];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut hdr, 0)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let etag = txlog::snapshot_etag(&hdr[txlog::SEGMENT_HEADER_LEN..]);
    let mut headers = vec![
        header("Content-Type", SNAPSHOT_TYPE),
        header("X-Repl-Lineage", lineage),
        header("X-Repl-Epoch", dir_meta.epoch),
        header("X-Repl-Snapshot-Lsn", lsn.0),
        header("X-Repl-Generation", generation.0),
        header("X-Repl-Snapshot-Checksum", meta.db_checksum),
        header("ETag", &etag),
        header("Accept-Ranges", "bytes"),
    ];
    if let Some(codec) = snapshot_codec(&f)? {
        if !accepts(req, codec) {
            // An older client: the snapshot decoded, verified and copied uncompressed into an
            // unlinked scratch file in the log directory, then streamed like any snapshot
            // (memory: one page; disk: one database size while the answer is sent).
            let (file, len) = plain_snapshot(&sh.dir, &path)?;
            // Not the stored file: no ranges of it (older clients do not ask for any).
            headers.retain(|(k, _)| k != "ETag" && k != "Accept-Ranges");
            headers.push(header("X-Repl-Encoding", "identity"));
            return Ok(Reply::new(
                200,
                headers,
                Body::File {
                    file: std::sync::Arc::new(file),
                    offset: 0,
                    len,
                },
            ));
        }
        headers.push(header("X-Repl-Encoding", codec_name(codec)));
    }
    // A range applies only to the snapshot the client started (If-Range names it): another
    // snapshot is served whole, from byte 0, so a client notices it changed and starts over.
    let range = req
        .header("Range")
        .and_then(parse_range)
        .filter(|_| req.header("If-Range").is_none_or(|t| t.trim() == etag));
    let (status, offset, n) = match range {
        None => (200, 0, len),
        Some((first, _)) if first >= len => {
            headers.push(header("Content-Range", format!("bytes */{len}")));
            let msg = format!(
                "the range starts at byte {first} but the snapshot has {len} bytes; \
                 request it again without Range"
            );
            let mut r = Reply::error(416, &msg);
            for (k, v) in headers.into_iter().skip(1) {
                r = r.with_header(&k, v);
            }
            return Ok(r);
        }
        Some((first, last)) => {
            let last = last.unwrap_or(len - 1).min(len - 1);
            headers.push(header(
                "Content-Range",
                format!("bytes {first}-{last}/{len}"),
            ));
            (206, first, last - first + 1)
        }
    };
    Ok(Reply::new(
        status,
        headers,
        Body::File {
            file: std::sync::Arc::new(f),
            offset,
            len: n,
        },
    ))
}

#[cfg(test)]
mod range_tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=10-"), Some((10, None)));
        assert_eq!(parse_range("bytes=0-99"), Some((0, Some(99))));
        for bad in [
            "bytes=-5",
            "bytes=5-1",
            "items=1-",
            "bytes=1-2,4-5",
            "bytes=+1-",
            "bytes=a-",
        ] {
            assert_eq!(parse_range(bad), None, "{bad}");
        }
    }
}
