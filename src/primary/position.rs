//! The capture state shared by every primary process (WAL.md §D.3), kept in
//! `<db>-replica/position`: the position itself (40 bytes, written with `pwrite` under WRITE,
//! read lock-free with its checksum), and, in the same file mapped `MAP_SHARED`, the write
//! intent of an open write session and the append flag (see the module doc of `primary` for
//! what they prove and why): their encoding, the intent check, and the `Primary` methods that
//! open, read and write them. The mapping is `sys::SharedWords`.

use super::Capture;
use crate::error::{Error, Result};
use crate::txlog::RecordMeta;
use crate::types::{Generation, Lsn};
use crate::wal::WalIndexHeader;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

/// The capture position: the last LSN and the WAL position just after it (WAL.md §D.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(super) struct Position {
    pub(super) lsn: Lsn,
    pub(super) generation: Generation,
    pub(super) salts: [u8; 8],
    pub(super) frame: u32,
    pub(super) cksum: (u32, u32),
}

pub(super) const POSITION_LEN: usize = 40;

impl Position {
    pub(super) fn encode(&self) -> [u8; POSITION_LEN] {
        let mut b = [0u8; POSITION_LEN];
        b[0..8].copy_from_slice(&self.lsn.0.to_be_bytes());
        b[8..12].copy_from_slice(&self.generation.0.to_be_bytes());
        b[12..20].copy_from_slice(&self.salts);
        b[20..24].copy_from_slice(&self.frame.to_be_bytes());
        b[24..28].copy_from_slice(&self.cksum.0.to_be_bytes());
        b[28..32].copy_from_slice(&self.cksum.1.to_be_bytes());
        let h = xxhash_rust::xxh3::xxh3_64(&b[0..32]);
        b[32..40].copy_from_slice(&h.to_be_bytes());
        b
    }

    pub(super) fn decode(b: &[u8]) -> Option<Position> {
        if b.len() < POSITION_LEN
            || xxhash_rust::xxh3::xxh3_64(&b[0..32]).to_be_bytes() != b[32..40]
        {
            return None;
        }
        let u32at = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
        Some(Position {
            lsn: Lsn(u64::from_be_bytes(b[0..8].try_into().unwrap())),
            generation: Generation(u32at(8)),
            salts: b[12..20].try_into().unwrap(),
            frame: u32at(20),
            cksum: (u32at(24), u32at(28)),
        })
    }

    pub(super) fn from_meta(m: &RecordMeta) -> Position {
        Position {
            lsn: m.lsn,
            generation: m.generation,
            salts: m.wal_salts,
            frame: m.wal_frame,
            cksum: m.wal_cksum,
        }
    }
}

/// The position file mapped: 4 KiB, bytes 0..40 the position (written with `pwrite`, read
/// from the mapping), bytes 64..104 the write intent and 128..132 the append flag (memory
/// loads/stores only).
pub(super) struct PosFile {
    pub(super) file: File,
    pub(super) map: crate::sys::SharedWords,
}

pub(super) const POSITION_FILE_WORDS: usize = 1024;
pub(super) const INTENT_WORD: usize = 16;
pub(super) const INTENT_WORDS: usize = 10;
/// Bytes 128..132: non-zero (a pid) while a capture may be appending to the log.
pub(super) const APPEND_FLAG_WORD: usize = 32;
/// Bytes 160..200: the claim, encoded like the position (its checksum tells a torn copy).
pub(super) const CLAIM_WORD: usize = 40;

/// "A write session of ours is open and was caught up at this WAL position" (see the module
/// doc). Written by T1 after its catch-up, cleared once a capture under WRITE has the
/// position at the header again (normally T2 of the same session). Found by a later WRITE
/// holder, it can only belong to a session whose process died: WRITE is exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Intent {
    pub(super) pid: u32,
    /// Header (= position) when T1 caught up.
    pub(super) salts: [u8; 8],
    pub(super) frame: u32,
    /// The wal-index header's iChange at that moment.
    pub(super) change: u32,
    pub(super) lsn: Lsn,
    pub(super) generation: Generation,
}

impl Intent {
    pub(super) fn fields(&self) -> [u32; INTENT_WORDS - 1] {
        [
            self.pid,
            u32::from_ne_bytes(self.salts[0..4].try_into().expect("4 bytes")),
            u32::from_ne_bytes(self.salts[4..8].try_into().expect("4 bytes")),
            self.frame,
            self.change,
            self.lsn.0 as u32,
            (self.lsn.0 >> 32) as u32,
            self.generation.0,
            0x494e_5431, // "INT1": layout version
        ]
    }

