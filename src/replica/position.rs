//! The replica's recorded position (WAL.md §E.8): `<db>-replica/applied`, two 64-byte slots
//! written alternately (a torn write leaves the other slot valid), each with a sequence number
//! and an xxh3 checksum. A slot holds the LSN, generation and database checksum the replica's
//! published state corresponds to, plus the *intent* of the batch being written (its LSN and
//! expected checksum). On restart the live content's checksum decides: equal to the applied
//! checksum ⇒ that LSN; equal to the intent's ⇒ the batch was published (or recovered) ⇒ the
//! intent's LSN; anything else ⇒ the replica is not a state of the primary ⇒ re-snapshot.
//!
//! Pure apart from positional file I/O; the file is modified only by the applier (which holds
//! the applier lock).

use crate::error::{Error, Result};
use crate::types::{Checksum, Generation, Lsn};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

const SLOT: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Applied {
    pub seq: u64,
    pub lsn: Lsn,
    pub generation: Generation,
    pub checksum: Checksum,
    /// The batch being written: (LSN, generation, checksum after it).
    pub intent: Option<(Lsn, Generation, Checksum)>,
}

impl Applied {
    pub fn encode(&self) -> [u8; SLOT] {
        let mut b = [0u8; SLOT];
        b[0..8].copy_from_slice(&self.seq.to_be_bytes());
        b[8..16].copy_from_slice(&self.lsn.0.to_be_bytes());
        b[16..20].copy_from_slice(&self.generation.0.to_be_bytes());
        b[20..28].copy_from_slice(&self.checksum.0.to_be_bytes());
        if let Some((l, g, c)) = self.intent {
            b[28] = 1;
            b[29..37].copy_from_slice(&l.0.to_be_bytes());
            b[37..41].copy_from_slice(&g.0.to_be_bytes());
            b[41..49].copy_from_slice(&c.0.to_be_bytes());
        }
        let h = xxhash_rust::xxh3::xxh3_64(&b[0..56]);
        b[56..64].copy_from_slice(&h.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Applied> {
        if b.len() < SLOT || xxhash_rust::xxh3::xxh3_64(&b[0..56]).to_be_bytes() != b[56..64] {
            return None;
        }
        let u64at = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32at = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        Some(Applied {
            seq: u64at(0),
            lsn: Lsn(u64at(8)),
            generation: Generation(u32at(16)),
            checksum: Checksum(u64at(20)),
            intent: (b[28] == 1)
                .then(|| (Lsn(u64at(29)), Generation(u32at(37)), Checksum(u64at(41)))),
        })
    }
}

pub struct PositionFile {
    f: File,
    path: String,
}

impl PositionFile {
    /// Opens (creating) the file read-write, or read-only when this process may not write it:
    /// a replica whose files are read-only still resumes its role and can be read (and a
    /// sync refuses before writing, see `Replica::sync`).
    pub fn open(dir: &Path) -> Result<PositionFile> {
        let path = dir.join("applied");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .or_else(|e| File::open(&path).map_err(|_| e))
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        Ok(PositionFile {
            f,
            path: path.display().to_string(),
        })
    }

    /// The newest valid slot (None: nothing recorded yet).
    pub fn read(&self) -> Option<Applied> {
        let mut b = [0u8; 2 * SLOT];
        let n = self.f.read_at(&mut b, 0).ok()?;
        let a = (n >= SLOT).then(|| Applied::decode(&b[0..SLOT])).flatten();
        let c = (n >= 2 * SLOT)
            .then(|| Applied::decode(&b[SLOT..]))
            .flatten();
        match (a, c) {
            (Some(x), Some(y)) => Some(if x.seq >= y.seq { x } else { y }),
            (x, y) => x.or(y),
        }
    }

    /// Write `a` with the next sequence number into the older slot.
    pub fn write(&self, a: &Applied) -> Result<Applied> {
        self.write_after(self.read(), a)
    }

    /// Record the batch about to be written as the intent, keeping the applied position.
    pub fn write_intent(&self, intent: (Lsn, Generation, Checksum)) -> Result<Applied> {
        let cur = self.read();
        let a = Applied {
            intent: Some(intent),
            ..cur.unwrap_or_default()
        };
        self.write_after(cur, &a)
    }

    fn write_after(&self, prev: Option<Applied>, a: &Applied) -> Result<Applied> {
        let seq = prev.map_or(1, |p| p.seq + 1);
        let a = Applied { seq, ..*a };
        let off = (seq % 2) * SLOT as u64;
        self.f
            .write_all_at(&a.encode(), off)
            .map_err(|e| Error::io(format!("writing {}", self.path), e))?;
        Ok(a)
    }

    pub fn sync(&self) -> Result<()> {
        self.f
            .sync_data()
            .map_err(|e| Error::io(format!("syncing {}", self.path), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_valid_slot_wins_and_a_torn_slot_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let p = PositionFile::open(d.path()).unwrap();
        assert_eq!(p.read(), None);
        let a = p
            .write(&Applied {
                lsn: Lsn(5),
                generation: Generation(1),
                checksum: Checksum(77),
                ..Default::default()
            })
            .unwrap();
        let b = p
            .write_intent((Lsn(9), Generation(1), Checksum(99)))
            .unwrap();
        assert_eq!(
            (b.lsn, b.checksum),
            (a.lsn, a.checksum),
            "the applied position is kept"
        );
        assert_eq!(b.intent, Some((Lsn(9), Generation(1), Checksum(99))));
        assert_eq!(p.read(), Some(b));
        // Tear the newest slot: the previous one is returned.
        let off = (b.seq % 2) * SLOT as u64;
        p.f.write_all_at(&[0xff; 10], off + 3).unwrap();
        assert_eq!(p.read(), Some(a));
    }
}
