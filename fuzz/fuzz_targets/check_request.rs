//! See `arbiter::fuzzing::check_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| arbiter::fuzzing::check_request(data));