    pub(super) fn tag(f: &[u32; INTENT_WORDS - 1]) -> u32 {
        let mut b = [0u8; (INTENT_WORDS - 1) * 4];
        for (c, v) in b.chunks_exact_mut(4).zip(f) {
            c.copy_from_slice(&v.to_ne_bytes());
        }
        (xxhash_rust::xxh3::xxh3_64(&b) as u32).max(1)
    }

    /// Fields first, the tag (non-zero checksum of the fields) last: a writer killed half-way
    /// leaves a tag that does not match, read as "no intent" (correct: it had not caught up
    /// yet, so it had not written anything to the WAL).
    pub(super) fn store(&self, w: &[std::sync::atomic::AtomicU32]) {
        let f = self.fields();
        w[0].store(0, Ordering::Release);
        for (slot, v) in w[1..].iter().zip(f) {
            slot.store(v, Ordering::Relaxed);
        }
        w[0].store(Self::tag(&f), Ordering::Release);
    }

    pub(super) fn load(w: &[std::sync::atomic::AtomicU32]) -> Option<Intent> {
        let tag = w[0].load(Ordering::Acquire);
        if tag == 0 {
            return None;
        }
        let mut f = [0u32; INTENT_WORDS - 1];
        for (v, slot) in f.iter_mut().zip(&w[1..]) {
            *v = slot.load(Ordering::Relaxed);
        }
        if Self::tag(&f) != tag || f[8] != 0x494e_5431 {
            return None;
        }
        let mut salts = [0u8; 8];
        salts[0..4].copy_from_slice(&f[1].to_ne_bytes());
        salts[4..8].copy_from_slice(&f[2].to_ne_bytes());
        Some(Intent {
            pid: f[0],
            salts,
            frame: f[3],
            change: f[4],
            lsn: Lsn(f[5] as u64 | (f[6] as u64) << 32),
            generation: Generation(f[7]),
        })
    }
}

/// The intent of a dead write session whose position is still the current one: what the
/// frames after it must satisfy to be accepted as that one session's work (`Primary::plan`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct IntentCheck {
    pub(super) intent: Intent,
}

impl IntentCheck {
    /// Is header `h` consistent with the dead session having committed `total` transactions
    /// (at most one)? iChange is +1 per commit and survives WAL restarts; recovery rebuilds
    /// the header with iChange 0 (then only the frame structure can be checked).
    pub(super) fn accepts(
        &self,
        h: &WalIndexHeader,
        total: u64,
    ) -> std::result::Result<(), String> {
        if total > 1 {
            return Err(format!(
                "{total} transactions since the write intent of pid {} (one write session commits at most one)",
                self.intent.pid
            ));
        }
        let want = self.intent.change.wrapping_add(total as u32);
        if h.change != want && h.change != 0 {
            return Err(format!(
                "wal-index iChange {} != {} (intent of pid {} at iChange {} + {total} commit(s)): \
                 another writer committed",
                h.change, want, self.intent.pid, self.intent.change
            ));
        }
        Ok(())
    }
}

impl super::Primary {
    pub(super) fn position_path(&self) -> PathBuf {
        self.dir.join("position")
    }

    /// The position file, opened and mapped once (pwrite for the position, the mapping for
    /// reads and for the write intent; both are thread-safe).
    pub(super) fn position_file(&self) -> Result<&PosFile> {
        self.posf.get_or_try_init(|| {
            let path = self.position_path();
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
            let map = crate::sys::SharedWords::map(&file, POSITION_FILE_WORDS)
                .map_err(|e| Error::io(format!("mapping {}", path.display()), e))?;
            Ok(PosFile { file, map })
        })
    }

    /// The shared position. Lock-free readers (T3's pre-check, `repl_lsn()`) may race a
    /// writer's pwrite: the checksum catches a torn copy and the read is retried.
    pub(super) fn read_position(&self) -> Option<Position> {
        self.read_mapped_position(0)
    }

    /// The claim (see the module doc of `primary`): the capture position including the
    /// transactions committed but not yet appended. Written only by WRITE holders; read
    /// lock-free by appenders (a torn copy fails its checksum and the read is retried).
    pub(super) fn read_claim(&self) -> Option<Position> {
        self.read_mapped_position(CLAIM_WORD)
    }

    /// A position encoded at word `at` of the mapping, read lock-free (retried while torn).
    fn read_mapped_position(&self, at: usize) -> Option<Position> {
        let f = self.position_file().ok()?;
        let w = &f.map.words()[at..at + POSITION_LEN / 4];
        for _ in 0..8 {
            let mut b = [0u8; POSITION_LEN];
            for (i, c) in b.chunks_exact_mut(4).enumerate() {
                c.copy_from_slice(&w[i].load(Ordering::Acquire).to_ne_bytes());
            }
            if let Some(p) = Position::decode(&b) {
                return Some(p);
            }
            std::hint::spin_loop();
        }
        None
    }

