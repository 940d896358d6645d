//! Device identities, their fingerprints and the safety number of two parties.
//!
//! A device has one Ed25519 key. It signs the device's contact card, hotline's
//! checkpoints and exports, and it is also the device's MLS signature key, so that the
//! key a person verified over the phone is the very key that authenticates the
//! device's messages inside the channel.
//!
//! The fingerprint follows Signal's safety-number construction: SHA-512 iterated
//! 5,200 times over a version, the public key and the stable identifier (here the party
//! and device names), of which 30 bytes become six groups of five digits. Two parties
//! compare the *safety number*: both fingerprints, lower one first, 60 digits that read
//! the same on both sides.

use std::fmt;

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use openmls::prelude::{BasicCredential, CredentialWithKey, SignatureScheme};
use openmls_traits::signatures::{Signer as MlsSigner, SignerError};
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::codec::{DecodeError, Reader, Writer};

/// Longest party or device name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// The public key of a device: 32 bytes of Ed25519.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceKey(pub [u8; 32]);

impl DeviceKey {
    /// The key as bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Checks `signature` over `message` with this key, rejecting the malleable and
    /// small-order forms that plain verification would let through.
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> Result<(), BadSignature> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| BadSignature)?;
        let signature = Signature::from_bytes(signature);
        key.verify_strict(message, &signature)
            .map_err(|_| BadSignature)
    }

    /// A short hexadecimal form for logs and diagnostics (not for verification).
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceKey({})", self.short())
    }
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// A signature did not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("signature does not verify")]
pub struct BadSignature;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("a {0} name cannot be empty")]
    Empty(&'static str),
    #[error("a {0} name is at most {MAX_NAME_LEN} bytes")]
    TooLong(&'static str),
    #[error("a {0} name cannot contain control characters")]
    ControlCharacter(&'static str),
}

/// Checks a party or device name: 1 to 64 bytes of UTF-8, no control characters.
pub fn check_name(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.trim().is_empty() {
        return Err(NameError::Empty(what));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(what));
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::ControlCharacter(what));
    }
    Ok(())
}

/// Who a device is: its party, its own name and its public key. This is what a
/// contact card asserts and what the MLS credential carries.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub party: String,
    pub device: String,
    pub key: DeviceKey,
}

impl DeviceInfo {
    /// The fingerprint that people read to each other.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.key, &self.party, &self.device)
    }

    pub(crate) fn encode(&self, writer: &mut Writer) {
        writer.string(&self.party);
        writer.string(&self.device);
        writer.fixed(&self.key.0);
    }

    pub(crate) fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let party = reader.string("party name", MAX_NAME_LEN)?;
        let device = reader.string("device name", MAX_NAME_LEN)?;
        let key = DeviceKey(reader.array("device key")?);
        for (what, name) in [("party", &party), ("device", &device)] {
            check_name(what, name).map_err(|_| DecodeError::Invalid {
                field: what,
                reason: "empty, too long or with control characters",
            })?;
        }
        Ok(Self { party, device, key })
    }

    /// The bytes of this device's MLS basic credential.
    pub fn credential_bytes(&self) -> Vec<u8> {
        let mut writer = Writer::new();
        writer.u8(1);
        self.encode(&mut writer);
        writer.into_bytes()
    }

    /// Reads the identity back from an MLS basic credential.
    pub fn from_credential_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        match reader.u8("credential version")? {
            1 => {}
            version => {
                return Err(DecodeError::UnsupportedVersion {
                    what: "credential",
                    version,
                });
            }
        }
        let info = Self::decode(&mut reader)?;
        reader.finish()?;
        Ok(info)
    }
}

/// A device's own identity, with its secret key.
///
/// `Debug` never prints the secret; the key is zeroized when dropped.
pub struct DeviceIdentity {
    info: DeviceInfo,
    signing_key: SigningKey,
}

impl fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl DeviceIdentity {
    /// A new identity with a fresh key from `rng`.
    pub fn generate(
        party: &str,
        device: &str,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Self, NameError> {
        check_name("party", party)?;
        check_name("device", device)?;
        let signing_key = SigningKey::generate(rng);
        Ok(Self::from_parts(party, device, signing_key))
    }

    fn from_parts(party: &str, device: &str, signing_key: SigningKey) -> Self {
        let info = DeviceInfo {
            party: party.to_owned(),
            device: device.to_owned(),
            key: DeviceKey(signing_key.verifying_key().to_bytes()),
        };
        Self { info, signing_key }
    }

    /// Restores an identity from [`DeviceIdentity::to_secret_bytes`].
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        match reader.u8("identity version")? {
            1 => {}
            version => {
                return Err(DecodeError::UnsupportedVersion {
                    what: "identity",
                    version,
                });
            }
        }
        let party = reader.string("party name", MAX_NAME_LEN)?;
        let device = reader.string("device name", MAX_NAME_LEN)?;
        let seed = Zeroizing::new(reader.array::<32>("secret key")?);
        reader.finish()?;
        for (what, name) in [("party", &party), ("device", &device)] {
            check_name(what, name).map_err(|_| DecodeError::Invalid {
                field: what,
                reason: "empty, too long or with control characters",
            })?;
        }
        Ok(Self::from_parts(
            &party,
            &device,
            SigningKey::from_bytes(&seed),
        ))
    }

    /// The identity with its secret key, for the device's own storage only.
    pub fn to_secret_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut writer = Writer::new();
        writer.u8(1);
        writer.string(&self.info.party);
        writer.string(&self.info.device);
        writer.fixed(self.signing_key.as_bytes());
        Zeroizing::new(writer.into_bytes())
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn key(&self) -> DeviceKey {
        self.info.key
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.info.fingerprint()
    }

