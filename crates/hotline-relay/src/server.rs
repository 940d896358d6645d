//! The relay server: axum over rustls, with bounds on everything.
//!
//! Routes (v1; errors are JSON problem documents with a stable `code`, see
//! `docs/openapi.yaml`):
//! - `GET /healthz`
//! - `GET /metrics` (Prometheus text)
//! - `PUT /v1/channels/{channel}/members`: membership, signed by the committer
//! - `POST /v1/channels/{channel}/messages`: append (members only), answered after fsync
//! - `GET /v1/channels/{channel}/messages?after=N&wait=MS`: read (members only), long-poll
//! - `POST /v1/inbox/{device}`: leave an invitation (any authenticated device)
//! - `GET /v1/inbox/{device}?after=N&wait=MS`: read one's own inbox
//! - `POST /v1/keypackages/{device}`: stock one's own one-time key packages (a batch)
//! - `GET /v1/keypackages/{device}`: how many of one's own are in stock
//! - `POST /v1/keypackages/{device}/claim`: take the device's oldest key package
//!   (any authenticated device)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use hotline_core::DeviceKey;
use hotline_proto::capability;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::admission::{Admission, CONNECTION};
use crate::auth::{self, AuthError};
use crate::storage::{Appended, Log, Membership, Quotas, RelayStorage, StorageError, Stored};
pub use hotline_proto::batch::{MAX_BATCH, decode_batch, encode_batch};
pub use hotline_proto::encode_messages;
pub use hotline_proto::limits::{MAX_KEY_PACKAGE, MAX_KEY_PACKAGE_STOCK, MAX_MESSAGE};

/// How often the relay measures the bytes its logs hold (the storage bound counts this
/// process's appends in between; other processes sharing the database are seen at the
/// next measure).
/// Most message bytes one read answers with (at least one message, whatever its size):
/// a read's memory is bounded by bytes, not by its count of messages alone.
pub const READ_BYTES: usize = 8 << 20;

const USAGE_INTERVAL: Duration = Duration::from_secs(10);

/// The kernel's queue of connections waiting to be accepted (capped by
/// `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;

// Linux error numbers of an accept that fails for want of resources.
const ENOMEM: i32 = 12;
const ENFILE: i32 = 23;
const EMFILE: i32 = 24;
const ENOBUFS: i32 = 105;

/// Limits, all configurable.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message: usize,
    pub max_connections: usize,
    /// Connections no request has authenticated on yet, in total and from one source
    /// address: beyond either, the oldest of them is closed (see `admission`).
    pub max_pending: usize,
    pub max_pending_per_source: usize,
    /// Time for a client to finish its TLS handshake and request headers.
    pub header_timeout: Duration,
    /// Time for a whole request body.
    pub body_timeout: Duration,
    /// Sustained requests per second per device, and burst.
    pub rate_per_second: f64,
    pub rate_burst: f64,
    /// Sustained bytes per second one device may have stored, and burst (a device that
    /// sends more waits: 429).
    pub sender_bytes_per_second: f64,
    pub sender_burst_bytes: f64,
    /// Bytes one channel's log may hold, and one device's inbox (507 beyond).
    pub quota_per_log: u64,
    pub quota_per_inbox: u64,
    /// Bytes the relay holds in all its logs together (507 `storage-full` beyond).
    pub max_storage: u64,
    pub max_wait: Duration,
    /// Messages older than this are deleted even if not every member acknowledged them.
    pub retention: Duration,
    /// How often retention runs.
    pub sweep_interval: Duration,
    /// The devices that may register new channels here (their committers), if the
    /// operator named them: a stranger's fresh key then cannot open a channel's log at
    /// all. `None`: anyone may (each channel within its quota, all within the storage
    /// bound).
    pub committers: Option<Vec<[u8; 32]>>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message: 1 << 20,
            max_connections: 1024,
            max_pending: 256,
            max_pending_per_source: 64,
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(30),
            rate_per_second: 200.0,
            rate_burst: 400.0,
            sender_bytes_per_second: (1 << 20) as f64,
            sender_burst_bytes: (64 << 20) as f64,
            quota_per_log: 1 << 30,
            quota_per_inbox: 16 << 20,
            max_storage: 32 << 30,
            max_wait: Duration::from_secs(30),
            retention: Duration::from_secs(30 * 24 * 3600),
            sweep_interval: Duration::from_secs(3600),
            committers: None,
        }
    }
}

impl Limits {
    /// The per-log bounds the storage enforces.
    pub fn quotas(&self) -> Quotas {
        Quotas {
            per_log: self.quota_per_log,
            per_inbox: self.quota_per_inbox,
        }
    }
}

/// Stream connections one device may hold on a relay at once.
pub(crate) const STREAMS_PER_DEVICE: usize = 8;

/// A counted stream connection (see [`AppState::hold_stream`]).
pub(crate) struct StreamHeld<S: RelayStorage> {
    state: Arc<AppState<S>>,
    device: DeviceKey,
}

impl<S: RelayStorage> Drop for StreamHeld<S> {
    fn drop(&mut self) {
        let mut streams = self.state.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = streams.get_mut(&self.device) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                streams.remove(&self.device);
            }
        }
    }
}

/// A device's allowance: requests and bytes (token buckets), as of `last`.
struct Allowance {
    requests: f64,
    bytes: f64,
    last: Instant,
}

pub(crate) struct AppState<S> {
    pub(crate) storage: S,
    pub(crate) limits: Limits,
    /// The relay's signing key (receipts) and its key's rotations.
    notary: Arc<crate::storage::Notary>,
    /// Per log, the readers waiting for its next append here (the entry made by the
    /// first, dropped when none waits): an append wakes its own log's readers only.
    appended: crate::storage::Waiters,
    /// What this process appended last, for subscribers waiting at the end of a log.
    recent: std::sync::Mutex<Recent>,
    /// The last sequence number this process appended to each log: a subscription that
    /// took all of them skips its first read, and a reader woken without its log growing
    /// goes back to waiting without reading anything.
    heads: std::sync::Mutex<HashMap<Log, u64>>,
    /// How many memberships this process registered: a push that checked membership
    /// under an older count checks again before it pushes more.
    pub(crate) memberships_set: AtomicU64,
    buckets: std::sync::Mutex<HashMap<DeviceKey, Allowance>>,
    /// Stream connections per device.
    streams: std::sync::Mutex<HashMap<DeviceKey, usize>>,
    /// Bytes held in all logs: read from the storage now and then (other processes,
    /// deletions), counted up by this process's appends in between.
    used: AtomicU64,
    keys: auth::KeyCache,
    pub(crate) metrics: Metrics,
    /// Held from counting a stock to appending to it, so that two stocking requests
    /// in this process cannot both fill the last places.
    stocking: tokio::sync::Mutex<()>,
    admission: Arc<Admission>,
}

/// The messages this process appended last (at most [`RECENT`], [`RECENT_BYTES`]),
/// as stored: a subscriber woken by an append at the end of its log takes it from here
/// instead of reading the storage again. A message once stored never changes, so a
/// copy is as good as a read; anything not here (older, appended by another process
/// or in a batch) is read from the storage.
#[derive(Default)]
pub(crate) struct Recent {
    messages: std::collections::VecDeque<(Log, Stored)>,
    bytes: usize,
}

