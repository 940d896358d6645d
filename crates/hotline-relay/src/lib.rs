//! hotline's relay: an untrusted store-and-forward server over HTTPS.
//!
//! The relay stores opaque MLS ciphertext per channel, durably (a post is answered only
//! after its group commit reached the disk), serves it after a cursor to the channel's
//! member devices, and leaves invitations in per-device inboxes. It decides nothing
//! about the group: it enforces the membership that the channel's committer signed.
//! It never sees plaintext.
//!
//! ```text
//!   client ──TLS 1.3, pinned cert──► axum routes ──► RelayStorage (SQLite: group commit)
//!          signed requests (Ed25519)
//! ```

pub mod admission;
pub use hotline_proto::{auth, capability, client};
// A test suite for backends: it asserts, so it may panic.
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub mod conformance;
pub mod postgres;
pub mod server;
pub mod storage;
mod stream;
pub mod tls;
