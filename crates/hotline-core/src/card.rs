//! Contact cards: what a device publishes so that others can add it to a channel.
//!
//! A card carries the device's party and names, its key, a batch of MLS key packages
//! (one of them marked last-resort, reusable when the others are spent) and the relay
//! addresses where the device picks up invitations. The device signs the card with
//! its key. A card is *unverified* ([`CardIn`]) until it is checked against the
//! fingerprint that a person read out of band; only then does it become a
//! [`VerifiedContact`], the one type that channel operations accept.
//!
//! Format (version 2), in the codec of [`crate::codec`]:
//! `u8 version | DeviceInfo | u32 n, n × bytes key package | bytes last-resort key
//! package | u32 m, m × string relay | [64] inbox capability | [64] signature`, where
//! the signature covers `"hotline-card-v1" ||` every byte before it. Version 1 is the
//! same without the inbox capability; it is still read.
//!
//! The **inbox capability** is the device's Ed25519 signature over
//! `"hotline-inbox-capability-v1"`: whoever holds the card presents it to the device's
//! relays to leave an invitation in its inbox or claim one of its key packages, and a
//! relay checks it with the inbox's key alone (the inbox id is the device's key), so
//! strangers without the card cannot write there. It is as secret as the card.

use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::{
    Capabilities, DeserializeBytes as _, ExtensionType, KeyPackage, KeyPackageIn, OpenMlsProvider,
    ProtocolVersion,
};
use openmls_traits::crypto::OpenMlsCrypto;
use thiserror::Error;

use crate::CIPHERSUITE;
use crate::codec::{DecodeError, Reader, Writer};
use crate::identity::{DeviceIdentity, DeviceInfo, DeviceKey, Fingerprint};

const CARD_VERSION: u8 = 2;
/// Cards made before inbox capabilities: no capability.
const CARD_VERSION_1: u8 = 1;
const SIGNATURE_CONTEXT: &[u8] = b"hotline-card-v1";
const INBOX_CAPABILITY_CONTEXT: &[u8] = b"hotline-inbox-capability-v1";

/// This device's inbox capability (see the module's documentation).
pub fn inbox_capability(identity: &DeviceIdentity) -> [u8; 64] {
    identity.sign(INBOX_CAPABILITY_CONTEXT)
}

/// Whether `capability` is the inbox capability of the device whose key is `device`.
pub fn check_inbox_capability(device: &DeviceKey, capability: &[u8; 64]) -> bool {
    device.verify(INBOX_CAPABILITY_CONTEXT, capability).is_ok()
}
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

const ARMOR_BEGIN: &str = "-----BEGIN HOTLINE CARD-----";
const ARMOR_END: &str = "-----END HOTLINE CARD-----";

/// A card as text, to mail or paste: the lines `Party:`, `Device:` and `Fingerprint:`
/// (what the card claims, for people; the fingerprint read out of band decides at
/// import), a blank line, then the card in base64, 64 columns, between `-----BEGIN
/// HOTLINE CARD-----` and `-----END HOTLINE CARD-----`.
pub fn armor(card: &[u8]) -> Result<String, CardError> {
    use base64::Engine;
    let claimed = CardIn::decode(card)?;
    let info = claimed.claimed();
    // Names from a card are shown, never acted on: no control characters in the text.
    let plain = |text: &str| -> String {
        text.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect()
    };
    let encoded = base64::engine::general_purpose::STANDARD.encode(card);
    let mut text = format!(
        "{ARMOR_BEGIN}\nParty: {}\nDevice: {}\nFingerprint: {}\n\n",
        plain(&info.party),
        plain(&info.device),
        info.fingerprint()
    );
    for line in encoded.as_bytes().chunks(64) {
        text.push_str(&String::from_utf8_lossy(line));
        text.push('\n');
    }
    text.push_str(ARMOR_END);
    text.push('\n');
    Ok(text)
}

