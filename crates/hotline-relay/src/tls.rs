//! The relay's self-signed certificate; the address and the client's pin on it are
//! `hotline_proto::tls` (re-exported here).
//!
//! On first start the relay creates a certificate (rcgen) in its data directory. Its
//! address carries the SHA-256 of that certificate: `https://HOST:PORT/#sha256=HEX`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::PublicKeyData;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub use hotline_proto::tls::*;

const CERTIFICATE: &str = "relay-cert.der";
const KEY: &str = "relay-key.der";
/// The relay's key rotations, oldest first (see `hotline_proto::rotation`).
const ROTATIONS: &str = "relay-rotations.bin";

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    let path = path.display().to_string();
    move |source| TlsError::Io { path, source }
}

/// Writes `bytes` to `path` (0600) through `path.new`, synced, then renamed over it.
fn replace(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let fresh = path.with_extension("new");
    let _ = std::fs::remove_file(&fresh);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&fresh)
        .map_err(io_error(&fresh))?;
    file.write_all(bytes).map_err(io_error(&fresh))?;
    file.sync_all().map_err(io_error(&fresh))?;
    std::fs::rename(&fresh, path).map_err(io_error(path))?;
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// The relay's key rotations as it serves them (encoded; empty if its key never
/// rotated).
pub fn load_rotations(dir: &Path) -> Result<Vec<u8>, TlsError> {
    let path = dir.join(ROTATIONS);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(bytes),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(error) => Err(io_error(&path)(error)),
    }
}

/// Gives the relay a new key and a certificate for it, and a statement signed by the
/// old key that names the new one, appended to the relay's rotations: devices that pin
/// the old key follow it. The old key is set aside as `relay-key.retired-TIME.der`
/// (0600; nothing needs it any more: receipts it signed carry their public key). The
/// running relay serves the new key from its next start. Returns the new certificate.
pub fn rotate_key(dir: &Path) -> Result<CertificateDer<'static>, TlsError> {
    let failed = |e: rcgen::Error| TlsError::Certificate(e.to_string());
    let key_path = dir.join(KEY);
    let old = std::fs::read(&key_path).map_err(io_error(&key_path))?;
    let old_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(old.clone()));
    let fresh = fresh_key().map_err(failed)?;
    let certificate = certificate_for(&fresh).map_err(failed)?;
    let time_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let statement = hotline_proto::rotation::Rotation::sign(
        &old_key,
        &fresh.subject_public_key_info(),
        time_ms,
    )?;
    let existing = load_rotations(dir)?;
    let mut chain = if existing.is_empty() {
        Vec::new()
    } else {
        hotline_proto::rotation::decode_chain(&existing)
            .map_err(|e| TlsError::Certificate(format!("{ROTATIONS}: {e}")))?
    };
    if chain.len() >= hotline_proto::rotation::MAX_CHAIN {
        return Err(TlsError::Certificate(format!(
            "the relay's key rotated {} times already, the most devices follow",
            chain.len()
        )));
    }
    chain.push(statement);
    // The statement first: a key is never served without the statement leading to it.
    replace(
        &dir.join(ROTATIONS),
        &hotline_proto::rotation::encode_chain(&chain),
    )?;
    replace(&dir.join(format!("relay-key.retired-{time_ms}.der")), &old)?;
    replace(&key_path, &fresh.serialize_der())?;
    replace(&dir.join(CERTIFICATE), certificate.der())?;
    Ok(certificate.der().clone())
}

/// A new relay key: Ed25519, whose signatures (TLS handshakes, custody receipts, key
/// rotations) every device verifies in about 60 % of the time an ECDSA P-256 one takes.
/// Relays made with P-256 keys keep them and work as before.
fn fresh_key() -> Result<rcgen::KeyPair, rcgen::Error> {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
}

/// A self-signed certificate for `key` with a random serial number: a renewed one
/// differs from the one it replaces even where the key's signatures are deterministic
/// (Ed25519).
fn certificate_for(key: &rcgen::KeyPair) -> Result<rcgen::Certificate, rcgen::Error> {
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "hotline-relay".into()])?;
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    params.self_signed(key)
}

/// The relay's certificate and key, created on first use.
pub fn load_or_create(
    dir: &Path,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| TlsError::Io { path, source }
    };
    let (cert_path, key_path) = (dir.join(CERTIFICATE), dir.join(KEY));
    if !cert_path.exists() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let failed = |e: rcgen::Error| TlsError::Certificate(e.to_string());
        let key = fresh_key().map_err(failed)?;
        let certificate = certificate_for(&key).map_err(failed)?;
        for (path, bytes) in [
            (&key_path, key.serialize_der()),
            (&cert_path, certificate.der().to_vec()),
        ] {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io(path))?;
            file.write_all(&bytes).map_err(io(path))?;
            file.sync_all().map_err(io(path))?;
        }
    }
    let cert = std::fs::read(&cert_path).map_err(io(&cert_path))?;
    let key = std::fs::read(&key_path).map_err(io(&key_path))?;
    Ok((
        CertificateDer::from(cert),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
    ))
}

/// Issues the relay a new certificate for the key it has (the address and its pin stay
/// the same): written beside the old one, synced, then renamed over it. The running
/// relay serves it after SIGHUP or its next start.
pub fn renew_certificate(dir: &Path) -> Result<CertificateDer<'static>, TlsError> {
    let key_path = dir.join(KEY);
    let key = std::fs::read(&key_path).map_err(io_error(&key_path))?;
    let failed = |e: rcgen::Error| TlsError::Certificate(e.to_string());
    let key_pair = rcgen::KeyPair::try_from(key.as_slice()).map_err(failed)?;
    let certificate = certificate_for(&key_pair).map_err(failed)?;
    replace(&dir.join(CERTIFICATE), certificate.der())?;
    Ok(certificate.der().clone())
}

/// The relay's TLS configuration, as `server_config` builds it: TLS 1.3 with the
/// relay's certificate, ALPN `hotline-stream/1` or `http/1.1`.
pub use rustls::ServerConfig;

pub fn server_config(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    // The stream protocol, or the one-shot HTTP routes (also for clients that offer
    // no ALPN at all).
    config.alpn_protocols = vec![hotline_proto::stream::ALPN.to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
