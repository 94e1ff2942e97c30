//! The bucket source: a replica (`repl_sync('s3://…')`, `repl_follow`), `restore` and `verify`
//! read a backup prefix through the manifest. Every object is checked against the manifest's
//! xxh3 before anything in it is used, opened when encrypted, and decoded by the txlog decoder
//! (record checksums); the applier then checks every database checksum as for any source.

use super::client::{Client, Target};
use super::crypt::Key;
use super::manifest::{Manifest, Object, MANIFEST};
use crate::error::{Error, Result};
use crate::transport::{Fetch, Source, SourceInfo};
use crate::txlog::{self, Record};
use crate::types::{Lsn, PageSize};
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a follower re-reads the manifest while it waits for new records.
const POLL: Duration = Duration::from_millis(100);

pub struct BucketSource {
    client: Client,
    key: Option<Key>,
    manifest: Mutex<Option<Manifest>>,
    /// The last chunk read and its records (a follower reads one chunk many times).
    chunk: Mutex<Option<(String, std::sync::Arc<Vec<Record>>)>>,
}

impl BucketSource {
    /// Opens `s3://bucket/prefix` and reads its manifest once (so a wrong target or key fails
    /// here, before anything is written).
    pub fn open(spec: &str) -> Result<BucketSource> {
        let src = BucketSource {
            client: Client::new(Target::parse(spec)?)?,
            key: Key::from_env()?,
            manifest: Mutex::new(None),
            chunk: Mutex::new(None),
        };
        src.refresh()?;
        Ok(src)
    }

    /// Re-reads the manifest.
    pub fn refresh(&self) -> Result<Manifest> {
        let what = self.client.describe(MANIFEST);
        let Some((b, _)) = self.client.get(MANIFEST)? else {
            return Err(Error::Misuse(format!(
                "{what} does not exist: nothing was backed up to {} yet (set repl_config('backup', '{}') on the primary)",
                self.client.target().display(),
                self.client.target().display()
            )));
        };
        let m = Manifest::from_json(&b, &what)?;
        match (&m.key_check, &self.key) {
            (Some(c), Some(k)) if !k.matches(c) => {
                return Err(Error::Misuse(format!(
                    "the backup key (REPL_BACKUP_KEY / REPL_BACKUP_KEY_FILE) is not the key {} was sealed with",
                    self.client.target().display()
                )))
            }
            (Some(_), None) => {
                return Err(Error::Misuse(format!(
                    "{} is encrypted: set REPL_BACKUP_KEY or REPL_BACKUP_KEY_FILE to its key",
                    self.client.target().display()
                )))
            }
            _ => {}
        }
        *self.manifest.lock().unwrap_or_else(|e| e.into_inner()) = Some(m.clone());
        Ok(m)
    }

    fn cached(&self) -> Result<Manifest> {
        let m = self
            .manifest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match m {
            Some(m) => Ok(m),
            None => self.refresh(),
        }
    }

    /// One object's plain bytes, checked against its manifest entry.
    pub fn object(&self, o: &Object) -> Result<Vec<u8>> {
        let what = self.client.describe(&o.key);
        let Some((b, _)) = self.client.get(&o.key)? else {
            return Err(Error::Corrupt(format!(
                "{what} is missing: the manifest lists it; the backup is damaged (sqlite-replica verify names every problem)"
            )));
        };
        if b.len() as u64 != o.bytes {
            return Err(Error::Corrupt(format!(
                "{what} is {} bytes, the manifest says {}: truncated or replaced; refused",
                b.len(),
                o.bytes
            )));
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&b);
        if sum != o.xxh3 {
            return Err(Error::Corrupt(format!(
                "{what}: checksum {sum:016x} differs from the manifest's {:016x}: the object is damaged; refused",
                o.xxh3
            )));
        }
        match &self.key {
            Some(k) => k.open(&o.key, &b, &what),
            None if super::crypt::is_sealed(&b) => Err(Error::Misuse(format!(
                "{what} is encrypted: set REPL_BACKUP_KEY or REPL_BACKUP_KEY_FILE"
            ))),
            None => Ok(b),
        }
    }

