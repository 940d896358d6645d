//! Cosigned roots: every party's device signs the same settled transcript root, so
//! that a party shown a different history cannot produce it, and anyone can check
//! offline that nobody was.
//!
//! What a device signs is a checkpoint in the C2SP `tlog-checkpoint` form, signed as a
//! C2SP `signed-note` with Ed25519 (the transparency-log convention, so existing tools
//! can read the notes):
//!
//! ```text
//! hotline/<channel id, 64 hex digits>/<horizon epoch>
//! <size of the settled prefix, decimal>
//! <RFC 6962 root of that prefix, base64>
//! ```
//!
//! The signature is over those bytes (with the final newline). A signed note carries
//! one line per signer: `— <party>/<device> <base64(key id ‖ signature)>`, the key id
//! being the first four bytes of SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public key).
//!
//! Format (body of envelope kind 10): `horizon u64 | size u64 | root [32] |
//! signature [64]`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use crate::codec::{DecodeError, Reader, Writer};
use crate::envelope::ChannelId;
use crate::identity::{DeviceIdentity, DeviceInfo, DeviceKey};

/// A device's signature of a settled root: the first `size` envelopes of the
/// canonical order from epoch `horizon` on have RFC 6962 root `root`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cosignature {
    pub horizon: u64,
    pub size: u64,
    pub root: [u8; 32],
    /// Ed25519 by the sender's device key over [`note`].
    pub signature: [u8; 64],
}

/// The checkpoint note a cosignature signs.
pub fn note(channel: &ChannelId, horizon: u64, size: u64, root: &[u8; 32]) -> String {
    format!(
        "hotline/{}/{horizon}\n{size}\n{}\n",
        hex::encode(channel.0),
        STANDARD.encode(root)
    )
}

impl Cosignature {
    /// This device's cosignature of `root` over the first `size` settled envelopes.
    pub fn sign(
        identity: &DeviceIdentity,
        channel: &ChannelId,
        horizon: u64,
        size: u64,
        root: [u8; 32],
    ) -> Self {
        let signature = identity.sign(note(channel, horizon, size, &root).as_bytes());
        Self {
            horizon,
            size,
            root,
            signature,
        }
    }

    /// Whether `key` made this cosignature in `channel`.
    pub fn holds(&self, channel: &ChannelId, key: &DeviceKey) -> bool {
        key.verify(
            note(channel, self.horizon, self.size, &self.root).as_bytes(),
            &self.signature,
        )
        .is_ok()
    }

    pub(crate) fn encode_into(&self, writer: &mut Writer) {
        writer.u64(self.horizon);
        writer.u64(self.size);
        writer.fixed(&self.root);
        writer.fixed(&self.signature);
    }

    pub(crate) fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            horizon: reader.u64("cosigned horizon")?,
            size: reader.u64("cosigned size")?,
            root: reader.array("cosigned root")?,
            signature: reader.array("cosignature")?,
        })
    }
}

/// Where the root of one horizon's envelopes stands on a device whose own transcript
/// starts earlier: how far its settled prefix was read, and the RFC 6962 frontier over
/// the envelopes of epoch ≥ `horizon` read so far. A device that joined at `horizon`
/// has exactly those envelopes, in the same canonical order, as its settled prefix; so
/// a founder can check (and cosign) the roots of members who joined later. Reading
/// goes forward only: each envelope is read once, whatever the history's length.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HorizonCursor {
    pub horizon: u64,
    /// Settled envelopes read (of every epoch).
    pub read: u64,
    /// The order key of the last one read.
    pub after: Option<crate::transcript_store::OrderKey>,
    pub frontier: crate::merkle::Frontier,
}

impl HorizonCursor {
    pub fn new(horizon: u64) -> Self {
        Self {
            horizon,
            ..Self::default()
        }
    }

    /// The root of the first `size` settled envelopes of epoch ≥ the horizon, reading
    /// forward as far as needed. `None` if `size` is behind what was read already
    /// (that root is gone) or beyond the settled prefix (not yet).
    pub fn root_at(
        &mut self,
        transcript: &crate::Transcript,
        size: u64,
    ) -> Result<Option<[u8; 32]>, crate::merkle::StorageError> {
        if size < self.frontier.len() {
            return Ok(None);
        }
        let settled = transcript.settled_len();
        self.read_forward(transcript, settled, Some(size))?;
        Ok((self.frontier.len() == size).then(|| self.frontier.root()))
    }

    /// Reads forward the settled envelopes not read yet, at most `budget` of them;
    /// whether every settled envelope is read now (then `frontier` holds the root of
    /// all those of epoch ≥ the horizon).
    pub fn read_settled(
        &mut self,
        transcript: &crate::Transcript,
        budget: u64,
    ) -> Result<bool, crate::merkle::StorageError> {
        let settled = transcript.settled_len();
        self.read_forward(
            transcript,
            settled.min(self.read.saturating_add(budget)),
            None,
        )?;
        Ok(self.read == settled)
    }

