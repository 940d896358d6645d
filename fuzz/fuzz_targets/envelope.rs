#![no_main]
//! Envelope decoding: never panics; whatever decodes re-encodes to the same bytes.
use hotline_core::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((envelope, id)) = Envelope::decode(data) {
        assert_eq!(envelope.encode(), data);
        assert_eq!(envelope.id(), id);
    }
});
