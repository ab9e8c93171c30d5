//! Fuzz target `wire_messages`: see `grinta_tests::fuzz::wire_messages` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| grinta_tests::fuzz::wire_messages(data));
