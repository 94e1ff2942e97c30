//! `sqlite-replica`: offline tools over a replication log directory (std-only argument parsing).
//!
//! - `verify <dir>`: decode every segment and snapshot, check every checksum and the LSN sequence,
//!   print a report; non-zero exit on any damage (the message names the file and offset).
//! - `inspect <dir> [--from LSN]`: one line per record: `lsn gen kind pages commit_size db_checksum ts epoch`.
//! - `rebuild <dir> <out.db> [--lsn N]`: write a plain database file at LSN N (default: the end).
//! - `restore <source> <out.db>`: a plain database file at the source's newest LSN (a
//!   primary's path or `http://host:port`), from its snapshot plus the log after it, with a
//!   progress bar on stderr; every record is checked against the primary's database checksum.
//! - `serve <db | dir> [--listen HOST:PORT] [--token-file F] [--tls-cert F --tls-key F]`: serve
//!   the primary's log over HTTP (the endpoints of `repl_primary('addr')`) from its log
//!   directory, for deployments whose writers are short-lived processes. Given a directory, it
//!   serves every primary in it on one listener (`/v1/db/<file name>/…`). The token comes from
//!   `--token-file` or `REPL_TOKEN` (`--token T` works but shows in `ps`).
//! - `compress-bench <db>...`: compresses every page of each database file with each codec the
//!   `compress` setting offers and prints one JSON line per file and codec (ratio, MB/s), so an
//!   operator can see what the setting would buy on their own data (scripts/bench_compress.py).
//!
//! Exit codes: 0 success, 1 error, 2 usage error.

#![forbid(unsafe_code)]

use replica::txlog::{rebuild, Log, LogConfig};
use replica::types::Lsn;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

