//! Fuzz target: arbitrary bytes as a WAL file and as a wal-index through every parser, the
//! recovery scan and hash lookups (`wal::exercise_wal`, which also asserts their properties).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    replica::wal::exercise_wal(data);
});
