#![no_main]
//! Stored identities and MLS credentials: never panic; what decodes round-trips.
use hotline_core::{DeviceIdentity, DeviceInfo, Fingerprint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(identity) = DeviceIdentity::from_secret_bytes(data) {
        assert_eq!(&identity.to_secret_bytes()[..], data);
    }
    if let Ok(info) = DeviceInfo::from_credential_bytes(data) {
        assert_eq!(info.credential_bytes(), data);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Fingerprint::parse(text);
    }
});
