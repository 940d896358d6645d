//! Custody receipts: a relay's signed word that it stored a message in a log at a
//! sequence number.
//!
//! The relay signs each commit batch once, with the key its address pins: the batch's
//! leaves (log, sequence number, SHA-256 of the message) form an RFC 6962 Merkle tree
//! (`ct_merkle`), and the relay signs
//!
//! ```text
//!   "hotline-custody-v1" || u64 time_ms || u64 leaves || [32] root
//! ```
//!
//! with its TLS key (the scheme rustls chose for that key: Ed25519 for relays created
//! by `relay serve` now, ECDSA P-256 for older ones). A receipt is that seal, with the relay's public key
//! (DER SubjectPublicKeyInfo, whose SHA-256 is the pin in the relay's address), and
//! one leaf with its inclusion proof. Anyone holding the relay's address checks it
//! offline ([`Receipt::verify`]): a member holds transferable proof of what the relay
//! accepted, and the hostile-relay alarms keep it as their evidence.

use ct_merkle::mem_backed_tree::MemoryBackedTree;
use ct_merkle::{InclusionProof, RootHash};
use hotline_core::codec::{DecodeError, Reader, Writer};
use rustls::SignatureScheme;
use rustls::pki_types::PrivateKeyDer;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::Log;
use crate::tls::{TlsError, signer_of, verify_with};

const CONTEXT: &[u8] = b"hotline-custody-v1";
const VERSION: u8 = 1;
/// Largest public key and signature a receipt carries (RSA-4096 fits).
const MAX_KEY: usize = 1024;
const MAX_SIGNATURE: usize = 1024;
/// Largest log name (a kind byte and a 32-byte id today).
const MAX_LOG: usize = 64;
/// Deepest inclusion proof (batches far below 2^32 leaves).
const MAX_PROOF: usize = 32;
/// Largest encoded receipt.
pub const MAX_RECEIPT: usize = 1
    + 4
    + MAX_KEY
    + 2
    + 4
    + MAX_SIGNATURE
    + 8
    + 8
    + 32
    + 8
    + 1
    + MAX_PROOF * 32
    + 4
    + MAX_LOG
    + 8
    + 32;

/// The seals this process verified last. The same receipt comes again: a following
/// device checks the relay's answer to its append, then the receipt on its own message
/// when the relay hands it back; a batch's receipts share one seal. A signature
/// verification costs about 50 µs, a look here about 1 µs.
mod verified_seals {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use sha2::{Digest, Sha256};

    /// How many are remembered (32 bytes each).
    const REMEMBERED: usize = 256;

    static SEALS: Mutex<VecDeque<[u8; 32]>> = Mutex::new(VecDeque::new());

    /// Whether `signature` by `key` over `message` verifies: remembered, or checked now
    /// (and then remembered).
    pub(super) fn verify(key: &[u8], scheme: u16, message: &[u8], signature: &[u8]) -> bool {
        let mut digest = Sha256::new();
        for part in [key, &scheme.to_be_bytes()[..], message, signature] {
            digest.update((part.len() as u64).to_be_bytes());
            digest.update(part);
        }
        let seal: [u8; 32] = digest.finalize().into();
        if SEALS.lock().is_ok_and(|seals| seals.contains(&seal)) {
            return true;
        }
        if !super::verify_with(key, scheme, message, signature) {
            return false;
        }
        if let Ok(mut seals) = SEALS.lock() {
            if seals.len() >= REMEMBERED {
                seals.pop_front();
            }
            seals.push_back(seal);
        }
        true
    }
}

/// Schemes a relay may sign with, in order of preference.
pub(crate) const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReceiptError {
    #[error("no receipt for a message the relay says it stored")]
    Missing,
    #[error("malformed receipt: {0}")]
    Malformed(#[from] DecodeError),
    #[error("the receipt is signed by another relay (its key does not match the pin)")]
    OtherRelay,
    #[error("the receipt's signature does not verify with the relay's key")]
    BadSignature,
    #[error("the receipt's message is not in the batch the relay signed")]
    NotIncluded,
    #[error("the receipt is for another log")]
    OtherLog,
    #[error("the receipt is for message {0} of the log")]
    OtherSeq(u64),
    #[error("the receipt is for other bytes")]
    OtherBytes,
}

/// One stored message, as a leaf of a commit batch's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// The log's storage key ([`Log::storage_key`]).
    pub log: Vec<u8>,
    pub seq: u64,
    /// SHA-256 of the message's bytes.
    pub hash: [u8; 32],
}

