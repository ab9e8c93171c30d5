//! Fuzz target `node`: see `grinta_tests::fuzz::node` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| grinta_tests::fuzz::node(data));
