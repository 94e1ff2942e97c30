//! Format tests: record round trips, every rejection path of FORMAT.md §3.4, the segment header
//! and scanner, file names, `DbChecksum`, the durable file and `meta.json`.

use super::support::*;
use crate::txlog::meta::decode_durable;
use crate::txlog::record::full_page_count;
use crate::txlog::*;
use crate::types::{Checksum, Generation, Lsn, PageNo, PageSize};
use xxhash_rust::xxh3::xxh3_64;

fn sample() -> (Record, Vec<u8>) {
    let mut m = Model::new(ps());
    m.txn(&[1, 2, 3], 3);
    let r = m.txn(&[3, 1, 5], 6);
    let b = encode_record(&r);
    (r, b)
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}
fn fix_header(b: &mut [u8]) {
    let s = xxh3_64(&b[..80]);
    put(b, 80, &s.to_be_bytes());
}
fn fix_trailer(b: &mut [u8]) {
    let n = b.len() - 8;
    let s = xxh3_64(&b[..n]);
    put(b, n, &s.to_be_bytes());
}
fn rejected(b: &[u8], needle: &str) {
    let e = decode_record(b).expect_err("must be rejected").to_string();
    assert!(e.contains(needle), "error {e:?} should contain {needle:?}");
    assert!(matches!(
        decode_record(b),
        Err(crate::error::Error::Corrupt(_))
    ));
}

