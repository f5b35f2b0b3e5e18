#![no_main]
//! `waygate_fuzz::dns` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| waygate_fuzz::dns(data));