const RECENT: usize = 64;
const RECENT_BYTES: usize = 2 << 20;

impl Recent {
    fn push(&mut self, log: Log, stored: Stored) {
        self.bytes += stored.bytes.len();
        self.messages.push_back((log, stored));
        while self.messages.len() > RECENT || self.bytes > RECENT_BYTES {
            let Some((_, oldest)) = self.messages.pop_front() else {
                break;
            };
            self.bytes -= oldest.bytes.len();
        }
    }

    /// `log`'s messages from `after + 1` on, in order and without a gap, at most
    /// `limit` and (but the first) `max_bytes`; `None` unless the first is here.
    fn after(&self, log: &Log, after: u64, limit: usize, max_bytes: usize) -> Option<Vec<Stored>> {
        let mut out: Vec<Stored> = Vec::new();
        let mut bytes = 0;
        // Appends of one group commit may be answered out of order.
        while out.len() < limit {
            let next = out.last().map_or(after, |last| last.seq) + 1;
            let Some((_, stored)) = self
                .messages
                .iter()
                .find(|(at, stored)| at == log && stored.seq == next)
            else {
                break;
            };
            if !out.is_empty() && bytes + stored.bytes.len() > max_bytes {
                break;
            }
            bytes += stored.bytes.len();
            out.push(stored.clone());
        }
        (!out.is_empty()).then_some(out)
    }
}

#[derive(Default)]
pub(crate) struct Metrics {
    stored: AtomicU64,
    /// Of `stored`, those appended over stream connections.
    pub(crate) stored_over_streams: AtomicU64,
    pub(crate) acknowledged_over_streams: AtomicU64,
    /// Reads of a log from the storage by readers waiting for messages (the rest are
    /// served from memory, or skipped when an append was to another log).
    storage_reads: AtomicU64,
    stored_bytes: AtomicU64,
    duplicates: AtomicU64,
    connections: AtomicU64,
    accept_paused: AtomicU64,
    rejected: std::sync::Mutex<HashMap<&'static str, u64>>,
    commit_buckets: std::sync::Mutex<[u64; 8]>,
    commit_sum: std::sync::Mutex<f64>,
}

const COMMIT_BOUNDS: [f64; 7] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25];

/// Counters as of one moment, for the relay's summary line once a minute.
#[derive(Debug, Default, Clone, Copy)]
struct Summary {
    stored: u64,
    duplicates: u64,
    refused: u64,
    evicted: u64,
}

impl Summary {
    fn now<S>(state: &AppState<S>) -> Self {
        Self {
            stored: state.metrics.stored.load(Ordering::Relaxed),
            duplicates: state.metrics.duplicates.load(Ordering::Relaxed),
            refused: state
                .metrics
                .rejected
                .lock()
                .map(|r| r.values().sum())
                .unwrap_or(0),
            evicted: state.admission.evicted(),
        }
    }

    /// Logs what changed since `before` (nothing if nothing did); returns `self`.
    fn log_since(self, before: &Summary) -> Self {
        let delta = |now: u64, then: u64| now.saturating_sub(then);
        let (stored, duplicates, refused, evicted) = (
            delta(self.stored, before.stored),
            delta(self.duplicates, before.duplicates),
            delta(self.refused, before.refused),
            delta(self.evicted, before.evicted),
        );
        if stored + duplicates + refused + evicted > 0 {
            tracing::info!(
                stored,
                duplicates,
                refused,
                pending_closed = evicted,
                "last minute"
            );
        }
        self
    }
}

/// A refusal, as a problem document.
#[derive(Debug)]
pub(crate) struct Problem {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) detail: String,
    /// When asking again can succeed (sent as `Retry-After`, whole seconds).
    pub(crate) retry_after: Option<Duration>,
}

impl Problem {
    pub(crate) fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub(crate) fn retry_after(self, after: Duration) -> Self {
        Self {
            retry_after: Some(after),
            ..self
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = json!({
            "type": format!("https://hotline.invalid/problems/{}", self.code),
            "title": self.status.canonical_reason().unwrap_or("error"),
            "status": self.status.as_u16(),
            "code": self.code,
            "detail": self.detail,
        });
        let mut response = (self.status, Json(body)).into_response();
        if let Ok(value) = "application/problem+json".parse() {
            response.headers_mut().insert("content-type", value);
        }
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up: asking again sooner is refused again.
            let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert("retry-after", seconds.max(1).into());
        }
        response
    }
}

impl From<AuthError> for Problem {
    fn from(error: AuthError) -> Self {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            error.to_string(),
        )
    }
}

impl From<StorageError> for Problem {
    fn from(error: StorageError) -> Self {
        let source = crate::admission::peer()
            .map(|ip| ip.to_string())
            .unwrap_or_default();
        match error {
            StorageError::QuotaExceeded(_) => {
                tracing::warn!(%error, %source, "refused: quota");
                Problem::new(StatusCode::INSUFFICIENT_STORAGE, "quota", error.to_string())
            }
            _ => {
                tracing::error!(%error, "storage failed");
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "storage",
                    error.to_string(),
                )
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn parse_key(hex_key: &str) -> Result<[u8; 32], Problem> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut key).map_err(|_| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            "ids are 64 hexadecimal digits",
        )
    })?;
    Ok(key)
}

impl<S: RelayStorage> AppState<S> {
    /// Counts a refusal and logs it, with its reason and the source address (never a
    /// message's bytes): limits hit and storage failures as warnings, the rest (what
    /// strangers and broken clients cause all day) at debug.
    pub(crate) fn reject(&self, problem: Problem) -> Problem {
        if let Ok(mut rejected) = self.metrics.rejected.lock() {
            *rejected.entry(problem.code).or_default() += 1;
        }
        let source = crate::admission::peer()
            .map(|ip| ip.to_string())
            .unwrap_or_else(|| "-".into());
        let (code, status) = (problem.code, problem.status.as_u16());
        match code {
            "slow-down" | "quota" | "stock-full" | "storage" | "internal" => {
                tracing::warn!(code, status, %source, detail = %problem.detail, "refused");
            }
            _ => tracing::debug!(code, status, %source, detail = %problem.detail, "refused"),
        }
        problem
    }

    /// A read's query string, or a `malformed` refusal saying what is wrong with it.
    fn query(&self, query: Result<Query<ReadQuery>, QueryRejection>) -> Result<ReadQuery, Problem> {
        query.map(|Query(query)| query).map_err(|rejection| {
            self.reject(Problem::new(
                StatusCode::BAD_REQUEST,
                "malformed",
                format!(
                    "{}; after and wait are non-negative integers",
                    rejection.body_text()
                ),
            ))
        })
    }

    /// The messages of a batch body, or a `malformed` refusal naming `what`.
    fn batch(&self, body: &[u8], what: &str) -> Result<Vec<Vec<u8>>, Problem> {
        decode_batch(body).map_err(|detail| {
            self.reject(Problem::new(
                StatusCode::BAD_REQUEST,
                "malformed",
                format!("malformed {what}: {detail}"),
            ))
        })
    }

