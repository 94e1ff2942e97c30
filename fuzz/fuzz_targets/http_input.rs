//! Fuzz target: arbitrary bytes as what the HTTP path parses from the network: a /v1/log
//! response body, a request URL, a /v1/exec JSON body (`transport::fuzzing::exercise_http`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    replica::transport::fuzzing::exercise_http(data);
});
