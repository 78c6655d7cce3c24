//! See `arbiter::fuzzing::limits_config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| arbiter::fuzzing::limits_config(data));
