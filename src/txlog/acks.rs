//! Follower acknowledgements (issue 16, synchronous replication): `<db>-replica/acks`, where the
//! servers of a primary record how far each follower got, so that a committing connection in
//! any process of the primary can wait until enough followers have its LSN.
//!
//! A follower acknowledges LSN n by asking for n + 1 (`GET /v1/log?from=n+1`): sqlite-replica's
//! follower asks only after it applied n (published to its readers) and fsynced its WAL, so one
//! acknowledgement is at once *received*, *durable* and *applied*.
//!
//! The file: 8 bytes `RACK0001`, then `SLOTS` slots of 24 bytes (big-endian u64s: the hash of the
//! follower's name, its acknowledged LSN, the wall-clock ms of the acknowledgement), read and
//! written whole under an flock. A slot not renewed for `TTL_MS` no longer counts; with every
//! slot taken the oldest acknowledgement makes room.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

const MAGIC: &[u8; 8] = b"RACK0001";
const SLOTS: usize = 32;
const SLOT: usize = 24;
const LEN: usize = 8 + SLOTS * SLOT;
/// An acknowledgement older than this does not count (a follower gone for good).
pub const TTL_MS: u64 = 120_000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slot {
    id: u64,
    lsn: u64,
    at_ms: u64,
}

fn decode(b: &[u8]) -> Vec<Slot> {
    if b.len() < LEN || &b[..8] != MAGIC {
        return Vec::new();
    }
    let u = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    (0..SLOTS)
        .map(|i| 8 + i * SLOT)
        .map(|o| Slot {
            id: u(o),
            lsn: u(o + 8),
            at_ms: u(o + 16),
        })
        .filter(|s| s.id != 0)
        .collect()
}

fn encode(slots: &[Slot]) -> Vec<u8> {
    let mut b = vec![0u8; LEN];
    b[..8].copy_from_slice(MAGIC);
    for (i, s) in slots.iter().take(SLOTS).enumerate() {
        let o = 8 + i * SLOT;
        b[o..o + 8].copy_from_slice(&s.id.to_be_bytes());
        b[o + 8..o + 16].copy_from_slice(&s.lsn.to_be_bytes());
        b[o + 16..o + 24].copy_from_slice(&s.at_ms.to_be_bytes());
    }
    b
}

/// The table with `id` at `lsn` (monotone: never lowered), stale slots dropped, the oldest
/// making room when full. Pure.
fn merged(mut slots: Vec<Slot>, id: u64, lsn: u64, now_ms: u64) -> Vec<Slot> {
    slots.retain(|s| now_ms.saturating_sub(s.at_ms) < TTL_MS);
    match slots.iter_mut().find(|s| s.id == id) {
        Some(s) => {
            s.lsn = s.lsn.max(lsn);
            s.at_ms = now_ms;
        }
        None => {
            if slots.len() >= SLOTS {
                slots.sort_by_key(|s| std::cmp::Reverse(s.at_ms));
                slots.truncate(SLOTS - 1);
            }
            slots.push(Slot {
                id,
                lsn,
                at_ms: now_ms,
            });
        }
    }
    slots
}

/// The LSN that at least `n` live followers acknowledged (the n-th highest), if `n` did.
fn nth(slots: &[Slot], n: usize, now_ms: u64) -> Option<u64> {
    let mut l: Vec<u64> = slots
        .iter()
        .filter(|s| now_ms.saturating_sub(s.at_ms) < TTL_MS)
        .map(|s| s.lsn)
        .collect();
    l.sort_unstable_by(|a, b| b.cmp(a));
    n.checked_sub(1).and_then(|i| l.get(i).copied())
}

fn name_hash(name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes()).max(1)
}

fn open(dir: &Path) -> Result<File> {
    let p = dir.join("acks");
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&p)
        .map_err(|e| Error::io(format!("opening {}", p.display()), e))
}

fn read_all(f: &File) -> Vec<u8> {
    let mut b = vec![0u8; LEN];
    match f.read_at(&mut b, 0) {
        Ok(n) if n == LEN => b,
        _ => Vec::new(),
    }
}

/// Records that follower `name` acknowledged `lsn` (a server, on each request).
pub fn record(dir: &Path, name: &str, lsn: u64) -> Result<()> {
    let f = open(dir)?;
    f.lock().map_err(|e| Error::io("locking acks", e))?;
    let slots = merged(
        decode(&read_all(&f)),
        name_hash(name),
        lsn,
        crate::util::now_ms(),
    );
    let r = f
        .write_all_at(&encode(&slots), 0)
        .map_err(|e| Error::io("writing acks", e));
    let _ = f.unlock();
    r
}

/// Followers known to have acknowledged at least `lsn`, and the LSN the `n`-th of them has.
pub fn acked(dir: &Path, n: usize, lsn: u64) -> (usize, Option<u64>) {
    let Ok(f) = File::open(dir.join("acks")) else {
        return (0, None);
    };
    let slots = decode(&read_all(&f));
    let now = crate::util::now_ms();
    let count = slots
        .iter()
        .filter(|s| now.saturating_sub(s.at_ms) < TTL_MS && s.lsn >= lsn)
        .count();
    (count, nth(&slots, n, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_merge_expire_and_rank() {
        let mut t = merged(Vec::new(), 7, 10, 1_000);
        t = merged(t, 8, 12, 1_000);
        t = merged(t, 7, 9, 2_000); // never lowered
        assert_eq!(nth(&t, 1, 2_000), Some(12));
        assert_eq!(nth(&t, 2, 2_000), Some(10));
        assert_eq!(nth(&t, 3, 2_000), None);
        assert_eq!(nth(&t, 0, 2_000), None);
        // Follower 8 went quiet: after the TTL only 7 counts.
        let later = 1_000 + TTL_MS + 500;
        t = merged(t, 7, 11, later);
        assert_eq!(nth(&t, 1, later), Some(11));
        assert_eq!(nth(&t, 2, later), None);
        assert_eq!(decode(&encode(&t)), t);
        assert!(decode(b"garbage").is_empty());
    }

    #[test]
    fn a_full_table_makes_room_with_its_oldest() {
        let mut t = Vec::new();
        for i in 0..SLOTS as u64 {
            t = merged(t, i + 1, 100 + i, 1_000 + i);
        }
        t = merged(t, 999, 5, 5_000);
        assert_eq!(t.len(), SLOTS);
        assert!(t.iter().all(|s| s.id != 1), "the oldest went");
        assert!(t.iter().any(|s| s.id == 999));
    }
}
