//! One hotline device's durable state, and the operations that change it.
//!
//! Everything a device knows lives in one SQLite database in its home directory: its
//! identity, its contact card, verified contacts, each channel's MLS state (openmls's
//! own SQLite storage, on the same connection), the channel's envelopes, the hashes of
//! ciphertexts already processed, and the outbox. Every operation runs in one
//! `BEGIN IMMEDIATE` transaction: it loads the channel, runs the core operation (during
//! which openmls writes its key state), stores what changed, and commits. A crash at
//! any point leaves all of it or none of it.
//!
//! ```text
//!   hotline (CLI) ──► Store::transact ──► Channel (hotline-core) ──► openmls
//!                          │  BEGIN IMMEDIATE                        │ writes key state
//!                          ▼                                         ▼
//!                    device.db (WAL, synchronous=FULL) ◄─────────────┘   COMMIT
//! ```

pub mod backup;
pub mod bundle;
pub mod clock;
pub mod escalate;
pub mod handoff;
pub mod home;
pub mod line;
pub mod link;
pub mod payload;
pub mod provider;
pub mod receive;
pub mod stock;
pub mod store;
pub mod sync;
#[doc(hidden)]
pub mod testing;
pub mod transcript_store;

pub use home::{Home, HomeError};
pub use store::{ChannelSummary, Invited, LogEntry, Store, StoreError};
