//! Where a transcript keeps what grows with history.
//!
//! The [`crate::Transcript`] holds in memory only what is bounded: the roster, each
//! sender's latest envelope, the envelopes waiting for a parent, the settled boundary.
//! Everything else (every accepted envelope with its frontier, who read what, the
//! settled prefix's Merkle nodes, the hashes of processed ciphertexts) lives behind
//! [`TranscriptStore`], which the caller provides: the device keeps it in its SQLite
//! database, inside the same transaction as the MLS state; the simulations and the
//! offline verifier keep it in memory ([`MemoryStore`]). The same tests run against both.
//!
//! The store is trusted storage, not a peer: it is written only by the transcript,
//! after every check passed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::envelope::{Envelope, EnvelopeId};
use crate::identity::DeviceKey;
use crate::merkle::{Hash, MemoryNodes, MerkleNodes, StorageError};

/// An accepted envelope with what the transcript derived from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub envelope: Envelope,
    /// Highest sequence number of each sender among this envelope and its ancestors.
    pub frontier: BTreeMap<DeviceKey, u64>,
    /// Whether some ancestor lies behind the horizon.
    pub partial: bool,
    /// Its place in the canonical order, once settled (the Merkle leaf index).
    pub position: Option<u64>,
}

/// A position in the canonical order: `(lamport, id)`.
pub type OrderKey = (u64, EnvelopeId);

/// Storage of a channel's accepted envelopes and what is derived from them.
pub trait TranscriptStore: MerkleNodes {
    /// The accepted envelope `id`, if any.
    fn entry(&self, id: &EnvelopeId) -> Result<Option<Entry>, StorageError>;
    /// The id of `sender`'s accepted envelope number `seq`, if any.
    fn chain(&self, sender: &DeviceKey, seq: u64) -> Result<Option<EnvelopeId>, StorageError>;
    /// Stores a newly accepted envelope (never called twice for one id).
    fn insert(&mut self, id: &EnvelopeId, entry: &Entry) -> Result<(), StorageError>;
    /// Records that an envelope is settled at `position`.
    fn set_position(&mut self, id: &EnvelopeId, position: u64) -> Result<(), StorageError>;
    /// Up to `limit` ids with their Lamport times, in canonical order, after `after`
    /// (from the start with `None`).
    fn ids_after(
        &self,
        after: Option<OrderKey>,
        limit: usize,
    ) -> Result<Vec<OrderKey>, StorageError>;
    /// Up to `limit` accepted envelopes in canonical order after `after`.
    fn page_after(
        &self,
        after: Option<OrderKey>,
        limit: usize,
    ) -> Result<Vec<(EnvelopeId, Envelope)>, StorageError>;
    /// Up to `limit` accepted envelopes before `before` (from the end with `None`),
    /// newest first.
    fn page_before(
        &self,
        before: Option<OrderKey>,
        limit: usize,
    ) -> Result<Vec<(EnvelopeId, Envelope)>, StorageError>;
    /// Devices that sent a read receipt covering `id`.
    fn readers(&self, id: &EnvelopeId) -> Result<BTreeSet<DeviceKey>, StorageError>;
    fn add_reader(&mut self, id: &EnvelopeId, reader: &DeviceKey) -> Result<(), StorageError>;
    /// Whether a ciphertext with this hash was processed already.
    fn is_processed(&self, hash: &[u8; 32]) -> Result<bool, StorageError>;
    /// Records a processed ciphertext; `false` if it was known.
    fn mark_processed(&mut self, hash: &[u8; 32]) -> Result<bool, StorageError>;
}

impl MerkleNodes for Box<dyn TranscriptStore> {
    fn node(&self, level: u32, index: u64) -> Result<Option<Hash>, StorageError> {
        (**self).node(level, index)
    }

    fn put_node(&mut self, level: u32, index: u64, hash: Hash) -> Result<(), StorageError> {
        (**self).put_node(level, index, hash)
    }
}

