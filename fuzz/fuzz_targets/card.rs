#![no_main]
//! Contact card decoding and verification: never panics, never verifies garbage.
use hotline_core::card::CardIn;
use libfuzzer_sys::fuzz_target;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;

fuzz_target!(|data: &[u8]| {
    if let Ok(card) = CardIn::decode(data) {
        let fingerprint = card.claimed().fingerprint();
        let provider = OpenMlsRustCrypto::default();
        let _ = card.verify(&fingerprint, provider.crypto());
    }
});
