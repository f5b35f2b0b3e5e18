#![no_main]
//! `waygate_fuzz::wireguard` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| waygate_fuzz::wireguard(data));
