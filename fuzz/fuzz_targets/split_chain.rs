#![no_main]
//! Split rings with arbitrary guest memory contents (descriptors, available ring, indirect
//! tables): see common.rs.
mod common;
libfuzzer_sys::fuzz_target!(|data: &[u8]| common::run(data, false));
