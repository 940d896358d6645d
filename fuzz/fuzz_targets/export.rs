#![no_main]
//! Export verification: never panics on any file.
use hotline_core::Export;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Export::verify(data);
});
