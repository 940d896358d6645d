//! The relay's address and the client's pin on its certificate.
//!
//! A relay's address carries the SHA-256 of its public key (the certificate's
//! SubjectPublicKeyInfo): `https://HOST:PORT/#sha256=HEX`. The client accepts a
//! certificate only with exactly that key (or, for addresses printed before key pins,
//! exactly that certificate) and still checks the handshake signature, so a replayed
//! certificate without its key fails, and a certificate renewed with the same key keeps
//! every member connected. TLS 1.3 only; one crypto provider (ring), installed explicitly.

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
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

/// Client configuration that trusts exactly the pinned certificate.
pub fn client_config(pin: [u8; 32]) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedVerifier {
        pin,
        provider: Arc::clone(&provider),
    });
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// Accepts the one certificate whose hash is the pin; verifies handshake signatures
/// with that certificate's key as usual.
#[derive(Debug)]
struct PinnedVerifier {
    pin: [u8; 32],
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
        // The key's pin, or (addresses from before key pins) the certificate's.
        if pin_of(end_entity) == self.pin || certificate_pin_of(end_entity) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the relay's certificate does not match the pin in its address".into(),
            ))
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
