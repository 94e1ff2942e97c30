//! Log tests: create/open, append rules, segment rolling, readers and their ranges, retention,
//! torn tails (truncated by writers only, never below the durable watermark), several handles on
//! one directory, snapshot files.

use super::support::*;
use crate::txlog::*;
use crate::types::{Generation, Lsn};
use std::fs::OpenOptions;

fn filled(dir: &std::path::Path, n: u32, segment_bytes: u64) -> (Log, Model, Vec<Record>) {
    let mut log = new_log(dir, segment_bytes);
    let mut m = Model::new(ps());
    m.pages = (1..=6).map(|i| page_bytes(ps(), 500 + i)).collect();
    let mut recs = vec![m.snapshot_record(false)];
    for i in 1..n {
        recs.push(m.txn(&[1, i % 5 + 1], 6));
    }
    for r in &recs {
        log.append(r).unwrap();
    }
    log.sync().unwrap();
    (log, m, recs)
}

fn lsns(it: impl Iterator<Item = crate::error::Result<Record>>) -> Vec<u64> {
    it.map(|r| r.unwrap().meta.lsn.0).collect()
}

#[test]
fn create_open_and_append_rules() {
    let d = tempfile::tempdir().unwrap();
    let (log, mut m, recs) = filled(d.path(), 5, 1 << 20);
    assert_eq!(log.last().unwrap(), &recs[4].meta);
    assert_eq!(log.first_lsn(), Some(Lsn(1)));
    assert!(err_text(Log::create(d.path(), log.meta(), cfg(1 << 20))).contains("already exists"));
    assert!(err_text(Log::open(&d.path().join("nope"), cfg(1)))
        .contains("not a replication log directory"));

    let mut log = Log::open(d.path(), cfg(1 << 20)).unwrap();
    assert_eq!(log.last(), Some(&recs[4].meta));
    assert_eq!(log.meta().role, "primary");
    let mut skip = m.txn(&[1], 6);
    skip.meta.lsn = Lsn(9);
    assert!(err_text(log.append(&skip)).contains("LSN 9 does not follow LSN 5"));
    let mut newgen = m.txn(&[1], 6);
    newgen.meta.lsn = Lsn(6);
    newgen.meta.generation = Generation(2);
    assert!(err_text(log.append(&newgen)).contains("must begin with a full snapshot"));
    let mut bad = newgen.clone();
    bad.meta.generation = Generation(1);
    bad.pages[0].data.truncate(3);
    assert!(err_text(log.append(&bad)).contains("has 3 bytes"));
    m.lsn = Lsn(5); // the refused records did not take LSNs
    let n = log.append(&m.snapshot_record(true)).unwrap();
    assert_eq!(n, record_len(ps(), 6));
    assert_eq!(log.last().unwrap().generation, Generation(2));
    log.sync().unwrap();
    assert_eq!(Log::verify(d.path()).unwrap().generations.len(), 2);
}

#[test]
fn segments_roll_and_readers_cross_them() {
    let d = tempfile::tempdir().unwrap();
    let (log, _, recs) = filled(d.path(), 20, 3000); // ~2 records per segment
    let files = segment_files(d.path());
    assert!(files.len() >= 8, "{files:?}");
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap();
        let first = parse_segment_file_name(name).unwrap();
        let b = std::fs::read(f).unwrap();
        let scan = scan_segment_bytes(&b).unwrap();
        assert_eq!(scan.records[0].lsn, first);
        // Only a record alone in its segment may exceed segment_bytes.
        assert!(b.len() <= 3000 || scan.records.len() == 1);
    }
    assert_eq!(
        lsns(log.read_from(Lsn(1), None).unwrap()),
        (1..=20).collect::<Vec<_>>()
    );
    let got: Vec<Record> = log
        .read_from(Lsn(7), Some(Lsn(11)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(got, recs[6..11].to_vec());
    assert_eq!(
        lsns(log.read_from(Lsn(0), Some(Lsn(2))).unwrap()),
        vec![1, 2]
    );
    assert_eq!(lsns(log.read_from(Lsn(20), None).unwrap()), vec![20]);
    assert!(lsns(log.read_from(Lsn(21), None).unwrap()).is_empty());
    assert!(lsns(log.read_from(Lsn(9), Some(Lsn(8))).unwrap()).is_empty());
    let metas: Vec<RecordMeta> = log
        .read_meta_from(Lsn(3), Some(Lsn(4)))
        .unwrap()
        .map(|m| m.unwrap())
        .collect();
    assert_eq!(metas, vec![recs[2].meta.clone(), recs[3].meta.clone()]);
    let rep = Log::verify(d.path()).unwrap();
    assert_eq!(
        (rep.records, rep.segments, rep.checksums_verified),
        (20, files.len(), 20)
    );

    let reopened = Log::open(d.path(), cfg(3000)).unwrap();
    assert_eq!(reopened.last(), Some(&recs[19].meta));
}

#[test]
fn retention_and_its_error_message() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _, _) = filled(d.path(), 20, 3000);
    let before = segment_files(d.path()).len();
    let removed = log.remove_segments_before(Lsn(10)).unwrap();
    assert!(removed > 0);
    assert_eq!(segment_files(d.path()).len(), before - removed);
    let first = log.first_lsn().unwrap();
    assert!(first <= Lsn(10) && first > Lsn(1));
    let e = err_text(log.read_from(Lsn(1), None));
    assert_eq!(
        e,
        format!("LSN 1 is older than the log's first retained LSN {first}: re-snapshot")
    );
    assert_eq!(
        lsns(log.read_from(Lsn(10), Some(Lsn(10))).unwrap()),
        vec![10]
    );
    // The current segment is never removed.
    log.remove_segments_before(Lsn(1000)).unwrap();
    assert_eq!(
        lsns(log.read_from(log.first_lsn().unwrap(), None).unwrap()).last(),
        Some(&20)
    );
    assert_eq!(
        Log::open(d.path(), cfg(3000)).unwrap().first_lsn(),
        log.first_lsn()
    );
}