    /// Authenticates, then charges the device's rate bucket one request.
    fn authenticate(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<DeviceKey, Problem> {
        self.authenticate_costing(method, uri, headers, body, 1.0)
    }

    /// Authenticates, then charges the device's rate bucket `cost` requests (a batch
    /// costs one per message); refuses, charging nothing, if the bucket lacks them.
    /// The signature was checked before the body was read ([`authenticate_first`]):
    /// here the body must have the hash it covers.
    fn authenticate_costing(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        cost: f64,
    ) -> Result<DeviceKey, Problem> {
        let device = match VERIFIED.try_with(|verified| *verified) {
            Ok((device, hash)) => {
                if hotline_proto::custody::message_hash(body) != hash {
                    return Err(self.reject(AuthError::BodyMismatch.into()));
                }
                device
            }
            // Outside the router's middleware: the whole check here.
            Err(_) => {
                let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
                let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
                auth::verify_request(
                    &self.keys,
                    header(auth::DEVICE),
                    header(auth::TIME),
                    header(auth::SIGNATURE),
                    method.as_str(),
                    path,
                    body,
                    now_ms(),
                )
                .map_err(|e| self.reject(e.into()))?
            }
        };
        // The connection is a member's now: out of the strangers' budget.
        crate::admission::note_authenticated();
        self.charge(device, cost, body.len() as f64)?;
        Ok(device)
    }

    /// Charges `device`'s allowance `requests` requests and `bytes` bytes; refuses,
    /// charging nothing, if it lacks either.
    pub(crate) fn charge(
        &self,
        device: DeviceKey,
        requests: f64,
        bytes: f64,
    ) -> Result<(), Problem> {
        let limits = &self.limits;
        let mut buckets = self
            .buckets
            .lock()
            .map_err(|_| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "lock"))?;
        let now = Instant::now();
        let allowance = buckets.entry(device).or_insert(Allowance {
            requests: limits.rate_burst,
            bytes: limits.sender_burst_bytes,
            last: now,
        });
        let elapsed = now.duration_since(allowance.last).as_secs_f64();
        allowance.requests =
            (allowance.requests + elapsed * limits.rate_per_second).min(limits.rate_burst);
        allowance.bytes = (allowance.bytes + elapsed * limits.sender_bytes_per_second)
            .min(limits.sender_burst_bytes);
        allowance.last = now;
        // Refused, with how long until the allowance holds this request again (no
        // `Retry-After` if it never can: a request larger than the burst).
        let slow_down = |detail: String, lacking: f64, per_second: f64, burst: f64, wanted: f64| {
            let problem = Problem::new(StatusCode::TOO_MANY_REQUESTS, "slow-down", detail);
            let after = (wanted <= burst && per_second > 0.0)
                .then(|| Duration::try_from_secs_f64(lacking / per_second).ok())
                .flatten();
            self.reject(match after {
                Some(after) => problem.retry_after(after),
                None => problem,
            })
        };
        if allowance.requests < requests {
            return Err(slow_down(
                "too many requests from this device; retry later".into(),
                requests - allowance.requests,
                limits.rate_per_second,
                limits.rate_burst,
                requests,
            ));
        }
        if allowance.bytes < bytes {
            return Err(slow_down(
                format!(
                    "this device sent more than {} bytes a second (bursts of {}); retry later",
                    limits.sender_bytes_per_second, limits.sender_burst_bytes
                ),
                bytes - allowance.bytes,
                limits.sender_bytes_per_second,
                limits.sender_burst_bytes,
                bytes,
            ));
        }
        allowance.requests -= requests;
        allowance.bytes -= bytes;
        Ok(())
    }

