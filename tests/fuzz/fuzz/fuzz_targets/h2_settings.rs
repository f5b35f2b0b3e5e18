#![no_main]
//! `waygate_fuzz::h2_settings` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| waygate_fuzz::h2_settings(data));
