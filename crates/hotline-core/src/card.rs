//! Contact cards: what a device publishes so that others can add it to a channel.
//!
//! A card carries the device's party and names, its key, a batch of MLS key packages
//! (one of them marked last-resort, reusable when the others are spent) and the relay
//! addresses where the device picks up invitations. The device signs the card with
//! its key. A card is *unverified* ([`CardIn`]) until it is checked against the
//! fingerprint that a person read out of band; only then does it become a
//! [`VerifiedContact`], the one type that channel operations accept.
//!
//! Format (version 1), in the codec of [`crate::codec`]:
//! `u8 version | DeviceInfo | u32 n, n × bytes key package | bytes last-resort key
//! package | u32 m, m × string relay | [64] signature`, where the signature covers
//! `"hotline-card-v1" ||` every byte before it.

use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::{
    Capabilities, DeserializeBytes as _, ExtensionType, KeyPackage, KeyPackageIn, OpenMlsProvider,
    ProtocolVersion,
};
use openmls_traits::crypto::OpenMlsCrypto;
use thiserror::Error;

use crate::CIPHERSUITE;
use crate::codec::{DecodeError, Reader, Writer};
use crate::identity::{DeviceIdentity, DeviceInfo, Fingerprint};

const CARD_VERSION: u8 = 1;
const SIGNATURE_CONTEXT: &[u8] = b"hotline-card-v1";
/// Most key packages on one card.
pub const MAX_KEY_PACKAGES: usize = 64;
/// Largest encoded key package accepted.
pub const MAX_KEY_PACKAGE_LEN: usize = 16 * 1024;
/// Most relay addresses on one card.
pub const MAX_RELAYS: usize = 16;
/// Longest relay address, in bytes.
pub const MAX_RELAY_LEN: usize = 512;

/// Why a card could not be made, read or trusted.
#[derive(Debug, Error)]
pub enum CardError {
    /// The bytes are not a card.
    #[error("malformed contact card: {0}")]
    Malformed(#[from] DecodeError),
    /// The card's own signature does not verify: it was altered or forged.
    #[error(
        "the contact card's signature does not verify; it was altered or is not from this device"
    )]
    BadSignature,
    /// The fingerprint read out of band is not the card's. Never import such a card.
    #[error(
        "fingerprint mismatch for {party}/{device}: the card has {actual}, you were told {expected}; \
         do not trust this card, call the other party again"
    )]
    FingerprintMismatch {
        party: String,
        device: String,
        expected: Fingerprint,
        actual: Fingerprint,
    },
    /// A key package inside the card is invalid or belongs to another key.
    #[error("key package {index} on the card is invalid: {reason}")]
    BadKeyPackage { index: usize, reason: String },
    /// Too many key packages or relays were asked for.
    #[error(
        "a card holds at most {MAX_KEY_PACKAGES} key packages and {MAX_RELAYS} relays of {MAX_RELAY_LEN} bytes"
    )]
    TooLarge,
    /// openmls could not create a key package.
    #[error("could not create a key package: {0}")]
    KeyPackageCreation(String),
}

/// A card as received: nothing in it is trusted yet.
#[derive(Debug, Clone)]
pub struct CardIn {
    info: DeviceInfo,
    key_packages: Vec<Vec<u8>>,
    last_resort: Vec<u8>,
    relays: Vec<String>,
    signature: [u8; 64],
    signed_len: usize,
    bytes: Vec<u8>,
}

/// A contact whose card verified and whose fingerprint matched what a person read.
#[derive(Debug, Clone)]
pub struct VerifiedContact {
    pub info: DeviceInfo,
    pub key_packages: Vec<KeyPackage>,
    pub last_resort: KeyPackage,
    pub relays: Vec<String>,
}

impl VerifiedContact {
    /// A key package to add this device with: a one-time one while any remain, else the
    /// last-resort one.
    pub fn take_key_package(&mut self) -> KeyPackage {
        self.key_packages
            .pop()
            .unwrap_or_else(|| self.last_resort.clone())
    }
}

/// A fresh key package of this device (one-time, or last-resort), its private parts in
/// `provider`'s storage, where a Welcome later finds them: its encoding and its hash
/// reference (TLS-encoded; that storage knows the package by it).
pub fn key_package(
    identity: &DeviceIdentity,
    provider: &impl OpenMlsProvider,
    last_resort: bool,
) -> Result<(Vec<u8>, Vec<u8>), CardError> {
    let failed = |e: String| CardError::KeyPackageCreation(e);
    // A last-resort key package must announce that extension in its capabilities.
    let capabilities = Capabilities::builder()
        .extensions(vec![ExtensionType::LastResort])
        .build();
    let mut builder = KeyPackage::builder().leaf_node_capabilities(capabilities);
    if last_resort {
        builder = builder.mark_as_last_resort();
    }
    let bundle = builder
        .build(
            CIPHERSUITE,
            provider,
            identity,
            identity.credential_with_key(),
        )
        .map_err(|e| failed(e.to_string()))?;
    let package = bundle.key_package();
    let bytes = package
        .tls_serialize_detached()
        .map_err(|e| failed(e.to_string()))?;
    let hash_ref = package
        .hash_ref(provider.crypto())
        .map_err(|e| failed(e.to_string()))?;
    let hash_ref = hash_ref
        .tls_serialize_detached()
        .map_err(|e| failed(e.to_string()))?;
    Ok((bytes, hash_ref))
}