fn chop(path: &std::path::Path, by: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - by).unwrap();
}

#[test]
fn torn_tail_is_left_to_readers_and_truncated_by_writers() {
    let d = tempfile::tempdir().unwrap();
    let (_, mut m, recs) = filled(d.path(), 5, 1 << 20);
    let seg = segment_files(d.path()).pop().unwrap();
    chop(&seg, 10);
    let size = std::fs::metadata(&seg).unwrap().len();
    let mut log = Log::open(d.path(), cfg(1 << 20)).unwrap();
    assert_eq!(log.last(), Some(&recs[3].meta));
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        size,
        "open must not truncate"
    );
    assert_eq!(lsns(log.read_from(Lsn(1), None).unwrap()), vec![1, 2, 3, 4]);
    assert!(Log::verify(d.path()).unwrap().torn_tail.is_some());
    // Appending over a pending torn tail is refused.
    let mut r5 = recs[4].clone();
    assert!(err_text(log.append(&r5)).contains("call refresh_for_append first"));
    assert!(log.refresh_for_append().unwrap().is_empty());
    assert!(std::fs::metadata(&seg).unwrap().len() < size);
    log.append(&r5).unwrap();
    // Garbage after the last record (a torn write of the next one) is truncated too.
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, &[0xAB; 300]).unwrap();
    let mut log = Log::open(d.path(), cfg(1 << 20)).unwrap();
    assert!(err_text(
        log.read_from(Lsn(1), None)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
    )
    .contains("bad magic"));
    assert!(log.refresh_for_append().unwrap().is_empty());
    r5 = m.txn(&[2], 6);
    assert_eq!(r5.meta.lsn, Lsn(6));
    log.append(&r5).unwrap();
    log.sync().unwrap();
    let rep = Log::verify(d.path()).unwrap();
    assert_eq!((rep.last_lsn, rep.torn_tail), (Some(Lsn(6)), None));
}

#[test]
fn truncation_never_drops_durable_records() {
    let d = tempfile::tempdir().unwrap();
    let (_, _, _) = filled(d.path(), 5, 1 << 20);
    Log::write_durable(d.path(), Lsn(5), Generation(1)).unwrap();
    let seg = segment_files(d.path()).pop().unwrap();
    let mut b = std::fs::read(&seg).unwrap();
    let n = b.len();
    b[n - 20] ^= 1;
    std::fs::write(&seg, &b).unwrap();
    let mut log = Log::open(d.path(), cfg(1 << 20)).unwrap();
    let e = err_text(log.refresh_for_append());
    assert!(
        e.contains("refusing to truncate") && e.contains("LSN 5"),
        "{e}"
    );
    assert_eq!(std::fs::read(&seg).unwrap(), b);
    assert!(err_text(Log::verify(d.path())).contains("record checksum mismatch"));
}

