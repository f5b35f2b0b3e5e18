#![no_main]
//! `waygate_fuzz::client_hello` under libFuzzer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| waygate_fuzz::client_hello(data));
