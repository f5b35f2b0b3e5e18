#![no_main]
//! `waygate_fuzz::wg_initiator` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| waygate_fuzz::wg_initiator(data));
