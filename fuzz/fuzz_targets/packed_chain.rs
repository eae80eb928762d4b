#![no_main]
//! Packed rings with arbitrary guest memory contents: see common.rs.
mod common;
libfuzzer_sys::fuzz_target!(|data: &[u8]| common::run(data, true));
