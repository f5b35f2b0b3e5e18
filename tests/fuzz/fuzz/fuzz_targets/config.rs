#![no_main]
//! `waygate_fuzz::config` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| waygate_fuzz::config(data));
