#![no_main]
//! Export verification: never panics on any file, and no edit of a valid export verifies.
//!
//! The first byte chooses the mode: 0 feeds the rest as a whole file; otherwise the rest
//! is a list of (u16 position, u8 mask) edits applied to a valid export, so that the
//! fuzzer explores past the magic and the signature instead of stopping at the header.
use std::sync::OnceLock;

use hotline_core::{Body, Channel, DeviceIdentity, Export};
use libfuzzer_sys::fuzz_target;
use openmls_rust_crypto::OpenMlsRustCrypto;
use rand::SeedableRng;

fn sample() -> &'static Vec<u8> {
    static SAMPLE: OnceLock<Vec<u8>> = OnceLock::new();
    SAMPLE.get_or_init(|| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let identity = DeviceIdentity::generate("north", "desk", &mut rng).unwrap();
        let provider = OpenMlsRustCrypto::default();
        let mut channel = Channel::create(&provider, &identity, "fuzz").unwrap();
        for n in 0..3 {
            channel.send(&provider, &identity, Body::Text(format!("line {n}")), n, None).unwrap();
        }
        channel.checkpoint(&provider, &identity, 9).unwrap();
        Export::write(channel.transcript(), channel.name(), &identity).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0, rest)) => {
            let _ = Export::verify(rest);
        }
        Some((_, edits)) => {
            let mut bytes = sample().clone();
            let mut changed = false;
            for edit in edits.chunks_exact(3) {
                let position = usize::from(u16::from_be_bytes([edit[0], edit[1]])) % bytes.len();
                if edit[2] != 0 {
                    bytes[position] ^= edit[2];
                    changed = true;
                }
            }
            let verified = Export::verify(&bytes).is_ok();
            // Edits can cancel out; only a real change must fail.
            if changed && bytes != *sample() {
                assert!(!verified, "an altered export verified");
            }
        }
        None => {}
    }
});
