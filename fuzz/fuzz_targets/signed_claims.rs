//! Fuzz target `signed_claims`: see `grinta_tests::fuzz::signed_claims` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| grinta_tests::fuzz::signed_claims(data));
