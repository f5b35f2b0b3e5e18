#![no_main]
//! `waygate_fuzz::sniff_stream` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| waygate_fuzz::sniff_stream(data));
