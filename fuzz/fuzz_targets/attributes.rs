#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dlq_bridge::fuzzing::attributes(data));
