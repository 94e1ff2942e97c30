//! Apply planning (WAL.md §E.2 step 1), pure: a batch of consecutive records becomes one
//! replica commit — the last image of every page, pages above each record's commit size
//! dropped as that record is applied (exactly what applying the records one by one would
//! leave visible), never the lock-byte page — and the expected database checksum after it.
//!
//! Invariants: records are consecutive (dense LSNs, the sequence rule of FORMAT.md §3.5);
//! the running `DbChecksum` equals the primary's checksum at every record boundary, or the
//! plan is refused (`Divergence`) before anything is written.

use crate::error::Error;
use crate::txlog::{DbChecksum, Record};
use crate::types::{Checksum, Generation, Lsn, PageSize};
use std::collections::BTreeMap;

/// One replica commit planned from one or more records.
#[derive(Debug)]
pub struct BatchPlan {
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    pub generation: Generation,
    pub page_size: PageSize,
    /// Database size in pages after the batch (the last record's commit size).
    pub commit_size: u32,
    /// Final image per page, ascending page number.
    pub pages: BTreeMap<u32, Vec<u8>>,
    /// The primary's database checksum after the last record (already verified against
    /// the planned state).
    pub db_checksum: Checksum,
    /// The batch contains a SNAPSHOT record (a new generation or a re-snapshot).
    pub has_snapshot: bool,
    /// Primary commit time of the last record (Unix ms).
    pub timestamp_ms: u64,
}

/// Why a batch could not be planned.
#[derive(Debug)]
pub enum PlanError {
    /// The records do not continue the replica's LSN (`expected`) or each other.
    Sequence(String),
    /// Applying the records does not reproduce the primary's checksum: the replica's state
    /// is not the primary's at its LSN (or the source is inconsistent). Re-snapshot.
    Divergence(String),
}

impl From<PlanError> for Error {
    fn from(e: PlanError) -> Error {
        match e {
            PlanError::Sequence(m) => Error::Corrupt(m),
            PlanError::Divergence(m) => Error::Corrupt(m),
        }
    }
}