const USAGE: &str = "usage:
  sqlite-replica verify <dir | s3://bucket/prefix>
  sqlite-replica inspect <dir> [--from LSN]
  sqlite-replica rebuild <dir> <out.db> [--lsn N]
  sqlite-replica restore <source> <out.db> [--lsn N | --time 2026-12-06T10:00:00Z]
      (source: a primary's path, http://host:port[?token=T] or s3://bucket/prefix; default: its newest LSN)
  sqlite-replica serve <db | dir> [--listen HOST:PORT] [--token-file F] [--tls-cert F --tls-key F]
                       [--backup s3://bucket/prefix]
      (default 127.0.0.1:7070; the token from --token-file or REPL_TOKEN; a directory serves every
       primary in it, each at /v1/db/<file name>; --backup also uploads each primary's log to the
       bucket, as repl_config('backup') would, one prefix per database when serving a directory)
  sqlite-replica compress-bench <db>...   (ratio and MB/s of each codec on the file's pages)

<dir> is a replication log directory (the one holding meta.json, log/ and snap/).
inspect prints one line per record: lsn gen kind pages commit_size db_checksum ts epoch";

enum Failure {
    Usage(String),
    Error(String),
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("sqlite-replica: {m}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Error(m)) => {
            eprintln!("sqlite-replica: error: {m}");
            ExitCode::from(1)
        }
    }
}

fn fail(e: replica::error::Error) -> Failure {
    Failure::Error(e.to_string())
}

/// Splits `args` into positional arguments and the value of the one allowed `--flag N`.
fn parse(args: &[String], flag: &str) -> Result<(Vec<String>, Option<Lsn>), Failure> {
    let mut pos = Vec::new();
    let mut value = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == flag {
            let v = it
                .next()
                .ok_or_else(|| Failure::Usage(format!("{flag} needs a value")))?;
            let n = v
                .parse::<u64>()
                .map_err(|_| Failure::Usage(format!("{flag}: {v:?} is not an LSN")))?;
            value = Some(Lsn(n));
        } else if a.starts_with("--") {
            return Err(Failure::Usage(format!("unknown option {a}")));
        } else {
            pos.push(a.clone());
        }
    }
    Ok((pos, value))
}

fn run(args: &[String]) -> Result<(), Failure> {
    let Some((cmd, rest)) = args.split_first() else {
        return Err(Failure::Usage("missing command".into()));
    };
    match cmd.as_str() {
        "verify" => {
            let (pos, _) = parse(rest, "--none")?;
            let [dir] = pos.as_slice() else {
                return Err(Failure::Usage(
                    "verify takes one log directory or s3:// backup".into(),
                ));
            };
            if dir.starts_with("s3://") {
                let src = replica::transport::s3::BucketSource::open(dir).map_err(fail)?;
                println!("{}", src.verify().map_err(fail)?);
                return Ok(());
            }
            let report = Log::verify(Path::new(dir)).map_err(fail)?;
            println!("{report}");
            Ok(())
        }
        "inspect" => {
            let (pos, from) = parse(rest, "--from")?;
            let [dir] = pos.as_slice() else {
                return Err(Failure::Usage("inspect takes one directory".into()));
            };
            inspect(Path::new(dir), from)
        }
        "rebuild" => {
            let (pos, lsn) = parse(rest, "--lsn")?;
            let [dir, out] = pos.as_slice() else {
                return Err(Failure::Usage(
                    "rebuild takes a directory and an output file".into(),
                ));
            };
            let info = rebuild(Path::new(dir), lsn, Path::new(out)).map_err(fail)?;
            println!(
                "rebuilt {out}: LSN {} generation {}, {} pages, checksum {}",
                info.lsn, info.generation, info.pages, info.checksum
            );
            Ok(())
        }
        "restore" => {
            let mut pos = Vec::new();
            let mut target = Target::End;
            let mut it = rest.iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--lsn" | "--time" if !matches!(target, Target::End) => {
                        return Err(Failure::Usage("give one of --lsn and --time".into()))
                    }
                    "--lsn" | "--time" => {
                        let v = it
                            .next()
                            .ok_or_else(|| Failure::Usage(format!("{a} needs a value")))?;
                        target = if a == "--lsn" {
                            Target::Lsn(Lsn(v.parse().map_err(|_| {
                                Failure::Usage(format!("--lsn: {v:?} is not an LSN"))
                            })?))
                        } else {
                            let t: jiff::Timestamp = v.parse().map_err(|e| {
                                Failure::Usage(format!(
                                    "--time: {v:?} is not an RFC 3339 time such as 2026-12-06T10:00:00Z ({e})"
                                ))
                            })?;
                            Target::Time(u64::try_from(t.as_millisecond()).unwrap_or(0))
                        };
                    }
                    o if o.starts_with("--") => {
                        return Err(Failure::Usage(format!("unknown option {o}")))
                    }
                    _ => pos.push(a.clone()),
                }
            }
            let [source, out] = pos.as_slice() else {
                return Err(Failure::Usage(
                    "restore takes a source and an output file".into(),
                ));
            };
            restore(source, Path::new(out), target)
        }
        "serve" => {
            // A server's log is its output: one line per event, info by default.
            if replica::config::get().log_level.is_none() {
                replica::logging::set_level(replica::logging::Level::Info);
            }
            let mut listen = "127.0.0.1:7070".to_string();
            let mut token = replica::config::get().token.clone();
            let (mut cert, mut key) = (None, None);
            let mut backup = None;
            let mut pos = Vec::new();
            let mut it = rest.iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--listen" | "--token" | "--token-file" | "--tls-cert" | "--tls-key"
                    | "--backup" => {
                        let v = it
                            .next()
                            .ok_or_else(|| Failure::Usage(format!("{a} needs a value")))?
                            .clone();
                        match a.as_str() {
                            "--listen" => listen = v,
                            "--token" => token = Some(v),
                            "--token-file" => {
                                let t = std::fs::read_to_string(&v).map_err(|e| {
                                    Failure::Error(format!("reading the token file {v}: {e}"))
                                })?;
                                let t = t.trim().to_string();
                                if t.is_empty() {
                                    return Err(Failure::Error(format!(
                                        "the token file {v} is empty"
                                    )));
                                }
                                token = Some(t);
                            }
                            "--tls-cert" => cert = Some(v),
                            "--backup" => backup = Some(v),
                            _ => key = Some(v),
                        }
                    }
                    o if o.starts_with("--") => {
                        return Err(Failure::Usage(format!("unknown option {o}")))
                    }
                    _ => pos.push(a.clone()),
                }
            }
            let [target] = pos.as_slice() else {
                return Err(Failure::Usage(
                    "serve takes the primary's database path, or a directory of primaries".into(),
                ));
            };
            let tls =
                replica::transport::server::TlsFiles::pair(cert, key, "--tls-cert and --tls-key")
                    .map_err(|e| Failure::Usage(e.to_string()))?;

            let target = std::path::absolute(target)
                .map_err(|e| Failure::Error(format!("{target}: {e}")))?;
            let target_is_dir = target.is_dir();
            let dbs = if target_is_dir {
                let dbs = replica::transport::server::primaries_in(&target).map_err(fail)?;
                if dbs.is_empty() {
                    return Err(Failure::Error(format!(
                        "{} holds no primary (no <db>-replica/ directory of a primary)",
                        target.display()
                    )));
                }
                dbs
            } else {
                vec![target.display().to_string()]
            };
            if let Some(target) = backup {
                SERVE_MANY.store(
                    dbs.len() > 1 || target_is_dir,
                    std::sync::atomic::Ordering::Relaxed,
                );
                for db in &dbs {
                    spawn_uploader(db, &target)?;
                }
            }
            replica::transport::server::serve_forever(&dbs, &listen, token, tls.as_ref())
                .map_err(fail)
        }
        "compress-bench" => {
            if rest.is_empty() {
                return Err(Failure::Usage("compress-bench takes database files".into()));
            }
            for f in rest {
                compress_bench(Path::new(f))?;
            }
            Ok(())
        }
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(Failure::Usage(format!("unknown command {other:?}"))),
    }
}