    /// Store the claim (WRITE held, or the caller otherwise excludes claim writers). Memory
    /// stores only: this is the whole of the commit path's bookkeeping.
    pub(super) fn store_claim(&self, p: &Position) {
        if let Ok(f) = self.position_file() {
            let w = &f.map.words()[CLAIM_WORD..CLAIM_WORD + POSITION_LEN / 4];
            for (slot, c) in w.iter().zip(p.encode().chunks_exact(4)) {
                slot.store(
                    u32::from_ne_bytes(c.try_into().expect("4 bytes")),
                    Ordering::Release,
                );
            }
        }
    }

    pub(super) fn save_position(&self, st: &Capture) -> Result<()> {
        self.position_file()?
            .file
            .write_all_at(&st.pos.encode(), 0)
            .map_err(|e| Error::io(format!("writing {}", self.position_path().display()), e))
    }

    /// The pending write intent (call with WRITE held: only WRITE holders write it).
    pub(super) fn read_intent(&self) -> Option<Intent> {
        let f = self.position_file().ok()?;
        Intent::load(&f.map.words()[INTENT_WORD..INTENT_WORD + INTENT_WORDS])
    }

    /// Record (or, with `None`, clear) the write intent (WRITE held). Memory stores only.
    pub(super) fn write_intent(&self, i: Option<&Intent>) {
        if let Ok(f) = self.position_file() {
            let w = &f.map.words()[INTENT_WORD..INTENT_WORD + INTENT_WORDS];
            match i {
                Some(i) => i.store(w),
                None => w[0].store(0, Ordering::Release),
            }
        }
    }

    /// The append flag word of the shared mapping (see `capture`); `None` if it is not mapped.
    pub(super) fn append_flag(&self) -> Option<&std::sync::atomic::AtomicU32> {
        self.position_file()
            .ok()
            .map(|f| &f.map.words()[APPEND_FLAG_WORD])
    }

    /// After a capture under WRITE: a caught-up position resolves any pending intent.
    pub(super) fn clear_intent_if_caught_up(&self, st: &Capture, h: &WalIndexHeader) {
        if st.loaded && st.pos.salts == h.salts && st.pos.frame == h.mx_frame {
            if let Ok(f) = self.position_file() {
                let tag = &f.map.words()[INTENT_WORD];
                if tag.load(Ordering::Relaxed) != 0 {
                    tag.store(0, Ordering::Release);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn intent() -> Intent {
        Intent {
            pid: 4242,
            salts: [1, 2, 3, 4, 5, 6, 7, 8],
            frame: 17,
            change: 99,
            lsn: Lsn(0x1_0000_0005),
            generation: Generation(3),
        }
    }

    fn header(change: u32) -> WalIndexHeader {
        let mut h = WalIndexHeader::parse_copy(&[0u8; 48]);
        h.change = change;
        h
    }

    #[test]
    fn intent_round_trips_and_clears() {
        let w: Vec<AtomicU32> = (0..INTENT_WORDS).map(|_| AtomicU32::new(0)).collect();
        assert_eq!(Intent::load(&w), None);
        intent().store(&w);
        assert_eq!(Intent::load(&w), Some(intent()));
        w[0].store(0, Ordering::Release);
        assert_eq!(Intent::load(&w), None);
    }

    #[test]
    fn torn_intent_reads_as_none() {
        let w: Vec<AtomicU32> = (0..INTENT_WORDS).map(|_| AtomicU32::new(0)).collect();
        intent().store(&w);
        w[4].store(18, Ordering::Relaxed); // frame changed after the tag: a half-written intent
        assert_eq!(Intent::load(&w), None);
    }

    #[test]
    fn intent_check_counts_transactions_and_ichange() {
        let c = IntentCheck { intent: intent() };
        assert!(c.accepts(&header(100), 1).is_ok());
        assert!(c.accepts(&header(99), 0).is_ok());
        assert!(c.accepts(&header(0), 1).is_ok(), "recovery resets iChange");
        assert!(c.accepts(&header(101), 2).is_err(), "two transactions");
        assert!(
            c.accepts(&header(101), 1).is_err(),
            "another commit besides ours"
        );
        assert!(
            c.accepts(&header(100), 0).is_err(),
            "a commit without frames of ours"
        );
    }
}