    /// The records of a chunk, decoded and checked (sequence and LSN range).
    pub fn chunk_records(&self, o: &Object) -> Result<std::sync::Arc<Vec<Record>>> {
        if let Some((k, v)) = &*self.chunk.lock().unwrap_or_else(|e| e.into_inner()) {
            if *k == o.key {
                return Ok(v.clone());
            }
        }
        let what = self.client.describe(&o.key);
        let b = self.object(o)?;
        let h =
            txlog::decode_segment_header(&b).map_err(|e| Error::Corrupt(format!("{what}: {e}")))?;
        if h.first_lsn != o.first_lsn {
            return Err(Error::Corrupt(format!(
                "{what}: starts at LSN {}, the manifest says {}",
                h.first_lsn, o.first_lsn
            )));
        }
        let mut off = txlog::SEGMENT_HEADER_LEN;
        let mut out: Vec<Record> = Vec::new();
        while off < b.len() {
            let (r, n) = txlog::decode_record(&b[off..])
                .map_err(|e| Error::Corrupt(format!("{what} at offset {off}: {e}")))?;
            if let Some(p) = out.last() {
                txlog::check_sequence(&p.meta, &r.meta)
                    .map_err(|e| Error::Corrupt(format!("{what} at offset {off}: {e}")))?;
            } else if r.meta.lsn != o.first_lsn {
                return Err(Error::Corrupt(format!(
                    "{what}: first record is LSN {}",
                    r.meta.lsn
                )));
            }
            off += n;
            out.push(r);
        }
        let last = out.last().map(|r| (r.meta.lsn, r.meta.db_checksum));
        if last != Some((o.last_lsn, o.db_checksum)) {
            return Err(Error::Corrupt(format!(
                "{what}: ends at LSN {:?}, the manifest says LSN {} with checksum {}",
                last.map(|l| l.0 .0),
                o.last_lsn,
                o.db_checksum
            )));
        }
        let v = std::sync::Arc::new(out);
        *self.chunk.lock().unwrap_or_else(|e| e.into_inner()) = Some((o.key.clone(), v.clone()));
        Ok(v)
    }

    /// The object `o` as a reader of its plain bytes. Unencrypted, it is the GET's body read
    /// in pieces (a snapshot of any size in bounded memory), checked against the manifest's
    /// `bytes` and `xxh3` as it goes: a damaged body fails the read that completes its length, a
    /// short or long one the read past it, so a caller that reads to the end (as `drain` makes
    /// sure) has used nothing unchecked once it returns. Encrypted, the whole object is opened in memory first (the
    /// seal covers the whole object).
    /// Returns the reader and the plain length.
    pub fn object_reader(&self, o: &Object) -> Result<(Box<dyn Read + Send>, u64)> {
        if self.key.is_some() {
            let plain = self.object(o)?;
            let len = plain.len() as u64;
            return Ok((Box::new(std::io::Cursor::new(plain)), len));
        }
        let what = self.client.describe(&o.key);
        let Some(body) = self.client.get_reader(&o.key)? else {
            return Err(Error::Corrupt(format!(
                "{what} is missing: the manifest lists it; the backup is damaged (sqlite-replica verify names every problem)"
            )));
        };
        let rd = Checked {
            inner: body,
            what,
            want_len: o.bytes,
            want_xxh3: o.xxh3,
            hash: xxhash_rust::xxh3::Xxh3::new(),
            n: 0,
            first: true,
        };
        Ok((Box::new(rd), o.bytes))
    }

    /// Streams the snapshot object `o`.
    fn stream_object(
        &self,
        o: &Object,
        progress: &mut dyn FnMut(u64, u64),
        on_meta: &mut dyn FnMut(&txlog::RecordMeta) -> Result<()>,
        on_page: &mut dyn FnMut(crate::types::PageNo, &[u8]) -> Result<()>,
    ) -> Result<(txlog::RecordMeta, txlog::DbChecksum)> {
        let what = self.client.describe(&o.key);
        let (mut rd, len) = self.object_reader(o)?;
        progress(len, len);
        let r = txlog::stream_snapshot_from(&mut rd, &what, len, on_meta, on_page)
            .map_err(checked_error)?;
        drain(&mut rd, &what)?;
        if r.0.lsn != o.first_lsn || r.0.db_checksum != o.db_checksum {
            return Err(Error::Corrupt(format!(
                "{what}: holds LSN {} checksum {}, the manifest says LSN {} checksum {}",
                r.0.lsn, r.0.db_checksum, o.first_lsn, o.db_checksum
            )));
        }
        Ok(r)
    }