/// Plan `records` on top of a replica at `lsn` (generation `generation`) whose checksums are
/// `sums`. On success `sums` describes the state after the batch; on error it is unspecified
/// (the caller rebuilds it or re-snapshots).
pub fn plan_batch(
    lsn: Lsn,
    generation: Generation,
    sums: &mut DbChecksum,
    records: &[Record],
) -> std::result::Result<BatchPlan, PlanError> {
    let first = records
        .first()
        .ok_or_else(|| PlanError::Sequence("empty batch".into()))?;
    let mut expect = lsn.next();
    let mut gen = generation;
    let mut pages: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    let mut has_snapshot = false;
    let page_size = first.meta.page_size;
    for r in records {
        let m = &r.meta;
        if m.lsn != expect && !m.snapshot {
            return Err(PlanError::Sequence(format!(
                "record LSN {} does not follow the replica's LSN {} (expected {expect})",
                m.lsn,
                Lsn(expect.0 - 1)
            )));
        }
        if m.snapshot && m.lsn.0 + 1 < expect.0 {
            return Err(PlanError::Sequence(format!(
                "snapshot at LSN {} is older than the replica's LSN {}",
                m.lsn,
                Lsn(expect.0 - 1)
            )));
        }
        if !m.snapshot && m.generation != gen {
            return Err(PlanError::Sequence(format!(
                "LSN {}: generation {} differs from the replica's generation {gen} without a snapshot",
                m.lsn, m.generation
            )));
        }
        if m.page_size != page_size || (sums.size() > 0 && sums.page_size() != page_size) {
            return Err(PlanError::Divergence(format!(
                "LSN {}: page size {} differs from the replica's {}: re-bootstrap into a new file",
                m.lsn,
                m.page_size,
                sums.page_size()
            )));
        }
        if m.snapshot {
            has_snapshot = true;
            pages.clear();
            *sums = DbChecksum::new(page_size);
        }
        let lock_page = page_size.lock_byte_page().get();
        for p in &r.pages {
            if p.pgno.get() == lock_page || p.pgno.get() > m.commit_size {
                continue;
            }
            pages.insert(p.pgno.get(), p.data.clone());
        }
        pages.retain(|&pg, _| pg <= m.commit_size);
        sums.apply(r);
        if sums.total() != m.db_checksum {
            return Err(PlanError::Divergence(format!(
                "after LSN {} the replica's checksum would be {} but the primary's is {}",
                m.lsn,
                sums.total(),
                m.db_checksum
            )));
        }
        gen = m.generation;
        expect = m.lsn.next();
    }
    let last = records.last().expect("non-empty");
    Ok(BatchPlan {
        first_lsn: first.meta.lsn,
        last_lsn: last.meta.lsn,
        generation: gen,
        page_size,
        commit_size: last.meta.commit_size,
        pages,
        db_checksum: last.meta.db_checksum,
        has_snapshot,
        timestamp_ms: last.meta.timestamp_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::txlog::{Page, RecordMeta};
    use crate::types::PageNo;

    fn ps() -> PageSize {
        PageSize::new(512).unwrap()
    }

    fn rec(
        sums: &mut DbChecksum,
        lsn: u64,
        snapshot: bool,
        commit: u32,
        pages: &[(u32, u8)],
    ) -> Record {
        let mut r = Record {
            meta: RecordMeta {
                lsn: Lsn(lsn),
                generation: Generation(1),
                snapshot,
                page_size: ps(),
                commit_size: commit,
                timestamp_ms: lsn,
                wal_salts: [0; 8],
                wal_frame: 0,
                wal_cksum: (0, 0),
                db_checksum: Checksum(0),
                page_count: pages.len() as u32,
                epoch: crate::types::Epoch::FIRST,
            },
            pages: pages
                .iter()
                .map(|&(p, b)| Page {
                    pgno: PageNo::new(p).unwrap(),
                    data: vec![b; 512],
                })
                .collect(),
        };
        sums.apply(&r);
        r.meta.db_checksum = sums.total();
        r
    }

    #[test]
    fn last_image_wins_and_truncation_drops_pages() {
        let mut primary = DbChecksum::new(ps());
        let s = rec(&mut primary, 1, true, 3, &[(1, 1), (2, 1), (3, 1)]);
        let a = rec(&mut primary, 2, false, 4, &[(2, 2), (4, 2)]);
        let b = rec(&mut primary, 3, false, 2, &[(1, 3)]); // truncates to 2 pages
        let c = rec(&mut primary, 4, false, 2, &[(2, 4)]);
        let mut sums = DbChecksum::new(ps());
        let plan = plan_batch(Lsn(0), Generation(1), &mut sums, &[s, a, b, c]).unwrap();
        assert_eq!(plan.commit_size, 2);
        assert_eq!(plan.pages.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(plan.pages[&1][0], 3);
        assert_eq!(plan.pages[&2][0], 4);
        assert_eq!(plan.db_checksum, primary.total());
        assert_eq!(sums.total(), primary.total());
        assert!(plan.has_snapshot);
        assert_eq!((plan.first_lsn, plan.last_lsn), (Lsn(1), Lsn(4)));
    }

    #[test]
    fn a_gap_in_lsns_is_refused() {
        let mut primary = DbChecksum::new(ps());
        let s = rec(&mut primary, 1, true, 1, &[(1, 1)]);
        let _skipped = rec(&mut primary, 2, false, 1, &[(1, 2)]);
        let c = rec(&mut primary, 3, false, 1, &[(1, 3)]);
        let mut sums = DbChecksum::new(ps());
        plan_batch(Lsn(0), Generation(1), &mut sums, std::slice::from_ref(&s)).unwrap();
        let e = plan_batch(Lsn(1), Generation(1), &mut sums, &[c]).unwrap_err();
        assert!(matches!(e, PlanError::Sequence(_)), "{e:?}");
    }

    #[test]
    fn a_diverged_baseline_is_detected_before_writing() {
        let mut primary = DbChecksum::new(ps());
        let s = rec(&mut primary, 1, true, 2, &[(1, 1), (2, 1)]);
        let a = rec(&mut primary, 2, false, 2, &[(1, 2)]);
        let mut sums = DbChecksum::new(ps());
        plan_batch(Lsn(0), Generation(1), &mut sums, &[s]).unwrap();
        sums.set_page(PageNo::new(2).unwrap(), &[9u8; 512]); // a foreign write on the replica
        let e = plan_batch(Lsn(1), Generation(1), &mut sums, &[a]).unwrap_err();
        assert!(matches!(e, PlanError::Divergence(_)), "{e:?}");
    }

    #[test]
    fn a_snapshot_resets_the_baseline() {
        let mut primary = DbChecksum::new(ps());
        let s = rec(&mut primary, 1, true, 2, &[(1, 1), (2, 1)]);
        let mut sums = DbChecksum::new(ps());
        plan_batch(Lsn(0), Generation(1), &mut sums, &[s]).unwrap();
        sums.set_page(PageNo::new(2).unwrap(), &[9u8; 512]); // diverged...
        let mut p2 = DbChecksum::new(ps());
        let mut snap = rec(&mut p2, 7, true, 1, &[(1, 5)]);
        snap.meta.generation = Generation(2);
        let plan = plan_batch(Lsn(1), Generation(1), &mut sums, &[snap]).unwrap();
        assert_eq!(plan.generation, Generation(2));
        assert_eq!(plan.last_lsn, Lsn(7));
        assert_eq!(plan.pages.len(), 1);
    }
}
