//! Relay key rotation: a statement signed by the relay's old key that names its new
//! one, which devices follow.
//!
//! A relay's address pins its key. When the operator rotates it (`hotline relay
//! rotate-key`), the old key signs
//!
//! ```text
//!   "hotline-relay-rotation-v1" || bytes old key || bytes new key || u64 time_ms
//! ```
//!
//! (keys as DER SubjectPublicKeyInfo, `bytes` a `u32` length then the bytes), and the
//! relay serves the chain of every such statement, oldest first, at `GET /v1/rotation`.
//! A device whose pinned key the relay no longer presents reads that chain over a
//! connection that accepts any key ([`crate::tls::probing_config`]); it follows the
//! chain only if every step is signed by the key before it, starting from its pin, and
//! the chain ends at the key the relay presented. Addresses in cards and channels keep
//! the old pin: each device accepts the keys its verified chains lead to
//! ([`crate::tls::accepted_pins`]).

use hotline_core::codec::{DecodeError, Reader, Writer};
use rustls::pki_types::PrivateKeyDer;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::tls::{TlsError, signer_of, verify_with};

const CONTEXT: &[u8] = b"hotline-relay-rotation-v1";
/// Largest public key and signature a statement carries.
const MAX_KEY: usize = 1024;
const MAX_SIGNATURE: usize = 1024;
/// Most statements in a chain.
pub const MAX_CHAIN: usize = 64;
/// Largest encoded chain.
pub const MAX_CHAIN_BYTES: usize =
    4 + MAX_CHAIN * (4 + 4 + MAX_KEY + 4 + MAX_KEY + 8 + 2 + 4 + MAX_SIGNATURE);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RotationError {
    #[error("malformed rotation statements: {0}")]
    Malformed(#[from] DecodeError),
    #[error("no statement starts from the pinned key")]
    NotFromPin,
    #[error("a rotation statement is not signed by the key it rotates from")]
    BadSignature,
    #[error("the statements do not lead to the key the relay presents")]
    NotToPresented,
}

/// One step followed: the pins of the key rotated from, and to.
pub type Step = ([u8; 32], [u8; 32]);

/// One rotation: the old key's signature naming the new key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// DER SubjectPublicKeyInfo of the key rotated from, and to.
    pub old_key: Vec<u8>,
    pub new_key: Vec<u8>,
    pub time_ms: u64,
    /// TLS signature scheme of `signature`, by `old_key`.
    pub scheme: u16,
    pub signature: Vec<u8>,
}

fn signed_message(old_key: &[u8], new_key: &[u8], time_ms: u64) -> Vec<u8> {
    let mut writer = Writer::new();
    writer.fixed(CONTEXT);
    writer.bytes(old_key);
    writer.bytes(new_key);
    writer.u64(time_ms);
    writer.into_bytes()
}

