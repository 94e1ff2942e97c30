//! Rebuild and verify against the model: every LSN of a synthetic log (growth, shrink, holes, a
//! new generation starting with a SNAPSHOT record), bases from snapshot files after retention,
//! a log starting at LSN 1 without snapshot, and a wrong `db_checksum` named by its LSN.

use super::support::*;
use crate::txlog::*;
use crate::types::{Checksum, Lsn};

/// A log with: LSN 1 snapshot, txns (grow, shrink, holes), LSN 7 new-generation snapshot, txns.
/// Returns the database bytes after every LSN (index = LSN).
fn synthetic(dir: &std::path::Path, segment_bytes: u64) -> (Log, Model, Vec<Vec<u8>>) {
    let mut log = new_log(dir, segment_bytes);
    let mut m = Model::new(ps());
    m.pages = (1..=3).map(|i| page_bytes(ps(), 1000 + i)).collect(); // pre-existing database
    let mut states = vec![Vec::new()];
    let mut push = |log: &mut Log, m: &Model, r: Record| {
        log.append(&r).unwrap();
        states.push(m.bytes());
    };
    let r = m.snapshot_record(false);
    push(&mut log, &m, r);
    for (pages, size) in [
        (&[1, 4][..], 4),
        (&[9][..], 9),
        (&[2, 3][..], 5),
        (&[1][..], 2),
        (&[2][..], 12),
    ] {
        let r = m.txn(pages, size);
        push(&mut log, &m, r);
    }
    m.pages[0] = page_bytes(ps(), 4242); // a change capture missed: a new generation
    let r = m.snapshot_record(true);
    push(&mut log, &m, r);
    for (pages, size) in [(&[5][..], 12), (&[1, 13][..], 13), (&[3][..], 3)] {
        let r = m.txn(pages, size);
        push(&mut log, &m, r);
    }
    log.sync().unwrap();
    (log, m, states)
}

#[test]
fn rebuild_every_lsn_equals_the_model() {
    let d = tempfile::tempdir().unwrap();
    let (_, m, states) = synthetic(d.path(), 4000);
    let out = d.path().join("out.db");
    for (lsn, bytes) in states.iter().enumerate().skip(1) {
        let info = rebuild(d.path(), Some(Lsn(lsn as u64)), &out).unwrap();
        let got = std::fs::read(&out).unwrap();
        assert_eq!(&got, bytes, "LSN {lsn}");
        assert_eq!(info.lsn, Lsn(lsn as u64));
        assert_eq!(info.pages as usize, bytes.len() / PS as usize);
        assert_eq!(
            info.checksum,
            DbChecksum::from_db_bytes(ps(), bytes).total()
        );
    }
    let info = rebuild(d.path(), None, &out).unwrap();
    assert_eq!((info.lsn, info.checksum), (m.lsn, m.checksum()));
    assert_eq!(info.generation.0, 2);
    assert!(err_text(rebuild(d.path(), Some(Lsn(99)), &out)).contains("the log ends at LSN 10"));
    let rep = Log::verify(d.path()).unwrap();
    assert_eq!(
        (rep.records, rep.snapshot_records, rep.checksums_verified),
        (10, 2, 10)
    );
    assert_eq!(rep.generations.len(), 2);
    assert_eq!(
        (rep.generations[1].first_lsn, rep.generations[1].last_lsn),
        (Lsn(7), Lsn(10))
    );
}

#[test]
fn rebuild_from_snapshot_file_after_retention() {
    let d = tempfile::tempdir().unwrap();
    let mut log = new_log(d.path(), 2500);
    let mut m = Model::new(ps());
    let mut states = vec![Vec::new()];
    for i in 0..12u32 {
        let r = m.txn(&[1, i % 4 + 2], 6);
        log.append(&r).unwrap();
        states.push(m.bytes());
        if i == 5 {
            log.write_snapshot(&m.snapshot_of_current()).unwrap(); // snapshot at LSN 6
        }
    }
    log.sync().unwrap();
    assert!(log.remove_segments_before(Lsn(7)).unwrap() > 0);
    let out = d.path().join("out.db");
    for lsn in 6..=12 {
        rebuild(d.path(), Some(Lsn(lsn)), &out).unwrap();
        assert_eq!(
            std::fs::read(&out).unwrap(),
            states[lsn as usize],
            "LSN {lsn}"
        );
    }
    let e = err_text(rebuild(d.path(), Some(Lsn(3)), &out));
    assert!(e.contains("no snapshot at or before LSN 3"), "{e}");
    // verify replays from the snapshot right before the log's first segment when there is one.
    let rep = Log::verify(d.path()).unwrap();
    assert_eq!(rep.snapshots.len(), 1);
    assert!(rep.first_lsn.unwrap() > Lsn(1));
}

