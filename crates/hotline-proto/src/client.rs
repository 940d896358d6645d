//! The client side of the relay API: pinned TLS, signed requests.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hotline_core::codec::DecodeError;
use hotline_core::{DeviceIdentity, DeviceKey};
use serde_json::json;
use thiserror::Error;

use crate::auth;
use crate::capability::Capability;
use crate::stream::Appended;
use crate::tls::{self, TlsError};
use crate::{Log, Membership, Stored, decode_messages};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(transparent)]
    Address(#[from] TlsError),
    #[error("relay {relay} unreachable: {detail}")]
    Network { relay: String, detail: String },
    #[error("relay {relay} refused ({status} {code}): {detail}{}", retry_note(.retry_after))]
    Refused {
        relay: String,
        status: u16,
        code: String,
        detail: String,
        /// How long the relay asked to be left alone (`Retry-After`), when it said.
        retry_after: Option<Duration>,
    },
    #[error("relay {relay} answered something malformed: {0}", relay = .1)]
    Malformed(DecodeError, String),
    #[error("relay {relay} gave no proof of custody: {detail}")]
    BadReceipt { relay: String, detail: String },
    #[error(
        "relay {relay} unreachable: it presents a key its address does not pin, and no valid rotation to it: {detail}"
    )]
    Rotation { relay: String, detail: String },
}

impl ClientError {
    /// How long the relay asked to be left alone, when it did (429 with `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

fn retry_note(after: &Option<Duration>) -> String {
    match after {
        Some(after) => format!(" (retry after {} s)", after.as_secs()),
        None => String::new(),
    }
}

/// The longest `Retry-After` a device honours: a relay cannot silence a path for
/// longer than this by asking.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// A `Retry-After` header's delay (delta-seconds; an HTTP date is not honoured), at most
/// [`MAX_RETRY_AFTER`].
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// The relay's key rotations that lead from the pin of its address to the key it
/// presents now: each step (from, to pins) to remember, and the encoded statements that
/// prove them (see [`crate::rotation`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Followed {
    pub steps: Vec<crate::rotation::Step>,
    pub chain: Vec<u8>,
}

/// Reads the relay's key rotations (`GET /v1/rotation`) over a connection that accepts
/// whatever key the relay presents, and follows them from the pin of `url` to that key.
/// Nothing read is trusted but what statements signed by the pinned key prove; a relay
/// that presents a key no such statement leads to is refused.
pub async fn follow_rotation(url: &str) -> Result<Followed, ClientError> {
    let (base, pin) = tls::parse_url(url)?;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let network = |e: reqwest::Error| ClientError::Network {
        relay: base.clone(),
        detail: error_chain(&e),
    };
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls::probing_config(std::sync::Arc::clone(&seen))?)
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(network)?;
    let mut response = http
        .get(format!("{base}/v1/rotation"))
        .send()
        .await
        .map_err(network)?;
    let rotation = |detail: String| ClientError::Rotation {
        relay: base.clone(),
        detail,
    };
    if !response.status().is_success() {
        return Err(rotation(format!(
            "it publishes no rotation ({})",
            response.status()
        )));
    }
    let mut chain = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(network)? {
        if chain.len() + chunk.len() > crate::rotation::MAX_CHAIN_BYTES {
            return Err(rotation(
                "its rotation statements are over the size limit".into(),
            ));
        }
        chain.extend_from_slice(&chunk);
    }
    let statements = crate::rotation::decode_chain(&chain)
        .map_err(|e| ClientError::Malformed(e, base.clone()))?;
    let presented = seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .ok_or_else(|| rotation("no key seen".into()))?;
    let steps = crate::rotation::follow(&pin, &statements, &presented)
        .map_err(|e| rotation(e.to_string()))?;
    Ok(Followed { steps, chain })
}