#[test]
fn round_trip_transaction_and_snapshot() {
    let (r, b) = sample();
    assert_eq!(b.len() as u64, record_len(ps(), 3));
    let (d, used) = decode_record(&b).unwrap();
    assert_eq!((d, used), (r.clone(), b.len()));
    let (m, total) = decode_record_meta(&b[..RECORD_HEADER_LEN]).unwrap();
    assert_eq!((m, total), (r.meta.clone(), b.len()));
    // Trailing bytes are not consumed.
    let mut more = b.clone();
    more.extend_from_slice(&b);
    assert_eq!(decode_record(&more).unwrap().1, b.len());

    let mut model = Model::new(ps());
    model.txn(&[1, 2], 4);
    let s = model.snapshot_record(true);
    assert!(s.meta.snapshot && s.meta.page_count == 4);
    let sb = encode_record(&s);
    assert_eq!(decode_record(&sb).unwrap().0, s);
    assert_eq!(be16(&sb, 6), FLAG_SNAPSHOT);
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[test]
fn header_layout_matches_format_md() {
    let (r, b) = sample();
    assert_eq!(&b[0..4], b"RPLR");
    assert_eq!(be16(&b, 4), 1);
    assert_eq!(
        u64::from_be_bytes(b[8..16].try_into().unwrap()),
        b.len() as u64
    );
    assert_eq!(
        u64::from_be_bytes(b[16..24].try_into().unwrap()),
        r.meta.lsn.0
    );
    assert_eq!(u32::from_be_bytes(b[28..32].try_into().unwrap()), PS);
    assert_eq!(u32::from_be_bytes(b[36..40].try_into().unwrap()), 3);
    assert_eq!(&b[48..56], &r.meta.wal_salts);
    assert_eq!(
        u64::from_be_bytes(b[72..80].try_into().unwrap()),
        r.meta.db_checksum.0
    );
    assert_eq!(u32::from_be_bytes(b[88..92].try_into().unwrap()), 1); // first pgno
}

#[test]
fn rejects_truncation() {
    let (_, b) = sample();
    rejected(&b[..40], "truncated header: 40 of 88");
    rejected(&b[..b.len() - 1], "truncated");
    rejected(&b[..b.len() - 1], "LSN 2");
    assert!(decode_record_meta(&b[..87]).is_err());
    assert!(decode_record(&[]).is_err());
}

#[test]
fn rejects_bad_header_fields() {
    let (_, b) = sample();
    let mut x = b.clone();
    x[0] = b'X';
    rejected(&x, "bad magic");
    let mut x = b.clone();
    put(&mut x, 4, &4u16.to_be_bytes());
    rejected(&x, "unsupported record format version 4");
    let mut x = b.clone();
    x[20] ^= 1;
    rejected(&x, "header checksum mismatch");
    let cases: [(usize, Vec<u8>, &str); 8] = [
        (6, 4u16.to_be_bytes().to_vec(), "unknown flags 0x0004"),
        (6, FLAG_COMPRESSED.to_be_bytes().to_vec(), "COMPRESSED"),
        (68, 1u32.to_be_bytes().to_vec(), "reserved"),
        (28, 1000u32.to_be_bytes().to_vec(), "invalid page size 1000"),
        (32, 0u32.to_be_bytes().to_vec(), "commit size is 0"),
        (36, 7u32.to_be_bytes().to_vec(), "page count 7 exceeds"),
        (
            8,
            12345u64.to_be_bytes().to_vec(),
            "record length 12345 inconsistent",
        ),
        (
            6,
            FLAG_SNAPSHOT.to_be_bytes().to_vec(),
            "SNAPSHOT holds 3 pages",
        ),
    ];
    for (at, v, needle) in cases {
        let mut x = b.clone();
        put(&mut x, at, &v);
        fix_header(&mut x);
        rejected(&x, needle);
        rejected(&x, "record LSN 2");
    }
}

#[test]
fn rejects_checksum_and_page_order() {
    let (_, b) = sample();
    let mut x = b.clone();
    x[200] ^= 0x40;
    rejected(&x, "record checksum mismatch");
    rejected(&x, "LSN 2");
    let entry = 4 + PS as usize;
    let pg = |i: usize| 88 + i * entry;
    for (i, v, needle) in [
        (1, 1u32, "duplicate: page 1 follows page 1"),
        (2, 2u32, "unsorted: page 2 follows page 3"),
        (0, 0u32, "page number 0"),
        (2, 7u32, "page 7 is beyond the commit size 6"),
    ] {
        let mut x = b.clone();
        put(&mut x, pg(i), &v.to_be_bytes());
        fix_trailer(&mut x);
        rejected(&x, needle);
    }
    // The lock-byte page (needs a page size whose lock-byte page number is small).
    let big = PageSize::new(65536).unwrap();
    let lock = big.lock_byte_page().get();
    let r = Record {
        meta: RecordMeta {
            page_size: big,
            commit_size: lock + 3,
            page_count: 1,
            ..sample().0.meta
        },
        pages: vec![Page {
            pgno: pn(lock + 1),
            data: vec![1; 65536],
        }],
    };
    let mut x = encode_record(&r);
    put(&mut x, 88, &lock.to_be_bytes());
    fix_trailer(&mut x);
    rejected(&x, "is the lock-byte page");
}

#[test]
fn snapshot_page_count_excludes_lock_byte_page() {
    let big = PageSize::new(65536).unwrap();
    let lock = big.lock_byte_page().get();
    assert_eq!(full_page_count(big, lock - 1), lock - 1);
    assert_eq!(full_page_count(big, lock + 4), lock + 3);
    // Header-only check: a SNAPSHOT claiming every page including the lock-byte page is rejected.
    let meta = RecordMeta {
        page_size: big,
        commit_size: lock + 4,
        snapshot: true,
        page_count: 1,
        ..sample().0.meta
    };
    let mut h = encode_record(&Record {
        meta: RecordMeta {
            snapshot: false,
            ..meta.clone()
        },
        pages: vec![Page {
            pgno: pn(1),
            data: vec![0; 65536],
        }],
    });
    h.truncate(RECORD_HEADER_LEN);
    for (count, ok) in [(lock + 3, true), (lock + 4, false)] {
        put(&mut h, 6, &FLAG_SNAPSHOT.to_be_bytes());
        put(&mut h, 36, &count.to_be_bytes());
        put(&mut h, 8, &record_len(big, count).to_be_bytes());
        fix_header(&mut h);
        assert_eq!(decode_record_meta(&h).is_ok(), ok, "count {count}");
    }
}

#[test]
fn validate_record_catches_bad_input() {
    let (r, _) = sample();
    let mut x = r.clone();
    x.pages[0].data.pop();
    assert!(validate_record(&x)
        .unwrap_err()
        .to_string()
        .contains("page 1 has 511 bytes"));
    let mut x = r.clone();
    x.pages.swap(0, 1);
    assert!(validate_record(&x)
        .unwrap_err()
        .to_string()
        .contains("unsorted"));
    let mut x = r.clone();
    x.meta.page_count = 9;
    assert!(validate_record(&x).is_err());
    let mut x = r;
    x.meta.snapshot = true;
    assert!(validate_record(&x)
        .unwrap_err()
        .to_string()
        .contains("SNAPSHOT"));
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "encode_record")]
fn encode_panics_on_invalid_record_in_debug() {
    let (mut r, _) = sample();
    r.pages.reverse();
    encode_record(&r);
}