fn inspect(dir: &Path, from: Option<Lsn>) -> Result<(), Failure> {
    let log = Log::open(dir, LogConfig::default()).map_err(fail)?;
    let Some(first) = log.first_lsn() else {
        return Ok(()); // empty log
    };
    let mut out = std::io::stdout().lock();
    for m in log
        .read_meta_from(from.unwrap_or(first), None)
        .map_err(fail)?
    {
        let m = m.map_err(fail)?;
        let kind = if m.snapshot { "snapshot" } else { "txn" };
        let line = writeln!(
            out,
            "{} {} {kind} {} {} {} {} {}",
            m.lsn,
            m.generation,
            m.page_count,
            m.commit_size,
            m.db_checksum,
            m.timestamp_ms,
            m.epoch
        );
        if line.is_err() {
            return Ok(()); // stdout closed (e.g. piped into head)
        }
    }
    Ok(())
}

/// A progress bar on stderr (a line per 5 % when stderr is not a terminal).
struct Bar {
    what: &'static str,
    tty: bool,
    last: u64,
    started: std::time::Instant,
}

/// `12.3 MiB/s, ETA 0:42` (rate and time left from `rate_eta`; `--` before any rate).
fn rate_text(done: u64, total: u64, elapsed_ms: u64) -> String {
    let (rate, eta) = replica::rate_eta(done, 0, total, elapsed_ms);
    let eta = eta.map_or_else(
        || "--".to_string(),
        |ms| {
            let s = ms.div_ceil(1000);
            format!("{}:{:02}", s / 60, s % 60)
        },
    );
    format!("{:.1} MiB/s, ETA {eta}", rate as f64 / 1048576.0)
}

impl Bar {
    fn show(&mut self, done: u64, total: u64) {
        use std::io::IsTerminal;
        if total == 0 {
            return;
        }
        let pct = done.min(total) * 100 / total;
        if !self.tty && pct < self.last + 5 && done < total {
            return;
        }
        if self.tty && pct == self.last && done < total {
            return;
        }
        self.last = pct;
        let filled = (pct / 4) as usize;
        let line = format!(
            "{:<10} [{}{}] {pct:>3}% {:.1}/{:.1} MiB {}",
            self.what,
            "#".repeat(filled),
            " ".repeat(25 - filled),
            done as f64 / 1048576.0,
            total as f64 / 1048576.0,
            rate_text(done, total, self.started.elapsed().as_millis() as u64)
        );
        let mut e = std::io::stderr().lock();
        if self.tty || std::io::stderr().is_terminal() {
            let _ = write!(e, "\r{line}");
            if done >= total {
                let _ = writeln!(e);
            }
        } else {
            let _ = writeln!(e, "{line}");
        }
    }
}

