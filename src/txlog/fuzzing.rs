//! The one entry point shared by the fuzz target (`fuzz/fuzz_targets/record_decode.rs`) and the
//! seed-corpus test (`tests/txlog_corpus.rs`), so both exercise exactly the same code. It feeds
//! arbitrary bytes to every decoder of the log formats and asserts their properties; a panic here
//! is a bug (decoders must return errors, never panic, on any input).

use super::meta::decode_durable;
use super::{
    decode_record, decode_record_meta, decode_segment_header, encode_record, encode_record_with,
    scan_segment_bytes, Compression, Meta, FLAG_COMPRESSED,
};

/// Runs every decoder on `data`. Properties checked: a decodable uncompressed record re-encodes
/// to exactly the bytes consumed (the encoding is canonical); a compressed one (whose frames
/// another encoder may have made differently) decodes to the same record after re-encoding with
/// either codec; both agree with the header-only decoder; a segment scan never reports an end
/// beyond the input.
pub fn exercise_decoders(data: &[u8]) {
    if let Ok((record, used)) = decode_record(data) {
        if u16::from_be_bytes([data[6], data[7]]) & FLAG_COMPRESSED == 0 {
            assert_eq!(encode_record(&record), &data[..used], "re-encoding differs");
        } else {
            for c in [Compression::Zstd(1), Compression::Lz4] {
                let again = encode_record_with(&record, c);
                let (back, n) = decode_record(&again).expect("a re-encoded record decodes");
                assert_eq!(back, record, "compressed re-encoding differs");
                assert_eq!(n, again.len());
            }
            let plain = encode_record(&record);
            assert_eq!(decode_record(&plain).expect("plain decodes").0, record);
        }
        let (meta, total) = decode_record_meta(data).expect("header decodes when the record does");
        assert_eq!(meta, record.meta);
        assert_eq!(total, used);
    } else {
        let _ = decode_record_meta(data);
    }
    if let Ok(scan) = scan_segment_bytes(data) {
        assert!(scan.end as usize <= data.len());
        assert_eq!(
            scan.header,
            decode_segment_header(data).expect("scanned header decodes")
        );
        if let Some(first) = scan.records.first() {
            assert_eq!(first.lsn, scan.header.first_lsn);
        }
    }
    let _ = decode_durable(data, "fuzz input");
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Meta::from_json(text, "fuzz input");
    }
}