fn pin(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl Rotation {
    /// The old key (`old`, the relay's private key) signs that the relay's key is now
    /// `new_key` (DER SubjectPublicKeyInfo).
    pub fn sign(old: &PrivateKeyDer<'_>, new_key: &[u8], time_ms: u64) -> Result<Self, TlsError> {
        let (signer, old_key) = signer_of(old, crate::custody::SCHEMES)?;
        let signature = signer
            .sign(&signed_message(&old_key, new_key, time_ms))
            .map_err(|e| TlsError::Certificate(format!("signing the rotation: {e}")))?;
        Ok(Self {
            old_key,
            new_key: new_key.to_vec(),
            time_ms,
            scheme: u16::from(signer.scheme()),
            signature,
        })
    }

    /// The pins of the key rotated from, and to.
    pub fn pins(&self) -> ([u8; 32], [u8; 32]) {
        (pin(&self.old_key), pin(&self.new_key))
    }

    fn verifies(&self) -> bool {
        verify_with(
            &self.old_key,
            self.scheme,
            &signed_message(&self.old_key, &self.new_key, self.time_ms),
            &self.signature,
        )
    }
}

/// Encodes a chain: `u32 n, n × (bytes old key, bytes new key, u64 time_ms, u16
/// scheme, bytes signature)`.
pub fn encode_chain(chain: &[Rotation]) -> Vec<u8> {
    let mut writer = Writer::new();
    writer.u32(chain.len() as u32);
    for rotation in chain {
        writer.bytes(&rotation.old_key);
        writer.bytes(&rotation.new_key);
        writer.u64(rotation.time_ms);
        writer.u16(rotation.scheme);
        writer.bytes(&rotation.signature);
    }
    writer.into_bytes()
}

/// Decodes [`encode_chain`], bounded in every field (checks no signature).
pub fn decode_chain(bytes: &[u8]) -> Result<Vec<Rotation>, DecodeError> {
    let mut reader = Reader::new(bytes);
    let count = reader.count("rotations", MAX_CHAIN, 22)?;
    let mut chain = Vec::with_capacity(count);
    for _ in 0..count {
        chain.push(Rotation {
            old_key: reader.bytes("old key", MAX_KEY)?.to_vec(),
            new_key: reader.bytes("new key", MAX_KEY)?.to_vec(),
            time_ms: reader.u64("time")?,
            scheme: reader.u16("scheme")?,
            signature: reader.bytes("signature", MAX_SIGNATURE)?.to_vec(),
        });
    }
    reader.finish()?;
    Ok(chain)
}

/// Follows `chain` from the key `pin` names to the key `presented` names: every step
/// from there on must be signed by the key before it, and the last must name the
/// presented key. Statements before the pinned key (older rotations) are passed over.
/// Returns each step's (from, to) pins, in order.
pub fn follow(
    pin: &[u8; 32],
    chain: &[Rotation],
    presented: &[u8; 32],
) -> Result<Vec<Step>, RotationError> {
    let start = chain
        .iter()
        .position(|rotation| &rotation.pins().0 == pin)
        .ok_or(RotationError::NotFromPin)?;
    let mut current = *pin;
    let mut steps = Vec::new();
    for rotation in &chain[start..] {
        let (from, to) = rotation.pins();
        if from != current || !rotation.verifies() {
            return Err(RotationError::BadSignature);
        }
        steps.push((from, to));
        current = to;
        if &current == presented {
            return Ok(steps);
        }
    }
    Err(RotationError::NotToPresented)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh ECDSA P-256 key, as relays have, and its public key.
    fn key() -> (PrivateKeyDer<'static>, Vec<u8>) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &rng,
        )
        .unwrap();
        let key = PrivateKeyDer::Pkcs8(pkcs8.as_ref().to_vec().into());
        let (_, public) = signer_of(&key, crate::custody::SCHEMES).unwrap();
        (key, public)
    }

    #[test]
    fn a_chain_is_followed_from_any_of_its_keys_to_the_presented_one() {
        let (a, a_pub) = key();
        let (b, b_pub) = key();
        let (_, c_pub) = key();
        let chain = vec![
            Rotation::sign(&a, &b_pub, 1).unwrap(),
            Rotation::sign(&b, &c_pub, 2).unwrap(),
        ];
        let chain = decode_chain(&encode_chain(&chain)).unwrap();
        let (pa, pb, pc) = (pin(&a_pub), pin(&b_pub), pin(&c_pub));
        assert_eq!(follow(&pa, &chain, &pc).unwrap(), [(pa, pb), (pb, pc)]);
        assert_eq!(follow(&pb, &chain, &pc).unwrap(), [(pb, pc)]);
        assert_eq!(follow(&pa, &chain, &pb).unwrap(), [(pa, pb)]);
        // A key the chain never reaches, or a pin it does not start from.
        let (_, d_pub) = key();
        assert_eq!(
            follow(&pa, &chain, &pin(&d_pub)),
            Err(RotationError::NotToPresented)
        );
        assert_eq!(
            follow(&pin(&d_pub), &chain, &pc),
            Err(RotationError::NotFromPin)
        );
    }

    #[test]
    fn a_statement_not_signed_by_the_old_key_is_refused() {
        let (a, a_pub) = key();
        let (_, b_pub) = key();
        let (mallory, _) = key();
        // Mallory signs "a rotated to mallory's b" with its own key, claiming a's.
        let mut forged = Rotation::sign(&mallory, &b_pub, 1).unwrap();
        forged.old_key = a_pub.clone();
        assert_eq!(
            follow(&pin(&a_pub), &[forged], &pin(&b_pub)),
            Err(RotationError::BadSignature)
        );
        // A genuine statement changed afterwards.
        let mut changed = Rotation::sign(&a, &b_pub, 1).unwrap();
        changed.time_ms += 1;
        assert_eq!(
            follow(&pin(&a_pub), &[changed], &pin(&b_pub)),
            Err(RotationError::BadSignature)
        );
    }

    #[test]
    fn decoding_arbitrary_cuts_never_panics() {
        let (a, _) = key();
        let (_, b_pub) = key();
        let bytes = encode_chain(&[Rotation::sign(&a, &b_pub, 1).unwrap()]);
        for cut in 0..bytes.len() {
            assert!(decode_chain(&bytes[..cut]).is_err());
        }
        assert!(bytes.len() <= MAX_CHAIN_BYTES);
    }
}