/// Checks that `bytes` is a valid key package of `info`'s device, in hotline's
/// ciphersuite, marked last-resort or not as `last_resort` says (what a card's packages
/// must be, and what a relay hands out must be).
pub fn check_key_package(
    info: &DeviceInfo,
    bytes: &[u8],
    last_resort: bool,
    crypto: &impl OpenMlsCrypto,
) -> Result<KeyPackage, String> {
    let package = KeyPackageIn::tls_deserialize_exact_bytes(bytes)
        .map_err(|e| e.to_string())?
        .validate(crypto, ProtocolVersion::Mls10)
        .map_err(|e| e.to_string())?;
    if package.ciphersuite() != CIPHERSUITE {
        return Err(format!("ciphersuite {:?}", package.ciphersuite()));
    }
    let leaf = package.leaf_node();
    if leaf.signature_key().as_slice() != info.key.0.as_slice()
        || leaf.credential().serialized_content() != info.credential_bytes().as_slice()
    {
        return Err("it belongs to another device".into());
    }
    if package.last_resort() != last_resort {
        return Err("wrong last-resort marking".into());
    }
    Ok(package)
}

/// Creates this device's card with `one_time` fresh key packages and a last-resort one.
/// Their private parts go to `provider`'s storage, where a Welcome later finds them.
pub fn create_card(
    identity: &DeviceIdentity,
    provider: &impl OpenMlsProvider,
    one_time: usize,
    relays: &[String],
) -> Result<Vec<u8>, CardError> {
    if one_time > MAX_KEY_PACKAGES
        || relays.len() > MAX_RELAYS
        || relays.iter().any(|r| r.len() > MAX_RELAY_LEN)
    {
        return Err(CardError::TooLarge);
    }
    let build =
        |last_resort: bool| key_package(identity, provider, last_resort).map(|(bytes, _)| bytes);
    let key_packages = (0..one_time)
        .map(|_| build(false))
        .collect::<Result<Vec<_>, _>>()?;
    let last_resort = build(true)?;

    let mut writer = Writer::new();
    writer.u8(CARD_VERSION);
    identity.info().encode(&mut writer);
    writer.u32(key_packages.len() as u32);
    for package in &key_packages {
        writer.bytes(package);
    }
    writer.bytes(&last_resort);
    writer.u32(relays.len() as u32);
    for relay in relays {
        writer.string(relay);
    }
    let signature = identity.sign(&signed_message(writer.as_bytes()));
    writer.fixed(&signature);
    Ok(writer.into_bytes())
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    [SIGNATURE_CONTEXT, body].concat()
}

impl CardIn {
    /// Parses a card. This checks the format only; see [`CardIn::verify`].
    pub fn decode(bytes: &[u8]) -> Result<Self, CardError> {
        let mut reader = Reader::new(bytes);
        let version = reader.u8("card version")?;
        if version != CARD_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "contact card",
                version,
            }
            .into());
        }
        let info = DeviceInfo::decode(&mut reader)?;
        let count = reader.count("key packages", MAX_KEY_PACKAGES, 4)?;
        let mut key_packages = Vec::with_capacity(count);
        for _ in 0..count {
            key_packages.push(reader.bytes("key package", MAX_KEY_PACKAGE_LEN)?.to_vec());
        }
        let last_resort = reader
            .bytes("last-resort key package", MAX_KEY_PACKAGE_LEN)?
            .to_vec();
        let count = reader.count("relays", MAX_RELAYS, 4)?;
        let mut relays = Vec::with_capacity(count);
        for _ in 0..count {
            relays.push(reader.string("relay address", MAX_RELAY_LEN)?);
        }
        let signed_len = reader.position();
        let signature = reader.array::<64>("card signature")?;
        reader.finish()?;
        Ok(Self {
            info,
            key_packages,
            last_resort,
            relays,
            signature,
            signed_len,
            bytes: bytes.to_vec(),
        })
    }

    /// The relays the card names (where its device receives invitations).
    pub fn relays(&self) -> &[String] {
        &self.relays
    }

    /// Who the card claims to be. Untrusted until [`CardIn::verify`] succeeds.
    pub fn claimed(&self) -> &DeviceInfo {
        &self.info
    }

    /// Checks the card against the fingerprint a person read out of band, its own
    /// signature, and every key package in it.
    pub fn verify(
        self,
        expected: &Fingerprint,
        crypto: &impl OpenMlsCrypto,
    ) -> Result<VerifiedContact, CardError> {
        let actual = self.info.fingerprint();
        if actual != *expected {
            return Err(CardError::FingerprintMismatch {
                party: self.info.party.clone(),
                device: self.info.device.clone(),
                expected: *expected,
                actual,
            });
        }
        self.info
            .key
            .verify(
                &signed_message(&self.bytes[..self.signed_len]),
                &self.signature,
            )
            .map_err(|_| CardError::BadSignature)?;
        let check = |index: usize, bytes: &[u8], last_resort: bool| {
            check_key_package(&self.info, bytes, last_resort, crypto)
                .map_err(|reason| CardError::BadKeyPackage { index, reason })
        };
        let key_packages = self
            .key_packages
            .iter()
            .enumerate()
            .map(|(index, bytes)| check(index, bytes, false))
            .collect::<Result<Vec<_>, _>>()?;
        let last_resort = check(self.key_packages.len(), &self.last_resort, true)?;
        Ok(VerifiedContact {
            info: self.info,
            key_packages,
            last_resort,
            relays: self.relays,
        })
    }
}
