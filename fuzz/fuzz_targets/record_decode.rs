//! Fuzz target: arbitrary bytes through every replication-log decoder (record, record header,
//! segment scanner, durable watermark, meta.json) via `exercise_decoders`, which also asserts
//! that any decodable record re-encodes to exactly the bytes it was decoded from.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    replica::txlog::exercise_decoders(data);
});
