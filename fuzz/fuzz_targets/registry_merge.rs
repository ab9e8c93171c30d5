//! Fuzz target `registry_merge`: see `grinta_tests::fuzz::registry_merge` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| grinta_tests::fuzz::registry_merge(data));
