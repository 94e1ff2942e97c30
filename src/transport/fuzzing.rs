//! The one entry point shared by the HTTP fuzz target (`fuzz/fuzz_targets/http_input.rs`) and
//! its seed-corpus test (`tests/fuzz_corpus.rs`): arbitrary bytes as everything the HTTP path
//! parses from the network — a `/v1/log` response body (client side), a request URL and a
//! `/v1/exec` JSON body (server side). A panic is a bug.

use crate::txlog::decode_record_meta;
use crate::types::Lsn;

/// Properties: a response body decodes only into dense records starting at the LSN asked
/// for; URL parameters accepted are in range; exec bodies parse or are refused with a message.
pub fn exercise_http(data: &[u8]) {
    let from = decode_record_meta(data).map_or(Lsn(1), |(m, _)| m.lsn);
    if let Ok(records) = super::http::decode_all(data, from) {
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.meta.lsn.0, from.0 + i as u64);
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        super::routes::fuzz_url(s);
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(s) {
            if let Ok(req) = super::exec::request_from_json(&v) {
                assert!(!req.sql.trim().is_empty());
            }
        }
    }
}