/// `serve --backup`: an uploader thread for `db` (one pass every `backup_interval_ms`), the
/// same passes a primary's own backup thread runs; `backup.lock` keeps it the only uploader.
fn spawn_uploader(db: &str, target: &str) -> Result<(), Failure> {
    use replica::transport::s3::Uploader;
    let db = db.to_string();
    let dir = replica::txlog::log_dir(&db);
    let mut target = target.to_string();
    if dbs_suffix_needed(&target) {
        // One prefix per database when serving a directory of primaries.
        let name = Path::new(&db)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("db");
        target = format!("{}/{name}", target.trim_end_matches('/'));
    }
    // Remembered as the primary's own `backup` setting, so local retention keeps every segment
    // the bucket lacks and repl_status().backup shows these uploads; the primary's own thread
    // takes over once this process stops. Another target already set is refused.
    match replica::transport::s3::configured_target(&dir) {
        Some(t) if t != target => {
            return Err(Failure::Error(format!(
                "{db} already backs up to {t} (repl_config('backup')): serve --backup {target} would \
                 split its backup in two; pass that target, or clear it with repl_config('backup', '')"
            )))
        }
        Some(_) => {}
        None => replica::transport::s3::set_target(&dir, &target).map_err(fail)?,
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("backup.lock"))
        .map_err(|e| Failure::Error(format!("{}: {e}", dir.display())))?;
    if lock.try_lock().is_err() {
        return Err(Failure::Error(format!(
            "{db}: another process (the primary itself, or another serve) is uploading its backup"
        )));
    }
    let mut up = Uploader::new(&target, &dir).map_err(fail)?;
    replica::logging::event(&format!(
        "event=backup_start db={db:?} target={:?}",
        up.target()
    ));
    std::thread::Builder::new()
        .name("repl-backup".into())
        .spawn(move || {
            let _lock = lock;
            let mut failing = false;
            let mut last_pass: Option<std::time::Instant> = None;
            loop {
                let (interval_ms, retain_ms) = replica::transport::s3::settings(&dir);
                let interval = std::time::Duration::from_millis(interval_ms);
                if last_pass.is_some_and(|t| t.elapsed() < interval) {
                    // Between passes: keep the lease (an interval longer than half of it).
                    if up.renew().is_err() && up.refused().is_some() {
                        replica::logging::event(&format!(
                            "event=backup_stopped db={db:?} error={:?}",
                            up.refused().unwrap_or_default()
                        ));
                        return;
                    }
                    std::thread::sleep(Uploader::renew_every().min(interval));
                    continue;
                }
                last_pass = Some(std::time::Instant::now());
                match up.run(retain_ms) {
                    Ok(r) if r.objects > 0 => {
                        failing = false;
                        replica::logging::event(&format!(
                            "event=backup_upload db={db:?} objects={} bytes={} uploaded_lsn={}",
                            r.objects,
                            r.bytes,
                            r.uploaded_lsn.map_or(0, |l| l.0)
                        ))
                    }
                    Ok(_) => failing = false,
                    Err(e) if !failing || up.refused().is_some() => {
                        failing = true;
                        replica::logging::event(&format!(
                            "event={} db={db:?} error={:?}",
                            if up.refused().is_some() {
                                "backup_stopped"
                            } else {
                                "backup_error"
                            },
                            e.to_string()
                        ))
                    }
                    Err(_) => {}
                }
                if up.refused().is_some() {
                    return;
                }
                std::thread::sleep(Uploader::renew_every().min(interval));
            }
        })
        .map_err(|e| Failure::Error(format!("starting the backup thread: {e}")))?;
    Ok(())
}

/// Whether a `--backup` target is shared by several databases (set by `serve` for a directory).
fn dbs_suffix_needed(_target: &str) -> bool {
    SERVE_MANY.load(std::sync::atomic::Ordering::Relaxed)
}

static SERVE_MANY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where `restore` stops.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// The source's newest durable LSN.
    End,
    Lsn(Lsn),
    /// The last transaction committed at or before this Unix time (ms).
    Time(u64),
}

/// RFC 3339 (UTC, milliseconds) of a Unix time in ms.
fn rfc3339(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(ms as i64)
        .map_or_else(|_| format!("{ms} ms"), |t| t.to_string())
}