/// A connection to one relay.
#[derive(Debug, Clone)]
pub struct RelayClient {
    base: String,
    pin: [u8; 32],
    http: reqwest::Client,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An error with its causes, which hold the useful part (a TLS refusal, a refused
/// connection).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// An append's `{"seq": n, "duplicate": b, "receipt": hex}` answer; `None` without a
/// sequence number or with a receipt that is not hex.
fn appended_of(answer: &serde_json::Value) -> Option<Appended> {
    let receipt = match answer["receipt"].as_str() {
        Some(receipt) => Some(hex::decode(receipt).ok()?),
        None => None,
    };
    Some(Appended {
        seq: answer["seq"].as_u64()?,
        duplicate: answer["duplicate"].as_bool().unwrap_or(false),
        receipt,
    })
}

/// [`appended_of`] of an answer's bytes, or why it is malformed.
fn parse_appended(answer: &[u8], relay: &str) -> Result<Appended, ClientError> {
    serde_json::from_slice::<serde_json::Value>(answer)
        .ok()
        .as_ref()
        .and_then(appended_of)
        .ok_or_else(|| {
            ClientError::Malformed(
                DecodeError::Invalid {
                    field: "append answer",
                    reason: "no sequence number, or a receipt that is not hex",
                },
                relay.to_owned(),
            )
        })
}

/// How long a connection to a relay may take to open. A relay that does not answer a
/// connection within it (down, stopping, or cut off) fails the request: every request
/// of a sync round waits at most this long on it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one request may take (a long poll: its wait, plus this).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl RelayClient {
    /// A client for the relay at `url` (`https://HOST:PORT/#sha256=PIN`).
    pub fn new(url: &str) -> Result<Self, ClientError> {
        let (base, pin) = tls::parse_url(url)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls::client_config(pin)?)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| ClientError::Network {
                relay: base.clone(),
                detail: e.to_string(),
            })?;
        Ok(Self { base, pin, http })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// An append's answer, once its receipt is checked: it must prove the message with
    /// `hash` stored in the channel's log at the answered number, by this relay.
    fn custody(
        &self,
        channel: &[u8; 32],
        hash: &[u8; 32],
        appended: Appended,
    ) -> Result<Appended, ClientError> {
        crate::custody::check_appended(&self.pin, &Log::Channel(*channel), hash, &appended)
            .map_err(|error| ClientError::BadReceipt {
                relay: self.base.clone(),
                detail: format!("message {}: {error}", appended.seq),
            })?;
        Ok(appended)
    }

