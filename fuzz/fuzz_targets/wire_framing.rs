//! Fuzz target `wire_framing`: see `grinta_tests::fuzz::wire_framing` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| grinta_tests::fuzz::wire_framing(data));