    /// Counts a stream connection of `device` while the guard lives; `None` when the
    /// device already holds [`STREAMS_PER_DEVICE`].
    pub(crate) fn hold_stream(self: &Arc<Self>, device: DeviceKey) -> Option<StreamHeld<S>> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let held = streams.entry(device).or_default();
        if *held >= STREAMS_PER_DEVICE {
            return None;
        }
        *held += 1;
        Some(StreamHeld {
            state: Arc::clone(self),
            device,
        })
    }

    /// Refuses (507 `storage-full`) an append of `bytes` that would take the relay
    /// past its storage bound.
    pub(crate) fn room_for(&self, bytes: u64) -> Result<(), Problem> {
        let used = self.used.load(Ordering::Relaxed);
        if used.saturating_add(bytes) > self.limits.max_storage {
            return Err(self.reject(Problem::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "storage-full",
                format!(
                    "the relay holds {used} bytes of its {} : nothing more is stored until \
                     members acknowledge or retention deletes",
                    self.limits.max_storage
                ),
            )));
        }
        Ok(())
    }

    /// Refuses (403 `no-capability`) a write to `device`'s inbox or stock by a request
    /// that does not present the capability from the device's card.
    fn require_capability(&self, headers: &HeaderMap, device: &[u8; 32]) -> Result<(), Problem> {
        let presented = headers
            .get(capability::HEADER)
            .and_then(|v| v.to_str().ok());
        match presented {
            Some(presented) if capability::presented_matches(presented, &DeviceKey(*device)) => {
                Ok(())
            }
            Some(_) => Err(self.reject(Problem::new(
                StatusCode::FORBIDDEN,
                "no-capability",
                "the capability presented is not this device's (it comes from the device's card)",
            ))),
            None => Err(self.reject(Problem::new(
                StatusCode::FORBIDDEN,
                "no-capability",
                "writing to a device's inbox needs the capability from its card \
                 (header hotline-capability)",
            ))),
        }
    }

    pub(crate) async fn require_member(
        &self,
        channel: &[u8; 32],
        device: &DeviceKey,
    ) -> Result<(), Problem> {
        match self.storage.membership(channel).await? {
            Some(membership) if membership.members.contains(&device.0) => Ok(()),
            Some(_) => Err(self.reject(Problem::new(
                StatusCode::FORBIDDEN,
                "not-a-member",
                "this device is not a member of the channel",
            ))),
            None => Err(self.reject(Problem::new(
                StatusCode::FORBIDDEN,
                "not-a-member",
                "no membership is registered for this channel",
            ))),
        }
    }

    pub(crate) async fn append(&self, log: Log, bytes: Bytes) -> Result<Appended, Problem> {
        if bytes.is_empty() {
            return Err(self.reject(Problem::new(
                StatusCode::BAD_REQUEST,
                "malformed",
                "empty message",
            )));
        }
        let len = bytes.len() as u64;
        self.room_for(len)?;
        let appended = self
            .storage
            .append(log.clone(), bytes.to_vec())
            .await
            .map_err(|e| self.reject(e.into()))?;
        if self.count_appended(&appended, len) {
            if let Ok(mut recent) = self.recent.lock() {
                let stored = Stored {
                    seq: appended.seq,
                    bytes: bytes.to_vec(),
                    receipt: appended.receipt.clone(),
                };
                recent.push(log.clone(), stored);
            }
            self.note_head(log.clone(), appended.seq);
            // The members waiting on the log are served before the appender hears
            // back: their pushes are the line's latency, the answer only the sender's.
            if self.appended.wake(&log.storage_key(), 1) {
                tokio::task::yield_now().await;
            }
        }
        Ok(appended)
    }

    /// Records that `device` committed `channel` up to `seq`; deletes what every
    /// current member acknowledged and returns how many.
    pub(crate) async fn acknowledge(
        &self,
        channel: [u8; 32],
        device: DeviceKey,
        seq: u64,
    ) -> Result<u64, Problem> {
        let members = self
            .storage
            .membership(&channel)
            .await?
            .map(|m| m.members)
            .unwrap_or_default();
        Ok(self
            .storage
            .acknowledge(Log::Channel(channel), device.0, seq, members)
            .await?)
    }

    /// Counts an answered append in the metrics; returns whether it stored a new
    /// message (the caller then wakes the long polls).
    /// Records that this process appended `seq` to `log` (before waking subscribers).
    fn note_head(&self, log: Log, seq: u64) {
        if let Ok(mut heads) = self.heads.lock() {
            let head = heads.entry(log).or_default();
            *head = (*head).max(seq);
        }
    }

    /// Whether this process appended to `log` since it started, `after` the last.
    fn appended_up_to(&self, log: &Log, after: u64) -> bool {
        self.heads
            .lock()
            .is_ok_and(|heads| heads.get(log).is_some_and(|&head| head <= after))
    }

    /// Whether this process appended to `log` past `after`.
    fn appended_past(&self, log: &Log, after: u64) -> bool {
        self.heads.lock().map_or(true, |heads| {
            heads.get(log).is_some_and(|&head| head > after)
        })
    }

    pub(crate) fn count_appended(&self, appended: &Appended, len: u64) -> bool {
        if appended.duplicate {
            self.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.metrics.stored.fetch_add(1, Ordering::Relaxed);
        self.metrics.stored_bytes.fetch_add(len, Ordering::Relaxed);
        self.used.fetch_add(len, Ordering::Relaxed);
        true
    }

    /// Appends and answers with the sequence number and receipt, as JSON.
    async fn append_answer(&self, log: Log, bytes: Bytes) -> Result<Response, Problem> {
        let appended = self.append(log, bytes).await?;
        Ok(Json(appended_json(&appended)).into_response())
    }

    /// Reads and answers with the encoded messages.
    async fn read_answer(&self, log: Log, query: &ReadQuery) -> Result<Response, Problem> {
        let messages = self
            .read(log, query.after, Duration::from_millis(query.wait))
            .await?;
        Ok((
            [("content-type", "application/octet-stream")],
            encode_messages(&messages),
        )
            .into_response())
    }

    /// Reads after a cursor; waits up to `wait` for something new if nothing is there.
    pub(crate) async fn read(
        &self,
        log: Log,
        after: u64,
        wait: Duration,
    ) -> Result<Vec<Stored>, Problem> {
        self.read_some(log, after, wait, 256, READ_BYTES).await
    }

    /// `read`, at most `limit` messages.
    pub(crate) async fn read_some(
        &self,
        log: Log,
        after: u64,
        wait: Duration,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Stored>, Problem> {
        let key = log.storage_key();
        let mut changes = self.appended.wait_on(&key);
        // Appends to the log by other relay processes sharing the storage, if any.
        let mut elsewhere = self.storage.changes(&key);
        let deadline = Instant::now() + wait.min(self.limits.max_wait);
        // How the last wait ended: not yet (read first), by this process's append
        // (`Some(true)`), or by another process's (`Some(false)`).
        let mut woken: Option<bool> = None;
        loop {
            let nothing_new = match woken {
                // Woken by this process's append to another log: nothing to read here
                // (every waiting reader is woken by every append).
                Some(true) => !self.appended_past(&log, after),
                // A reader that took everything this process appended to the log (a
                // stream subscription going on after a push), where no other process
                // appends: nothing newer exists.
                None => elsewhere.is_none() && self.appended_up_to(&log, after),
                Some(false) => false,
            };
            if !nothing_new {
                // Woken by this process's append at the end of the log: that message is
                // taken as it was stored, without reading it back.
                let fresh = match woken {
                    Some(true) => self
                        .recent
                        .lock()
                        .ok()
                        .and_then(|recent| recent.after(&log, after, limit.max(1), max_bytes)),
                    _ => None,
                };
                let messages = match fresh {
                    Some(messages) => messages,
                    None => {
                        self.metrics.storage_reads.fetch_add(1, Ordering::Relaxed);
                        self.storage
                            .read_after(&log, after, limit.max(1), max_bytes)
                            .await?
                    }
                };
                if !messages.is_empty() {
                    return Ok(messages);
                }
            }
            if Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let external = async {
                match elsewhere.as_mut() {
                    Some(waiting) => waiting.changed().await,
                    None => std::future::pending().await,
                }
            };
            woken = Some(tokio::select! {
                () = changes.changed() => true,
                () = external => false,
                () = tokio::time::sleep(left) => return Ok(Vec::new()),
            });
        }
    }
}

#[derive(Debug, Deserialize)]
struct ReadQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    wait: u64,
}

/// A non-negative whole number, written as JSON allows it (`3` or `3.0`: JSON Schema's
/// `integer` admits both), up to 2^53.
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    if let Some(value) = number.as_u64() {
        return Ok(value);
    }
    match number.as_f64() {
        Some(value) if value >= 0.0 && value.fract() == 0.0 && value <= 9_007_199_254_740_991.0 => {
            Ok(value as u64)
        }
        _ => Err(serde::de::Error::custom(format!(
            "{number} is not a non-negative whole number"
        ))),
    }
}

#[derive(Debug, Deserialize)]
struct MembersBody {
    committer: String,
    #[serde(deserialize_with = "whole_number")]
    version: u64,
    members: Vec<String>,
    signature: String,
}

/// An append's answer: `{"seq", "duplicate", "receipt"}` (the receipt in hex, when the
/// message has one).
fn appended_json(appended: &Appended) -> serde_json::Value {
    match &appended.receipt {
        Some(receipt) => json!({
            "seq": appended.seq,
            "duplicate": appended.duplicate,
            "receipt": hex::encode(receipt),
        }),
        None => json!({"seq": appended.seq, "duplicate": appended.duplicate}),
    }
}

async fn put_members<S: RelayStorage>(
    State(state): State<Arc<AppState<S>>>,
    Path(channel): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    state.authenticate(&method, &uri, &headers, &body)?;
    let channel = parse_key(&channel)?;
    let request: MembersBody = serde_json::from_slice(&body).map_err(|e| {
        state.reject(Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            e.to_string(),
        ))
    })?;
    let membership = Membership {
        committer: parse_key(&request.committer)?,
        version: request.version,
        members: request
            .members
            .iter()
            .map(|m| parse_key(m))
            .collect::<Result<_, _>>()?,
    };
    if membership.members.len() > 4096 {
        return Err(state.reject(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            "at most 4096 members",
        )));
    }
    let mut signature = [0u8; 64];
    hex::decode_to_slice(&request.signature, &mut signature).map_err(|_| {
        state.reject(Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            "signature is 128 hexadecimal digits",
        ))
    })?;
    let signer = match state.storage.membership(&channel).await? {
        None if state
            .limits
            .committers
            .as_ref()
            .is_some_and(|allowed| !allowed.contains(&membership.committer)) =>
        {
            return Err(state.reject(Problem::new(
                StatusCode::FORBIDDEN,
                "not-allowed",
                "this relay registers channels of the committers its operator named only",
            )));
        }
        None => membership.committer,
        Some(current) if membership.version > current.version => current.committer,
        Some(_) => {
            return Err(state.reject(Problem::new(
                StatusCode::CONFLICT,
                "conflict",
                "a membership of this version or newer is registered",
            )));
        }
    };
    DeviceKey(signer)
        .verify(&auth::membership_message(&channel, &membership), &signature)
        .map_err(|_| {
            state.reject(Problem::new(
                StatusCode::FORBIDDEN,
                "not-committer",
                "the membership is not signed by the channel's committer",
            ))
        })?;
    if !state.storage.set_membership(&channel, &membership).await? {
        return Err(state.reject(Problem::new(
            StatusCode::CONFLICT,
            "conflict",
            "a membership of this version or newer is registered",
        )));
    }
    state.memberships_set.fetch_add(1, Ordering::SeqCst);
    Ok((StatusCode::OK, Json(json!({"version": membership.version}))).into_response())
}