fn restore(source: &str, out: &Path, target: Target) -> Result<(), Failure> {
    use replica::transport::{open_source, Fetch};
    use std::io::IsTerminal;
    use std::os::unix::fs::FileExt;
    if out.exists() {
        return Err(Failure::Error(format!(
            "{} exists: restore writes a new file; remove it or choose another name",
            out.display()
        )));
    }
    let src = open_source(source).map_err(fail)?;
    // A time becomes an LSN where the source can tell (directory, bucket); over HTTP the
    // restore stops at the first record committed later.
    let (stop_lsn, stop_ms) = match target {
        Target::End => (None, None),
        Target::Lsn(l) => (Some(l), None),
        Target::Time(ms) if src.knows_times() => match src.lsn_at_time(ms).map_err(fail)? {
            Some(l) => (Some(l), None),
            None => {
                return Err(Failure::Error(format!(
                    "{} holds no transaction committed at or before {}",
                    src.describe(),
                    rfc3339(ms)
                )))
            }
        },
        Target::Time(ms) => (None, Some(ms)),
    };
    let tty = std::io::stderr().is_terminal();
    let mut bar = Bar {
        what: "snapshot",
        tty,
        last: 0,
        started: std::time::Instant::now(),
    };
    let tmp = out.with_extension(format!("restore-{}.tmp", std::process::id()));
    let res = (|| -> Result<(Lsn, u64, replica::types::Checksum), Failure> {
        let f = std::fs::File::create(&tmp)
            .map_err(|e| Failure::Error(format!("{}: {e}", tmp.display())))?;
        let io = |e: std::io::Error| Failure::Error(format!("writing {}: {e}", tmp.display()));
        // Streamed into the temporary file (memory: a page and the checksums); the file is
        // removed unless every checksum held.
        let mut write_err = None;
        let (smeta, mut sums) = src
            .snapshot_stream_at(
                stop_lsn,
                &mut |d, t| bar.show(d, t),
                &mut |m| match stop_ms {
                    Some(ms) if m.timestamp_ms > ms => Err(replica::error::Error::Unsupported(format!(
                        "the source's newest snapshot (LSN {}) was taken at {}, after {}; restore from the \
                         primary's log directory or from its bucket backup instead",
                        m.lsn,
                        rfc3339(m.timestamp_ms),
                        rfc3339(ms)
                    ))),
                    _ => Ok(()),
                },
                &mut |pgno, data| {
                    f.write_all_at(data, (pgno.get() as u64 - 1) * data.len() as u64)
                        .map_err(|e| {
                            let m = format!("writing {}: {e}", tmp.display());
                            write_err = Some(m.clone());
                            replica::error::Error::Other(m)
                        })
                },
            )
            .map_err(|e| write_err.take().map_or_else(|| fail(e), Failure::Error))?;
        let mut ps = smeta.page_size;
        let mut size = smeta.commit_size;
        let mut lsn = smeta.lsn;
        let mut ts = smeta.timestamp_ms;
        let end = src.info().map_err(fail)?.durable_lsn.unwrap_or(lsn);
        if let Some(t) = stop_lsn {
            if t > end {
                return Err(Failure::Error(format!(
                    "LSN {t} is not in {}: it ends at LSN {end}",
                    src.describe()
                )));
            }
        }
        let goal = stop_lsn.unwrap_or(end);
        let mut bar = Bar {
            what: "log",
            tty,
            last: 0,
            started: std::time::Instant::now(),
        };
        let span = goal.0.saturating_sub(lsn.0);
        'fetch: while lsn < goal {
            let recs = match src.fetch(lsn.next(), 32 << 20).map_err(fail)? {
                Fetch::Records(v) if v.is_empty() => break,
                Fetch::Records(v) => v,
                Fetch::Truncated { first_lsn } => {
                    return Err(Failure::Error(format!(
                        "the source no longer holds LSN {} (it now starts at LSN {first_lsn}); run restore again",
                        lsn.next()
                    )))
                }
            };
            for r in recs {
                if r.meta.lsn > goal || stop_ms.is_some_and(|ms| r.meta.timestamp_ms > ms) {
                    break 'fetch;
                }
                if r.meta.snapshot {
                    // A new generation starts with the whole database.
                    f.set_len(0).map_err(io)?;
                    sums = replica::txlog::DbChecksum::new(r.meta.page_size);
                    ps = r.meta.page_size;
                } else if r.meta.page_size != ps {
                    return Err(Failure::Error(format!(
                        "LSN {}: page size {} differs from {} without a snapshot",
                        r.meta.lsn, r.meta.page_size, ps
                    )));
                }
                for p in &r.pages {
                    f.write_all_at(&p.data, (p.pgno.get() as u64 - 1) * ps.get() as u64)
                        .map_err(io)?;
                    sums.set_page(p.pgno, &p.data);
                }
                size = r.meta.commit_size;
                sums.truncate(size);
                if sums.total() != r.meta.db_checksum {
                    return Err(Failure::Error(format!(
                        "LSN {}: the restored state does not match the primary's checksum; nothing was kept",
                        r.meta.lsn
                    )));
                }
                lsn = r.meta.lsn;
                ts = r.meta.timestamp_ms;
            }
            bar.show(lsn.0.saturating_sub(smeta.lsn.0).min(span), span.max(1));
        }
        bar.show(span.max(1), span.max(1));
        if let Some(t) = stop_lsn {
            if lsn != t {
                return Err(Failure::Error(format!(
                    "the source's log ends at LSN {lsn}, before the target LSN {t}; nothing was kept"
                )));
            }
        }
        f.set_len(size as u64 * ps.get() as u64).map_err(io)?;
        f.sync_all().map_err(io)?;
        Ok((lsn, ts, sums.total()))
    })();
    match res {
        Ok((lsn, ts, sum)) => {
            std::fs::rename(&tmp, out)
                .map_err(|e| Failure::Error(format!("renaming to {}: {e}", out.display())))?;
            println!(
                "restored {} at LSN {lsn}, checksum {sum}, committed {}",
                out.display(),
                rfc3339(ts)
            );
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// One JSON line per codec: the ratio (stored/original bytes, raw entries counted at page size)
/// and compress/decompress throughput over every page of `path`, one page per call as the log
/// does it.
fn compress_bench(path: &Path) -> Result<(), Failure> {
    use replica::txlog::{compress_page, decompress_page, Compression};
    use std::time::Instant;
    let data = std::fs::read(path)
        .map_err(|e| Failure::Error(format!("reading {}: {e}", path.display())))?;
    if data.len() < 100 || &data[..16] != b"SQLite format 3\0" {
        return Err(Failure::Error(format!(
            "{} is not an SQLite database file",
            path.display()
        )));
    }
    let ps = match u16::from_be_bytes([data[16], data[17]]) {
        1 => 65536,
        n => usize::from(n),
    };
    let pages: Vec<&[u8]> = data.chunks_exact(ps).collect();
    let mb = (pages.len() * ps) as f64 / 1e6;
    for c in [
        Compression::Lz4,
        Compression::Zstd(1),
        Compression::Zstd(3),
        Compression::Zstd(9),
    ] {
        // Best of three passes: the figures are for the codec, not for the machine's other load.
        let mut stored: Vec<Option<Vec<u8>>> = Vec::new();
        let mut ct = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            stored = pages.iter().map(|p| compress_page(c, p)).collect();
            ct = ct.min(t.elapsed().as_secs_f64());
        }
        let bytes: usize = stored.iter().map(|s| s.as_ref().map_or(ps, Vec::len)).sum();
        let codec = c.codec().expect("a codec");
        let mut dt = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            for (s, p) in stored.iter().zip(&pages) {
                if let Some(s) = s {
                    let back = decompress_page(codec, s, ps).map_err(fail)?;
                    if back.as_slice() != *p {
                        return Err(Failure::Error(format!("{} does not round-trip", c.name())));
                    }
                }
            }
            dt = dt.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{}",
            serde_json::json!({
                "file": path.display().to_string(), "codec": c.name(), "page_size": ps,
                "pages": pages.len(), "ratio": bytes as f64 / (pages.len() * ps) as f64,
                "compress_mb_s": mb / ct.max(1e-9), "decompress_mb_s": mb / dt.max(1e-9),
            })
        );
    }
    Ok(())
}
