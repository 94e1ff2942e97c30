//! Compressed records (FORMAT.md §3.7): round trips with both codecs through every reader (the
//! in-memory decoder, the streaming scanner, the log and snapshot files), raw entries for pages
//! that do not shrink, and the rejections: a damaged frame, a frame that would decompress past
//! the page size, stored lengths out of bounds, a version/flag mismatch.

use super::support::*;
use crate::txlog::*;
use tempfile::tempdir;
use xxhash_rust::xxh3::xxh3_64;

const CODECS: [Compression; 3] = [Compression::Zstd(3), Compression::Zstd(1), Compression::Lz4];

fn text_model() -> Model {
    let mut m = Model::new(ps());
    m.text = true;
    m
}

/// A compressed record whose first entry is compressed, its bytes and the offset of that
/// entry's `stored_len`.
fn sample(c: Compression) -> (Record, Vec<u8>) {
    let mut m = text_model();
    let r = m.txn(&[1, 2, 4], 5);
    let b = encode_record_with(&r, c);
    (r, b)
}

fn fix_trailer(b: &mut [u8]) {
    let n = b.len() - 8;
    let s = xxh3_64(&b[..n]);
    b[n..].copy_from_slice(&s.to_be_bytes());
}

fn rejected(b: &[u8], needle: &str) {
    let e = decode_record(b).expect_err("must be rejected").to_string();
    assert!(e.contains(needle), "error {e:?} should contain {needle:?}");
    // The streaming scanner refuses the same bytes.
    let mut seg = encode_segment_header(&SegmentHeader {
        first_lsn: decode_record_meta(b).map_or(Lsn(1), |m| m.0.lsn),
        created_ms: 1,
    })
    .to_vec();
    seg.extend_from_slice(b);
    assert!(
        scan_segment_bytes(&seg).is_err(),
        "scanner accepted: {needle}"
    );
}

#[test]
fn round_trip_with_each_codec_is_smaller_and_identical() {
    for c in CODECS {
        let (r, b) = sample(c);
        let plain = encode_record(&r);
        assert!(
            b.len() * 4 < plain.len() * 3,
            "{c:?}: {} vs {}",
            b.len(),
            plain.len()
        );
        assert_eq!(u16::from_be_bytes([b[4], b[5]]), RECORD_VERSION_COMPRESSED);
        assert_eq!(
            u16::from_be_bytes([b[6], b[7]]) & FLAG_COMPRESSED,
            FLAG_COMPRESSED
        );
        let (d, used) = decode_record(&b).unwrap();
        assert_eq!((d, used), (r.clone(), b.len()));
        let (m, total) = decode_record_meta(&b).unwrap();
        assert_eq!((m, total), (r.meta.clone(), b.len()));
    }
    // Compression off writes version 1, byte for byte what older builds wrote.
    let (r, _) = sample(Compression::Zstd(3));
    assert_eq!(encode_record_with(&r, Compression::None), encode_record(&r));
}

#[test]
fn incompressible_pages_are_stored_raw() {
    let mut m = Model::new(ps()); // random pages
    let r = m.txn(&[1, 2], 2);
    let b = encode_record_with(&r, Compression::Zstd(3));
    // Each entry: pgno, stored_len = page size, the page itself.
    assert_eq!(b.len(), RECORD_HEADER_LEN + 2 * (8 + PS as usize) + 8);
    assert_eq!(&b[92..96], &PS.to_be_bytes());
    assert_eq!(decode_record(&b).unwrap().0, r);
}

#[test]
fn damaged_compressed_entry_is_rejected_with_a_clear_error() {
    for c in CODECS {
        let (_, b) = sample(c);
        // A flipped byte inside the frame: the record checksum catches it.
        let mut f = b.clone();
        f[100] ^= 0x40;
        rejected(&f, "record checksum mismatch");
        // The same damage behind a recomputed checksum: the decompressor refuses it.
        let mut g = b.clone();
        g[96..104].copy_from_slice(&[0xff; 8]);
        fix_trailer(&mut g);
        rejected(&g, "does not decompress");
    }
}

