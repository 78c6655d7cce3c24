//! See `arbiter::fuzzing::peer_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| arbiter::fuzzing::peer_message(data));
