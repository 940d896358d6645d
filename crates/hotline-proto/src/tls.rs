//! The relay's address and the client's pin on its certificate.
//!
//! A relay's address carries the SHA-256 of its public key (the certificate's
//! SubjectPublicKeyInfo): `https://HOST:PORT/#sha256=HEX`. The client accepts a
//! certificate only with exactly that key (or, for addresses printed before key pins,
//! exactly that certificate) and still checks the handshake signature, so a replayed
//! certificate without its key fails, and a certificate renewed with the same key keeps
//! every member connected. TLS 1.3 only; one crypto provider (ring), installed explicitly.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime,
};
use sha2::{Digest, Sha256};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot use {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create the relay certificate: {0}")]
    Certificate(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error(
        "relay address {0:?} has no certificate pin; use the address printed by: hotline relay url --data DIR"
    )]
    NoPin(String),
}

/// The one crypto provider of hotline.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs the provider as the process default (idempotent).
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The pin of a relay: SHA-256 of its certificate's public key (the DER
/// SubjectPublicKeyInfo), which stays the same when the certificate is renewed with the
/// same key. A certificate that does not parse has no key pin: its certificate pin.
pub fn pin_of(certificate: &CertificateDer<'_>) -> [u8; 32] {
    match webpki::EndEntityCert::try_from(certificate) {
        Ok(parsed) => Sha256::digest(parsed.subject_public_key_info().as_ref()).into(),
        Err(_) => certificate_pin_of(certificate),
    }
}

/// The pin of one certificate: SHA-256 of its DER encoding (addresses printed before
/// relays pinned their key carry this one; it breaks when the certificate is renewed).
pub fn certificate_pin_of(certificate: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(certificate.as_ref()).into()
}

/// The address users give to clients.
pub fn relay_url(authority: &str, pin: &[u8; 32]) -> String {
    format!("https://{authority}/#sha256={}", hex::encode(pin))
}

/// Splits an address into its base URL and its pin.
pub fn parse_url(url: &str) -> Result<(String, [u8; 32]), TlsError> {
    let (base, fragment) = url
        .split_once('#')
        .ok_or_else(|| TlsError::NoPin(url.to_owned()))?;
    let hex_pin = fragment
        .strip_prefix("sha256=")
        .ok_or_else(|| TlsError::NoPin(url.to_owned()))?;
    let mut pin = [0u8; 32];
    hex::decode_to_slice(hex_pin, &mut pin).map_err(|_| TlsError::NoPin(url.to_owned()))?;
    Ok((base.trim_end_matches('/').to_owned(), pin))
}

/// What a relay's certificate that fails the pin says (a device then looks for the
/// relay's key rotation, see [`crate::rotation`]).
pub const PIN_MISMATCH: &str = "the relay's certificate does not match the pin in its address";

/// Where relays' verified key rotations lead, by the pin they start from: a device
/// loads what it followed from its store, and adds what it follows. Every address
/// pinning a key then accepts the keys its rotations lead to.
static FOLLOWED: Mutex<BTreeMap<[u8; 32], [u8; 32]>> = Mutex::new(BTreeMap::new());

/// Records that the relay whose key `from` pins rotated to the key `to` pins, as a
/// verified statement chain showed ([`crate::rotation::follow`]).
pub fn follow(from: [u8; 32], to: [u8; 32]) {
    if from != to {
        FOLLOWED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(from, to);
    }
}

/// The pins an address pinning `pin` accepts: it, then each key its relay rotated to.
pub fn accepted_pins(pin: [u8; 32]) -> Vec<[u8; 32]> {
    let followed = FOLLOWED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut pins = vec![pin];
    while let Some(next) = pins.last().and_then(|last| followed.get(last)) {
        if pins.contains(next) || pins.len() > 64 {
            break;
        }
        pins.push(*next);
    }
    pins
}

/// A signer with the relay's key, and that key's public part (DER
/// SubjectPublicKeyInfo): what custody receipts and rotation statements are signed
/// with. The scheme is the first of `schemes` the key can sign with.
pub(crate) fn signer_of(
    key: &PrivateKeyDer<'_>,
    schemes: &[rustls::SignatureScheme],
) -> Result<(Box<dyn rustls::sign::Signer>, Vec<u8>), TlsError> {
    let key = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::Certificate(format!("the relay's key: {e}")))?;
    let public = key
        .public_key()
        .ok_or_else(|| TlsError::Certificate("the relay's key has no public key".into()))?
        .as_ref()
        .to_vec();
    let signer = key.choose_scheme(schemes).ok_or_else(|| {
        TlsError::Certificate("the relay's key signs with no usable scheme".into())
    })?;
    Ok((signer, public))
}

/// Whether `signature` (TLS scheme `scheme`) over `message` verifies with the public key
/// `spki` (DER SubjectPublicKeyInfo).
pub(crate) fn verify_with(spki: &[u8], scheme: u16, message: &[u8], signature: &[u8]) -> bool {
    let spki = SubjectPublicKeyInfoDer::from(spki);
    let Ok(key) = webpki::RawPublicKeyEntity::try_from(&spki) else {
        return false;
    };
    let scheme = rustls::SignatureScheme::from(scheme);
    provider()
        .signature_verification_algorithms
        .mapping
        .iter()
        .filter(|(known, _)| *known == scheme)
        .flat_map(|(_, algorithms)| algorithms.iter())
        .any(|algorithm| key.verify_signature(*algorithm, message, signature).is_ok())
}

/// Client configuration that trusts exactly the pinned key (and the keys its relay's
/// followed rotations lead to, [`accepted_pins`]).
pub fn client_config(pin: [u8; 32]) -> Result<rustls::ClientConfig, TlsError> {
    verifying(Arc::new(PinnedVerifier {
        pins: accepted_pins(pin),
        seen: None,
        provider: provider(),
    }))
}

/// Client configuration for reading a relay's rotation statements only: it accepts
/// whatever key the relay presents (still checking the handshake signature with it)
/// and records that key's pin in `seen`. Nothing read over it is trusted but what the
/// statements, signed by the pinned key, prove.
pub fn probing_config(
    seen: Arc<Mutex<Option<[u8; 32]>>>,
) -> Result<rustls::ClientConfig, TlsError> {
    verifying(Arc::new(PinnedVerifier {
        pins: Vec::new(),
        seen: Some(seen),
        provider: provider(),
    }))
}

fn verifying(verifier: Arc<PinnedVerifier>) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::clone(&verifier.provider);
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// Accepts a certificate whose key (or, for old addresses, whose whole certificate) one
/// of the pins names, or with `seen` any certificate, recording its key's pin; verifies
/// handshake signatures with that certificate's key as usual.
#[derive(Debug)]
struct PinnedVerifier {
    pins: Vec<[u8; 32]>,
    seen: Option<Arc<Mutex<Option<[u8; 32]>>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(seen) = &self.seen {
            *seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(pin_of(end_entity));
            return Ok(ServerCertVerified::assertion());
        }
        // The key's pin, or (addresses from before key pins) the certificate's.
        let (key, certificate) = (pin_of(end_entity), certificate_pin_of(end_entity));
        if self
            .pins
            .iter()
            .any(|pin| *pin == key || *pin == certificate)
        {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(PIN_MISMATCH.into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