#[test]
fn refresh_sees_other_writers_including_rolls() {
    let d = tempfile::tempdir().unwrap();
    let mut a = new_log(d.path(), 3000);
    let mut b = Log::open(d.path(), cfg(3000)).unwrap();
    let mut m = Model::new(ps());
    m.pages = vec![page_bytes(ps(), 77); 6];
    let first = m.snapshot_record(false);
    a.append(&first).unwrap();
    assert_eq!(b.refresh_for_append().unwrap(), vec![first]);
    let mut written = Vec::new();
    for i in 0..9 {
        let r = m.txn(&[i % 6 + 1], 6);
        a.append(&r).unwrap();
        written.push(r);
    }
    assert_eq!(b.refresh_for_append().unwrap(), written);
    assert_eq!(b.last(), a.last());
    // a's handle is now stale: its append is refused, not interleaved.
    let r = m.txn(&[3], 6);
    b.append(&r).unwrap();
    let r2 = m.txn(&[4], 6);
    let e = err_text(a.append(&r2));
    assert!(
        e.contains("refresh_for_append") || e.contains("does not follow"),
        "{e}"
    );
    assert_eq!(a.refresh_for_append().unwrap(), vec![r]);
    a.append(&r2).unwrap();
    a.sync().unwrap();
    assert_eq!(Log::verify(d.path()).unwrap().last_lsn, Some(Lsn(12)));
}

#[test]
fn torn_segment_header_is_replaced() {
    let d = tempfile::tempdir().unwrap();
    let (_, mut m, _) = filled(d.path(), 3, 1 << 20);
    let torn = d.path().join("log").join(segment_file_name(Lsn(4)));
    std::fs::write(&torn, b"RPLS\0\x01").unwrap();
    let mut log = Log::open(d.path(), cfg(1 << 20)).unwrap();
    assert_eq!(log.last().unwrap().lsn, Lsn(3));
    assert_eq!(lsns(log.read_from(Lsn(2), None).unwrap()), vec![2, 3]);
    assert!(Log::verify(d.path())
        .unwrap()
        .torn_tail
        .unwrap()
        .contains("segment header truncated"));
    let r4 = m.txn(&[1], 6);
    assert!(err_text(log.append(&r4)).contains("torn header: call refresh_for_append first"));
    log.refresh_for_append().unwrap();
    assert!(!torn.exists());
    m.lsn = Lsn(3);
    log.append(&m.txn(&[1], 6)).unwrap();
    log.sync().unwrap();
    assert_eq!(Log::verify(d.path()).unwrap().last_lsn, Some(Lsn(4)));
    assert_eq!(segment_files(d.path()).len(), 2);
}

#[test]
fn corrupt_rolled_segment_is_an_error_for_readers() {
    let d = tempfile::tempdir().unwrap();
    let (log, _, _) = filled(d.path(), 10, 3000);
    let seg = segment_files(d.path())[1].clone();
    let mut b = std::fs::read(&seg).unwrap();
    b[200] ^= 0xff;
    std::fs::write(&seg, &b).unwrap();
    let e = err_text(
        log.read_from(Lsn(1), None)
            .unwrap()
            .collect::<Result<Vec<_>, _>>(),
    );
    assert!(
        e.contains(&seg.display().to_string()) && e.contains("offset 32"),
        "{e}"
    );
    assert!(err_text(Log::verify(d.path())).contains(&seg.display().to_string()));
}

#[test]
fn durable_watermark_caps_replica_readers() {
    let d = tempfile::tempdir().unwrap();
    let (log, _, _) = filled(d.path(), 6, 1 << 20);
    assert_eq!(log.read_durable_from(Lsn(1)).unwrap().count(), 0);
    Log::write_durable(d.path(), Lsn(4), Generation(1)).unwrap();
    assert_eq!(lsns(log.read_durable_from(Lsn(2)).unwrap()), vec![2, 3, 4]);
    Log::write_durable(d.path(), Lsn(9), Generation(1)).unwrap();
    assert!(err_text(Log::verify(d.path())).contains("acknowledged records are missing"));
}

