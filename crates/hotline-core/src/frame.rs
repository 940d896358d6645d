//! Ephemeral frames: what travels inside a channel's MLS group without entering its
//! transcript (link tests and their answers).
//!
//! A frame is an MLS application message like any other, so only members can read it
//! and MLS names its sender; its plaintext starts with [`EPHEMERAL`] (an envelope starts
//! with its version, 1; a resend with `RESENT`, 0x81). It carries the sender's send
//! time, a payload that is the caller's own (at most [`MAX_FRAME_PAYLOAD`] bytes), and
//! what the sender **holds**: the last sequence number of each sender's chain in its
//! transcript. A quiet line thus still tells every sender what reached whom, without a
//! transcript entry per link test; what the record keeps of the line's health is the
//! periodic, signed `Body::Availability`.
//!
//! Frames are never marked processed in the transcript's store (that set lasts as long
//! as the channel): the caller remembers the hashes of the frames it sent and received
//! for as long as a relay may serve them again (MLS refuses a second opening anyway).

use crate::codec::{DecodeError, Reader, Writer};
use crate::envelope::MAX_SEEN;
use crate::identity::DeviceKey;

/// First byte of an ephemeral frame's plaintext.
pub const EPHEMERAL: u8 = 0x82;
/// The frame layout this build writes and reads.
pub const FRAME_VERSION: u8 = 1;
/// Largest payload of a frame.
pub const MAX_FRAME_PAYLOAD: usize = 4096;

/// One ephemeral frame, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The sender's clock when it sealed the frame (a claim, like envelope times).
    pub sent_ms: u64,
    /// Per sender, the last sequence number of its chain the frame's sender holds.
    pub held: Vec<(DeviceKey, u64)>,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The plaintext to seal, marker included.
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = Writer::with_capacity(16 + 40 * self.held.len() + self.payload.len());
        writer.u8(EPHEMERAL);
        writer.u8(FRAME_VERSION);
        writer.u64(self.sent_ms);
        writer.u32(self.held.len() as u32);
        for (sender, seq) in &self.held {
            writer.fixed(&sender.0);
            writer.u64(*seq);
        }
        writer.bytes(&self.payload);
        writer.into_bytes()
    }

    /// Decodes a plaintext that starts with [`EPHEMERAL`].
    pub fn decode(plaintext: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(plaintext);
        if reader.u8("frame marker")? != EPHEMERAL {
            return Err(DecodeError::Invalid {
                field: "frame marker",
                reason: "not an ephemeral frame",
            });
        }
        let version = reader.u8("frame version")?;
        if version != FRAME_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "ephemeral frame",
                version,
            });
        }
        let sent_ms = reader.u64("frame time")?;
        let count = reader.count("held chains", MAX_SEEN, 40)?;
        let mut held = Vec::with_capacity(count);
        for _ in 0..count {
            let sender = DeviceKey(reader.array("held sender")?);
            let seq = reader.u64("held sequence number")?;
            held.push((sender, seq));
        }
        let payload = reader.bytes("frame payload", MAX_FRAME_PAYLOAD)?.to_vec();
        reader.finish()?;
        Ok(Self {
            sent_ms,
            held,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_refuse_garbage_without_panicking() {
        let frame = Frame {
            sent_ms: 1_700_000_000_000,
            held: vec![(DeviceKey([1; 32]), 7), (DeviceKey([2; 32]), 0)],
            payload: b"probe".to_vec(),
        };
        let bytes = frame.encode();
        assert_eq!(bytes[0], EPHEMERAL);
        assert_eq!(Frame::decode(&bytes), Ok(frame));
        for cut in 0..bytes.len() {
            assert!(Frame::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Frame::decode(&longer).is_err());
        let mut version = bytes.clone();
        version[1] = 2;
        assert!(matches!(
            Frame::decode(&version),
            Err(DecodeError::UnsupportedVersion { .. })
        ));
        // A count far beyond the bytes that follow is refused before allocating.
        let mut huge = bytes[..10].to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(Frame::decode(&huge).is_err());
    }
}
