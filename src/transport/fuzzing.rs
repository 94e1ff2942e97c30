//! The one entry point shared by the HTTP fuzz target (`fuzz/fuzz_targets/http_input.rs`) and
//! its seed-corpus test (`tests/fuzz_corpus.rs`): arbitrary bytes as everything the network
//! paths parse — a `/v1/log` response body (client side), a request URL and a `/v1/exec` JSON
//! body (server side), and what a bucket returns (FORMAT.md §9): a manifest and an encrypted
//! object. A panic is a bug.

use crate::txlog::decode_record_meta;
use crate::types::Lsn;

/// Properties: a response body decodes only into dense records starting at the LSN asked
/// for; URL parameters accepted are in range; exec bodies parse or are refused with a message;
/// a manifest accepted passes its chain rule and survives a round trip, and its lookups answer
/// inside it; a sealed object opens only with the key and object name it was sealed with.
pub fn exercise_http(data: &[u8]) {
    exercise_bucket(data);
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

/// The bucket half of `exercise_http`.
fn exercise_bucket(data: &[u8]) {
    use super::s3::crypt::{is_sealed, Key};
    use super::s3::manifest::Manifest;
    if let Ok(m) = Manifest::from_json(data, "fuzz manifest") {
        let again = Manifest::from_json(m.to_json().as_bytes(), "round trip")
            .expect("an accepted manifest encodes to one that is accepted");
        assert_eq!(again, m);
        for lsn in [
            Lsn(0),
            Lsn(1),
            m.last_lsn().unwrap_or(Lsn(1)),
            Lsn(u64::MAX),
        ] {
            if let Some(c) = m.chunk_for(lsn) {
                assert!(c.first_lsn <= lsn && lsn <= c.last_lsn);
            }
            if let Some(s) = m.snapshot_at_or_before(Some(lsn)) {
                assert!(s.last_lsn <= lsn);
            }
        }
        let _ = m.chunk_at_time(0);
        let _ = m.chunk_at_time(u64::MAX);
        let mut plan = m.clone();
        let _ = plan.plan_retention(u64::MAX, 1);
    }
    let key = Key::parse(&[7u8; 32], "fuzz key").expect("32 bytes");
    let opened = key.open("log/x.seg", data, "fuzz object");
    if opened.is_ok() {
        assert!(is_sealed(data));
    }
    let sealed = key.seal("log/x.seg", data).expect("sealing never fails");
    assert_eq!(
        key.open("log/x.seg", &sealed, "again").expect("opens"),
        data
    );
    assert!(
        key.open("log/y.seg", &sealed, "moved").is_err(),
        "bound to its object name"
    );
}
