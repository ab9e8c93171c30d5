//! Fuzz target `push_pull`: see `grinta_tests::fuzz::push_pull` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| grinta_tests::fuzz::push_pull(data));
