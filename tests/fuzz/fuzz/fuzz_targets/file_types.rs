#![no_main]
//! `waygate_fuzz::file_types` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| waygate_fuzz::file_types(data));
