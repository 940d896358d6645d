//! The channel core of hotline: identities, contact cards, MLS channels, the signed
//! and chained envelope, the transcript and its offline verifier.
//!
//! This crate does no I/O. It opens no socket and no file, reads no clock and spawns
//! nothing: bytes and the current time come in as arguments, bytes and events go out as
//! return values. MLS state lives in the [`openmls_traits::OpenMlsProvider`] the caller
//! passes, so that the caller can commit a processed message, its MLS state change and
//! its transcript entry in one storage transaction.
//!
//! ```text
//!   identity ─► card ─► (verified contact) ─► channel ─► envelope ─► transcript ─► export
//!                                              │ MLS (openmls)                     │
//!                                              ▼                                   ▼
//!                                        ciphertext bytes                  verify (offline)
//! ```

pub mod agreement;
pub mod card;
pub mod channel;
pub mod codec;
pub mod cosign;
pub mod envelope;
pub mod export;
pub mod frame;
pub mod identity;
pub mod merkle;
pub mod transcript;
pub mod transcript_store;

use openmls::prelude::Ciphersuite;

/// The one ciphersuite hotline speaks: X25519, AES-128-GCM, SHA-256, Ed25519.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

pub use agreement::{Agreement, Proposal};
pub use card::{CardError, CardIn, VerifiedContact, create_card};
pub use channel::{Channel, ChannelError, ChannelSnapshot, Event, Fresh, Hold, Outgoing};
pub use cosign::Cosignature;
pub use envelope::{
    Availability, Body, ChannelId, Coded, Envelope, EnvelopeId, Kind, MembershipNote, Message,
    NonResponse, PathNote, PathRecord, Precedence,
};
pub use export::{Export, VerifyError, VerifyReport};
pub use frame::Frame;
pub use identity::{DeviceIdentity, DeviceInfo, DeviceKey, Fingerprint, safety_number};
pub use transcript::{Finding, Inserted, Transcript, TranscriptState};
pub use transcript_store::{MemoryStore, TranscriptStore};