async fn post_message<S: RelayStorage>(
    State(state): State<Arc<AppState<S>>>,
    Path(channel): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let device = state.authenticate(&method, &uri, &headers, &body)?;
    let channel = parse_key(&channel)?;
    state.require_member(&channel, &device).await?;
    state.append_answer(Log::Channel(channel), body).await
}

/// Several messages for one channel in one signed request, appended in order (committed
/// together where the backend can). Answers one result per message, in order: its
/// sequence number, or why it was refused (a message refused leaves the others as they
/// are: each is an append of its own).
async fn post_batch<S: RelayStorage>(
    State(state): State<Arc<AppState<S>>>,
    Path(channel): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    // Authenticated before the body is decoded; then charged one request per message.
    let device = state.authenticate(&method, &uri, &headers, &body)?;
    let messages = state.batch(&body, "batch")?;
    state.charge(device, messages.len() as f64 - 1.0, 0.0)?;
    let channel = parse_key(&channel)?;
    state.require_member(&channel, &device).await?;
    let lengths: Vec<u64> = messages.iter().map(|m| m.len() as u64).collect();
    state.room_for(lengths.iter().sum())?;
    let answers = state
        .storage
        .append_all(Log::Channel(channel), messages)
        .await;
    let mut results = Vec::with_capacity(answers.len());
    let mut stored = 0;
    for (answer, len) in answers.into_iter().zip(lengths) {
        match answer {
            Ok(appended) => {
                if state.count_appended(&appended, len) {
                    stored += 1;
                    state.note_head(Log::Channel(channel), appended.seq);
                }
                results.push(appended_json(&appended));
            }
            Err(error) => {
                let problem = state.reject(error.into());
                results.push(json!({"error": problem.code, "detail": problem.detail}));
            }
        }
    }
    if stored > 0 {
        state
            .appended
            .wake(&Log::Channel(channel).storage_key(), stored);
    }
    Ok(Json(json!({ "results": results })).into_response())
}

#[derive(Debug, Deserialize)]
struct AckBody {
    #[serde(deserialize_with = "whole_number")]
    seq: u64,
}

async fn post_ack<S: RelayStorage>(
    State(state): State<Arc<AppState<S>>>,
    Path(channel): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let device = state.authenticate(&method, &uri, &headers, &body)?;
    let channel = parse_key(&channel)?;
    state.require_member(&channel, &device).await?;
    let ack: AckBody = serde_json::from_slice(&body).map_err(|e| {
        state.reject(Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            e.to_string(),
        ))
    })?;
    let deleted = state.acknowledge(channel, device, ack.seq).await?;
    Ok(Json(json!({"deleted": deleted})).into_response())
}

async fn post_inbox_ack<S: RelayStorage>(
    State(state): State<Arc<AppState<S>>>,
    Path(device): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let reader = state.authenticate(&method, &uri, &headers, &body)?;
    let device = parse_key(&device)?;
    if reader.0 != device {
        return Err(state.reject(Problem::new(
            StatusCode::FORBIDDEN,
            "not-a-member",
            "a device acknowledges only its own inbox",
        )));
    }
    let ack: AckBody = serde_json::from_slice(&body).map_err(|e| {
        state.reject(Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            e.to_string(),
        ))
    })?;
    let deleted = state
        .storage
        .acknowledge(Log::Inbox(device), device, ack.seq, vec![device])
        .await?;
    Ok(Json(json!({"deleted": deleted})).into_response())
}

async fn get_messages<S: RelayStorage>(
    State(state): State<Arc<AppState<S>>>,
    Path(channel): Path<String>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let device = state.authenticate(&method, &uri, &headers, b"")?;
    let query = state.query(query)?;
    let channel = parse_key(&channel)?;
    state.require_member(&channel, &device).await?;
    state.read_answer(Log::Channel(channel), &query).await
}

async fn post_inbox<S: RelayStorage>(
    State(state): State<Arc<AppState<S>>>,
    Path(device): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    state.authenticate(&method, &uri, &headers, &body)?;
    let device = parse_key(&device)?;
    state.require_capability(&headers, &device)?;
    state.append_answer(Log::Inbox(device), body).await
}

async fn get_inbox<S: RelayStorage>(
    State(state): State<Arc<AppState<S>>>,
    Path(device): Path<String>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let reader = state.authenticate(&method, &uri, &headers, b"")?;
    let query = state.query(query)?;
    let device = parse_key(&device)?;
    if reader.0 != device {
        return Err(state.reject(Problem::new(
            StatusCode::FORBIDDEN,
            "not-a-member",
            "a device reads only its own inbox",
        )));
    }
    state.read_answer(Log::Inbox(device), &query).await
}

/// Refuses anyone but the device itself, saying `detail`.
fn require_owner<S: RelayStorage>(
    state: &AppState<S>,
    requester: &DeviceKey,
    device: &[u8; 32],
    detail: &'static str,
) -> Result<(), Problem> {
    if requester.0 != *device {
        return Err(state.reject(Problem::new(StatusCode::FORBIDDEN, "not-a-member", detail)));
    }
    Ok(())
}

/// The stock of key packages, as a count (at most one more than the limit: enough to
/// know whether it is over).
async fn stock_of<S: RelayStorage>(
    state: &AppState<S>,
    log: &Log,
) -> Result<Vec<Vec<u8>>, Problem> {
    Ok(state
        .storage
        .read_after(log, 0, MAX_KEY_PACKAGE_STOCK + 1, usize::MAX)
        .await?
        .into_iter()
        .map(|stored| stored.bytes)
        .collect())
}

/// A device stocks one-time key packages (a batch, as `post_batch` takes), for
/// inviters to claim one each. All or nothing: a package too large, or a stock that
/// would exceed [`MAX_KEY_PACKAGE_STOCK`], refuses the whole request.
async fn post_key_packages<S: RelayStorage>(
    State(state): State<Arc<AppState<S>>>,
    Path(device): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let requester = state.authenticate(&method, &uri, &headers, &body)?;
    let packages = state.batch(&body, "batch of key packages")?;
    state.charge(requester, packages.len() as f64 - 1.0, 0.0)?;
    let device = parse_key(&device)?;
    require_owner(
        &state,
        &requester,
        &device,
        "a device stocks only its own key packages",
    )?;
    if packages
        .iter()
        .any(|package| package.len() > MAX_KEY_PACKAGE)
    {
        return Err(state.reject(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("a key package is at most {MAX_KEY_PACKAGE} bytes"),
        )));
    }
    let log = Log::KeyPackages(device);
    let _stocking = state.stocking.lock().await;
    // What the stock would hold: the packages there, and the new ones (a package
    // already in stock, or twice in the request, is stored once).
    let mut after: std::collections::HashSet<Vec<u8>> =
        stock_of(&state, &log).await?.into_iter().collect();
    after.extend(packages.iter().cloned());
    if after.len() > MAX_KEY_PACKAGE_STOCK {
        return Err(state.reject(Problem::new(
            StatusCode::CONFLICT,
            "stock-full",
            format!(
                "at most {MAX_KEY_PACKAGE_STOCK} key packages in stock per device: \
                 claim or let expire some before stocking more"
            ),
        )));
    }
    let lengths: Vec<u64> = packages.iter().map(|p| p.len() as u64).collect();
    state.room_for(lengths.iter().sum())?;
    let answers = state.storage.append_all(log.clone(), packages).await;
    for (answer, len) in answers.into_iter().zip(lengths) {
        let appended = answer.map_err(|error| state.reject(error.into()))?;
        state.count_appended(&appended, len);
    }
    let stock = stock_of(&state, &log).await?.len();
    Ok(Json(json!({ "stock": stock })).into_response())
}

