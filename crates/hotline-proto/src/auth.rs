//! Request authentication and membership registration, shared by relay and client.
//!
//! A device signs every request with its Ed25519 key over
//! `"hotline-relay-request-v1\n" METHOD "\n" PATH?QUERY "\n" TIME-MS "\n" hex(SHA-256(body))`,
//! sent in the headers `hotline-device` (hex key), `hotline-time`, `hotline-signature`
//! (hex) and `hotline-content-sha256` (the body's hash, hex), so that a relay checks the
//! signature before it reads the body ([`verify_headers`]) and the body against the
//! hash after. The relay accepts a time within ±5 minutes of its clock.
//!
//! A channel's membership is registered by its committer, signed over
//! `"hotline-relay-members-v1" || channel || u64 version || committer || sorted keys`.
//! The first registration of a channel names its committer (trust on first use at
//! the relay); later ones must be signed by the committer registered, carry a higher
//! version, and may name a new committer (hand-over).

use std::collections::HashMap;
use std::sync::Mutex;

use ed25519_dalek::{Signature, VerifyingKey};
use hotline_core::{DeviceIdentity, DeviceKey};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::Membership;

pub const DEVICE: &str = "hotline-device";
pub const TIME: &str = "hotline-time";
pub const SIGNATURE: &str = "hotline-signature";
pub const CONTENT: &str = "hotline-content-sha256";
/// How far a request's time may be from the relay's clock.
pub const WINDOW_MS: u64 = 5 * 60 * 1000;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    #[error("missing or malformed authentication headers")]
    Missing,
    #[error("request time is outside the accepted window; check this machine's clock")]
    Stale,
    #[error("request signature does not verify")]
    BadSignature,
    #[error("the body does not match the hash its signature covers")]
    BodyMismatch,
}

fn message_with_hash(method: &str, path: &str, time_ms: u64, hash: &[u8; 32]) -> Vec<u8> {
    format!(
        "hotline-relay-request-v1\n{method}\n{path}\n{time_ms}\n{}",
        hex::encode(hash)
    )
    .into_bytes()
}

/// The three authentication headers for a request.
pub fn sign_request(
    identity: &DeviceIdentity,
    method: &str,
    path: &str,
    time_ms: u64,
    body: &[u8],
) -> [(&'static str, String); 4] {
    let hash: [u8; 32] = Sha256::digest(body).into();
    let signature = identity.sign(&message_with_hash(method, path, time_ms, &hash));
    [
        (DEVICE, identity.key().to_string()),
        (TIME, time_ms.to_string()),
        (SIGNATURE, hex::encode(signature)),
        (CONTENT, hex::encode(hash)),
    ]
}

/// Device keys already decompressed (an Ed25519 point decompression per request was
/// about 8 % of the relay's CPU under load). Bounded: emptied when full.
#[derive(Debug, Default)]
pub struct KeyCache {
    keys: Mutex<HashMap<[u8; 32], VerifyingKey>>,
}

/// Most keys a [`KeyCache`] holds before it starts over.
pub const KEY_CACHE_SIZE: usize = 65_536;

impl KeyCache {
    /// Checks `signature` over `message` by `key` strictly, as
    /// [`DeviceKey::verify`](hotline_core::DeviceKey::verify) does.
    pub fn verify(
        &self,
        key: &DeviceKey,
        message: &[u8],
        signature: &[u8; 64],
    ) -> Result<(), AuthError> {
        let cached = self
            .keys
            .lock()
            .ok()
            .and_then(|keys| keys.get(&key.0).copied());
        let verifying = match cached {
            Some(verifying) => verifying,
            None => {
                let verifying =
                    VerifyingKey::from_bytes(&key.0).map_err(|_| AuthError::BadSignature)?;
                if let Ok(mut keys) = self.keys.lock() {
                    if keys.len() >= KEY_CACHE_SIZE {
                        keys.clear();
                    }
                    keys.insert(key.0, verifying);
                }
                verifying
            }
        };
        verifying
            .verify_strict(message, &Signature::from_bytes(signature))
            .map_err(|_| AuthError::BadSignature)
    }
}

/// The headers of a request, as [`verify_headers`] takes them.
#[derive(Debug, Clone, Copy)]
pub struct Headers<'a> {
    pub device: Option<&'a str>,
    pub time: Option<&'a str>,
    pub signature: Option<&'a str>,
    /// The declared SHA-256 of the body; `None` is an empty body's.
    pub content: Option<&'a str>,
}

