#![no_main]
//! `waygate_fuzz::proxy_head` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| waygate_fuzz::proxy_head(data));