    /// The last LSN committed at or before `ms` (None: nothing that early is in the bucket).
    pub fn lsn_at(&self, ms: u64) -> Result<Option<Lsn>> {
        let m = self.cached()?;
        let Some(c) = m.chunk_at_time(ms) else {
            return Ok(m
                .snapshots
                .iter()
                .rev()
                .find(|s| s.last_ms <= ms)
                .map(|s| s.first_lsn));
        };
        let recs = self.chunk_records(c)?;
        Ok(recs
            .iter()
            .take_while(|r| r.meta.timestamp_ms <= ms)
            .last()
            .map(|r| r.meta.lsn))
    }

    /// `sqlite-replica verify s3://…`: every object of the manifest downloaded and checked
    /// (size, xxh3, decoding, record checksums, LSN sequence), and the database checksum of every
    /// record replayed from the oldest snapshot. The first problem is the error, naming the
    /// object.
    pub fn verify(&self) -> Result<String> {
        let m = self.refresh()?;
        m.check_chain()
            .map_err(|e| Error::Corrupt(format!("{}: {e}", self.client.describe(MANIFEST))))?;
        let mut out = format!(
            "lineage {} epoch {} page_size {}, manifest written by uploader {} ({})\n",
            m.lineage, m.epoch, m.page_size, m.writer, m.writer_host
        );
        let mut bases = std::collections::HashMap::new();
        for s in &m.snapshots {
            let (meta, sums) =
                self.stream_object(s, &mut |_, _| {}, &mut |_| Ok(()), &mut |_, _| Ok(()))?;
            out += &format!(
                "snapshot {} LSN {} generation {}: {} pages, checksum {}\n",
                s.key, meta.lsn, meta.generation, meta.commit_size, meta.db_checksum
            );
            bases.insert(meta.lsn, sums);
        }
        let mut state: Option<txlog::DbChecksum> = None;
        let mut verified = 0u64;
        let mut records = 0u64;
        let mut prev_last: Option<Lsn> = None;
        for c in &m.chunks {
            if prev_last.is_none_or(|p| p.next() != c.first_lsn) {
                state = bases.remove(&Lsn(c.first_lsn.0 - 1));
            }
            let what = self.client.describe(&c.key);
            for r in self.chunk_records(c)?.iter() {
                records += 1;
                if r.meta.snapshot {
                    state = Some(txlog::DbChecksum::new(r.meta.page_size));
                }
                if let Some(s) = state.as_mut() {
                    for p in &r.pages {
                        s.set_page(p.pgno, &p.data);
                    }
                    s.truncate(r.meta.commit_size);
                    if s.total() != r.meta.db_checksum {
                        return Err(Error::Corrupt(format!(
                            "{what}: LSN {}: database checksum mismatch after replay: the record says {}, the replayed state has {}",
                            r.meta.lsn, r.meta.db_checksum, s.total()
                        )));
                    }
                    verified += 1;
                }
            }
            prev_last = Some(c.last_lsn);
        }
        out += &format!(
            "chunks {} ({} bytes), records {}, LSN {}..{}\ndatabase checksums verified: {verified} records\nOK",
            m.chunks.len(),
            m.chunks.iter().map(|c| c.bytes).sum::<u64>(),
            records,
            m.first_record_lsn().map_or("-".into(), |l| l.to_string()),
            m.last_lsn().map_or("-".into(), |l| l.to_string()),
        );
        Ok(out)
    }
}

/// A GET body checked as it is read against the manifest's length and xxh3 (`object_reader`).
struct Checked {
    inner: Box<dyn Read + Send>,
    what: String,
    want_len: u64,
    want_xxh3: u64,
    hash: xxhash_rust::xxh3::Xxh3,
    n: u64,
    /// Before the first byte: a sealed object read without a key is named as such.
    first: bool,
}

