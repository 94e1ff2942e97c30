//! Domain newtypes shared by every module. Constructors that can fail return `Option`/`Result`
//! so an invalid value (page size 3000, page number 0) cannot travel through the code.

use std::fmt;

/// Log sequence number: one per committed primary transaction, dense, increasing across
/// generations of one lineage. 0 = the state before the first captured transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub fn next(self) -> Lsn {
        Lsn(self.0 + 1)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Generation of a lineage: starts at 1, +1 whenever capture could not prove continuity (a gap)
/// and the stream restarts from a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Generation(pub u32);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Epoch of a lineage: the term of one primary. Starts at 1; `repl_promote()` makes the
/// promoted replica the primary of epoch old + 1. Every record carries the epoch of the primary
/// that wrote it (FORMAT.md §3.1); a replica refuses records of an epoch older than the newest
/// it has seen, and a primary that learns of a newer epoch stops accepting writes (fencing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u32);

impl Epoch {
    /// The epoch of every lineage's first primary (and of files written before epochs existed).
    pub const FIRST: Epoch = Epoch(1);

    pub fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }
}

impl Default for Epoch {
    fn default() -> Epoch {
        Epoch::FIRST
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A database page number (1-based, never 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageNo(u32);

impl PageNo {
    pub fn new(n: u32) -> Option<PageNo> {
        if n == 0 {
            None
        } else {
            Some(PageNo(n))
        }
    }
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for PageNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A WAL frame number (1-based; 0 means "no frame").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FrameNo(pub u32);

/// A database page size: a power of two in 512..=65536.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageSize(u32);

impl PageSize {
    pub fn new(n: u32) -> Option<PageSize> {
        if (512..=65536).contains(&n) && n.is_power_of_two() {
            Some(PageSize(n))
        } else {
            None
        }
    }
    pub fn get(self) -> u32 {
        self.0
    }
    pub fn bytes(self) -> usize {
        self.0 as usize
    }
    /// The page size recorded in a database header (bytes 16..18, big-endian; 1 means 65536).
    /// `None` when `head` is shorter than 18 bytes or the value is not a valid page size.
    pub fn from_db_header(head: &[u8]) -> Option<PageSize> {
        let raw = u16::from_be_bytes([*head.get(16)?, *head.get(17)?]) as u32;
        PageSize::new(if raw == 1 { 65536 } else { raw })
    }
    /// The page holding file offset 2^30 (the "lock-byte page"); it never appears in a WAL
    /// and is never part of a snapshot or record.
    pub fn lock_byte_page(self) -> PageNo {
        PageNo((0x4000_0000 / self.0) + 1)
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A 64-bit content checksum (database checksum = XOR over per-page checksums).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Checksum(pub u64);

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Checksum of one page: xxh3-64 over the big-endian page number followed by the page bytes.
/// The database checksum is the XOR of the page checksums of pages 1..=commit_size, skipping
/// the lock-byte page; it can therefore be maintained incrementally.
pub fn page_checksum(pgno: PageNo, data: &[u8]) -> Checksum {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&pgno.get().to_be_bytes());
    h.update(data);
    Checksum(h.digest())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_validation() {
        assert!(PageSize::new(512).is_some());
        assert!(PageSize::new(65536).is_some());
        assert!(PageSize::new(1000).is_none());
        assert!(PageSize::new(256).is_none());
        assert!(PageSize::new(131072).is_none());
    }

    #[test]
    fn page_size_from_db_header() {
        let mut head = [0u8; 100];
        head[16..18].copy_from_slice(&4096u16.to_be_bytes());
        assert_eq!(PageSize::from_db_header(&head), PageSize::new(4096));
        head[16..18].copy_from_slice(&1u16.to_be_bytes()); // 1 means 65536
        assert_eq!(PageSize::from_db_header(&head), PageSize::new(65536));
        head[16..18].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(PageSize::from_db_header(&head), None);
        assert_eq!(PageSize::from_db_header(&head[..17]), None);
    }

    #[test]
    fn lock_byte_page() {
        assert_eq!(PageSize::new(4096).unwrap().lock_byte_page().get(), 262145);
        assert_eq!(PageSize::new(65536).unwrap().lock_byte_page().get(), 16385);
    }

    #[test]
    fn page_checksum_depends_on_pgno() {
        let d = vec![7u8; 4096];
        assert_ne!(
            page_checksum(PageNo::new(1).unwrap(), &d),
            page_checksum(PageNo::new(2).unwrap(), &d)
        );
    }
}