#[test]
fn segment_header_and_names() {
    let h = SegmentHeader {
        first_lsn: Lsn(42),
        created_ms: 7,
    };
    let b = encode_segment_header(&h);
    assert_eq!(&b[0..4], b"RPLS");
    assert_eq!(decode_segment_header(&b).unwrap(), h);
    let mut x = b;
    x[3] = 0;
    assert!(decode_segment_header(&x)
        .unwrap_err()
        .to_string()
        .contains("bad magic"));
    let mut x = b;
    x[5] = 9;
    assert!(decode_segment_header(&x)
        .unwrap_err()
        .to_string()
        .contains("version 9"));
    let mut x = b;
    x[12] ^= 1;
    assert!(decode_segment_header(&x)
        .unwrap_err()
        .to_string()
        .contains("checksum"));
    assert!(decode_segment_header(&b[..31])
        .unwrap_err()
        .to_string()
        .contains("truncated"));

    assert_eq!(segment_file_name(Lsn(42)), "00000000000000000042.seg");
    assert_eq!(
        parse_segment_file_name("00000000000000000042.seg"),
        Some(Lsn(42))
    );
    assert_eq!(
        parse_segment_file_name("00000000000000000042.seg.1.tmp"),
        None
    );
    assert_eq!(parse_segment_file_name("42.seg"), None);
    assert_eq!(
        snapshot_file_name(Lsn(9), Generation(2)),
        "00000000000000000009-0000000002.snap"
    );
    assert_eq!(
        parse_snapshot_file_name("00000000000000000009-0000000002.snap"),
        Some((Lsn(9), Generation(2)))
    );
    assert_eq!(
        parse_snapshot_file_name("00000000000000000009-2.snap"),
        None
    );
}

fn segment_bytes_of(records: &[Record]) -> Vec<u8> {
    let first = records[0].meta.lsn;
    let mut b = encode_segment_header(&SegmentHeader {
        first_lsn: first,
        created_ms: 1,
    })
    .to_vec();
    for r in records {
        b.extend_from_slice(&encode_record(r));
    }
    b
}

#[test]
fn segment_scanner() {
    let mut m = Model::new(ps());
    let recs: Vec<Record> = (0..3).map(|i| m.txn(&[1, i + 2], i + 2)).collect();
    let b = segment_bytes_of(&recs);
    let scan = scan_segment_bytes(&b).unwrap();
    assert_eq!(scan.records.len(), 3);
    assert_eq!(scan.end, b.len() as u64);
    assert!(scan.torn_tail.is_none());
    // Torn tail: reported, not an error.
    let scan = scan_segment_bytes(&b[..b.len() - 5]).unwrap();
    assert_eq!(scan.records.len(), 2);
    assert!(scan.torn_tail.unwrap().contains("record LSN 3 truncated"));
    // Corrupt byte in the middle: an error naming the offset of the bad record.
    let mut x = b.clone();
    let second = 32 + record_len(ps(), 2) as usize;
    x[second + 100] ^= 1;
    let e = scan_segment_bytes(&x).unwrap_err().to_string();
    assert!(
        e.contains(&format!("at offset {second}")) && e.contains("record LSN 2"),
        "{e}"
    );
    // LSN gap inside a segment.
    let gap = segment_bytes_of(&[recs[0].clone(), recs[2].clone()]);
    assert!(scan_segment_bytes(&gap)
        .unwrap_err()
        .to_string()
        .contains("does not follow"));
    // First record must match the header.
    let mut y = b.clone();
    put(
        &mut y,
        0,
        &encode_segment_header(&SegmentHeader {
            first_lsn: Lsn(5),
            created_ms: 1,
        }),
    );
    assert!(scan_segment_bytes(&y)
        .unwrap_err()
        .to_string()
        .contains("segment header says 5"));
}