/// The marker of a `Checked` failure inside an `io::Error` (see `checked_error`).
const CHECKED: &str = "backup object check: ";

impl Read for Checked {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let bad = |m: String| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{CHECKED}{m}"))
        };
        let k = self.inner.read(buf)?;
        if self.first && k > 0 {
            self.first = false;
            if super::crypt::is_sealed(&buf[..k]) {
                return Err(bad(format!(
                    "{} is encrypted: set REPL_BACKUP_KEY or REPL_BACKUP_KEY_FILE",
                    self.what
                )));
            }
        }
        self.hash.update(&buf[..k]);
        self.n += k as u64;
        if self.n > self.want_len || (k == 0 && self.n < self.want_len) {
            return Err(bad(format!(
                "{} is {}{} bytes, the manifest says {}: truncated or replaced; refused",
                self.what,
                if k == 0 { "" } else { "more than " },
                self.n,
                self.want_len
            )));
        }
        // Checked on the read that completes the length (a reader that stops at the length
        // it was told, without a last empty read, still has every byte checked).
        if k > 0 && self.n == self.want_len && self.hash.digest() != self.want_xxh3 {
            return Err(bad(format!(
                "{}: checksum {:016x} differs from the manifest's {:016x}: the object is damaged; refused",
                self.what,
                self.hash.digest(),
                self.want_xxh3
            )));
        }
        Ok(k)
    }
}

/// Reads `rd` to its end (where `Checked` compares length and checksum).
fn drain(rd: &mut dyn Read, what: &str) -> Result<()> {
    std::io::copy(rd, &mut std::io::sink())
        .map(|_| ())
        .map_err(|e| checked_error(Error::io(format!("reading {what}"), e)))
}

/// A `Checked` failure surfaced through a decoder's I/O error becomes the corruption it is.
fn checked_error(e: Error) -> Error {
    let text = e.to_string();
    match text.split_once(CHECKED) {
        Some((_, m)) if m.contains("is encrypted") => Error::Misuse(m.to_string()),
        Some((_, m)) => Error::Corrupt(m.to_string()),
        None => e,
    }
}

impl Source for BucketSource {
    fn describe(&self) -> String {
        self.client.target().display()
    }

    fn info(&self) -> Result<SourceInfo> {
        let m = self.refresh()?;
        Ok(SourceInfo {
            lineage: m.lineage.clone(),
            first_lsn: m
                .first_record_lsn()
                .or_else(|| m.snapshots.first().map(|s| s.first_lsn)),
            durable_lsn: m.last_lsn(),
            epoch: m.epoch,
            epoch_start: None,
        })
    }

    fn snapshot(&self) -> Result<Record> {
        let mut pages = Vec::new();
        let (meta, _) = self.snapshot_stream(&mut |_, _| {}, &mut |_| Ok(()), &mut |pgno, d| {
            pages.push(txlog::Page {
                pgno,
                data: d.to_vec(),
            });
            Ok(())
        })?;
        Ok(Record { meta, pages })
    }

    fn snapshot_stream(
        &self,
        progress: &mut dyn FnMut(u64, u64),
        on_meta: &mut dyn FnMut(&txlog::RecordMeta) -> Result<()>,
        on_page: &mut dyn FnMut(crate::types::PageNo, &[u8]) -> Result<()>,
    ) -> Result<(txlog::RecordMeta, txlog::DbChecksum)> {
        self.snapshot_stream_at(None, progress, on_meta, on_page)
    }

    fn snapshot_stream_at(
        &self,
        at: Option<Lsn>,
        progress: &mut dyn FnMut(u64, u64),
        on_meta: &mut dyn FnMut(&txlog::RecordMeta) -> Result<()>,
        on_page: &mut dyn FnMut(crate::types::PageNo, &[u8]) -> Result<()>,
    ) -> Result<(txlog::RecordMeta, txlog::DbChecksum)> {
        let m = self.refresh()?;
        let Some(s) = m.snapshot_at_or_before(at).cloned() else {
            return Err(Error::Misuse(format!(
                "{} holds no snapshot at or before LSN {}: the oldest is at LSN {}",
                self.describe(),
                at.map_or("-".into(), |a| a.to_string()),
                m.snapshots
                    .first()
                    .map_or("-".into(), |s| s.first_lsn.to_string())
            )));
        };
        self.stream_object(&s, progress, on_meta, on_page)
    }