/// The card in `bytes`: armoured text as [`armor`] writes it (surrounding text and
/// whitespace allowed), or the binary card as it is.
pub fn dearmor(bytes: &[u8]) -> Result<Vec<u8>, CardError> {
    use base64::Engine;
    let malformed = |reason| {
        CardError::from(DecodeError::Invalid {
            field: "armoured card",
            reason,
        })
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Ok(bytes.to_vec());
    };
    let Some(start) = text.find(ARMOR_BEGIN) else {
        return Ok(bytes.to_vec());
    };
    let body = &text[start + ARMOR_BEGIN.len()..];
    let end = body
        .find(ARMOR_END)
        .ok_or_else(|| malformed("no END line"))?;
    // The header lines end at the first blank line; the rest is base64.
    let body = &body[..end];
    let encoded: String = match body.find("\n\n").or_else(|| body.find("\r\n\r\n")) {
        Some(blank) => &body[blank..],
        None => body,
    }
    .chars()
    .filter(|c| !c.is_whitespace())
    .collect();
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| malformed("not base64"))
}

/// A card as received: nothing in it is trusted yet.
#[derive(Debug, Clone)]
pub struct CardIn {
    info: DeviceInfo,
    key_packages: Vec<Vec<u8>>,
    last_resort: Vec<u8>,
    relays: Vec<String>,
    inbox_capability: Option<[u8; 64]>,
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
    Ok(encode_card(identity, &key_packages, &last_resort, relays))
}

/// This device's card `card` again, in the current version (with its inbox
/// capability), its key packages and relays unchanged; `None` if it already is.
pub fn reissue_card(identity: &DeviceIdentity, card: &[u8]) -> Result<Option<Vec<u8>>, CardError> {
    let card = CardIn::decode(card)?;
    if card.inbox_capability.is_some() {
        return Ok(None);
    }
    Ok(Some(encode_card(
        identity,
        &card.key_packages,
        &card.last_resort,
        &card.relays,
    )))
}

fn encode_card(
    identity: &DeviceIdentity,
    key_packages: &[Vec<u8>],
    last_resort: &[u8],
    relays: &[String],
) -> Vec<u8> {
    let mut writer = Writer::new();
    writer.u8(CARD_VERSION);
    identity.info().encode(&mut writer);
    writer.u32(key_packages.len() as u32);
    for package in key_packages {
        writer.bytes(package);
    }
    writer.bytes(last_resort);
    writer.u32(relays.len() as u32);
    for relay in relays {
        writer.string(relay);
    }
    writer.fixed(&inbox_capability(identity));
    let signature = identity.sign(&signed_message(writer.as_bytes()));
    writer.fixed(&signature);
    writer.into_bytes()
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    [SIGNATURE_CONTEXT, body].concat()
}