/// How many key packages the device itself has in stock.
async fn get_key_packages<S: RelayStorage>(
    State(state): State<Arc<AppState<S>>>,
    Path(device): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let requester = state.authenticate(&method, &uri, &headers, b"")?;
    let device = parse_key(&device)?;
    require_owner(
        &state,
        &requester,
        &device,
        "a device reads only its own stock of key packages",
    )?;
    let stock = stock_of(&state, &Log::KeyPackages(device)).await?.len();
    Ok(Json(json!({ "stock": stock })).into_response())
}

/// Any authenticated device takes the device's oldest key package; it is gone from the
/// stock, so no two inviters get the same one.
async fn claim_key_package<S: RelayStorage>(
    State(state): State<Arc<AppState<S>>>,
    Path(device): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    state.authenticate(&method, &uri, &headers, &body)?;
    let device = parse_key(&device)?;
    state.require_capability(&headers, &device)?;
    if !body.is_empty() {
        return Err(state.reject(Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            "a claim has an empty body",
        )));
    }
    match state.storage.claim_first(Log::KeyPackages(device)).await? {
        Some((_, package)) => {
            Ok(([("content-type", "application/octet-stream")], package).into_response())
        }
        None => Err(state.reject(Problem::new(
            StatusCode::NOT_FOUND,
            "no-key-package",
            "no key package in stock for this device",
        ))),
    }
}

/// A metric family's `# HELP` and `# TYPE` lines (Prometheus text format 0.0.4).
fn family(text: &mut String, name: &str, kind: &str, help: &str) {
    *text += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

tokio::task_local! {
    /// The device a request's headers authenticated, and the hash its body must have
    /// (set by [`authenticate_first`] for the handler it runs).
    static VERIFIED: (DeviceKey, [u8; 32]);
}

/// Checks the signature of every `/v1/` request (the public `/v1/rotation` aside) from
/// its headers, over the body hash they declare, before anything reads the body: a
/// request that does not authenticate is answered 401 with its body unread. The
/// handler then checks the body against the hash.
async fn authenticate_first<S: RelayStorage>(
    State(state): State<Arc<AppState<S>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    if !path.starts_with("/v1/") || path == "/v1/rotation" {
        return next.run(request).await;
    }
    let headers = request.headers();
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let verified = auth::verify_headers(
        &state.keys,
        auth::Headers {
            device: header(auth::DEVICE),
            time: header(auth::TIME),
            signature: header(auth::SIGNATURE),
            content: header(auth::CONTENT),
        },
        request.method().as_str(),
        request
            .uri()
            .path_and_query()
            .map_or(request.uri().path(), |p| p.as_str()),
        now_ms(),
    );
    match verified {
        Ok(verified) => VERIFIED.scope(verified, next.run(request)).await,
        Err(error) => {
            let mut refused = state.reject(error.into()).into_response();
            // A small body already on its way is drained (briefly, never kept), so that
            // the client reads the refusal rather than a reset connection; a larger
            // one is not waited for: the connection closes after the answer.
            let small = request
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                .is_some_and(|len| len <= DRAIN_LIMIT);
            if small {
                let drain = axum::body::to_bytes(request.into_body(), DRAIN_LIMIT);
                let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
            } else {
                refused.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
            }
            refused
        }
    }
}

/// The most of an unauthenticated request's body drained (and dropped) so that its
/// sender reads the refusal, and for how long at most.
const DRAIN_LIMIT: usize = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// The relay's key rotations (public: each statement is signed by the key before it),
/// for devices that still pin an earlier key.
async fn get_rotation<S: RelayStorage>(State(state): State<Arc<AppState<S>>>) -> Response {
    let rotations = state.notary.rotations();
    if rotations.is_empty() {
        return state
            .reject(Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "this relay's key never rotated",
            ))
            .into_response();
    }
    (
        [("content-type", "application/octet-stream")],
        rotations.to_vec(),
    )
        .into_response()
}

