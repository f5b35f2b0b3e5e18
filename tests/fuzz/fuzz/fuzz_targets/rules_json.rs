#![no_main]
//! `waygate_fuzz::rules_json` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| waygate_fuzz::rules_json(data));