#[test]
fn db_checksum_incremental_equals_full_recompute() {
    let mut m = Model::new(ps());
    let mut c = DbChecksum::new(ps());
    let ops: [(&[u32], u32); 6] = [
        (&[1, 2, 3], 3),
        (&[2], 3),
        (&[5, 9], 9),
        (&[1], 4),
        (&[12], 12),
        (&[], 2),
    ];
    for (pages, size) in ops {
        let r = m.txn(pages, size);
        c.apply(&r);
        assert_eq!(c.total(), m.checksum());
        assert_eq!(c.total(), r.meta.db_checksum);
        assert_eq!(c.size(), size);
        assert_eq!(
            DbChecksum::from_db_bytes(ps(), &m.bytes()).total(),
            m.checksum()
        );
    }
    let s = m.snapshot_of_current();
    let from = DbChecksum::from_pages(ps(), s.meta.commit_size, &s.pages);
    assert_eq!(from.total(), m.checksum());
    c.apply(&s);
    assert_eq!(c.total(), m.checksum());
    c.truncate(0);
    assert_eq!(c.total(), Checksum(0));
    // The lock-byte page never counts.
    let big = PageSize::new(65536).unwrap();
    let mut d = DbChecksum::new(big);
    d.set_page(big.lock_byte_page(), &[1; 65536]);
    assert_eq!((d.size(), d.total()), (0, Checksum(0)));
    assert_eq!(d.page(big.lock_byte_page()), None);
}

#[test]
fn db_checksum_rollback_takes_back_every_change_since_begin() {
    // Every page of a try (grow, shrink below the start, regrow, snapshot) taken back equals
    // the state before it, page by page; a committed try equals applying the records.
    let mut m = Model::new(ps());
    let mut c = DbChecksum::new(ps());
    c.apply(&m.txn(&[1, 2, 3, 4, 5], 5));
    let tries: [&[(&[u32], u32)]; 4] = [
        &[(&[2, 7], 7), (&[1], 3), (&[9], 9)],
        &[(&[], 1), (&[3], 4)],
        &[(&[4], 5)],
        &[(&[6], 6), (&[], 2), (&[2], 2)],
    ];
    for (k, ops) in tries.iter().enumerate() {
        let before = c.clone();
        let mut model = m.clone();
        c.begin();
        for (pages, size) in *ops {
            c.apply(&model.txn(pages, *size));
        }
        c.begin(); // nested: keeps the first start
        if k == 3 {
            c.apply(&model.snapshot_of_current());
        }
        assert_eq!(c.total(), model.checksum());
        c.rollback();
        assert_eq!(
            (c.total(), c.size()),
            (before.total(), before.size()),
            "try {k}"
        );
        for n in 1..=12 {
            let p = PageNo::new(n).unwrap();
            assert_eq!(c.page(p), before.page(p), "try {k}, page {n}");
        }
        // The same changes kept.
        c.begin();
        for (pages, size) in *ops {
            c.apply(&m.txn(pages, *size));
        }
        c.commit();
        assert_eq!(c.total(), m.checksum());
        c.rollback(); // nothing to take back after commit
        assert_eq!(c.total(), m.checksum());
    }
}

#[test]
fn durable_and_meta_files() {
    assert_eq!(decode_durable(&[], "d").unwrap(), None);
    let dir = tempfile::tempdir().unwrap();
    Log::write_durable(dir.path(), Lsn(7), Generation(1)).unwrap();
    Log::write_durable(dir.path(), Lsn(5), Generation(1)).unwrap(); // never lowers
    assert_eq!(
        Log::read_durable(dir.path()).unwrap(),
        Some((Lsn(7), Generation(1)))
    );
    let mut b = std::fs::read(dir.path().join("durable")).unwrap();
    assert_eq!(b.len(), 20);
    b[3] ^= 1;
    assert!(decode_durable(&b, "d")
        .unwrap_err()
        .to_string()
        .contains("checksum mismatch"));
    assert!(decode_durable(&b[..19], "d")
        .unwrap_err()
        .to_string()
        .contains("19 bytes"));

    let meta = Meta::new("primary", ps()).unwrap();
    assert_eq!(meta.lineage.len(), 32);
    assert_eq!(Meta::from_json(&meta.to_json(), "m").unwrap(), meta);
    let v3 = meta.to_json().replace("\"format\":1", "\"format\":3");
    assert!(Meta::from_json(&v3, "m")
        .unwrap_err()
        .to_string()
        .contains("format 3 is not supported"));
    assert!(Meta::from_json("{}", "m")
        .unwrap_err()
        .to_string()
        .contains("\"format\""));
    let bad = meta.to_json().replace(&meta.lineage, "xyz");
    assert!(Meta::from_json(&bad, "m")
        .unwrap_err()
        .to_string()
        .contains("lineage"));
}

