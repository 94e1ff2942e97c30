//! The fuzz seed corpus (`tests/corpus/record_decode/`) under `cargo test`: every file goes
//! through `exercise_decoders`, the same function the fuzz target calls, which must not panic.
//! The seeds are generated deterministically here (valid records and segments, truncations, bit
//! flips); `committed_seeds_are_current` fails when the format changed without regenerating them:
//! `cargo test --test txlog_corpus -- --ignored regenerate_corpus`.

use replica::txlog::{
    decode_record, encode_record, encode_record_with, encode_segment_header, exercise_decoders,
    scan_segment_bytes, Compression, DbChecksum, Page, Record, RecordMeta, SegmentHeader,
};
use replica::types::{Generation, Lsn, PageNo, PageSize};
use std::path::PathBuf;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/record_decode")
}

fn record(lsn: u64, snapshot: bool, writes: &[u32], commit_size: u32) -> Record {
    let ps = PageSize::new(512).unwrap();
    let pages: Vec<Page> = writes
        .iter()
        .map(|&n| Page {
            pgno: PageNo::new(n).unwrap(),
            data: vec![(n as u8).wrapping_mul(37) ^ lsn as u8; 512],
        })
        .collect();
    let meta = RecordMeta {
        lsn: Lsn(lsn),
        generation: Generation(1),
        snapshot,
        page_size: ps,
        commit_size,
        timestamp_ms: 1_700_000_000_000 + lsn,
        wal_salts: *b"saltsalt",
        wal_frame: lsn as u32 * 2,
        wal_cksum: (0x1234_5678, 0x9abc_def0),
        db_checksum: DbChecksum::from_pages(ps, commit_size, &pages).total(),
        page_count: pages.len() as u32,
        epoch: replica::types::Epoch::FIRST,
    };
    Record { meta, pages }
}

fn flip(mut b: Vec<u8>, at: usize) -> Vec<u8> {
    b[at] ^= 0x10;
    b
}

/// `b` (one record) with byte `at` set to `v` and the record checksum recomputed, so the
/// damage reaches the page-entry checks behind the checksum.
fn patch(mut b: Vec<u8>, at: usize, v: &[u8]) -> Vec<u8> {
    b[at..at + v.len()].copy_from_slice(v);
    let end = b.len() - 8;
    let sum = xxhash_rust::xxh3::xxh3_64(&b[..end]);
    b[end..].copy_from_slice(&sum.to_be_bytes());
    b
}

/// The seed files, by name.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let txn = encode_record(&record(2, false, &[1, 3], 3));
    let snap = encode_record(&record(1, true, &[1, 2, 3], 3));
    let empty = encode_record(&record(3, false, &[], 1));
    let mut seg = encode_segment_header(&SegmentHeader {
        first_lsn: Lsn(1),
        created_ms: 1_700_000_000_000,
    })
    .to_vec();
    seg.extend_from_slice(&snap);
    seg.extend_from_slice(&txn);
    seg.extend_from_slice(&empty);
    let n = txn.len();
    // Compressed records (format version 2, FORMAT.md §3.7); the first entry's stored_len is at
    // 92, its frame at 96.
    let ztxn = encode_record_with(&record(2, false, &[1, 3], 3), Compression::Zstd(3));
    let lz4snap = encode_record_with(&record(1, true, &[1, 2, 3], 3), Compression::Lz4);
    let mut zseg = seg[..32].to_vec();
    zseg.extend_from_slice(&lz4snap);
    zseg.extend_from_slice(&ztxn);
    let mut durable = 42u64.to_be_bytes().to_vec();
    durable.extend_from_slice(&1u32.to_be_bytes());
    durable.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&durable).to_be_bytes());
    vec![
        ("record-txn.bin", txn.clone()),
        ("record-snapshot.bin", snap.clone()),
        ("record-no-pages.bin", empty.clone()),
        ("record-two.bin", [txn.clone(), empty.clone()].concat()),
        ("record-trunc-header.bin", txn[..50].to_vec()),
        ("record-trunc-body.bin", txn[..n - 300].to_vec()),
        ("record-trunc-trailer.bin", txn[..n - 3].to_vec()),
        ("record-flip-magic.bin", flip(txn.clone(), 1)),
        ("record-flip-version.bin", flip(txn.clone(), 5)),
        ("record-flip-lsn.bin", flip(txn.clone(), 23)),
        ("record-flip-pgno.bin", flip(txn.clone(), 91)),
        ("record-flip-page.bin", flip(txn.clone(), 300)),
        ("record-flip-trailer.bin", flip(txn.clone(), n - 1)),
        ("segment-3.bin", seg.clone()),
        ("segment-empty.bin", seg[..32].to_vec()),
        ("segment-torn.bin", seg[..seg.len() - 40].to_vec()),
        ("segment-flip-header.bin", flip(seg.clone(), 10)),
        ("segment-flip-record.bin", flip(seg.clone(), 32 + snap.len() + 400)),
        ("record-zstd.bin", ztxn.clone()),
        ("record-lz4-snapshot.bin", lz4snap.clone()),
        ("segment-compressed.bin", zseg),
        ("record-zstd-flip-frame.bin", flip(ztxn.clone(), 100)),
        ("record-zstd-bad-frame.bin", patch(ztxn.clone(), 100, &[0xff; 4])),
        ("record-zstd-len-bomb.bin", patch(ztxn.clone(), 92, &u32::MAX.to_be_bytes())),
        ("record-zstd-len-zero.bin", patch(ztxn.clone(), 92, &[0; 4])),
        ("durable.bin", durable),
        ("meta.json", br#"{"format":1,"lineage":"00112233445566778899aabbccddeeff","role":"primary","page_size":4096,"created_ms":1700000000000}"#.to_vec()),
    ]
}

