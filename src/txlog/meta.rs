//! `meta.json` (FORMAT.md §6), the durable watermark file (§7) and the small filesystem helpers
//! the log needs: atomic file creation (tmp + fsync + link/rename + dir fsync), directory fsync,
//! the wall clock and random lineage ids. Crash reasoning: `meta.json` appears complete or not at
//! all; `durable` is one 20-byte pwrite at offset 0, so it holds the old or the new watermark.

use crate::error::{Error, Result};
use crate::types::{Checksum, Epoch, Generation, Lsn, PageSize};
use serde_json::{json, Value};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use xxhash_rust::xxh3::xxh3_64;

/// Directory format version (`meta.json` `format`) of an epoch-1 log, readable by every build.
pub const DIR_FORMAT: u32 = 1;
/// Directory format version of a log written by a primary of epoch 2 or later (a promoted
/// replica): `meta.json` adds `epoch`, `epoch_lsn` and `epoch_checksum`, and its records are
/// version 3 (FORMAT.md §3.1, §6). This build reads both.
pub const DIR_FORMAT_EPOCH: u32 = 2;
pub(crate) const META_FILE: &str = "meta.json";
pub(crate) const FENCE_FILE: &str = "fence";
pub(crate) const DURABLE_FILE: &str = "durable";
const DURABLE_LEN: usize = 20;

/// The identity of a log directory (`meta.json`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub format: u32,
    /// 32 lowercase hex digits.
    pub lineage: String,
    pub role: String,
    pub page_size: u32,
    pub created_ms: u64,
    /// The epoch of the primary writing this log (1 unless it was promoted).
    pub epoch: Epoch,
    /// Where this epoch's history starts: the LSN of the promoted replica's state (the log's
    /// first snapshot) and its database checksum. None for epoch 1 (LSN 0).
    pub epoch_start: Option<(Lsn, Checksum)>,
}

impl Meta {
    /// A new identity: fresh random lineage, current time.
    pub fn new(role: &str, page_size: PageSize) -> Result<Meta> {
        Ok(Meta {
            format: DIR_FORMAT,
            lineage: random_hex16()?,
            role: role.to_string(),
            page_size: page_size.get(),
            created_ms: now_ms(),
            epoch: Epoch::FIRST,
            epoch_start: None,
        })
    }

    pub fn to_json(&self) -> String {
        let mut v = json!({
            "format": self.format,
            "lineage": self.lineage,
            "role": self.role,
            "page_size": self.page_size,
            "created_ms": self.created_ms,
        });
        if self.epoch != Epoch::FIRST {
            v["format"] = json!(DIR_FORMAT_EPOCH);
            v["epoch"] = json!(self.epoch.0);
            if let Some((lsn, sum)) = self.epoch_start {
                v["epoch_lsn"] = json!(lsn.0);
                v["epoch_checksum"] = json!(format!("{:016x}", sum.0));
            }
        }
        v.to_string()
    }

    /// Parses and validates `meta.json` text; `what` names the file in messages.
    pub fn from_json(text: &str, what: &str) -> Result<Meta> {
        let bad = |m: String| Error::Corrupt(format!("{what}: {m}"));
        let v: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let uint = |k: &str| {
            v.get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| bad(format!("missing or non-integer \"{k}\"")))
        };
        let string = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(format!("missing or non-string \"{k}\"")))
        };
        let format = uint("format")?;
        if format != u64::from(DIR_FORMAT) && format != u64::from(DIR_FORMAT_EPOCH) {
            return Err(Error::Unsupported(format!(
                "{what}: log directory format {format} is not supported (this build reads formats \
                 {DIR_FORMAT} and {DIR_FORMAT_EPOCH})"
            )));
        }
        let (epoch, epoch_start) = if format == u64::from(DIR_FORMAT_EPOCH) {
            let e = u32::try_from(uint("epoch")?)
                .ok()
                .filter(|e| *e >= 2)
                .ok_or_else(|| bad("\"epoch\" must be 2..=4294967295 in format 2".into()))?;
            let start = match (
                v.get("epoch_lsn").and_then(Value::as_u64),
                v.get("epoch_checksum"),
            ) {
                (Some(l), Some(c)) => {
                    let c = c
                        .as_str()
                        .and_then(|c| u64::from_str_radix(c, 16).ok())
                        .ok_or_else(|| bad("\"epoch_checksum\" is not 16 hex digits".into()))?;
                    Some((Lsn(l), Checksum(c)))
                }
                (None, None) => None,
                _ => {
                    return Err(bad(
                        "\"epoch_lsn\" and \"epoch_checksum\" go together".into()
                    ))
                }
            };
            (Epoch(e), start)
        } else {
            (Epoch::FIRST, None)
        };
        let meta = Meta {
            format: format as u32,
            epoch,
            epoch_start,
            lineage: string("lineage")?,
            role: string("role")?,
            page_size: u32::try_from(uint("page_size")?)
                .map_err(|_| bad("page_size out of range".into()))?,
            created_ms: uint("created_ms")?,
        };
        meta.validate().map_err(bad)?;
        Ok(meta)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.lineage.len() != 32 || !self.lineage.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("lineage {:?} is not 32 hex digits", self.lineage));
        }
        if PageSize::new(self.page_size).is_none() {
            return Err(format!("invalid page_size {}", self.page_size));
        }
        Ok(())
    }
}