#[test]
fn snapshot_files() {
    let d = tempfile::tempdir().unwrap();
    let (log, mut m, _) = filled(d.path(), 4, 1 << 20);
    assert!(log.latest_snapshot(None).unwrap().is_none());
    let s4 = m.snapshot_of_current();
    let p4 = log.write_snapshot(&s4).unwrap();
    assert_eq!(
        p4.file_name().unwrap().to_str().unwrap(),
        snapshot_file_name(Lsn(4), Generation(1))
    );
    assert_eq!(Log::read_snapshot(&p4).unwrap(), s4);
    m.txn(&[2, 7], 7);
    let s5 = m.snapshot_of_current();
    let p5 = log.write_snapshot(&s5).unwrap();
    assert_eq!(
        log.latest_snapshot(None).unwrap(),
        Some((s5.meta.clone(), p5.clone()))
    );
    assert_eq!(log.latest_snapshot(Some(Lsn(4))).unwrap().unwrap().1, p4);
    assert!(log.latest_snapshot(Some(Lsn(3))).unwrap().is_none());
    let mut txn = m.txn(&[1], 7);
    assert!(err_text(log.write_snapshot(&txn)).contains("not a SNAPSHOT"));
    // A wrong db_checksum is caught on read.
    txn = m.snapshot_of_current();
    txn.meta.db_checksum.0 ^= 1;
    let bad = log.write_snapshot(&txn).unwrap();
    assert!(err_text(Log::read_snapshot(&bad)).contains("database checksum mismatch"));
    std::fs::remove_file(&bad).unwrap();
    // A flipped byte is caught and the message names the file.
    let mut b = std::fs::read(&p4).unwrap();
    b[500] ^= 1;
    std::fs::write(&p4, &b).unwrap();
    let e = err_text(Log::read_snapshot(&p4));
    assert!(
        e.contains(&p4.display().to_string()) && e.contains("checksum mismatch"),
        "{e}"
    );
    assert_eq!(log.remove_snapshots_before(Lsn(100)).unwrap(), 1);
    assert!(!p4.exists() && p5.exists());
}

#[test]
fn hinted_reads_continue_where_the_last_one_stopped() {
    for segment_bytes in [1 << 20, 3000] {
        let d = tempfile::tempdir().unwrap();
        let (mut log, mut m, mut recs) = filled(d.path(), 12, segment_bytes);
        // Read to the end (and, separately, to an `upto` inside the log): the hint continues.
        let mut it = log.read_from_hinted(Lsn(3), None, None).unwrap();
        assert_eq!(lsns(it.by_ref()), (3..=12).collect::<Vec<_>>());
        let end_hint = it.hint().expect("a hint at the end of the log");
        let mut it = log.read_from_hinted(Lsn(1), Some(Lsn(7)), None).unwrap();
        assert_eq!(lsns(it.by_ref()), (1..=7).collect::<Vec<_>>());
        let mid_hint = it.hint().expect("a hint before `upto`");
        let got: Vec<Record> = log
            .read_from_hinted(Lsn(8), None, Some(&mid_hint))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(got, recs[7..].to_vec(), "segment_bytes {segment_bytes}");
        // Records appended after the hint was taken (possibly in a new segment) are found.
        for i in 0..6 {
            let r = m.txn(&[2, i % 5 + 1], 6);
            log.append(&r).unwrap();
            recs.push(r);
        }
        let got: Vec<Record> = log
            .read_from_hinted(Lsn(13), None, Some(&end_hint))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(got, recs[12..].to_vec(), "segment_bytes {segment_bytes}");
        // A hint for another position is ignored, never misapplied.
        assert_eq!(
            lsns(log.read_from_hinted(Lsn(5), None, Some(&mid_hint)).unwrap()),
            (5..=18).collect::<Vec<_>>()
        );
    }
}

#[test]
fn located_ranges_are_whole_records_within_one_segment() {
    for segment_bytes in [1 << 20, 3000] {
        let d = tempfile::tempdir().unwrap();
        let (log, _, recs) = filled(d.path(), 15, segment_bytes);
        let mut from = Lsn(2);
        let mut hint = None;
        let mut seen = Vec::new();
        while let Some(r) = log.locate(from, Lsn(14), 5000, hint.as_ref()).unwrap() {
            assert_eq!(r.first, from);
            let bytes = std::fs::read(&r.path).unwrap();
            let mut b = &bytes[r.start as usize..(r.start + r.len) as usize];
            for _ in 0..r.count {
                let (rec, used) = decode_record(b).unwrap();
                seen.push(rec);
                b = &b[used..];
            }
            assert!(b.is_empty(), "the range ends on a record boundary");
            from = r.last.next();
            hint = Some(r.next);
        }
        assert_eq!(seen, recs[1..14].to_vec(), "segment_bytes {segment_bytes}");
        assert!(log.locate(Lsn(15), Lsn(14), 5000, None).unwrap().is_none());
    }
}