#[test]
fn length_bombs_are_bounded_by_the_page_size() {
    let (_, b) = sample(Compression::Zstd(3));
    // A stored length larger than a page is refused before anything is read for it.
    for bad in [PS + 1, u32::MAX, 0] {
        let mut g = b.clone();
        g[92..96].copy_from_slice(&bad.to_be_bytes());
        fix_trailer(&mut g);
        rejected(&g, "stored bytes (must be 1..=512");
    }
    // A small frame that would decompress to far more than a page: refused, never allocated.
    let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap();
    assert!(bomb.len() < PS as usize);
    let mut m = text_model();
    let r = m.txn(&[1], 1);
    let mut rec = encode_record_with(&r, Compression::Zstd(3));
    let old = u32::from_be_bytes(rec[92..96].try_into().unwrap()) as usize;
    rec.splice(96..96 + old, bomb.iter().copied());
    rec[92..96].copy_from_slice(&(bomb.len() as u32).to_be_bytes());
    let total = rec.len() as u64;
    rec[8..16].copy_from_slice(&total.to_be_bytes());
    let h = xxh3_64(&rec[..80]);
    rec[80..88].copy_from_slice(&h.to_be_bytes());
    fix_trailer(&mut rec);
    rejected(&rec, "does not decompress");
    // And a frame of fewer bytes than a page is refused too.
    let short = zstd::bulk::compress(&[7u8; 100], 3).unwrap();
    let mut rec2 = encode_record_with(&r, Compression::Zstd(3));
    let old = u32::from_be_bytes(rec2[92..96].try_into().unwrap()) as usize;
    rec2.splice(96..96 + old, short.iter().copied());
    rec2[92..96].copy_from_slice(&(short.len() as u32).to_be_bytes());
    let total = rec2.len() as u64;
    rec2[8..16].copy_from_slice(&total.to_be_bytes());
    let h = xxh3_64(&rec2[..80]);
    rec2[80..88].copy_from_slice(&h.to_be_bytes());
    fix_trailer(&mut rec2);
    rejected(&rec2, "decompresses to 100 bytes");
}

#[test]
fn header_rules_of_version_2() {
    let (_, b) = sample(Compression::Zstd(3));
    let with = |at: usize, v: &[u8]| {
        let mut g = b.clone();
        g[at..at + v.len()].copy_from_slice(v);
        let h = xxh3_64(&g[..80]);
        g[80..88].copy_from_slice(&h.to_be_bytes());
        fix_trailer(&mut g);
        g
    };
    rejected(&with(68, &[9]), "unknown compression codec 9");
    rejected(&with(69, &[1]), "reserved field");
    rejected(&with(6, &0u16.to_be_bytes()), "without the COMPRESSED flag");
    rejected(
        &with(4, &4u16.to_be_bytes()),
        "unsupported record format version 4",
    );
    rejected(
        &with(8, &100u64.to_be_bytes()),
        "compressed record length 100 outside",
    );
    // Entries must fill the record exactly: one extra byte before the trailer is refused.
    let mut g = b.clone();
    let n = g.len() - 8;
    g.insert(n, 0);
    let total = g.len() as u64;
    g[8..16].copy_from_slice(&total.to_be_bytes());
    let h = xxh3_64(&g[..80]);
    g[80..88].copy_from_slice(&h.to_be_bytes());
    fix_trailer(&mut g);
    rejected(&g, "1 bytes after the last page entry");
}

#[test]
fn the_log_stores_compressed_records_readers_see_the_same_pages() {
    let d = tempdir().unwrap();
    let mut log = new_log(d.path(), 4096);
    let mut m = text_model();
    let mut want = Vec::new();
    // Plain, then zstd, then lz4 records in one log (the setting changed twice).
    for (i, c) in [Compression::None, Compression::Zstd(3), Compression::Lz4]
        .into_iter()
        .enumerate()
    {
        log.set_config(LogConfig {
            segment_bytes: 4096,
            compression: c,
        });
        for k in 0..4u32 {
            let r = m.txn(&[1, 2 + k, 7], 8 + i as u32);
            log.append(&r).unwrap();
            want.push(r);
        }
    }
    log.sync().unwrap();
    let got: Vec<Record> = log
        .read_from(Lsn(1), None)
        .unwrap()
        .collect::<crate::error::Result<_>>()
        .unwrap();
    assert_eq!(got, want);
    Log::verify(d.path()).unwrap(); // every record of both forms decodes and chains
                                    // A run located for serving is as long as the stored bytes and names the codec.
    let durable = Lsn(want.len() as u64);
    let mut from = Lsn(1);
    let mut codecs = Vec::new();
    while from <= durable {
        let r = log.locate(from, durable, 1 << 20, None).unwrap().unwrap();
        let bytes = std::fs::read(&r.path).unwrap();
        let run = &bytes[r.start as usize..(r.start + r.len) as usize];
        let mut at = 0;
        let mut n = 0;
        while at < run.len() {
            at += decode_record(&run[at..]).unwrap().1;
            n += 1;
        }
        assert_eq!((at, n), (run.len(), r.count as usize));
        codecs.push(r.codec);
        from = r.last.next();
    }
    assert!(codecs.contains(&None));
    assert!(codecs.contains(&Some(CODEC_ZSTD)) || codecs.contains(&Some(CODEC_LZ4)));
}

