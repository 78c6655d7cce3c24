//! See `arbiter::fuzzing::log_entry`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| arbiter::fuzzing::log_entry(data));