/// Issue 14 (B): the last record of the log cut at EVERY byte offset inside it (an OS crash
/// before the group fsync), or damaged at every offset, with the watermark below it (FORMAT.md
/// §7: it was never served). Reopening as a writer must drop exactly that record (never one
/// before it), leave the segment ending at the record before, and take the same LSN again;
/// readers must then see the whole log with the re-appended record.
#[test]
fn last_record_cut_or_damaged_at_every_offset_is_dropped_and_retaken() {
    let d = tempfile::tempdir().unwrap();
    let (_, _, recs) = filled(d.path(), 4, 1 << 20);
    Log::write_durable(d.path(), Lsn(3), Generation(1)).unwrap();
    let seg = segment_files(d.path()).pop().unwrap();
    let whole = std::fs::read(&seg).unwrap();
    let last_len = encode_record(&recs[3]).len();
    let start = whole.len() - last_len;
    // The lost LSN 4 captured again (same pages, a later capture time).
    let mut again = recs[3].clone();
    again.meta.timestamp_ms += 1;
    assert_eq!(again.meta.lsn, Lsn(4));
    let check = |what: &str, at: usize| {
        let mut log = Log::open(d.path(), cfg(1 << 20)).unwrap();
        assert!(
            log.refresh_for_append().unwrap().is_empty(),
            "{what} at {at}: nothing new to adopt"
        );
        assert_eq!(log.last(), Some(&recs[2].meta), "{what} at {at}");
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len(),
            start as u64,
            "{what} at {at}: the segment ends where the lost record began"
        );
        log.append(&again).unwrap();
        let got: Vec<_> = log
            .read_from(Lsn(1), None)
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(got.len(), 4, "{what} at {at}");
        assert_eq!(got[3], again, "{what} at {at}");
        assert_eq!(got[..3], recs[..3], "{what} at {at}");
    };
    for cut in start..whole.len() {
        std::fs::write(&seg, &whole[..cut]).unwrap();
        check("cut", cut);
    }
    // Damage (one flipped bit) anywhere in the record, full length kept: the header checksum
    // or the record checksum fails, and the record is dropped the same way.
    for at in (start..whole.len()).step_by(61).chain([whole.len() - 1]) {
        let mut b = whole.clone();
        b[at] ^= 0x10;
        std::fs::write(&seg, &b).unwrap();
        check("flip", at);
    }
}

/// The asynchronous capture's batches: one write, read back record by record, the sequence
/// checked inside the batch and against the log's tail, a batch that does not fit rolling the
/// segment first.
#[test]
fn batches_append_in_one_write_and_keep_the_rules() {
    let d = tempfile::tempdir().unwrap();
    let mut log = new_log(d.path(), 64 << 10);
    let mut m = Model::new(ps());
    m.pages = (1..=6).map(|i| page_bytes(ps(), 900 + i)).collect();
    let mut recs = vec![m.snapshot_record(false)];
    log.append(&recs[0]).unwrap();
    let batch: Vec<Record> = (1..=5).map(|i| m.txn(&[1, i % 5 + 1], 6)).collect();
    log.append_batch(&batch).unwrap();
    recs.extend(batch);
    assert_eq!(log.last(), Some(&recs[5].meta));
    // Out of sequence inside the batch (a hole) or against the tail: refused, nothing written.
    let next: Vec<Record> = (0..3).map(|_| m.txn(&[2], 6)).collect();
    let holed = vec![next[0].clone(), next[2].clone()];
    assert!(matches!(
        log.append_batch(&holed),
        Err(crate::error::Error::OutOfSequence(_))
    ));
    assert!(matches!(
        log.append_batch(&next[1..]),
        Err(crate::error::Error::OutOfSequence(_))
    ));
    assert_eq!(log.last(), Some(&recs[5].meta));
    // A batch larger than what is left of the segment goes into a new one, whole.
    let before = segment_files(d.path()).len();
    let mut big: Vec<Record> = vec![next[0].clone(), next[1].clone(), next[2].clone()];
    big.extend((0..80).map(|i| m.txn(&[1, 2, 3, 4, 5, i % 6 + 1], 6)));
    log.append_batch(&big).unwrap();
    recs.extend(big);
    assert!(segment_files(d.path()).len() > before);
    log.sync().unwrap();
    let got: Vec<Record> = log
        .read_from(Lsn(1), None)
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert!(
        got == recs,
        "the records read back differ from the ones appended"
    );
    let reopened = Log::open(d.path(), cfg(64 << 10)).unwrap();
    assert_eq!(reopened.last(), Some(&recs.last().unwrap().meta));
    assert_eq!(Log::verify(d.path()).unwrap().records as usize, recs.len());
}