/// Reads `<dir>/meta.json`.
pub(crate) fn read_meta(dir: &Path) -> Result<Meta> {
    let path = dir.join(META_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Misuse(format!(
                "{} not found: {} is not a replication log directory",
                path.display(),
                dir.display()
            ))
        } else {
            Error::io(format!("reading {}", path.display()), e)
        }
    })?;
    Meta::from_json(&text, &path.display().to_string())
}

/// Writes `<dir>/meta.json` atomically; fails if it already exists.
pub(crate) fn create_meta(dir: &Path, meta: &Meta) -> Result<()> {
    meta.validate()
        .map_err(|m| Error::Misuse(format!("invalid meta: {m}")))?;
    let path = dir.join(META_FILE);
    let tmp = dir.join(format!("{META_FILE}.{}.tmp", std::process::id()));
    write_and_sync(&tmp, meta.to_json().as_bytes())?;
    // link() fails if the target exists: exactly one creator wins.
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::Misuse(format!(
            "{} already exists: the log directory is already initialised (open it instead)",
            path.display()
        ))),
        Err(e) => Err(Error::io(format!("creating {}", path.display()), e)),
    }
}

/// Creates/truncates `path`, writes `data` and fsyncs it.
pub fn write_and_sync(path: &Path, data: &[u8]) -> Result<()> {
    let ctx = || format!("writing {}", path.display());
    let mut f = File::create(path).map_err(|e| Error::io(ctx(), e))?;
    f.write_all(data).map_err(|e| Error::io(ctx(), e))?;
    f.sync_all().map_err(|e| Error::io(ctx(), e))
}

/// fsync of a directory, making creations/renames/removals in it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync of directory {}", dir.display()), e))
}

pub(crate) use crate::util::now_ms;

/// `<dir>/fence`: the newest epoch this log's primary has learned of, and who holds it
/// (FORMAT.md §6.1). Written by whoever learns it (the HTTP server from a follower's
/// `X-Repl-Epoch`, `repl_promote()` telling its former source); a primary whose log epoch is
/// older than the fence accepts no more writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub epoch: Epoch,
    /// The new primary as a person reads it (a URL without its token, or a path), if known.
    pub primary: Option<String>,
    pub seen_ms: u64,
}

impl Fence {
    pub fn to_json(&self) -> String {
        json!({"epoch": self.epoch.0, "primary": self.primary, "seen_ms": self.seen_ms}).to_string()
    }

    pub fn from_json(text: &str) -> Option<Fence> {
        let v: Value = serde_json::from_str(text).ok()?;
        Some(Fence {
            epoch: Epoch(u32::try_from(v.get("epoch")?.as_u64()?).ok()?),
            primary: v.get("primary").and_then(Value::as_str).map(str::to_string),
            seen_ms: v.get("seen_ms").and_then(Value::as_u64).unwrap_or(0),
        })
    }
}

/// Reads `<dir>/fence` (None: no fence, or an unreadable one, which fences nothing).
pub fn read_fence(dir: &Path) -> Option<Fence> {
    Fence::from_json(&std::fs::read_to_string(dir.join(FENCE_FILE)).ok()?)
}

/// Raises `<dir>/fence` to `f` (tmp + rename: readers see the old or the new fence). Never
/// lowers it; returns whether it changed. Keeps a known primary's name when `f` has none.
pub fn raise_fence(dir: &Path, f: &Fence) -> Result<bool> {
    let cur = read_fence(dir);
    let mut f = f.clone();
    match &cur {
        Some(c) if c.epoch > f.epoch => return Ok(false),
        Some(c) if c.epoch == f.epoch && (f.primary.is_none() || c.primary == f.primary) => {
            return Ok(false)
        }
        Some(c) if c.epoch == f.epoch => {}
        _ => {}
    }
    if f.primary.is_none() {
        f.primary = cur.filter(|c| c.epoch == f.epoch).and_then(|c| c.primary);
    }
    let path = dir.join(FENCE_FILE);
    let tmp = dir.join(format!("{FENCE_FILE}.{}.tmp", std::process::id()));
    write_and_sync(&tmp, f.to_json().as_bytes())?;
    std::fs::rename(&tmp, &path)
        .map_err(|e| Error::io(format!("renaming to {}", path.display()), e))?;
    sync_dir(dir)?;
    Ok(true)
}