impl Leaf {
    fn encode(&self) -> Vec<u8> {
        let mut writer = Writer::with_capacity(4 + self.log.len() + 40);
        writer.bytes(&self.log);
        writer.u64(self.seq);
        writer.fixed(&self.hash);
        writer.into_bytes()
    }
}

/// A relay's receipt for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The relay's public key (DER SubjectPublicKeyInfo).
    pub relay_key: Vec<u8>,
    /// The TLS signature scheme of `signature`.
    pub scheme: u16,
    pub signature: Vec<u8>,
    /// When the relay committed the batch (its clock, milliseconds since the epoch).
    pub time_ms: u64,
    /// Leaves in the batch.
    pub size: u64,
    /// The batch's RFC 6962 root.
    pub root: [u8; 32],
    /// This message's place in the batch, and the hashes proving it.
    pub index: u64,
    pub proof: Vec<[u8; 32]>,
    pub leaf: Leaf,
}

fn sealed_message(time_ms: u64, size: u64, root: &[u8; 32]) -> Vec<u8> {
    [
        CONTEXT,
        &time_ms.to_be_bytes(),
        &size.to_be_bytes(),
        &root[..],
    ]
    .concat()
}

impl Receipt {
    /// The pin of the relay that signed it (SHA-256 of its public key).
    pub fn pin(&self) -> [u8; 32] {
        Sha256::digest(&self.relay_key).into()
    }

    /// Checks the signature and the inclusion proof, and that the relay is the one
    /// `pin` names. Needs nothing but the receipt and the pin.
    pub fn verify(&self, pin: &[u8; 32]) -> Result<(), ReceiptError> {
        if &self.pin() != pin {
            return Err(ReceiptError::OtherRelay);
        }
        let message = sealed_message(self.time_ms, self.size, &self.root);
        if !verified_seals::verify(&self.relay_key, self.scheme, &message, &self.signature) {
            return Err(ReceiptError::BadSignature);
        }
        let root = RootHash::<Sha256>::new(self.root.into(), self.size);
        let proof = InclusionProof::<Sha256>::try_from_bytes(self.proof.concat())
            .map_err(|_| ReceiptError::NotIncluded)?;
        root.verify_inclusion(&self.leaf.encode(), self.index, &proof)
            .map_err(|_| ReceiptError::NotIncluded)
    }

    /// Checks the receipt as [`verify`](Self::verify) does, and that it is for the
    /// message whose SHA-256 is `hash`, stored in `log` at `seq`.
    pub fn verify_for(
        &self,
        pin: &[u8; 32],
        log: &Log,
        seq: u64,
        hash: &[u8; 32],
    ) -> Result<(), ReceiptError> {
        self.verify(pin)?;
        if self.leaf.log != log.storage_key() {
            return Err(ReceiptError::OtherLog);
        }
        if self.leaf.seq != seq {
            return Err(ReceiptError::OtherSeq(self.leaf.seq));
        }
        if &self.leaf.hash != hash {
            return Err(ReceiptError::OtherBytes);
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut writer = Writer::with_capacity(256 + self.relay_key.len() + self.proof.len() * 32);
        writer.u8(VERSION);
        writer.bytes(&self.relay_key);
        writer.u16(self.scheme);
        writer.bytes(&self.signature);
        writer.u64(self.time_ms);
        writer.u64(self.size);
        writer.fixed(&self.root);
        writer.u64(self.index);
        // Invariant: proofs are at most MAX_PROOF hashes (batches of < 2^32 leaves).
        writer.u8(self.proof.len() as u8);
        for hash in &self.proof {
            writer.fixed(hash);
        }
        writer.bytes(&self.leaf.log);
        writer.u64(self.leaf.seq);
        writer.fixed(&self.leaf.hash);
        writer.into_bytes()
    }

    /// Decodes a receipt (bounded in every field; checks nothing cryptographic).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        if reader.u8("receipt version")? != VERSION {
            return Err(DecodeError::Invalid {
                field: "receipt version",
                reason: "not a version this device knows",
            });
        }
        let relay_key = reader.bytes("relay key", MAX_KEY)?.to_vec();
        let scheme = reader.u16("scheme")?;
        let signature = reader.bytes("signature", MAX_SIGNATURE)?.to_vec();
        let time_ms = reader.u64("time")?;
        let size = reader.u64("batch size")?;
        let root = reader.array("root")?;
        let index = reader.u64("index")?;
        let depth = reader.u8("proof length")? as usize;
        if depth > MAX_PROOF {
            return Err(DecodeError::TooLong {
                field: "proof",
                len: depth as u64,
                limit: MAX_PROOF as u64,
            });
        }
        let mut proof = Vec::with_capacity(depth);
        for _ in 0..depth {
            proof.push(reader.array("proof")?);
        }
        let log = reader.bytes("log", MAX_LOG)?.to_vec();
        let seq = reader.u64("seq")?;
        let hash = reader.array("hash")?;
        reader.finish()?;
        Ok(Self {
            relay_key,
            scheme,
            signature,
            time_ms,
            size,
            root,
            index,
            proof,
            leaf: Leaf { log, seq, hash },
        })
    }
}