/// Raising the watermark is read-compare-write: racing raisers (threads with their own
/// descriptor, threads sharing one, and `Log::write_durable` callers) must never lower it, and
/// it must end at the highest value raised. A reader checks every value it sees is monotonic.
#[test]
fn durable_watermark_never_goes_down_under_racing_raisers() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let shared = Arc::new(DurableFile::open(&path).unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (path, done) = (path.clone(), done.clone());
        std::thread::spawn(move || {
            let mut seen = Lsn(0);
            let mut reads = 0u64;
            while !done.load(Ordering::Acquire) {
                // (A read racing the 20-byte pwrite may see it torn: the checksum says so.)
                if let Ok(Some((l, _))) = Log::read_durable(&path) {
                    assert!(l >= seen, "watermark went down from {seen} to {l}");
                    seen = l;
                }
                reads += 1;
            }
            reads
        })
    };
    let raisers: Vec<_> = (0..6u64)
        .map(|t| {
            let (path, shared) = (path.clone(), shared.clone());
            std::thread::spawn(move || {
                let own = DurableFile::open(&path).unwrap();
                // Interleaved values, each thread raising its own ascending sequence.
                for i in 0..2000u64 {
                    let lsn = Lsn(i * 6 + t);
                    match t % 3 {
                        0 => own.raise(lsn, Generation(1)).unwrap(),
                        1 => shared.raise(lsn, Generation(1)).unwrap(),
                        _ => Log::write_durable(&path, lsn, Generation(1)).unwrap(),
                    }
                }
            })
        })
        .collect();
    for r in raisers {
        r.join().unwrap();
    }
    done.store(true, Ordering::Release);
    assert!(watcher.join().unwrap() > 0);
    assert_eq!(
        Log::read_durable(&path).unwrap(),
        Some((Lsn(1999 * 6 + 5), Generation(1)))
    );
}

// ---- epochs (FORMAT.md §3.1 version 3, §6 format 2, §6.1 fence) ----

#[test]
fn epoch_round_trip_in_version_3_plain_and_compressed() {
    use crate::types::Epoch;
    let (mut r, old) = sample();
    // Epoch 1 is written exactly as before: version 1, reserved 0, read back as epoch 1.
    assert_eq!(be16(&old, 4), RECORD_VERSION);
    assert_eq!(decode_record(&old).unwrap().0.meta.epoch, Epoch::FIRST);
    r.meta.epoch = Epoch(7);
    let b = encode_record(&r);
    assert_eq!(be16(&b, 4), RECORD_VERSION_EPOCH);
    assert_eq!(&b[68..72], &7u32.to_be_bytes());
    assert_eq!(decode_record(&b).unwrap(), (r.clone(), b.len()));
    assert_eq!(decode_record_meta(&b).unwrap().0.epoch, Epoch(7));
    for c in [Compression::Zstd(DEFAULT_ZSTD_LEVEL), Compression::Lz4] {
        let z = encode_record_with(&r, c);
        assert_eq!(be16(&z, 4), RECORD_VERSION_EPOCH);
        assert_eq!(be16(&z, 6) & FLAG_COMPRESSED, FLAG_COMPRESSED);
        assert_eq!(record_codec(&z).unwrap(), c.codec());
        assert_eq!(decode_record(&z).unwrap().0, r);
    }
    // A version-2 (compressed, epoch 1) record still reads as epoch 1.
    r.meta.epoch = Epoch::FIRST;
    let z = encode_record_with(&r, Compression::Lz4);
    assert_eq!(be16(&z, 4), RECORD_VERSION_COMPRESSED);
    assert_eq!(decode_record(&z).unwrap().0.meta.epoch, Epoch::FIRST);
}

#[test]
fn version_3_rejects_epoch_below_2_and_unknown_codec() {
    let (mut r, _) = sample();
    r.meta.epoch = crate::types::Epoch(3);
    let mut b = encode_record(&r);
    put(&mut b, 68, &1u32.to_be_bytes());
    fix_header(&mut b);
    fix_trailer(&mut b);
    rejected(&b, "epoch 1 in a version-3 record");
    let mut z = encode_record_with(&r, Compression::Lz4);
    put(&mut z, 6, &((9u16 << 8) | FLAG_COMPRESSED).to_be_bytes());
    fix_header(&mut z);
    fix_trailer(&mut z);
    rejected(&z, "unknown compression codec 9");
}