#[test]
#[ignore = "writes the committed seed corpus; run after a format change"]
fn regenerate_corpus() {
    std::fs::create_dir_all(corpus_dir()).unwrap();
    for (name, bytes) in seeds() {
        std::fs::write(corpus_dir().join(name), bytes).unwrap();
    }
}

#[test]
fn committed_seeds_are_current() {
    for (name, bytes) in seeds() {
        let committed = std::fs::read(corpus_dir().join(name)).unwrap_or_default();
        assert!(
            committed == bytes,
            "seed {name} is missing or stale: cargo test --test txlog_corpus -- --ignored regenerate_corpus"
        );
    }
    // The valid seeds really are valid (so the fuzzer starts from deep inside the decoders).
    let get = |n: &str| seeds().into_iter().find(|s| s.0 == n).unwrap().1;
    assert!(decode_record(&get("record-txn.bin")).is_ok());
    assert!(decode_record(&get("record-snapshot.bin")).is_ok());
    assert_eq!(
        scan_segment_bytes(&get("segment-3.bin"))
            .unwrap()
            .records
            .len(),
        3
    );
    assert!(scan_segment_bytes(&get("segment-torn.bin"))
        .unwrap()
        .torn_tail
        .is_some());
    assert!(decode_record(&get("record-flip-page.bin")).is_err());
    let z = decode_record(&get("record-zstd.bin")).unwrap().0;
    assert_eq!(z, decode_record(&get("record-txn.bin")).unwrap().0);
    assert!(decode_record(&get("record-lz4-snapshot.bin")).is_ok());
    assert_eq!(
        scan_segment_bytes(&get("segment-compressed.bin"))
            .unwrap()
            .records
            .len(),
        2
    );
    for bad in [
        "record-zstd-flip-frame.bin",
        "record-zstd-bad-frame.bin",
        "record-zstd-len-bomb.bin",
        "record-zstd-len-zero.bin",
    ] {
        assert!(decode_record(&get(bad)).is_err(), "{bad} decodes");
    }
}

#[test]
fn every_corpus_file_decodes_without_panic() {
    let mut n = 0;
    for ent in std::fs::read_dir(corpus_dir()).unwrap() {
        let path = ent.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let res = std::panic::catch_unwind(|| exercise_decoders(&bytes));
        assert!(res.is_ok(), "decoders panicked on {}", path.display());
        // Every prefix too: truncation at each length must be an error, never a panic.
        if bytes.len() <= 4096 {
            for cut in 0..bytes.len() {
                exercise_decoders(&bytes[..cut]);
            }
        }
        n += 1;
    }
    assert!(n >= seeds().len(), "only {n} corpus files");
}
