//! The relay's self-signed certificate; the address and the client's pin on it are
//! `hotline_proto::tls` (re-exported here).
//!
//! On first start the relay creates a certificate (rcgen) in its data directory. Its
//! address carries the SHA-256 of that certificate: `https://HOST:PORT/#sha256=HEX`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub use hotline_proto::tls::*;

const CERTIFICATE: &str = "relay-cert.der";
const KEY: &str = "relay-key.der";

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
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".into(), "hotline-relay".into()])
                .map_err(|e| TlsError::Certificate(e.to_string()))?;
        for (path, bytes) in [
            (&key_path, certified.signing_key.serialize_der()),
            (&cert_path, certified.cert.der().to_vec()),
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
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| TlsError::Io { path, source }
    };
    let key_path = dir.join(KEY);
    let key = std::fs::read(&key_path).map_err(io(&key_path))?;
    let failed = |e: rcgen::Error| TlsError::Certificate(e.to_string());
    let key_pair = rcgen::KeyPair::try_from(key.as_slice()).map_err(failed)?;
    let certificate =
        rcgen::CertificateParams::new(vec!["localhost".into(), "hotline-relay".into()])
            .and_then(|params| params.self_signed(&key_pair))
            .map_err(failed)?;
    let (path, fresh) = (
        dir.join(CERTIFICATE),
        dir.join(format!("{CERTIFICATE}.new")),
    );
    let _ = std::fs::remove_file(&fresh);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&fresh)
        .map_err(io(&fresh))?;
    file.write_all(certificate.der()).map_err(io(&fresh))?;
    file.sync_all().map_err(io(&fresh))?;
    std::fs::rename(&fresh, &path).map_err(io(&path))?;
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
