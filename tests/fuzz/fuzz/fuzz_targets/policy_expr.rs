#![no_main]
//! `waygate_fuzz::policy_expr` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| waygate_fuzz::policy_expr(data));