/// 16 bytes from /dev/urandom as 32 lowercase hex digits.
pub(crate) fn random_hex16() -> Result<String> {
    let mut b = [0u8; 16];
    crate::util::urandom(&mut b).map_err(|e| Error::io("reading /dev/urandom", e))?;
    Ok(crate::util::hex(&b))
}

fn encode_durable(lsn: Lsn, gen: Generation) -> [u8; DURABLE_LEN] {
    let mut b = [0u8; DURABLE_LEN];
    b[0..8].copy_from_slice(&lsn.0.to_be_bytes());
    b[8..12].copy_from_slice(&gen.0.to_be_bytes());
    let sum = xxh3_64(&b[..12]);
    b[12..20].copy_from_slice(&sum.to_be_bytes());
    b
}

/// Decodes the durable file's bytes (§7); empty = no watermark.
pub(crate) fn decode_durable(b: &[u8], what: &str) -> Result<Option<(Lsn, Generation)>> {
    if b.is_empty() {
        return Ok(None);
    }
    if b.len() != DURABLE_LEN {
        return Err(Error::Corrupt(format!(
            "{what}: {} bytes, expected {DURABLE_LEN}",
            b.len()
        )));
    }
    let stored = u64::from_be_bytes(b[12..20].try_into().expect("8 bytes"));
    let actual = xxh3_64(&b[..12]);
    if stored != actual {
        return Err(Error::Corrupt(format!(
            "{what}: checksum mismatch (stored {stored:016x}, computed {actual:016x})"
        )));
    }
    let lsn = Lsn(u64::from_be_bytes(b[0..8].try_into().expect("8 bytes")));
    let gen = Generation(u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")));
    Ok(Some((lsn, gen)))
}

pub(crate) fn read_durable(dir: &Path) -> Result<Option<(Lsn, Generation)>> {
    let path = dir.join(DURABLE_FILE);
    match std::fs::read(&path) {
        Ok(b) => decode_durable(&b, &format!("durable watermark {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

/// Raises the watermark to (lsn, gen); never lowers it. One pwrite at offset 0, no fsync.
pub(crate) fn write_durable(dir: &Path, lsn: Lsn, gen: Generation) -> Result<()> {
    DurableFile::open(dir)?.raise(lsn, gen)
}

/// The durable watermark file kept open by a writer that raises it often (flock + pread +
/// pwrite + unlock per raise instead of open/read/close/open/write/close).
///
/// Raising is read-compare-write, so two writers could otherwise interleave and lower the
/// watermark (A reads 5, B reads 5 and writes 9, A writes 7). The file's `flock` excludes
/// writers of other processes and other open descriptions; `local` excludes the threads
/// sharing this one (an flock belongs to the open file description, so it does not).
pub struct DurableFile {
    f: std::fs::File,
    path: std::path::PathBuf,
    local: std::sync::Mutex<()>,
}

impl DurableFile {
    pub fn open(dir: &Path) -> Result<DurableFile> {
        let path = dir.join(DURABLE_FILE);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        Ok(DurableFile {
            f,
            path,
            local: std::sync::Mutex::new(()),
        })
    }

    /// The watermark now (one pread; `None` when there is none or it reads torn).
    pub fn read(&self) -> Option<(Lsn, Generation)> {
        let mut b = [0u8; DURABLE_LEN];
        let n = self.f.read_at(&mut b, 0).ok()?;
        decode_durable(&b[..n], "durable watermark").ok().flatten()
    }

    /// Raise the watermark to (lsn, gen); never lowers it, also against concurrent raisers.
    pub fn raise(&self, lsn: Lsn, gen: Generation) -> Result<()> {
        let _local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        self.f
            .lock()
            .map_err(|e| Error::io(format!("locking {}", self.path.display()), e))?;
        let r = self.raise_locked(lsn, gen);
        let _ = self.f.unlock();
        r
    }

    fn raise_locked(&self, lsn: Lsn, gen: Generation) -> Result<()> {
        let mut b = [0u8; DURABLE_LEN];
        let n = self.f.read_at(&mut b, 0).unwrap_or(0);
        if let Ok(Some(cur)) = decode_durable(&b[..n], "durable watermark") {
            if (lsn, gen) <= cur {
                return Ok(());
            }
        }
        self.f
            .write_all_at(&encode_durable(lsn, gen), 0)
            .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))
    }
}