    /// Signs `message` with the device key.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing_key.sign(message).to_bytes()
    }

    /// The MLS credential of this device: its identity, bound to its key.
    pub fn credential_with_key(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.info.credential_bytes()).into(),
            signature_key: self.info.key.0.to_vec().into(),
        }
    }
}

impl MlsSigner for DeviceIdentity {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(self.signing_key.sign(payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// Thirty digits that identify a device key, read aloud in six groups of five.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint([u8; 30]);

/// The number of SHA-512 iterations, as in Signal's safety numbers: it makes a search
/// for a key with a chosen fingerprint 5,200 times costlier.
const FINGERPRINT_ITERATIONS: usize = 5200;

impl Fingerprint {
    /// The fingerprint of a device key with its party and device names.
    pub fn of(key: &DeviceKey, party: &str, device: &str) -> Self {
        let mut identifier = Writer::new();
        identifier.string(party);
        identifier.string(device);
        let identifier = identifier.into_bytes();

        let mut hash = Sha512::new()
            .chain_update(b"hotline-fingerprint-v1")
            .chain_update(key.0)
            .chain_update(&identifier)
            .finalize();
        for _ in 1..FINGERPRINT_ITERATIONS {
            hash = Sha512::new()
                .chain_update(hash)
                .chain_update(key.0)
                .finalize();
        }
        let mut digits = [0u8; 30];
        for (group, chunk) in hash[..30].chunks_exact(5).enumerate() {
            let value = chunk
                .iter()
                .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte))
                % 100_000;
            let mut rest = value;
            for position in (0..5).rev() {
                digits[group * 5 + position] = (rest % 10) as u8;
                rest /= 10;
            }
        }
        Self(digits)
    }

    /// Parses thirty digits; spaces, dashes and dots between them are ignored.
    pub fn parse(text: &str) -> Result<Self, FingerprintParseError> {
        let mut digits = [0u8; 30];
        let mut count = 0;
        for c in text.chars() {
            match c {
                '0'..='9' => {
                    if count == 30 {
                        return Err(FingerprintParseError::WrongLength);
                    }
                    digits[count] = c as u8 - b'0';
                    count += 1;
                }
                ' ' | '-' | '.' | '\t' => {}
                _ => return Err(FingerprintParseError::NotADigit(c)),
            }
        }
        if count != 30 {
            return Err(FingerprintParseError::WrongLength);
        }
        Ok(Self(digits))
    }

    /// The digits without separators.
    pub fn digits(&self) -> String {
        self.0.iter().map(|d| char::from(b'0' + d)).collect()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.digits();
        for (index, group) in digits.as_bytes().chunks(5).enumerate() {
            if index > 0 {
                f.write_str(" ")?;
            }
            // Invariant: the digits are ASCII, so every chunk is valid UTF-8.
            f.write_str(std::str::from_utf8(group).unwrap_or_default())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Why a typed fingerprint was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FingerprintParseError {
    #[error("a fingerprint has exactly 30 digits")]
    WrongLength,
    #[error("a fingerprint holds only digits (and spaces), found {0:?}")]
    NotADigit(char),
}

/// The 60 digits that two parties compare: both fingerprints, the lower first, so that
/// both sides see the same number.
pub fn safety_number(a: &Fingerprint, b: &Fingerprint) -> String {
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    format!("{low} {high}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn identity(party: &str, seed: u64) -> DeviceIdentity {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        DeviceIdentity::generate(party, "laptop", &mut rng).unwrap()
    }

    #[test]
    fn fingerprint_reads_as_six_groups_and_parses_back() {
        let fingerprint = identity("north", 1).fingerprint();
        let shown = fingerprint.to_string();
        assert_eq!(shown.split(' ').count(), 6);
        assert!(shown.split(' ').all(|g| g.len() == 5));
        assert_eq!(Fingerprint::parse(&shown), Ok(fingerprint));
        assert_eq!(Fingerprint::parse(&fingerprint.digits()), Ok(fingerprint));
        assert_eq!(
            Fingerprint::parse("1234"),
            Err(FingerprintParseError::WrongLength)
        );
        assert!(matches!(
            Fingerprint::parse("x"),
            Err(FingerprintParseError::NotADigit('x'))
        ));
    }

    #[test]
    fn fingerprint_binds_key_and_names() {
        let a = identity("north", 1);
        let b = identity("north", 2);
        assert_ne!(a.fingerprint(), b.fingerprint());
        let renamed = Fingerprint::of(&a.key(), "south", "laptop");
        assert_ne!(a.fingerprint(), renamed);
    }

    #[test]
    fn safety_number_is_symmetric() {
        let a = identity("north", 1).fingerprint();
        let b = identity("south", 2).fingerprint();
        assert_eq!(safety_number(&a, &b), safety_number(&b, &a));
        assert_eq!(safety_number(&a, &b).replace(' ', "").len(), 60);
    }

    #[test]
    fn secret_round_trip_and_debug_hides_secret() {
        let a = identity("north", 3);
        let restored = DeviceIdentity::from_secret_bytes(&a.to_secret_bytes()).unwrap();
        assert_eq!(restored.info(), a.info());
        assert!(!format!("{a:?}").contains(&hex::encode(a.signing_key.as_bytes())));
    }

    #[test]
    fn strict_verification() {
        let a = identity("north", 4);
        let signature = a.sign(b"hello");
        assert_eq!(a.key().verify(b"hello", &signature), Ok(()));
        assert_eq!(a.key().verify(b"hellO", &signature), Err(BadSignature));
    }
}