/// A transcript store in memory, for simulations, tests and offline verification.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    entries: HashMap<EnvelopeId, Entry>,
    order: BTreeSet<OrderKey>,
    chain: HashMap<(DeviceKey, u64), EnvelopeId>,
    read: HashMap<EnvelopeId, BTreeSet<DeviceKey>>,
    nodes: MemoryNodes,
    processed: HashSet<[u8; 32]>,
}

impl MemoryStore {
    pub fn boxed() -> Box<dyn TranscriptStore> {
        Box::new(Self::default())
    }
}

impl MerkleNodes for MemoryStore {
    fn node(&self, level: u32, index: u64) -> Result<Option<Hash>, StorageError> {
        self.nodes.node(level, index)
    }

    fn put_node(&mut self, level: u32, index: u64, hash: Hash) -> Result<(), StorageError> {
        self.nodes.put_node(level, index, hash)
    }
}

impl TranscriptStore for MemoryStore {
    fn entry(&self, id: &EnvelopeId) -> Result<Option<Entry>, StorageError> {
        Ok(self.entries.get(id).cloned())
    }

    fn chain(&self, sender: &DeviceKey, seq: u64) -> Result<Option<EnvelopeId>, StorageError> {
        Ok(self.chain.get(&(*sender, seq)).copied())
    }

    fn insert(&mut self, id: &EnvelopeId, entry: &Entry) -> Result<(), StorageError> {
        self.order.insert((entry.envelope.lamport, *id));
        self.chain
            .insert((entry.envelope.sender, entry.envelope.seq), *id);
        self.entries.insert(*id, entry.clone());
        Ok(())
    }

    fn set_position(&mut self, id: &EnvelopeId, position: u64) -> Result<(), StorageError> {
        match self.entries.get_mut(id) {
            Some(entry) => {
                entry.position = Some(position);
                Ok(())
            }
            None => Err(StorageError(format!("no entry {id:?} to settle"))),
        }
    }

    fn ids_after(
        &self,
        after: Option<OrderKey>,
        limit: usize,
    ) -> Result<Vec<OrderKey>, StorageError> {
        Ok(match after {
            Some(key) => self
                .order
                .range((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded))
                .take(limit)
                .copied()
                .collect(),
            None => self.order.iter().take(limit).copied().collect(),
        })
    }

    fn page_after(
        &self,
        after: Option<OrderKey>,
        limit: usize,
    ) -> Result<Vec<(EnvelopeId, Envelope)>, StorageError> {
        Ok(self
            .ids_after(after, limit)?
            .into_iter()
            .filter_map(|(_, id)| Some((id, self.entries.get(&id)?.envelope.clone())))
            .collect())
    }

    fn page_before(
        &self,
        before: Option<OrderKey>,
        limit: usize,
    ) -> Result<Vec<(EnvelopeId, Envelope)>, StorageError> {
        let keys: Vec<OrderKey> = match before {
            Some(key) => self.order.range(..key).rev().take(limit).copied().collect(),
            None => self.order.iter().rev().take(limit).copied().collect(),
        };
        Ok(keys
            .into_iter()
            .filter_map(|(_, id)| Some((id, self.entries.get(&id)?.envelope.clone())))
            .collect())
    }

    fn readers(&self, id: &EnvelopeId) -> Result<BTreeSet<DeviceKey>, StorageError> {
        Ok(self.read.get(id).cloned().unwrap_or_default())
    }

    fn add_reader(&mut self, id: &EnvelopeId, reader: &DeviceKey) -> Result<(), StorageError> {
        self.read.entry(*id).or_default().insert(*reader);
        Ok(())
    }

    fn is_processed(&self, hash: &[u8; 32]) -> Result<bool, StorageError> {
        Ok(self.processed.contains(hash))
    }

    fn mark_processed(&mut self, hash: &[u8; 32]) -> Result<bool, StorageError> {
        Ok(self.processed.insert(*hash))
    }
}
