//! Bundles: messages carried between devices as a file, until the relay lands.
//!
//! Format (version 1): `"HOTLINE-BUNDLE\n" | u8 version | u32 n | n × entry`, where an
//! entry is `u8 kind (1 channel message, 2 welcome) | u32 m, m × [32] recipient keys |
//! bytes message (≤ 2 MiB)`.

use hotline_core::DeviceKey;
use hotline_core::codec::{DecodeError, Reader, Writer};

const MAGIC: &[u8; 15] = b"HOTLINE-BUNDLE\n";
const VERSION: u8 = 1;
const MAX_ENTRIES: usize = 1_000_000;
const MAX_MESSAGE: usize = 2 << 20;

/// One message in a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// For the channel's members.
    Message(Vec<u8>),
    /// For these devices' inboxes.
    Welcome { to: Vec<DeviceKey>, bytes: Vec<u8> },
}

pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut writer = Writer::new();
    writer.fixed(MAGIC);
    writer.u8(VERSION);
    writer.u32(entries.len() as u32);
    for entry in entries {
        match entry {
            Entry::Message(bytes) => {
                writer.u8(1);
                writer.u32(0);
                writer.bytes(bytes);
            }
            Entry::Welcome { to, bytes } => {
                writer.u8(2);
                writer.u32(to.len() as u32);
                for key in to {
                    writer.fixed(&key.0);
                }
                writer.bytes(bytes);
            }
        }
    }
    writer.into_bytes()
}

pub fn decode(bytes: &[u8]) -> Result<Vec<Entry>, DecodeError> {
    let mut reader = Reader::new(bytes);
    if reader.take(MAGIC.len(), "magic")? != MAGIC {
        return Err(DecodeError::Invalid {
            field: "magic",
            reason: "not a hotline bundle",
        });
    }
    let version = reader.u8("bundle version")?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion {
            what: "bundle",
            version,
        });
    }
    let count = reader.count("entries", MAX_ENTRIES, 9)?;
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = reader.u8("entry kind")?;
        let recipients = reader.count("recipients", 1024, 32)?;
        let mut to = Vec::with_capacity(recipients);
        for _ in 0..recipients {
            to.push(DeviceKey(reader.array("recipient")?));
        }
        let bytes = reader.bytes("message", MAX_MESSAGE)?.to_vec();
        entries.push(match kind {
            1 if to.is_empty() => Entry::Message(bytes),
            2 => Entry::Welcome { to, bytes },
            _ => {
                return Err(DecodeError::Invalid {
                    field: "entry kind",
                    reason: "unknown kind",
                });
            }
        });
    }
    reader.finish()?;
    Ok(entries)
}

const INVITATION_MAGIC: &[u8; 15] = b"HOTLINE-INVITE\n";
/// Version 2 names the inviting device and the channel, signed by that device.
const INVITATION_VERSION: u8 = 2;
const INVITATION_CONTEXT: &[u8] = b"hotline-invitation-v2";

/// Who sent an invitation, and to which channel, as the invitation says (signed by the
/// key it names; whether that key is a verified contact is for the invitee to check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inviter {
    pub party: String,
    pub device: String,
    pub key: DeviceKey,
    pub channel: String,
}

/// An invitation read from an inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invitation {
    /// The channel's relays (not authenticated: relays are untrusted anyway).
    pub relays: Vec<String>,
    /// The MLS Welcome (authenticated by MLS).
    pub welcome: Vec<u8>,
    /// Who sent it and for which channel: `None` in version 1 invitations.
    pub from: Option<Inviter>,
}