#[test]
fn epochs_never_decrease_along_a_log() {
    use crate::types::Epoch;
    let mut m = Model::new(ps());
    let mut a = m.txn(&[1], 1).meta;
    let mut b = m.txn(&[1], 1).meta;
    a.epoch = Epoch(2);
    b.epoch = Epoch(3);
    assert!(crate::txlog::check_sequence(&a, &b).is_ok());
    let err = crate::txlog::check_sequence(&b, &a_next(&a, &b)).unwrap_err();
    assert!(err.contains("epoch 2 is older than epoch 3"), "{err}");
}

fn a_next(a: &RecordMeta, b: &RecordMeta) -> RecordMeta {
    RecordMeta {
        lsn: b.lsn.next(),
        ..a.clone()
    }
}

#[test]
fn meta_json_epoch_format_2_and_old_format_1() {
    use crate::types::Epoch;
    let mut m = Meta::new("primary", ps()).unwrap();
    let one = m.to_json();
    assert!(!one.contains("epoch"), "{one}");
    assert_eq!(Meta::from_json(&one, "t").unwrap().epoch, Epoch::FIRST);
    m.epoch = Epoch(4);
    m.epoch_start = Some((Lsn(41), Checksum(0xabc)));
    let two = m.to_json();
    let back = Meta::from_json(&two, "t").unwrap();
    assert_eq!(back.format, DIR_FORMAT_EPOCH);
    assert_eq!(
        (back.epoch, back.epoch_start),
        (Epoch(4), Some((Lsn(41), Checksum(0xabc))))
    );
    let bad = two.replace("\"epoch\":4", "\"epoch\":1");
    assert!(Meta::from_json(&bad, "t").is_err());
    let three = one.replace("\"format\":1", "\"format\":3");
    assert!(Meta::from_json(&three, "t")
        .unwrap_err()
        .to_string()
        .contains("format 3"));
}

#[test]
fn fence_is_raised_never_lowered() {
    use crate::types::Epoch;
    let d = tempfile_dir();
    assert!(read_fence(&d).is_none());
    let f = |e, p: Option<&str>| Fence {
        epoch: Epoch(e),
        primary: p.map(str::to_string),
        seen_ms: 1,
    };
    assert!(raise_fence(&d, &f(3, Some("http://b"))).unwrap());
    assert!(!raise_fence(&d, &f(2, Some("http://c"))).unwrap());
    assert!(!raise_fence(&d, &f(3, None)).unwrap());
    assert_eq!(read_fence(&d).unwrap().primary.as_deref(), Some("http://b"));
    assert!(raise_fence(&d, &f(4, None)).unwrap());
    assert_eq!(read_fence(&d).unwrap().epoch, Epoch(4));
    let _ = std::fs::remove_dir_all(&d);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "repl-fence-{}-{}",
        std::process::id(),
        crate::util::now_ms()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_log_refuses_records_of_another_epoch() {
    use crate::types::Epoch;
    let d = tempfile_dir();
    let mut meta = Meta::new("primary", ps()).unwrap();
    meta.epoch = Epoch(2);
    meta.epoch_start = Some((Lsn(0), Checksum(0)));
    let mut log = Log::create(&d, &meta, LogConfig::default()).unwrap();
    let mut m = Model::new(ps());
    let mut r = m.txn(&[1], 1);
    let e = log.append(&r).unwrap_err().to_string();
    assert!(e.contains("has epoch 1 but this log is epoch 2"), "{e}");
    r.meta.epoch = Epoch(2);
    log.append(&r).unwrap();
    let mut r2 = m.txn(&[1], 1);
    r2.meta.epoch = Epoch(2);
    let mut r3 = m.txn(&[1], 1);
    r3.meta.epoch = Epoch(3);
    assert!(log.append_batch(&[r2.clone(), r3]).is_err());
    assert!(log.append_batch(&[r2]).is_ok());
    drop(log);
    let back = Log::open(&d, LogConfig::default()).unwrap();
    assert_eq!(back.meta().epoch, Epoch(2));
    assert_eq!(back.last().unwrap().epoch, Epoch(2));
    let _ = std::fs::remove_dir_all(&d);
}