async fn metrics<S: RelayStorage>(State(state): State<Arc<AppState<S>>>) -> Response {
    let m = &state.metrics;
    let durations = state.storage.take_commit_durations();
    if let (Ok(mut buckets), Ok(mut sum)) = (m.commit_buckets.lock(), m.commit_sum.lock()) {
        for d in durations {
            *sum += d;
            let index = COMMIT_BOUNDS
                .iter()
                .position(|b| d <= *b)
                .unwrap_or(COMMIT_BOUNDS.len());
            buckets[index] += 1;
        }
    }
    let mut text = String::new();
    family(
        &mut text,
        "hotline_relay_build_info",
        "gauge",
        "The relay's version (always 1).",
    );
    text += &format!(
        "hotline_relay_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    );
    for (name, kind, help, value) in [
        (
            "hotline_relay_messages_stored_total",
            "counter",
            "Messages stored (durable) since the relay started.",
            m.stored.load(Ordering::Relaxed),
        ),
        (
            "hotline_relay_messages_stored_over_streams_total",
            "counter",
            "Of the messages stored, those appended over stream connections (the rest came by the one-shot routes).",
            m.stored_over_streams.load(Ordering::Relaxed),
        ),
        (
            "hotline_relay_acknowledgements_over_streams_total",
            "counter",
            "Acknowledgements (a member committed a log up to a message) taken over stream connections.",
            m.acknowledged_over_streams.load(Ordering::Relaxed),
        ),
        (
            "hotline_relay_storage_reads_total",
            "counter",
            "Reads of a log from storage for readers (long polls, stream subscriptions); fresh messages are handed over from memory instead.",
            m.storage_reads.load(Ordering::Relaxed),
        ),
        (
            "hotline_relay_bytes_stored_total",
            "counter",
            "Bytes of messages stored since the relay started.",
            m.stored_bytes.load(Ordering::Relaxed),
        ),
        (
            "hotline_relay_duplicates_total",
            "counter",
            "Appends of bytes already stored (answered, nothing added).",
            m.duplicates.load(Ordering::Relaxed),
        ),
        (
            "hotline_relay_connections",
            "gauge",
            "Connections open now.",
            m.connections.load(Ordering::Relaxed),
        ),
        (
            "hotline_relay_pending_connections",
            "gauge",
            "Connections no request authenticated on yet.",
            state.admission.pending() as u64,
        ),
        (
            "hotline_relay_evicted_connections_total",
            "counter",
            "Pending connections closed to make room.",
            state.admission.evicted(),
        ),
        (
            "hotline_relay_accept_paused_total",
            "counter",
            "Accepts paused for want of file descriptors or memory.",
            m.accept_paused.load(Ordering::Relaxed),
        ),
    ] {
        family(&mut text, name, kind, help);
        text += &format!("{name} {value}\n");
    }
    family(
        &mut text,
        "hotline_relay_rejected_total",
        "counter",
        "Requests refused, by reason (the problem code).",
    );
    if let Ok(rejected) = m.rejected.lock() {
        let mut reasons: Vec<_> = rejected.iter().collect();
        reasons.sort();
        for (reason, count) in reasons {
            text += &format!("hotline_relay_rejected_total{{reason=\"{reason}\"}} {count}\n");
        }
    }
    family(
        &mut text,
        "hotline_relay_commit_seconds",
        "histogram",
        "Duration of the storage's group commits (each signed and durable).",
    );
    if let (Ok(buckets), Ok(sum)) = (m.commit_buckets.lock(), m.commit_sum.lock()) {
        let mut cumulative = 0;
        for (index, bound) in COMMIT_BOUNDS.iter().enumerate() {
            cumulative += buckets[index];
            text +=
                &format!("hotline_relay_commit_seconds_bucket{{le=\"{bound}\"}} {cumulative}\n");
        }
        cumulative += buckets[COMMIT_BOUNDS.len()];
        text += &format!(
            "hotline_relay_commit_seconds_bucket{{le=\"+Inf\"}} {cumulative}\nhotline_relay_commit_seconds_sum {sum}\nhotline_relay_commit_seconds_count {cumulative}\n"
        );
    }
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

/// Every refusal is a problem document: those that axum itself answers (a method the
/// route does not have, a body over the limit, a path that does not parse) too, with
/// their text as the detail.
async fn as_problem(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let allow = response.headers().get("allow").cloned();
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too-large",
        StatusCode::NOT_FOUND => "not-found",
        status if status.is_server_error() => "internal",
        _ => "malformed",
    };
    let text = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .unwrap_or_default();
    let detail = match String::from_utf8_lossy(&text).trim() {
        "" => status
            .canonical_reason()
            .unwrap_or("refused")
            .to_lowercase(),
        text => text.to_owned(),
    };
    let mut problem = Problem::new(status, code, detail).into_response();
    if let Some(allow) = allow {
        problem.headers_mut().insert("allow", allow);
    }
    problem
}

fn router<S: RelayStorage>(state: Arc<AppState<S>>) -> Router {
    let limit = state.limits.max_message;
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/rotation", get(get_rotation::<S>))
        .route("/metrics", get(metrics::<S>))
        .route("/v1/channels/{channel}/members", put(put_members::<S>))
        .route(
            "/v1/channels/{channel}/messages",
            post(post_message::<S>).get(get_messages::<S>),
        )
        .route("/v1/channels/{channel}/batch", post(post_batch::<S>))
        .route("/v1/channels/{channel}/ack", post(post_ack::<S>))
        .route(
            "/v1/inbox/{device}",
            post(post_inbox::<S>).get(get_inbox::<S>),
        )
        .route("/v1/inbox/{device}/ack", post(post_inbox_ack::<S>))
        .route(
            "/v1/keypackages/{device}",
            post(post_key_packages::<S>).get(get_key_packages::<S>),
        )
        .route(
            "/v1/keypackages/{device}/claim",
            post(claim_key_package::<S>),
        )
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "not-found", "no such endpoint") })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            authenticate_first::<S>,
        ))
        .layer(axum::middleware::map_response(as_problem))
        .with_state(state)
}

/// The TLS exporter of a connection that chose the stream protocol by ALPN; `None`
/// for one that speaks HTTP.
fn stream_exporter<IO>(tls: &tokio_rustls::server::TlsStream<IO>) -> Option<[u8; 32]> {
    let session = tls.get_ref().1;
    if session.alpn_protocol() != Some(hotline_proto::stream::ALPN) {
        return None;
    }
    let mut exporter = [0u8; 32];
    session
        .export_keying_material(&mut exporter, hotline_proto::stream::EXPORTER_LABEL, None)
        .ok()?;
    Some(exporter)
}

/// Serves the one-shot HTTP routes on a connection until it ends, the relay stops,
/// its time is up, or (while unauthenticated) it is evicted to make room.
async fn serve_http<IO>(
    tls: IO,
    app: Router,
    limits: &Limits,
    ticket: &crate::admission::Ticket,
    stop: &mut watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(tls);
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let body_deadline = tokio::time::sleep(limits.body_timeout + limits.max_wait);
    tokio::pin!(body_deadline);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = stop.changed() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(10), connection).await;
        }
        // Slow clients cannot hold a connection for ever.
        _ = &mut body_deadline => {}
        // A stranger's connection closed to make room.
        () = ticket.evicted() => {}
    }
}

/// A running relay: its address, and how to stop it.
pub struct Running {
    pub address: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// The TLS configuration new connections get (swapped by [`Running::reload_tls`]).
    acceptor: Arc<std::sync::Mutex<TlsAcceptor>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Serves `tls` to connections accepted from now on (a renewed certificate, say);
    /// those already open keep theirs.
    pub fn reload_tls(&self, tls: rustls::ServerConfig) {
        let mut acceptor = self
            .acceptor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *acceptor = TlsAcceptor::from(Arc::new(tls));
    }