    fn lsn_at_time(&self, ms: u64) -> Result<Option<Lsn>> {
        self.lsn_at(ms)
    }

    fn knows_times(&self) -> bool {
        true
    }

    fn snapshot_bytes(
        &self,
        _resume: Option<(&str, u64)>,
    ) -> Result<crate::transport::SnapshotBytes> {
        let m = self.refresh()?;
        let Some(s) = m.snapshots.last().cloned() else {
            return Err(Error::Other(format!(
                "{} holds no snapshot yet; retry in a moment",
                self.describe()
            )));
        };
        let what = self.client.describe(&s.key);
        let (mut rd, len) = self.object_reader(&s)?;
        let mut head = vec![0u8; txlog::SEGMENT_HEADER_LEN + txlog::RECORD_HEADER_LEN];
        rd.read_exact(&mut head)
            .map_err(|e| Error::Corrupt(format!("{what} is truncated ({e})")))?;
        Ok(crate::transport::SnapshotBytes {
            etag: txlog::snapshot_etag(&head[txlog::SEGMENT_HEADER_LEN..]),
            lsn: s.first_lsn,
            generation: s.generation,
            len,
            start: 0,
            // Checked as it is read: a damaged body fails the read that reaches its end.
            body: Box::new(std::io::Cursor::new(head).chain(rd)),
        })
    }

    fn fetch(&self, from: Lsn, max_bytes: usize) -> Result<Fetch> {
        let mut m = self.cached()?;
        if m.last_lsn().is_none_or(|l| l < from) {
            m = self.refresh()?;
        }
        match self.fetch_in(&m, from, max_bytes) {
            // A chunk the cached manifest names may have been merged into a larger one
            // (compaction, FORMAT.md §9.7) and deleted: the current manifest names the new one.
            Err(e) => {
                let now = self.refresh()?;
                if now.chunks == m.chunks {
                    return Err(e);
                }
                self.fetch_in(&now, from, max_bytes)
            }
            ok => ok,
        }
    }

    fn fetch_wait(&self, from: Lsn, max_bytes: usize, wait: Duration) -> Result<Fetch> {
        let deadline = Instant::now() + wait;
        loop {
            let f = self.fetch(from, max_bytes)?;
            match &f {
                Fetch::Records(v) if v.is_empty() && Instant::now() + POLL < deadline => {
                    std::thread::sleep(POLL);
                    self.refresh()?;
                }
                _ => return Ok(f),
            }
        }
    }

    fn page_size(&self) -> Result<Option<PageSize>> {
        Ok(PageSize::new(self.cached()?.page_size))
    }
}

impl BucketSource {
    fn fetch_in(&self, m: &Manifest, from: Lsn, max_bytes: usize) -> Result<Fetch> {
        let mut out = Vec::new();
        let Some(last) = m.last_lsn() else {
            return Ok(Fetch::Records(out));
        };
        if from > last {
            return Ok(Fetch::Records(out));
        }
        if m.chunk_for(from).is_none() {
            // Before the oldest record held, or in a break of the chain a snapshot bridges.
            let first = m
                .chunks
                .iter()
                .find(|c| c.first_lsn > from)
                .map_or(last.next(), |c| c.first_lsn);
            return Ok(Fetch::Truncated { first_lsn: first });
        }
        let mut bytes = 0usize;
        let mut at = from;
        while let Some(c) = m.chunk_for(at) {
            for r in self.chunk_records(c)?.iter().filter(|r| r.meta.lsn >= at) {
                bytes += r.pages.iter().map(|p| p.data.len()).sum::<usize>();
                out.push(r.clone());
                if bytes >= max_bytes {
                    return Ok(Fetch::Records(out));
                }
            }
            at = c.last_lsn.next();
        }
        Ok(Fetch::Records(out))
    }
}
