#![no_main]
//! `Channel::receive` on arbitrary bytes: never panics, and a refused message leaves
//! the channel as it was.
use hotline_core::{Channel, DeviceIdentity};
use libfuzzer_sys::fuzz_target;
use openmls_rust_crypto::OpenMlsRustCrypto;
use rand::SeedableRng;

fuzz_target!(|data: &[u8]| {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let identity = DeviceIdentity::generate("north", "desk", &mut rng).unwrap();
    let provider = OpenMlsRustCrypto::default();
    let mut channel = Channel::create(&provider, &identity, "fuzz").unwrap();
    let before = (channel.epoch(), channel.transcript().len());
    if channel.receive(&provider, data).is_err() {
        assert_eq!((channel.epoch(), channel.transcript().len()), before);
    }
});
