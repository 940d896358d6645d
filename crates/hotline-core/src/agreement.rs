//! Agreed texts: a joint communiqué that every party signs.
//!
//! A party proposes a text in one or more language versions, equally authentic; each
//! party's device signs the exact bytes of the proposal (its id and every version),
//! or rejects it. The text is **accepted** when a device of every party has signed,
//! **rejected** when any party rejected it, **expired** when its deadline passed first.
//! The signatures are Ed25519 by the device keys over a digest bound to the channel and
//! the proposal: transferable, checkable by anyone holding the text and the keys.
//!
//! Formats (body of envelope kind 9): `u8 tag` then
//! - 1 proposal: `u32 n ≤ 16, n × (language string ≤ 16, text string) | u8 has deadline
//!   [u64 deadline ms]`;
//! - 2 signature: `proposal [32] | digest [32] | signature [64]`;
//! - 3 rejection: `proposal [32] | reason string ≤ 1024`.

use sha2::{Digest, Sha256};

use crate::codec::{DecodeError, Reader, Writer};
use crate::envelope::{ChannelId, EnvelopeId};
use crate::identity::{DeviceIdentity, DeviceKey};

/// Most language versions of one agreed text.
pub const MAX_VERSIONS: usize = 16;
/// Longest language code (`en`, `ru`, `zh-Hant`, `x-legal`).
pub const MAX_LANGUAGE_LEN: usize = 16;
/// Longest reason for a rejection.
pub const MAX_REASON_LEN: usize = 1024;
const DIGEST_CONTEXT: &[u8] = b"hotline-agreed-text-v1";

/// What an agreement envelope says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Agreement {
    Propose(Proposal),
    /// The sender's device signs the proposal's digest ([`digest`]).
    Sign {
        proposal: EnvelopeId,
        digest: [u8; 32],
        signature: [u8; 64],
    },
    Reject {
        proposal: EnvelopeId,
        reason: String,
    },
}

/// A text proposed for every party's signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposal {
    /// (language, text), equally authentic; at least one, languages distinct.
    pub versions: Vec<(String, String)>,
    /// After this, unsigned by some party, it is expired.
    pub deadline_ms: Option<u64>,
}

/// What every party signs: SHA-256 over a context, the channel, the proposal's envelope
/// id and every version (language and text, length-prefixed, in the proposal's order).
pub fn digest(
    channel: &ChannelId,
    proposal: &EnvelopeId,
    versions: &[(String, String)],
) -> [u8; 32] {
    let mut writer = Writer::new();
    writer.fixed(DIGEST_CONTEXT);
    writer.fixed(&channel.0);
    writer.fixed(&proposal.0);
    writer.u32(versions.len() as u32);
    for (language, text) in versions {
        writer.string(language);
        writer.string(text);
    }
    Sha256::digest(writer.as_bytes()).into()
}

/// A device's signature over a proposal's digest.
pub fn sign(identity: &DeviceIdentity, digest: &[u8; 32]) -> [u8; 64] {
    identity.sign(&signed_message(digest))
}

/// Whether `signature` is `key`'s over `digest`.
pub fn check(key: &DeviceKey, digest: &[u8; 32], signature: &[u8; 64]) -> bool {
    key.verify(&signed_message(digest), signature).is_ok()
}

fn signed_message(digest: &[u8; 32]) -> Vec<u8> {
    [DIGEST_CONTEXT, &digest[..]].concat()
}

impl Agreement {
    pub(crate) fn encode_into(&self, writer: &mut Writer) {
        match self {
            Agreement::Propose(proposal) => {
                writer.u8(1);
                writer.u32(proposal.versions.len() as u32);
                for (language, text) in &proposal.versions {
                    writer.string(language);
                    writer.string(text);
                }
                match proposal.deadline_ms {
                    Some(deadline) => {
                        writer.u8(1);
                        writer.u64(deadline);
                    }
                    None => writer.u8(0),
                }
            }
            Agreement::Sign {
                proposal,
                digest,
                signature,
            } => {
                writer.u8(2);
                writer.fixed(&proposal.0);
                writer.fixed(digest);
                writer.fixed(signature);
            }
            Agreement::Reject { proposal, reason } => {
                writer.u8(3);
                writer.fixed(&proposal.0);
                writer.string(reason);
            }
        }
    }

    pub(crate) fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match reader.u8("agreement")? {
            1 => {
                let count = reader.count("language versions", MAX_VERSIONS, 8)?;
                if count == 0 {
                    return Err(DecodeError::Invalid {
                        field: "language versions",
                        reason: "an agreed text needs at least one version",
                    });
                }
                let mut versions: Vec<(String, String)> = Vec::with_capacity(count);
                for _ in 0..count {
                    let language = reader.string("language", MAX_LANGUAGE_LEN)?;
                    let text = reader.string("agreed text", crate::envelope::MAX_BODY_LEN)?;
                    if !language_ok(&language) || versions.iter().any(|(l, _)| *l == language) {
                        return Err(DecodeError::Invalid {
                            field: "language",
                            reason: "letters, digits and '-', each language once",
                        });
                    }
                    versions.push((language, text));
                }
                let deadline_ms = match reader.flag("agreement deadline")? {
                    true => Some(reader.u64("agreement deadline")?),
                    false => None,
                };
                Agreement::Propose(Proposal {
                    versions,
                    deadline_ms,
                })
            }
            2 => Agreement::Sign {
                proposal: EnvelopeId(reader.array("proposal")?),
                digest: reader.array("agreed digest")?,
                signature: reader.array("agreement signature")?,
            },
            3 => Agreement::Reject {
                proposal: EnvelopeId(reader.array("proposal")?),
                reason: reader.string("rejection reason", MAX_REASON_LEN)?,
            },
            _ => {
                return Err(DecodeError::Invalid {
                    field: "agreement",
                    reason: "unknown agreement step",
                });
            }
        })
    }
}

/// A language code as agreed texts name them: 1 to 16 ASCII letters, digits or `-`.
pub fn language_ok(language: &str) -> bool {
    !language.is_empty()
        && language.len() <= MAX_LANGUAGE_LEN
        && language
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_signature_holds_for_the_exact_texts_only() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let identity = DeviceIdentity::generate("north", "desk", &mut rng).unwrap();
        let versions = vec![
            (
                "en".to_owned(),
                "The ceasefire holds until 18 May.".to_owned(),
            ),
            (
                "fr".to_owned(),
                "Le cessez-le-feu tient jusqu'au 18 mai.".to_owned(),
            ),
        ];
        let channel = ChannelId([1; 32]);
        let proposal = EnvelopeId([2; 32]);
        let agreed = digest(&channel, &proposal, &versions);
        let signature = sign(&identity, &agreed);
        assert!(check(&identity.key(), &agreed, &signature));
        let mut changed = versions.clone();
        changed[1].1.push(' ');
        for other in [
            digest(&channel, &proposal, &changed),
            digest(&ChannelId([3; 32]), &proposal, &versions),
            digest(&channel, &EnvelopeId([4; 32]), &versions),
            digest(&channel, &proposal, &versions[..1]),
        ] {
            assert!(!check(&identity.key(), &other, &signature));
        }
    }
}
