//! What a hotline device and a relay share: the relay API's addresses and pins
//! (`tls`), request authentication and membership signatures (`auth`), the batch body
//! (`batch`), the logs a relay keeps and the membership it enforces, limits both ends
//! know, and the device's client of the API (`client`).
//!
//! A change to the relay API has its home here; a device depends on this crate, never
//! on the relay's (no HTTP server, no database drivers, no certificate generation in a
//! device).

pub mod auth;
pub mod batch;
pub mod capability;
pub mod client;
pub mod custody;
pub mod limits;
pub mod rotation;
pub mod stream;
pub mod tls;

/// Where a message goes: a channel's log, a device's inbox (invitations), or a device's
/// stock of one-time key packages (claimed one at a time by inviters).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Log {
    Channel([u8; 32]),
    Inbox([u8; 32]),
    KeyPackages([u8; 32]),
}

impl Log {
    /// How a relay's storage names this log (a kind byte, then the id).
    pub fn storage_key(&self) -> Vec<u8> {
        match self {
            Log::Channel(id) => [&[1u8][..], id].concat(),
            Log::Inbox(id) => [&[2u8][..], id].concat(),
            Log::KeyPackages(id) => [&[3u8][..], id].concat(),
        }
    }
}

/// A stored message as a relay hands it over: its sequence number in the log, its
/// bytes, and the relay's encoded custody receipt ([`custody::Receipt`]; none for a
/// message stored before relays signed receipts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub bytes: Vec<u8>,
    pub receipt: Option<Vec<u8>>,
}

/// Messages as a read answers them: `u32 n, n × (u64 seq, bytes message, bytes
/// receipt)`, an empty receipt for none.
pub fn encode_messages(messages: &[Stored]) -> Vec<u8> {
    let mut writer = hotline_core::codec::Writer::new();
    writer.u32(messages.len() as u32);
    for message in messages {
        writer.u64(message.seq);
        writer.bytes(&message.bytes);
        writer.bytes(message.receipt.as_deref().unwrap_or_default());
    }
    writer.into_bytes()
}

/// Decodes [`encode_messages`], bounded in count and size.
pub fn decode_messages(bytes: &[u8]) -> Result<Vec<Stored>, hotline_core::codec::DecodeError> {
    let mut reader = hotline_core::codec::Reader::new(bytes);
    let count = reader.count("messages", 4096, 16)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let seq = reader.u64("seq")?;
        let bytes = reader.bytes("message", limits::MAX_MESSAGE)?.to_vec();
        let receipt = reader.bytes("receipt", custody::MAX_RECEIPT)?;
        out.push(Stored {
            seq,
            bytes,
            receipt: (!receipt.is_empty()).then(|| receipt.to_vec()),
        });
    }
    reader.finish()?;
    Ok(out)
}

/// The membership of a channel as its committer signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub committer: [u8; 32],
    pub version: u64,
    pub members: Vec<[u8; 32]>,
}

impl Membership {
    /// From its stored columns (members concatenated); `None` if they are not keys.
    pub fn from_stored(committer: &[u8], version: i64, members: &[u8]) -> Option<Self> {
        Some(Self {
            committer: committer.try_into().ok()?,
            version: version as u64,
            members: members
                .chunks_exact(32)
                .filter_map(|chunk| chunk.try_into().ok())
                .collect(),
        })
    }

    /// The members concatenated, as stored.
    pub fn stored_members(&self) -> Vec<u8> {
        self.members.iter().flatten().copied().collect()
    }
}