/// SHA-256 of a message, as receipts name it.
pub fn message_hash(message: &[u8]) -> [u8; 32] {
    Sha256::digest(message).into()
}

/// Checks an encoded receipt: that it proves the message with `hash` stored in `log`
/// at `seq` by the relay that `pin` names.
pub fn check(
    pin: &[u8; 32],
    log: &Log,
    seq: u64,
    hash: &[u8; 32],
    receipt: &[u8],
) -> Result<(), ReceiptError> {
    let receipt = Receipt::decode(receipt)?;
    // Signed by the pinned key, or by one its relay rotated to since.
    let signer = receipt.pin();
    if &signer != pin && !crate::tls::accepted_pins(*pin).contains(&signer) {
        return Err(ReceiptError::OtherRelay);
    }
    receipt.verify_for(&signer, log, seq, hash)
}

/// Checks an append's answer: its receipt must prove the message stored where the
/// answer says. Only a duplicate of a message stored before relays signed receipts
/// may come without one.
pub fn check_appended(
    pin: &[u8; 32],
    log: &Log,
    hash: &[u8; 32],
    appended: &crate::stream::Appended,
) -> Result<(), ReceiptError> {
    match &appended.receipt {
        Some(receipt) => check(pin, log, appended.seq, hash, receipt),
        None if appended.duplicate => Ok(()),
        None => Err(ReceiptError::Missing),
    }
}

/// The relay's signer of receipts: its TLS key.
pub struct Notary {
    signer: Box<dyn rustls::sign::Signer>,
    relay_key: Vec<u8>,
    rotations: Vec<u8>,
}

impl std::fmt::Debug for Notary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notary")
            .field("scheme", &self.signer.scheme())
            .finish_non_exhaustive()
    }
}

impl Notary {
    /// A notary signing with the relay's TLS key.
    pub fn new(key: &PrivateKeyDer<'_>) -> Result<Self, TlsError> {
        let (signer, relay_key) = signer_of(key, SCHEMES)?;
        Ok(Self {
            signer,
            relay_key,
            rotations: Vec::new(),
        })
    }

    /// The statements that lead from the relay's earlier keys to this one (encoded, see
    /// [`crate::rotation`]), served to devices that still pin an earlier key.
    pub fn with_rotations(mut self, rotations: Vec<u8>) -> Self {
        self.rotations = rotations;
        self
    }

    /// [`Notary::with_rotations`]'s statements (empty if the key never rotated).
    pub fn rotations(&self) -> &[u8] {
        &self.rotations
    }

    /// The pin of the key it signs with.
    pub fn pin(&self) -> [u8; 32] {
        Sha256::digest(&self.relay_key).into()
    }