#[test]
fn rebuild_from_an_empty_database_when_the_log_starts_at_1() {
    let d = tempfile::tempdir().unwrap();
    let mut log = new_log(d.path(), 1 << 20);
    let mut m = Model::new(ps());
    for (pages, size) in [(&[1, 2][..], 2), (&[4][..], 4)] {
        log.append(&m.txn(pages, size)).unwrap();
    }
    let out = d.path().join("x.db");
    let info = rebuild(d.path(), None, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), m.bytes());
    assert_eq!(info.checksum, m.checksum());
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 4 * u64::from(PS)); // page 3 is a hole
}

#[test]
fn wrong_db_checksum_is_named_by_lsn() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, mut m, _) = synthetic(d.path(), 1 << 20);
    let mut r = m.txn(&[2], 3);
    r.meta.db_checksum = Checksum(r.meta.db_checksum.0 ^ 0x10);
    log.append(&r).unwrap();
    let out = d.path().join("out.db");
    let e = err_text(rebuild(d.path(), None, &out));
    assert!(
        e.contains("record LSN 11") && e.contains("database checksum mismatch"),
        "{e}"
    );
    assert!(!out.exists());
    rebuild(d.path(), Some(Lsn(10)), &out).unwrap();
    assert!(err_text(Log::verify(d.path())).contains("record LSN 11: database checksum mismatch"));
}

#[test]
fn compaction_snapshots_equal_the_model_at_every_lsn() {
    let d = tempfile::tempdir().unwrap();
    let (_, _, states) = synthetic(d.path(), 4000);
    for (lsn, bytes) in states.iter().enumerate().skip(1) {
        let lsn = Lsn(lsn as u64);
        let (meta, path) = compact(d.path(), lsn, Default::default()).unwrap();
        assert_eq!(meta.lsn, lsn);
        assert!(meta.snapshot);
        // The file is a valid snapshot (every check of the reader, checksum included)...
        let snap = Log::read_snapshot(&path).unwrap();
        assert_eq!(snap.meta, meta);
        // ...holding exactly the database at that LSN (the lock-byte page never stored).
        let mut got = vec![0u8; bytes.len()];
        for p in &snap.pages {
            let at = (p.pgno.get() as usize - 1) * PS as usize;
            got[at..at + PS as usize].copy_from_slice(&p.data);
        }
        assert_eq!(&got, bytes, "LSN {lsn}");
        assert_eq!(
            meta.db_checksum,
            DbChecksum::from_db_bytes(ps(), bytes).total()
        );
        // The record's WAL position is carried over (a primary resumes from it).
        let d2 = Log::open(d.path(), LogConfig::default()).unwrap();
        let orig = d2
            .read_meta_from(lsn, Some(lsn))
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                meta.wal_salts,
                meta.wal_frame,
                meta.wal_cksum,
                meta.generation
            ),
            (
                orig.wal_salts,
                orig.wal_frame,
                orig.wal_cksum,
                orig.generation
            )
        );
        // And the scratch files are gone.
        let names: Vec<String> = std::fs::read_dir(d.path().join("snap"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| n.ends_with(".snap")), "{names:?}");
    }
    // A later rebuild may start from the compacted snapshot alone (the log removed before it).
    let out = d.path().join("out.db");
    let last = Lsn(states.len() as u64 - 1);
    let info = rebuild(d.path(), Some(last), &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), states[last.0 as usize]);
    assert_eq!(info.lsn, last);
}

#[test]
fn compaction_past_the_log_end_is_refused_and_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (_, m, _) = synthetic(d.path(), 4000);
    let e = compact(d.path(), Lsn(m.lsn.0 + 5), Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("the log ends at LSN"), "{e}");
    let snaps = std::fs::read_dir(d.path().join("snap"))
        .map(|rd| rd.count())
        .unwrap_or(0);
    assert_eq!(snaps, 0);
}