    /// Reads settled envelopes in canonical order until `end` of them are read, or (with
    /// `size`) until the root covers `size` envelopes of the horizon.
    fn read_forward(
        &mut self,
        transcript: &crate::Transcript,
        end: u64,
        size: Option<u64>,
    ) -> Result<(), crate::merkle::StorageError> {
        let enough = |cursor: &Self| size.is_some_and(|size| cursor.frontier.len() >= size);
        while self.read < end && !enough(self) {
            let want = (end - self.read).min(256) as usize;
            let page = transcript.page_after(self.after, want)?;
            if page.is_empty() {
                break;
            }
            for (id, envelope) in page {
                self.read += 1;
                self.after = Some((envelope.lamport, id));
                if envelope.epoch >= self.horizon {
                    self.frontier.push(&id.0);
                }
                if enough(self) {
                    break;
                }
            }
        }
        Ok(())
    }

    /// `u64 horizon | u64 read | u8 has after [u64 lamport, [32] id] | frontier`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.horizon.to_be_bytes());
        out.extend_from_slice(&self.read.to_be_bytes());
        match &self.after {
            Some((lamport, id)) => {
                out.push(1);
                out.extend_from_slice(&lamport.to_be_bytes());
                out.extend_from_slice(&id.0);
            }
            None => out.push(0),
        }
        out.extend_from_slice(&self.frontier.encode());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let horizon = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let read = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        let (after, rest) = match *bytes.get(16)? {
            0 => (None, bytes.get(17..)?),
            1 => {
                let lamport = u64::from_be_bytes(bytes.get(17..25)?.try_into().ok()?);
                let id = crate::EnvelopeId(bytes.get(25..57)?.try_into().ok()?);
                (Some((lamport, id)), bytes.get(57..)?)
            }
            _ => return None,
        };
        Some(Self {
            horizon,
            read,
            after,
            frontier: crate::merkle::Frontier::decode(rest)?,
        })
    }
}

/// The signed note: the checkpoint and one signature line per signer, as C2SP
/// `signed-note` writes them.
pub fn signed_note(
    channel: &ChannelId,
    horizon: u64,
    size: u64,
    root: &[u8; 32],
    signers: &[(DeviceInfo, [u8; 64])],
) -> String {
    let mut out = note(channel, horizon, size, root);
    out.push('\n');
    for (info, signature) in signers {
        let name = format!("{}/{}", info.party, info.device);
        let mut id_input = name.as_bytes().to_vec();
        id_input.push(0x0A);
        id_input.push(0x01);
        id_input.extend_from_slice(&info.key.0);
        let key_id = &Sha256::digest(&id_input)[..4];
        let line = [key_id, &signature[..]].concat();
        out.push_str(&format!("— {name} {}\n", STANDARD.encode(line)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_cosignature_holds_for_its_own_root_size_channel_and_key_only() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let north = DeviceIdentity::generate("north", "desk", &mut rng).unwrap();
        let south = DeviceIdentity::generate("south", "desk", &mut rng).unwrap();
        let channel = ChannelId([5; 32]);
        let cosigned = Cosignature::sign(&north, &channel, 0, 12, [9; 32]);
        assert!(cosigned.holds(&channel, &north.key()));
        assert!(!cosigned.holds(&channel, &south.key()));
        assert!(!cosigned.holds(&ChannelId([6; 32]), &north.key()));
        for changed in [
            Cosignature {
                size: 13,
                ..cosigned.clone()
            },
            Cosignature {
                root: [8; 32],
                ..cosigned.clone()
            },
            Cosignature {
                horizon: 1,
                ..cosigned.clone()
            },
        ] {
            assert!(!changed.holds(&channel, &north.key()));
        }
        let text = note(&channel, 0, 12, &[9; 32]);
        assert_eq!(
            text,
            format!(
                "hotline/{}/0\n12\nCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=\n",
                "05".repeat(32)
            )
        );
        let signed = signed_note(
            &channel,
            0,
            12,
            &[9; 32],
            &[(north.info().clone(), cosigned.signature)],
        );
        let line = signed.lines().last().unwrap();
        assert!(line.starts_with("— north/desk "), "{signed}");
        let decoded = STANDARD.decode(line.rsplit(' ').next().unwrap()).unwrap();
        assert_eq!(decoded.len(), 68);
        assert_eq!(&decoded[4..], &cosigned.signature[..]);
    }

    #[test]
    fn a_horizon_cursor_round_trips_and_refuses_garbage() {
        let mut cursor = HorizonCursor::new(3);
        assert_eq!(
            HorizonCursor::decode(&cursor.encode()),
            Some(cursor.clone())
        );
        cursor.read = 9;
        cursor.after = Some((12, crate::EnvelopeId([4; 32])));
        for leaf in 0u8..5 {
            cursor.frontier.push(&[leaf]);
        }
        assert_eq!(
            HorizonCursor::decode(&cursor.encode()),
            Some(cursor.clone())
        );
        let bytes = cursor.encode();
        assert_eq!(HorizonCursor::decode(&bytes[..bytes.len() - 1]), None);
        let mut bad = bytes.clone();
        bad[16] = 2;
        assert_eq!(HorizonCursor::decode(&bad), None);
    }
}