/// An invitation left in a device's relay inbox (version 2): `magic | u8 2 | string
/// party | string device | [32] key | string channel | u32 n, n × string relay | bytes
/// welcome | [64] Ed25519 signature` by `key` over "hotline-invitation-v2" and every
/// byte before it. The names let an invitee that cannot join say who invited it to
/// what; the signature keeps a relay from blaming someone else.
pub fn encode_invitation(
    identity: &hotline_core::DeviceIdentity,
    channel: &str,
    relays: &[String],
    welcome: &[u8],
) -> Vec<u8> {
    let info = identity.info();
    let mut writer = Writer::new();
    writer.fixed(INVITATION_MAGIC);
    writer.u8(INVITATION_VERSION);
    writer.string(&info.party);
    writer.string(&info.device);
    writer.fixed(info.key.as_bytes());
    writer.string(channel);
    writer.u32(relays.len() as u32);
    for relay in relays {
        writer.string(relay);
    }
    writer.bytes(welcome);
    let mut bytes = writer.into_bytes();
    let signature = identity.sign(&[INVITATION_CONTEXT, &bytes].concat());
    bytes.extend_from_slice(&signature);
    bytes
}

/// Reads an invitation back (version 1 or 2); a version 2 invitation whose signature
/// does not verify under the key it names is refused.
pub fn decode_invitation(bytes: &[u8]) -> Result<Invitation, DecodeError> {
    let mut reader = Reader::new(bytes);
    if reader.take(INVITATION_MAGIC.len(), "magic")? != INVITATION_MAGIC {
        return Err(DecodeError::Invalid {
            field: "magic",
            reason: "not a hotline invitation",
        });
    }
    let version = reader.u8("invitation version")?;
    let from = match version {
        VERSION => None,
        INVITATION_VERSION => {
            let party = reader.string("party name", 256)?;
            let device = reader.string("device name", 256)?;
            let key = DeviceKey(reader.array("device key")?);
            let channel = reader.string("channel name", 256)?;
            Some(Inviter {
                party,
                device,
                key,
                channel,
            })
        }
        version => {
            return Err(DecodeError::UnsupportedVersion {
                what: "invitation",
                version,
            });
        }
    };
    let count = reader.count("relays", 16, 4)?;
    let mut relays = Vec::with_capacity(count);
    for _ in 0..count {
        relays.push(reader.string("relay", 512)?);
    }
    let welcome = reader.bytes("welcome", MAX_MESSAGE)?.to_vec();
    if let Some(inviter) = &from {
        let signed = reader.position();
        let signature: [u8; 64] = reader.array("signature")?;
        inviter
            .key
            .verify(&[INVITATION_CONTEXT, &bytes[..signed]].concat(), &signature)
            .map_err(|_| DecodeError::Invalid {
                field: "signature",
                reason: "does not verify under the inviting device's key",
            })?;
    }
    reader.finish()?;
    Ok(Invitation {
        relays,
        welcome,
        from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn an_invitation_names_its_signed_sender_and_a_forged_one_is_refused() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let north = hotline_core::DeviceIdentity::generate("north", "desk", &mut rng).unwrap();
        let relays = vec!["https://127.0.0.1:1/#sha256=00".to_owned()];
        let bytes = encode_invitation(&north, "crisis", &relays, b"welcome");
        let invitation = decode_invitation(&bytes).unwrap();
        assert_eq!(invitation.relays, relays);
        assert_eq!(invitation.welcome, b"welcome");
        let from = invitation.from.unwrap();
        assert_eq!(
            (from.party.as_str(), from.channel.as_str()),
            ("north", "crisis")
        );
        assert_eq!(from.key, north.key());
        // A relay that renames the channel (or the sender) breaks the signature.
        let mut tampered = bytes.clone();
        let at = bytes.windows(6).position(|w| w == b"crisis").unwrap();
        tampered[at..at + 6].copy_from_slice(b"cr1sis");
        assert!(matches!(
            decode_invitation(&tampered),
            Err(DecodeError::Invalid {
                field: "signature",
                ..
            })
        ));
        // Version 1 (no sender, no signature) still reads.
        let mut writer = Writer::new();
        writer.fixed(INVITATION_MAGIC);
        writer.u8(VERSION);
        writer.u32(0);
        writer.bytes(b"welcome");
        let old = decode_invitation(&writer.into_bytes()).unwrap();
        assert_eq!((old.from, old.welcome), (None, b"welcome".to_vec()));
    }
}