    /// Seals one commit batch: one signature over the root of `leaves`, one receipt per
    /// leaf (in order). Empty batches need no seal.
    pub fn seal(&self, leaves: Vec<Leaf>, time_ms: u64) -> Result<Vec<Receipt>, TlsError> {
        if leaves.is_empty() {
            return Ok(Vec::new());
        }
        let mut tree = MemoryBackedTree::<Sha256, Vec<u8>>::new();
        for leaf in &leaves {
            tree.push(leaf.encode());
        }
        let mut root = [0u8; 32];
        root.copy_from_slice(tree.root().as_bytes());
        let size = tree.len();
        let signature = self
            .signer
            .sign(&sealed_message(time_ms, size, &root))
            .map_err(|e| TlsError::Certificate(format!("signing a receipt: {e}")))?;
        let scheme = u16::from(self.signer.scheme());
        Ok(leaves
            .into_iter()
            .enumerate()
            .map(|(index, leaf)| Receipt {
                relay_key: self.relay_key.clone(),
                scheme,
                signature: signature.clone(),
                time_ms,
                size,
                root,
                index: index as u64,
                proof: tree
                    .prove_inclusion(index)
                    .as_bytes()
                    .chunks_exact(32)
                    .filter_map(|chunk| chunk.try_into().ok())
                    .collect(),
                leaf,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Notaries with each kind of relay key: Ed25519 (relays made now; their
    /// signatures are checked by ed25519-dalek) and ECDSA P-256 (relays made before;
    /// checked through rustls's provider). Keys made by ring, as rcgen makes them.
    fn notaries() -> [Notary; 2] {
        let rng = ring::rand::SystemRandom::new();
        let ed25519 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let p256 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &rng,
        )
        .unwrap();
        [ed25519.as_ref(), p256.as_ref()]
            .map(|pkcs8| Notary::new(&PrivateKeyDer::Pkcs8(pkcs8.to_vec().into())).unwrap())
    }

    fn notary() -> Notary {
        let [ed25519, _] = notaries();
        ed25519
    }

    fn leaves(n: u64) -> Vec<Leaf> {
        (1..=n)
            .map(|seq| Leaf {
                log: Log::Channel([7; 32]).storage_key(),
                seq,
                hash: Sha256::digest(seq.to_be_bytes()).into(),
            })
            .collect()
    }

    #[test]
    fn every_receipt_of_a_batch_verifies_with_the_pin_alone() {
        for notary in notaries() {
            every_receipt_verifies(&notary);
        }
    }

    fn every_receipt_verifies(notary: &Notary) {
        for size in [1, 2, 3, 7, 64] {
            let receipts = notary.seal(leaves(size), 1_700_000_000_000).unwrap();
            assert_eq!(receipts.len() as u64, size);
            for receipt in &receipts {
                let decoded = Receipt::decode(&receipt.encode()).unwrap();
                assert_eq!(&decoded, receipt);
                decoded.verify(&notary.pin()).unwrap();
                decoded
                    .verify_for(
                        &notary.pin(),
                        &Log::Channel([7; 32]),
                        receipt.leaf.seq,
                        &message_hash(&receipt.leaf.seq.to_be_bytes()),
                    )
                    .unwrap();
            }
        }
    }

    #[test]
    fn a_changed_receipt_does_not_verify() {
        for notary in notaries() {
            a_changed_receipt_fails(&notary);
        }
    }

    fn a_changed_receipt_fails(notary: &Notary) {
        let receipt = notary.seal(leaves(5), 1).unwrap().remove(2);
        // Verified once, its seal is remembered: what differs from it is checked anew.
        receipt.verify(&notary.pin()).unwrap();
        for bit in [0, 7, 8 * receipt.signature.len() - 1] {
            let mut forged = receipt.clone();
            forged.signature[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(
                forged.verify(&notary.pin()),
                Err(ReceiptError::BadSignature)
            );
        }
        let mut cut = receipt.clone();
        cut.signature.pop();
        assert_eq!(cut.verify(&notary.pin()), Err(ReceiptError::BadSignature));
        assert_eq!(receipt.verify(&[0; 32]), Err(ReceiptError::OtherRelay));
        let mut later = receipt.clone();
        later.time_ms += 1;
        assert_eq!(later.verify(&notary.pin()), Err(ReceiptError::BadSignature));
        let mut moved = receipt.clone();
        moved.leaf.seq += 1;
        assert_eq!(moved.verify(&notary.pin()), Err(ReceiptError::NotIncluded));
        let mut elsewhere = receipt.clone();
        elsewhere.index = 3;
        assert_eq!(
            elsewhere.verify(&notary.pin()),
            Err(ReceiptError::NotIncluded)
        );
        assert_eq!(
            receipt.verify_for(
                &notary.pin(),
                &Log::Inbox([7; 32]),
                3,
                &message_hash(&3u64.to_be_bytes())
            ),
            Err(ReceiptError::OtherLog)
        );
        assert_eq!(
            receipt.verify_for(
                &notary.pin(),
                &Log::Channel([7; 32]),
                3,
                &message_hash(b"other")
            ),
            Err(ReceiptError::OtherBytes)
        );
        // Another relay's key, even with the same batch, is another pin.
        let other = self::notary();
        let theirs = other.seal(leaves(5), 1).unwrap().remove(2);
        assert_eq!(theirs.verify(&notary.pin()), Err(ReceiptError::OtherRelay));
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        let receipt = notary().seal(leaves(3), 1).unwrap().remove(0).encode();
        for cut in 0..receipt.len() {
            assert!(Receipt::decode(&receipt[..cut]).is_err());
        }
        let mut longer = receipt.clone();
        longer.push(0);
        assert!(Receipt::decode(&longer).is_err());
        assert!(receipt.len() <= MAX_RECEIPT);
    }
}