    async fn send(
        &self,
        identity: &DeviceIdentity,
        method: reqwest::Method,
        path: String,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, ClientError> {
        self.send_within(identity, method, path, body, REQUEST_TIMEOUT, None)
            .await
    }

    /// `send`, presenting the capability to write to another device's inbox.
    async fn send_capable(
        &self,
        identity: &DeviceIdentity,
        method: reqwest::Method,
        path: String,
        body: Vec<u8>,
        capability: &Capability,
    ) -> Result<Vec<u8>, ClientError> {
        self.send_within(
            identity,
            method,
            path,
            body,
            REQUEST_TIMEOUT,
            Some(capability),
        )
        .await
    }

    /// `send`, given up after `timeout` (a long poll waits longer than a post).
    async fn send_within(
        &self,
        identity: &DeviceIdentity,
        method: reqwest::Method,
        path: String,
        body: Vec<u8>,
        timeout: Duration,
        capability: Option<&Capability>,
    ) -> Result<Vec<u8>, ClientError> {
        let network = |e: reqwest::Error| ClientError::Network {
            relay: self.base.clone(),
            detail: error_chain(&e),
        };
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        for (name, value) in auth::sign_request(identity, method.as_str(), &path, now_ms(), &body) {
            request = request.header(name, value);
        }
        if let Some(capability) = capability {
            request = request.header(crate::capability::HEADER, capability.to_hex());
        }
        let response = request
            .timeout(timeout)
            .body(body)
            .send()
            .await
            .map_err(network)?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let bytes = response.bytes().await.map_err(network)?.to_vec();
        if status.is_success() {
            return Ok(bytes);
        }
        let problem: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        Err(ClientError::Refused {
            relay: self.base.clone(),
            status: status.as_u16(),
            code: problem["code"].as_str().unwrap_or("unknown").to_owned(),
            detail: problem["detail"].as_str().unwrap_or("").to_owned(),
            retry_after,
        })
    }

    /// Registers a channel's membership, signed by `committer` (this identity).
    pub async fn register(
        &self,
        committer: &DeviceIdentity,
        channel: &[u8; 32],
        membership: &Membership,
    ) -> Result<(), ClientError> {
        let signature = committer.sign(&auth::membership_message(channel, membership));
        let body = json!({
            "committer": hex::encode(membership.committer),
            "version": membership.version,
            "members": membership.members.iter().map(hex::encode).collect::<Vec<_>>(),
            "signature": hex::encode(signature),
        });
        self.send(
            committer,
            reqwest::Method::PUT,
            format!("/v1/channels/{}/members", hex::encode(channel)),
            body.to_string().into_bytes(),
        )
        .await
        .map(|_| ())
    }

    /// Posts a message; returns its sequence number (and the relay's receipt) once the
    /// relay stored it durably.
    pub async fn post(
        &self,
        identity: &DeviceIdentity,
        channel: &[u8; 32],
        bytes: Vec<u8>,
    ) -> Result<Appended, ClientError> {
        let hash = crate::custody::message_hash(&bytes);
        let appended = self.post_unchecked(identity, channel, bytes).await?;
        self.custody(channel, &hash, appended)
    }

    /// [`post`](Self::post) for a message whose custody nobody keeps (a link test, a
    /// delivery or read receipt): the relay's receipt is not checked.
    pub async fn post_unchecked(
        &self,
        identity: &DeviceIdentity,
        channel: &[u8; 32],
        bytes: Vec<u8>,
    ) -> Result<Appended, ClientError> {
        self.append(
            identity,
            format!("/v1/channels/{}/messages", hex::encode(channel)),
            bytes,
        )
        .await
    }

    /// Posts several messages to a channel in one signed request (at most
    /// [`MAX_BATCH`](crate::batch::MAX_BATCH)); they are appended in order. One answer
    /// per message, in order: its sequence number once stored durably, or why the relay
    /// refused that one.
    pub async fn post_batch(
        &self,
        identity: &DeviceIdentity,
        channel: &[u8; 32],
        messages: &[Vec<u8>],
    ) -> Result<Vec<Result<Appended, ClientError>>, ClientError> {
        let answer = self
            .send(
                identity,
                reqwest::Method::POST,
                format!("/v1/channels/{}/batch", hex::encode(channel)),
                crate::batch::encode_batch(messages),
            )
            .await?;
        let answer: serde_json::Value = serde_json::from_slice(&answer).map_err(|_| {
            ClientError::Malformed(
                hotline_core::codec::DecodeError::Invalid {
                    field: "batch answer",
                    reason: "not one result per message",
                },
                self.base.clone(),
            )
        })?;
        let results = answer["results"].as_array().cloned().unwrap_or_default();
        if results.len() != messages.len() {
            return Err(ClientError::Malformed(
                hotline_core::codec::DecodeError::Invalid {
                    field: "batch answer",
                    reason: "not one result per message",
                },
                self.base.clone(),
            ));
        }
        Ok(results
            .iter()
            .zip(messages)
            .map(|(result, message)| match appended_of(result) {
                Some(appended) => {
                    self.custody(channel, &crate::custody::message_hash(message), appended)
                }
                None => Err(ClientError::Refused {
                    relay: self.base.clone(),
                    status: 200,
                    code: result["error"].as_str().unwrap_or("unknown").to_owned(),
                    detail: result["detail"].as_str().unwrap_or("").to_owned(),
                    retry_after: None,
                }),
            })
            .collect())
    }

    /// Messages after `after`, waiting up to `wait` for new ones.
    pub async fn fetch(
        &self,
        identity: &DeviceIdentity,
        channel: &[u8; 32],
        after: u64,
        wait: Duration,
    ) -> Result<Vec<Stored>, ClientError> {
        self.read(
            identity,
            format!("/v1/channels/{}/messages", hex::encode(channel)),
            after,
            wait,
        )
        .await
    }

    /// Leaves an invitation in a device's inbox, presenting the capability derived
    /// from its card.
    pub async fn post_inbox(
        &self,
        identity: &DeviceIdentity,
        device: &[u8; 32],
        capability: &Capability,
        bytes: Vec<u8>,
    ) -> Result<u64, ClientError> {
        let answer = self
            .send_capable(
                identity,
                reqwest::Method::POST,
                format!("/v1/inbox/{}", hex::encode(device)),
                bytes,
                capability,
            )
            .await?;
        Ok(parse_appended(&answer, &self.base)?.seq)
    }

    /// This device's invitations after `after`.
    pub async fn fetch_inbox(
        &self,
        identity: &DeviceIdentity,
        after: u64,
        wait: Duration,
    ) -> Result<Vec<Stored>, ClientError> {
        self.read(
            identity,
            format!("/v1/inbox/{}", identity.key()),
            after,
            wait,
        )
        .await
    }

    /// Tells the relay this device committed a channel's messages up to `seq`.
    pub async fn ack(
        &self,
        identity: &DeviceIdentity,
        channel: &[u8; 32],
        seq: u64,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/channels/{}/ack", hex::encode(channel));
        self.send(
            identity,
            reqwest::Method::POST,
            path,
            json!({"seq": seq}).to_string().into_bytes(),
        )
        .await
        .map(|_| ())
    }

    /// Tells the relay this device handled its invitations up to `seq`.
    pub async fn ack_inbox(&self, identity: &DeviceIdentity, seq: u64) -> Result<(), ClientError> {
        let path = format!("/v1/inbox/{}/ack", identity.key());
        self.send(
            identity,
            reqwest::Method::POST,
            path,
            json!({"seq": seq}).to_string().into_bytes(),
        )
        .await
        .map(|_| ())
    }

    /// Stocks this device's one-time key packages on the relay (at most
    /// [`MAX_BATCH`](crate::batch::MAX_BATCH) per request, each at most
    /// [`MAX_KEY_PACKAGE`](crate::limits::MAX_KEY_PACKAGE) bytes). All or nothing: a
    /// stock that would exceed
    /// [`MAX_KEY_PACKAGE_STOCK`](crate::limits::MAX_KEY_PACKAGE_STOCK) is refused
    /// (409 `stock-full`). Returns how many are in stock after.
    pub async fn stock_key_packages(
        &self,
        identity: &DeviceIdentity,
        packages: &[Vec<u8>],
    ) -> Result<u64, ClientError> {
        let answer = self
            .send(
                identity,
                reqwest::Method::POST,
                format!("/v1/keypackages/{}", identity.key()),
                crate::batch::encode_batch(packages),
            )
            .await?;
        self.stock_answer(&answer)
    }

    /// How many of this device's key packages the relay has in stock.
    pub async fn key_package_stock(&self, identity: &DeviceIdentity) -> Result<u64, ClientError> {
        let answer = self
            .send(
                identity,
                reqwest::Method::GET,
                format!("/v1/keypackages/{}", identity.key()),
                Vec::new(),
            )
            .await?;
        self.stock_answer(&answer)
    }

    /// Takes `device`'s oldest key package from the relay's stock (no one else gets
    /// it), presenting the capability from its card; `None` if the relay has none in
    /// stock for that device.
    pub async fn claim_key_package(
        &self,
        identity: &DeviceIdentity,
        device: &DeviceKey,
        capability: &Capability,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        match self
            .send_capable(
                identity,
                reqwest::Method::POST,
                format!("/v1/keypackages/{device}/claim"),
                Vec::new(),
                capability,
            )
            .await
        {
            Ok(package) => Ok(Some(package)),
            Err(ClientError::Refused {
                status: 404, code, ..
            }) if code == "no-key-package" => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The `stock` of a `{"stock": n}` answer.
    fn stock_answer(&self, answer: &[u8]) -> Result<u64, ClientError> {
        serde_json::from_slice::<serde_json::Value>(answer)
            .ok()
            .and_then(|v| v["stock"].as_u64())
            .ok_or_else(|| {
                ClientError::Malformed(
                    DecodeError::Invalid {
                        field: "stock answer",
                        reason: "no stock count",
                    },
                    self.base.clone(),
                )
            })
    }

    /// POSTs to a log; the answer.
    async fn append(
        &self,
        identity: &DeviceIdentity,
        path: String,
        bytes: Vec<u8>,
    ) -> Result<Appended, ClientError> {
        let answer = self
            .send(identity, reqwest::Method::POST, path, bytes)
            .await?;
        parse_appended(&answer, &self.base)
    }

    /// GETs a log after a cursor.
    async fn read(
        &self,
        identity: &DeviceIdentity,
        path: String,
        after: u64,
        wait: Duration,
    ) -> Result<Vec<Stored>, ClientError> {
        let path = format!("{path}?after={after}&wait={}", wait.as_millis());
        let bytes = self
            .send_within(
                identity,
                reqwest::Method::GET,
                path,
                Vec::new(),
                wait + REQUEST_TIMEOUT,
                None,
            )
            .await?;
        decode_messages(&bytes).map_err(|e| ClientError::Malformed(e, self.base.clone()))
    }
}
