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

/// An invitation left in a device's relay inbox: the channel's relays and the Welcome.
/// The relay list is not authenticated (relays are untrusted anyway); the Welcome is.
pub fn encode_invitation(relays: &[String], welcome: &[u8]) -> Vec<u8> {
    let mut writer = Writer::new();
    writer.fixed(INVITATION_MAGIC);
    writer.u8(VERSION);
    writer.u32(relays.len() as u32);
    for relay in relays {
        writer.string(relay);
    }
    writer.bytes(welcome);
    writer.into_bytes()
}

/// Reads an invitation back.
pub fn decode_invitation(bytes: &[u8]) -> Result<(Vec<String>, Vec<u8>), DecodeError> {
    let mut reader = Reader::new(bytes);
    if reader.take(INVITATION_MAGIC.len(), "magic")? != INVITATION_MAGIC {
        return Err(DecodeError::Invalid {
            field: "magic",
            reason: "not a hotline invitation",
        });
    }
    let version = reader.u8("invitation version")?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion {
            what: "invitation",
            version,
        });
    }
    let count = reader.count("relays", 16, 4)?;
    let mut relays = Vec::with_capacity(count);
    for _ in 0..count {
        relays.push(reader.string("relay", 512)?);
    }
    let welcome = reader.bytes("welcome", MAX_MESSAGE)?.to_vec();
    reader.finish()?;
    Ok((relays, welcome))
}