impl CardIn {
    /// Parses a card. This checks the format only; see [`CardIn::verify`].
    pub fn decode(bytes: &[u8]) -> Result<Self, CardError> {
        let mut reader = Reader::new(bytes);
        let version = reader.u8("card version")?;
        if version != CARD_VERSION && version != CARD_VERSION_1 {
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
        let inbox_capability = match version {
            CARD_VERSION_1 => None,
            _ => Some(reader.array::<64>("inbox capability")?),
        };
        let signed_len = reader.position();
        let signature = reader.array::<64>("card signature")?;
        reader.finish()?;
        Ok(Self {
            info,
            key_packages,
            last_resort,
            relays,
            inbox_capability,
            signature,
            signed_len,
            bytes: bytes.to_vec(),
        })
    }

    /// The relays the card names (where its device receives invitations).
    pub fn relays(&self) -> &[String] {
        &self.relays
    }

    /// The capability to write to the card's device's inbox on its relays (`None` on
    /// a card made before capabilities: its device must export its card again).
    pub fn inbox_capability(&self) -> Option<&[u8; 64]> {
        self.inbox_capability.as_ref()
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

#[cfg(test)]
mod tests {
    use super::*;
    use openmls_rust_crypto::OpenMlsRustCrypto;

    /// `card` as a version-1 card (no inbox capability), signed again by `identity`.
    fn as_version_1(identity: &DeviceIdentity, card: &[u8]) -> Vec<u8> {
        let card = CardIn::decode(card).unwrap();
        let mut writer = Writer::new();
        writer.u8(CARD_VERSION_1);
        identity.info().encode(&mut writer);
        writer.u32(card.key_packages.len() as u32);
        for package in &card.key_packages {
            writer.bytes(package);
        }
        writer.bytes(&card.last_resort);
        writer.u32(card.relays.len() as u32);
        for relay in &card.relays {
            writer.string(relay);
        }
        let signature = identity.sign(&signed_message(writer.as_bytes()));
        writer.fixed(&signature);
        writer.into_bytes()
    }

    #[test]
    fn an_armoured_card_reads_back_as_the_binary_card() {
        let provider = OpenMlsRustCrypto::default();
        let identity = DeviceIdentity::generate("north", "desk", &mut rand::rngs::OsRng).unwrap();
        let card = create_card(&identity, &provider, 2, &[]).unwrap();
        let text = armor(&card).unwrap();
        let fingerprint = identity.info().fingerprint();
        assert!(
            text.contains(&format!(
                "Party: north\nDevice: desk\nFingerprint: {fingerprint}\n\n"
            )),
            "{text}"
        );
        assert_eq!(dearmor(text.as_bytes()).unwrap(), card);
        // Pasted into a mail: text around it, lines re-wrapped, CRLF.
        let mailed = format!("Hello,\r\n\r\n{}\r\nRegards", text.replace('\n', "\r\n"));
        assert_eq!(dearmor(mailed.as_bytes()).unwrap(), card);
        // The binary card passes through; a cut armour or bad base64 is refused.
        assert_eq!(dearmor(&card).unwrap(), card);
        let cut = &text[..text.len() - 20];
        assert!(dearmor(cut.as_bytes()).is_err());
        let garbled = text.replace("\n\n", "\n\n!!!");
        assert!(dearmor(garbled.as_bytes()).is_err());
    }

    #[test]
    fn a_card_carries_its_inbox_capability_and_an_old_card_is_reissued_with_one() {
        let provider = OpenMlsRustCrypto::default();
        let identity = DeviceIdentity::generate("north", "desk", &mut rand::rngs::OsRng).unwrap();
        let relays = vec!["https://127.0.0.1:1/#sha256=00".to_owned()];
        let card = create_card(&identity, &provider, 2, &relays).unwrap();
        let decoded = CardIn::decode(&card).unwrap();
        let capability = *decoded.inbox_capability().unwrap();
        assert!(check_inbox_capability(&identity.key(), &capability));
        assert_eq!(reissue_card(&identity, &card).unwrap(), None);

        // A card from before capabilities still reads and verifies, without one.
        let old = as_version_1(&identity, &card);
        let decoded = CardIn::decode(&old).unwrap();
        assert!(decoded.inbox_capability().is_none());
        let fingerprint = identity.info().fingerprint();
        decoded.verify(&fingerprint, provider.crypto()).unwrap();

        // Reissued: the same packages and relays, the capability, a valid signature.
        let new = reissue_card(&identity, &old).unwrap().unwrap();
        let decoded = CardIn::decode(&new).unwrap();
        assert_eq!(decoded.inbox_capability(), Some(&capability));
        assert_eq!(decoded.relays(), relays.as_slice());
        let contact = decoded.verify(&fingerprint, provider.crypto()).unwrap();
        assert_eq!(contact.key_packages.len(), 2);

        // The capability is covered by the card's signature.
        let mut altered = new.clone();
        let at = altered.len() - 64 - 1;
        altered[at] ^= 1;
        assert!(matches!(
            CardIn::decode(&altered)
                .unwrap()
                .verify(&fingerprint, provider.crypto()),
            Err(CardError::BadSignature)
        ));
    }
}
