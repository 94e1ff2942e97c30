//! The one entry point shared by the fuzz target (`fuzz/fuzz_targets/record_decode.rs`) and the
//! seed-corpus test (`tests/txlog_corpus.rs`), so both exercise exactly the same code. It feeds
//! arbitrary bytes to every decoder of the log formats and asserts their properties; a panic here
//! is a bug (decoders must return errors, never panic, on any input).

use super::meta::decode_durable;
use super::{
    decode_record, decode_record_meta, decode_segment_header, encode_record, scan_segment_bytes,
    Meta,
};

/// Runs every decoder on `data`. Properties checked: a decodable record re-encodes to exactly the
/// bytes consumed (the encoding is canonical) and agrees with the header-only decoder; a segment
/// scan never reports an end beyond the input.
pub fn exercise_decoders(data: &[u8]) {
    if let Ok((record, used)) = decode_record(data) {
        assert_eq!(encode_record(&record), &data[..used], "re-encoding differs");
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
