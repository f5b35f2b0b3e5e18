#![no_main]
//! `waygate_fuzz::posture_json` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| waygate_fuzz::posture_json(data));
