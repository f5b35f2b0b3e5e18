#![no_main]
//! `waygate_fuzz::inner_packet` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| waygate_fuzz::inner_packet(data));