/// Checks a request's signature over the body hash its headers declare, before the
/// body is read: the authenticated device, and the hash the body must have.
pub fn verify_headers(
    keys: &KeyCache,
    headers: Headers<'_>,
    method: &str,
    path: &str,
    now_ms: u64,
) -> Result<(DeviceKey, [u8; 32]), AuthError> {
    let (Some(device), Some(time), Some(signature)) =
        (headers.device, headers.time, headers.signature)
    else {
        return Err(AuthError::Missing);
    };
    let hash: [u8; 32] = match headers.content {
        Some(content) => {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(content, &mut hash).map_err(|_| AuthError::Missing)?;
            hash
        }
        None => Sha256::digest(b"").into(),
    };
    let mut key = [0u8; 32];
    hex::decode_to_slice(device, &mut key).map_err(|_| AuthError::Missing)?;
    let time_ms: u64 = time.parse().map_err(|_| AuthError::Missing)?;
    let mut sig = [0u8; 64];
    hex::decode_to_slice(signature, &mut sig).map_err(|_| AuthError::Missing)?;
    if time_ms.abs_diff(now_ms) > WINDOW_MS {
        return Err(AuthError::Stale);
    }
    let key = DeviceKey(key);
    keys.verify(&key, &message_with_hash(method, path, time_ms, &hash), &sig)?;
    Ok((key, hash))
}

/// Checks a request's headers against its body; returns the authenticated device.
#[allow(clippy::too_many_arguments)]
pub fn verify_request(
    keys: &KeyCache,
    device: Option<&str>,
    time: Option<&str>,
    signature: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
    now_ms: u64,
) -> Result<DeviceKey, AuthError> {
    let content = hex::encode(Sha256::digest(body));
    let headers = Headers {
        device,
        time,
        signature,
        content: Some(&content),
    };
    verify_headers(keys, headers, method, path, now_ms).map(|(key, _)| key)
}

/// The bytes a committer signs to register a channel's membership.
pub fn membership_message(channel: &[u8; 32], membership: &Membership) -> Vec<u8> {
    let mut members = membership.members.clone();
    members.sort();
    let mut out = b"hotline-relay-members-v1".to_vec();
    out.extend_from_slice(channel);
    out.extend_from_slice(&membership.version.to_be_bytes());
    out.extend_from_slice(&membership.committer);
    for member in members {
        out.extend_from_slice(&member);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn cached_keys_verify_exactly_as_fresh_ones() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let identity = DeviceIdentity::generate("north", "desk", &mut rng).unwrap();
        let cache = KeyCache::default();
        let signature = identity.sign(b"request");
        for _ in 0..2 {
            // First from scratch, then from the cache: same answers.
            assert_eq!(
                cache.verify(&identity.key(), b"request", &signature),
                Ok(())
            );
            assert_eq!(
                cache.verify(&identity.key(), b"another request", &signature),
                Err(AuthError::BadSignature)
            );
            let mut flipped = signature;
            flipped[0] ^= 1;
            assert_eq!(
                cache.verify(&identity.key(), b"request", &flipped),
                Err(AuthError::BadSignature)
            );
        }
        // Not a point on the curve: refused, and not cached.
        let mut bad = [0u8; 32];
        bad[31] = 0x80;
        bad[0] = 2;
        assert_eq!(
            cache.verify(&DeviceKey(bad), b"request", &signature),
            Err(AuthError::BadSignature)
        );
        assert_eq!(cache.keys.lock().unwrap().len(), 1);
    }
}
