//! Fuzz target `flow_stream`: see `grinta_tests::fuzz::flow_stream` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| grinta_tests::fuzz::flow_stream(data));