#[test]
fn snapshot_files_compressed_both_ways_stream_back() {
    for c in [Compression::Zstd(3), Compression::Lz4] {
        let d = tempdir().unwrap();
        let mut log = new_log(d.path(), 1 << 20);
        log.set_config(LogConfig {
            segment_bytes: 1 << 20,
            compression: c,
        });
        let mut m = text_model();
        let r1 = m.txn(&[1, 2, 3, 4], 4);
        log.append(&r1).unwrap();
        let snap = m.snapshot_of_current();
        // Whole-record writer.
        let path = log.write_snapshot(&snap).unwrap();
        let plain_len = record_len(ps(), snap.meta.page_count) + SEGMENT_HEADER_LEN as u64;
        assert!(std::fs::metadata(&path).unwrap().len() < plain_len * 3 / 4);
        let mut pages = Vec::new();
        let (meta, sums) = stream_snapshot_file(&path, &mut |_| Ok(()), &mut |p, b| {
            pages.push((p, b.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            (meta.db_checksum, sums.total()),
            (snap.meta.db_checksum, snap.meta.db_checksum)
        );
        assert_eq!(pages.len(), snap.pages.len());
        // The streaming writer (compaction, the primary's snapshots) gives the same pages.
        let sd = tempdir().unwrap();
        let p2 = write_streamed(sd.path(), &snap.meta, c, &mut |pgno, buf| {
            buf.copy_from_slice(&m.pages[pgno as usize - 1]);
            Ok(())
        })
        .unwrap();
        let b2 = std::fs::read(&p2).unwrap();
        let (rec, used) = decode_record(&b2[SEGMENT_HEADER_LEN..]).unwrap();
        assert_eq!(used + SEGMENT_HEADER_LEN, b2.len());
        assert_eq!(rec, snap);
    }
}

#[test]
fn the_setting_parses_and_names() {
    for (text, c) in [
        ("none", Compression::None),
        ("0", Compression::None),
        ("zstd", Compression::Zstd(DEFAULT_ZSTD_LEVEL)),
        ("ZSTD:9", Compression::Zstd(9)),
        ("19", Compression::Zstd(19)),
        ("lz4", Compression::Lz4),
    ] {
        assert_eq!(Compression::parse(text), Some(c), "{text}");
        assert_eq!(Compression::from_code(c.code()), Some(c));
        assert_eq!(Compression::parse(&c.name()), Some(c));
    }
    for bad in ["gzip", "20", "zstd:0", "-1", "zstd:x"] {
        assert_eq!(Compression::parse(bad), None, "{bad}");
    }
    assert_eq!(Compression::from_code(50), None);
}

#[test]
fn a_compressed_snapshot_copies_to_exactly_the_uncompressed_file() {
    let d = tempdir().unwrap();
    let mut log = new_log(d.path(), 1 << 20);
    log.set_config(LogConfig {
        segment_bytes: 1 << 20,
        compression: Compression::Zstd(3),
    });
    let mut m = text_model();
    log.append(&m.txn(&[1, 2, 3, 4, 5], 5)).unwrap();
    let snap = m.snapshot_of_current();
    let path = log.write_snapshot(&snap).unwrap();
    let mut out = Vec::new();
    let n = copy_snapshot_plain(&path, &mut out).unwrap();
    assert_eq!(n as usize, out.len());
    let src = std::fs::read(&path).unwrap();
    assert_eq!(out[..SEGMENT_HEADER_LEN], src[..SEGMENT_HEADER_LEN]);
    assert_eq!(out[SEGMENT_HEADER_LEN..], encode_record(&snap)[..]);
    // A damaged compressed page (checksums fixed) is an error: the copy must be discarded.
    let mut bad = src.clone();
    let at = SEGMENT_HEADER_LEN + 96;
    bad[at..at + 8].copy_from_slice(&[0xff; 8]);
    fix_trailer(&mut bad);
    std::fs::write(&path, &bad).unwrap();
    let e = copy_snapshot_plain(&path, &mut Vec::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not decompress"), "{e}");
}
