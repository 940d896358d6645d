//! Inbox capabilities: who may leave an invitation in a device's inbox or claim one of
//! its one-time key packages.
//!
//! A relay is reachable by anyone, but only those who hold a device's card have a
//! reason to write to its inbox. The card carries the device's signature over
//! `"hotline-inbox-capability-v1"` (see `hotline_core::card`); a post to an inbox or a
//! key-package claim presents it, hex-encoded, in the `hotline-capability` header, and
//! the relay checks it against the inbox's id, which is the device's key. Nothing is
//! registered: an inbox is open to the holders of its device's card from the moment
//! the card exists, on every relay, and closed to everyone else.
//!
//! The capability is as secret as the card: a card handed around widely lets whoever
//! receives it post invitations (still signed by their sender, still checked by the
//! device, still bounded by the relay's quotas).

use hotline_core::DeviceKey;

/// The header a post to an inbox or a key-package claim carries.
pub const HEADER: &str = "hotline-capability";

/// The right to post to one device's inbox (and claim its key packages).
#[derive(Clone, PartialEq, Eq)]
pub struct Capability([u8; 64]);

impl std::fmt::Debug for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A bearer secret: never printed.
        f.write_str("Capability(..)")
    }
}

impl Capability {
    /// The capability a card carries.
    pub fn new(bytes: [u8; 64]) -> Self {
        Self(bytes)
    }

    /// As sent in the header.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Whether the header value `presented` is the capability of `device`'s inbox (the
/// relay's check). Anything malformed is simply not it.
pub fn presented_matches(presented: &str, device: &DeviceKey) -> bool {
    let mut capability = [0u8; 64];
    if hex::decode_to_slice(presented.trim(), &mut capability).is_err() {
        return false;
    }
    hotline_core::card::check_inbox_capability(device, &capability)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotline_core::DeviceIdentity;

    #[test]
    fn only_the_devices_capability_opens_its_inbox() {
        let mut rng = rand::rngs::OsRng;
        let owner = DeviceIdentity::generate("north", "desk", &mut rng).unwrap();
        let stranger = DeviceIdentity::generate("mallory", "desk", &mut rng).unwrap();
        let capability = Capability::new(hotline_core::card::inbox_capability(&owner));
        assert!(presented_matches(&capability.to_hex(), &owner.key()));
        // Another device's capability, or the stranger's own, opens nothing here.
        let theirs = Capability::new(hotline_core::card::inbox_capability(&stranger));
        assert!(!presented_matches(&theirs.to_hex(), &owner.key()));
        assert!(presented_matches(&theirs.to_hex(), &stranger.key()));
        // A signature by the owner over anything else is not the capability.
        let other = hex::encode(owner.sign(b"hotline-inbox-capability-v2"));
        assert!(!presented_matches(&other, &owner.key()));
        assert!(!presented_matches("", &owner.key()));
        assert!(!presented_matches("zz", &owner.key()));
        assert_eq!(format!("{capability:?}"), "Capability(..)");
    }
}
