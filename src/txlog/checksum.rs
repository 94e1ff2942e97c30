//! `DbChecksum`: the database checksum of FORMAT.md §1 maintained incrementally. It keeps one
//! page checksum per page (8 bytes per page, no page data) and their XOR, so applying a record
//! costs O(pages in the record) and the total always equals a full recompute. Pages between the
//! old size and a larger new size that were never set count as zero-filled pages, exactly like
//! the holes a plain database file would read as; the lock-byte page never counts.

use super::{Page, Record};
use crate::types::{page_checksum, Checksum, PageNo, PageSize};

/// Incrementally maintained database checksum: per-page checksums + XOR total.
#[derive(Clone, Debug)]
pub struct DbChecksum {
    page_size: PageSize,
    lock_byte: u32,
    /// Index `pgno - 1`; 0 for the lock-byte page (which never contributes).
    sums: Vec<u64>,
    total: u64,
    zero_page: Vec<u8>,
    /// The undo journal of `begin` (None when no change is being tried).
    journal: Option<Journal>,
}

/// What `rollback` needs to take back the changes since `begin`: the size and total then, and
/// the old value of every slot below that size that was changed or removed since, in order.
#[derive(Clone, Debug)]
struct Journal {
    len: usize,
    total: u64,
    old: Vec<(usize, u64)>,
}

impl DbChecksum {
    /// An empty database (0 pages).
    pub fn new(page_size: PageSize) -> DbChecksum {
        DbChecksum {
            page_size,
            lock_byte: page_size.lock_byte_page().get(),
            sums: Vec::new(),
            total: 0,
            zero_page: Vec::new(),
            journal: None,
        }
    }

    /// Starts trying changes that `rollback` can take back (an append pass re-capturing
    /// frames that may turn out unprovable). Costs nothing up front, and each change then
    /// remembers one old value, where a copy of the state would cost 8 bytes per page of the
    /// database on every pass. A `begin` while trying keeps the first one's start.
    pub fn begin(&mut self) {
        if self.journal.is_none() {
            self.journal = Some(Journal {
                len: self.sums.len(),
                total: self.total,
                old: Vec::new(),
            });
        }
    }

    /// Keeps the changes since `begin`.
    pub fn commit(&mut self) {
        self.journal = None;
    }

    /// Takes back every change since `begin` (nothing when not trying).
    pub fn rollback(&mut self) {
        let Some(j) = self.journal.take() else {
            return;
        };
        for &(i, v) in j.old.iter().rev() {
            if self.sums.len() <= i {
                self.sums.resize(i + 1, 0);
            }
            self.sums[i] = v;
        }
        self.sums.resize(j.len, 0);
        self.total = j.total;
    }

    /// Remembers slot `i`'s value before a change, when `rollback` will need it.
    fn note(&mut self, i: usize) {
        if let Some(j) = &mut self.journal {
            if i < j.len {
                j.old.push((i, self.sums[i]));
            }
        }
    }

    /// The checksum of a database holding `pages` (need not be sorted) and `commit_size` pages.
    pub fn from_pages<'a>(
        page_size: PageSize,
        commit_size: u32,
        pages: impl IntoIterator<Item = &'a Page>,
    ) -> DbChecksum {
        let mut c = DbChecksum::new(page_size);
        for p in pages {
            c.set_page(p.pgno, &p.data);
        }
        c.truncate(commit_size);
        c
    }

    /// The checksum of a plain database file's bytes (size = whole pages in `bytes`).
    pub fn from_db_bytes(page_size: PageSize, bytes: &[u8]) -> DbChecksum {
        let mut c = DbChecksum::new(page_size);
        for (i, data) in bytes.chunks_exact(page_size.bytes()).enumerate() {
            let pgno = PageNo::new(i as u32 + 1).expect("i + 1 > 0");
            c.set_page(pgno, data);
        }
        c
    }

    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// Database size in pages.
    pub fn size(&self) -> u32 {
        self.sums.len() as u32
    }

    pub fn total(&self) -> Checksum {
        Checksum(self.total)
    }

    /// The checksum of one page (`None` beyond the size or for the lock-byte page).
    pub fn page(&self, pgno: PageNo) -> Option<Checksum> {
        if pgno.get() == self.lock_byte {
            return None;
        }
        self.sums.get(pgno.get() as usize - 1).map(|s| Checksum(*s))
    }

    /// Sets page `pgno` to `data` (growing the database if needed). The lock-byte page is ignored.
    pub fn set_page(&mut self, pgno: PageNo, data: &[u8]) {
        if pgno.get() != self.lock_byte {
            self.set_page_checksum(pgno, page_checksum(pgno, data));
        }
    }

    /// Like `set_page` for a caller that already computed `page_checksum(pgno, data)`.
    pub fn set_page_checksum(&mut self, pgno: PageNo, sum: Checksum) {
        let n = pgno.get();
        if n == self.lock_byte {
            return;
        }
        if n > self.size() {
            self.truncate(n);
        }
        self.note(n as usize - 1);
        let slot = &mut self.sums[n as usize - 1];
        self.total ^= *slot ^ sum.0;
        *slot = sum.0;
    }

    /// Resizes to `commit_size` pages: removes pages above it; a larger size adds zero-filled pages.
    pub fn truncate(&mut self, commit_size: u32) {
        let new_len = commit_size as usize;
        while self.sums.len() > new_len {
            self.note(self.sums.len() - 1);
            let s = self.sums.pop().expect("len > new_len");
            self.total ^= s;
        }
        if self.sums.len() < new_len && self.zero_page.len() != self.page_size.bytes() {
            self.zero_page = vec![0u8; self.page_size.bytes()];
        }
        while self.sums.len() < new_len {
            let n = self.sums.len() as u32 + 1;
            let s = if n == self.lock_byte {
                0
            } else {
                page_checksum(PageNo::new(n).expect("n > 0"), &self.zero_page).0
            };
            self.sums.push(s);
            self.total ^= s;
        }
    }

    /// Removes every page.
    pub fn clear(&mut self) {
        if self.journal.is_some() {
            self.truncate(0);
        }
        self.sums.clear();
        self.total = 0;
    }

    /// Applies a record (FORMAT.md §3.6): a SNAPSHOT clears first; pages are set; then the size
    /// becomes `commit_size`. The caller compares `total()` with `r.meta.db_checksum`.
    pub fn apply(&mut self, r: &Record) {
        if r.meta.snapshot {
            self.clear();
        }
        for p in &r.pages {
            self.set_page(p.pgno, &p.data);
        }
        self.truncate(r.meta.commit_size);
    }
}