    /// Stops accepting, lets in-flight requests (and their commits) finish, then returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Raises this process's open-file limit to its hard limit (a relay holds one
/// descriptor per connection; the usual soft limit of 1,024 is below the connection
/// limit). Returns the limit now in force.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Serves `storage` on `listen` with the certificate kept in `dir` (created on first
/// use): the running relay and its address, with the pin of its key.
pub async fn serve_from<S: RelayStorage>(
    dir: &std::path::Path,
    listen: SocketAddr,
    storage: S,
    limits: Limits,
) -> std::io::Result<(Running, String)> {
    let tls_error = |e: crate::tls::TlsError| std::io::Error::other(e.to_string());
    let (cert, key) = crate::tls::load_or_create(dir).map_err(tls_error)?;
    let pin = crate::tls::pin_of(&cert);
    let notary = crate::storage::Notary::new(&key)
        .map_err(tls_error)?
        .with_rotations(crate::tls::load_rotations(dir).map_err(tls_error)?);
    let config = crate::tls::server_config(cert, key).map_err(tls_error)?;
    let running = serve(listen, config, notary, storage, limits).await?;
    let url = crate::tls::relay_url(&running.address.to_string(), &pin);
    Ok((running, url))
}

/// Binds and serves. Connections beyond the limit wait in the kernel's backlog. Every
/// commit batch is signed by `notary` (the relay's TLS key: custody receipts).
pub async fn serve<S: RelayStorage>(
    listen: SocketAddr,
    tls: rustls::ServerConfig,
    notary: crate::storage::Notary,
    storage: S,
    limits: Limits,
) -> std::io::Result<Running> {
    let notary = Arc::new(notary);
    storage.set_notary(Arc::clone(&notary));
    // A deep accept queue: connections that strangers open in bursts must not push a
    // member's connection out of it (a dropped SYN costs the member a second).
    let socket = if listen.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    let listener = socket.listen(LISTEN_BACKLOG)?;
    let address = listener.local_addr()?;
    let current = Arc::new(std::sync::Mutex::new(TlsAcceptor::from(Arc::new(tls))));
    let acceptor = Arc::clone(&current);
    let state = Arc::new(AppState {
        storage,
        limits: limits.clone(),
        notary,
        appended: crate::storage::Waiters::default(),
        recent: std::sync::Mutex::default(),
        heads: std::sync::Mutex::default(),
        memberships_set: AtomicU64::new(0),
        buckets: std::sync::Mutex::new(HashMap::new()),
        streams: std::sync::Mutex::new(HashMap::new()),
        used: AtomicU64::new(0),
        keys: auth::KeyCache::default(),
        metrics: Metrics::default(),
        stocking: tokio::sync::Mutex::new(()),
        admission: Admission::new(limits.max_pending, limits.max_pending_per_source),
    });
    let used = state
        .storage
        .used_bytes()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    state.used.store(used, Ordering::Relaxed);
    let app = router(Arc::clone(&state));
    let (shutdown, mut stop) = watch::channel(false);
    // Retention: delete what is older than the retention period, now and then.
    let sweeper = {
        let (state, mut stop) = (Arc::clone(&state), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(state.limits.sweep_interval);
            let mut minute = tokio::time::interval(Duration::from_secs(60));
            let mut usage = tokio::time::interval(USAGE_INTERVAL);
            let mut said = Summary::default();
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    // What all logs hold, deletions and other processes' appends counted.
                    _ = usage.tick() => match state.storage.used_bytes().await {
                        Ok(used) => state.used.store(used, Ordering::Relaxed),
                        Err(error) => tracing::error!(%error, "cannot measure the storage used"),
                    },
                    _ = tick.tick() => {
                        let before = now_ms().saturating_sub(state.limits.retention.as_millis() as u64);
                        match state.storage.expire(before).await {
                            Ok(0) => {}
                            Ok(deleted) => tracing::info!(deleted, "retention: old messages deleted"),
                            Err(error) => tracing::error!(%error, "retention failed"),
                        }
                    }
                    // What the relay did in the last minute, if anything: one line.
                    _ = minute.tick() => said = Summary::now(&state).log_since(&said),
                }
            }
        })
    };
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let task = tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        let mut last_said: Option<Instant> = None;
        loop {
            let permit = tokio::select! {
                _ = stop.changed() => break,
                permit = Arc::clone(&connections).acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
            };
            let accepted = tokio::select! {
                _ = stop.changed() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors (or memory): accepting again at once
                    // would fail again at once, a core spinning. Pause, say so now
                    // and then.
                    if matches!(
                        error.raw_os_error(),
                        Some(EMFILE | ENFILE | ENOBUFS | ENOMEM)
                    ) {
                        let open = state.metrics.connections.load(Ordering::Relaxed);
                        if last_said
                            .is_none_or(|at: Instant| at.elapsed() >= Duration::from_secs(10))
                        {
                            tracing::warn!(
                                %error,
                                open,
                                "cannot accept connections; pausing 100 ms \
                                 (raise the open-file limit: ulimit -n)"
                            );
                            last_said = Some(Instant::now());
                        }
                        state.metrics.accept_paused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            };
            // Pending until a request authenticates; may close the oldest pending one.
            let ticket = Arc::new(state.admission.admit(peer.ip()));
            // Answers are small and latency matters: no Nagle delay.
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let (app, state, limits) = (app.clone(), Arc::clone(&state), limits.clone());
            let mut stop = stop.clone();
            tasks.spawn(CONNECTION.scope(Arc::clone(&ticket), async move {
                let _permit = permit;
                state.metrics.connections.fetch_add(1, Ordering::Relaxed);
                // A client must finish its handshake within the header timeout.
                let handshake =
                    tokio::time::timeout(limits.header_timeout, acceptor.accept(stream));
                let accepted = tokio::select! {
                    accepted = handshake => accepted.ok().and_then(Result::ok),
                    () = ticket.evicted() => None,
                };
                if let Some(tls) = accepted {
                    match stream_exporter(&tls) {
                        Some(exporter) => {
                            let ticket = Arc::clone(&ticket);
                            crate::stream::serve(Arc::clone(&state), tls, exporter, ticket, stop)
                                .await;
                        }
                        None => serve_http(tls, app, &limits, &ticket, &mut stop).await,
                    }
                }
                state.metrics.connections.fetch_sub(1, Ordering::Relaxed);
            }));
            while tasks.try_join_next().is_some() {}
        }
        sweeper.abort();
        // In-flight requests finish (their commits are answered) before we return.
        let _ = tokio::time::timeout(Duration::from_secs(15), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    });
    Ok(Running {
        address,
        shutdown,
        task,
        acceptor: current,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(seq: u64, len: usize) -> Stored {
        Stored {
            seq,
            bytes: vec![seq as u8; len],
            receipt: None,
        }
    }

    #[test]
    fn recent_appends_are_taken_in_order_without_gaps_or_other_logs() {
        let (a, b) = (Log::Channel([1; 32]), Log::Channel([2; 32]));
        let mut recent = Recent::default();
        // Appends of one group commit answered out of order, another log between.
        for (log, seq) in [(&a, 6), (&b, 1), (&a, 5), (&a, 7), (&a, 9)] {
            recent.push(log.clone(), stored(seq, 10));
        }
        let seqs = |found: Option<Vec<Stored>>| {
            found.map(|messages| messages.iter().map(|m| m.seq).collect::<Vec<_>>())
        };
        assert_eq!(seqs(recent.after(&a, 4, 10, 1 << 20)), Some(vec![5, 6, 7]));
        assert_eq!(seqs(recent.after(&a, 5, 10, 1 << 20)), Some(vec![6, 7]));
        // 8 is not here: 9 is never handed out past the gap.
        assert_eq!(seqs(recent.after(&a, 7, 10, 1 << 20)), None);
        assert_eq!(seqs(recent.after(&a, 3, 10, 1 << 20)), None);
        assert_eq!(seqs(recent.after(&b, 0, 10, 1 << 20)), Some(vec![1]));
        // Limits: count, and bytes but for the first.
        assert_eq!(seqs(recent.after(&a, 5, 1, 1 << 20)), Some(vec![6]));
        assert_eq!(seqs(recent.after(&a, 5, 10, 5)), Some(vec![6]));
    }

    #[test]
    fn recent_appends_are_bounded_in_count_and_bytes() {
        let log = Log::Channel([1; 32]);
        let mut recent = Recent::default();
        for seq in 1..=(RECENT as u64 * 2) {
            recent.push(log.clone(), stored(seq, 100));
        }
        assert_eq!(recent.messages.len(), RECENT);
        assert_eq!(recent.after(&log, 0, 10, 1 << 20), None);
        for seq in 1..=4 {
            recent.push(log.clone(), stored(1000 + seq, RECENT_BYTES / 3));
        }
        assert!(recent.bytes <= RECENT_BYTES);
        assert_eq!(recent.messages.len(), 3);
        assert_eq!(
            recent.bytes,
            recent
                .messages
                .iter()
                .map(|(_, m)| m.bytes.len())
                .sum::<usize>()
        );
    }
}
