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
    /// An envelope that waited for a parent (kept by the caller beside the store, see
    /// [`crate::Fresh`]) is accepted now: the caller may forget it as waiting.
    fn forget_waiting(&mut self, _id: &EnvelopeId) -> Result<(), StorageError> {
        Ok(())
    }
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

/// The promises every [`TranscriptStore`] keeps, checked on fresh stores from `make`:
/// lookups by id and by chain place, order in both directions with paging, positions,
/// readers, processed hashes and Merkle nodes; then whole transcripts over such stores
/// must give exactly what the same deliveries give over a [`MemoryStore`] (canonical
/// order, roots, settled roots and consistency proofs, delivered and read state).
/// Returns the first broken promise. Run by this crate on [`MemoryStore`] and by the
/// client on its SQLite store.
pub fn conformance(make: &mut dyn FnMut() -> Box<dyn TranscriptStore>) -> Result<(), String> {
    conformance::store_promises(make())?;
    conformance::transcripts_agree(make)
}

mod conformance {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::envelope::{Body, ChannelId};
    use crate::identity::DeviceIdentity;
    use crate::merkle::ct_root;
    use crate::transcript::Transcript;

    fn check(ok: bool, what: &str) -> Result<(), String> {
        if ok { Ok(()) } else { Err(what.to_owned()) }
    }

    fn fail(error: impl std::fmt::Display) -> String {
        error.to_string()
    }

    const CHANNEL: ChannelId = ChannelId([7; 32]);

    /// The writers and what they wrote, in the order they wrote it.
    type History = (Vec<DeviceIdentity>, Vec<(Envelope, EnvelopeId)>);

    /// Envelopes by three devices that each write over what they received so far.
    fn history(seed: u64, steps: usize) -> Result<History, String> {
        let mut rng = StdRng::seed_from_u64(seed);
        let identities = ["north", "south", "mediator"]
            .iter()
            .map(|party| DeviceIdentity::generate(party, "desk", &mut rng).map_err(fail))
            .collect::<Result<Vec<_>, _>>()?;
        let mut views: Vec<Transcript> = (0..3).map(|_| Transcript::new(CHANNEL)).collect();
        for view in &mut views {
            for identity in &identities {
                view.admit(identity.info());
            }
        }
        let mut pool: Vec<(Envelope, EnvelopeId)> = Vec::new();
        let mut delivered = [0usize; 3];
        for step in 0..steps {
            let who = rng.gen_range(0..3);
            let target = (delivered[who] + rng.gen_range(0..4)).min(pool.len());
            for (envelope, id) in &pool[delivered[who]..target] {
                views[who].insert(envelope.clone(), *id).map_err(fail)?;
            }
            delivered[who] = target;
            let me = identities[who].key();
            let (seq, prev) = views[who]
                .head_of(&me)
                .map_or((1, EnvelopeId::NONE), |(seq, id, _)| (seq + 1, id));
            let (seen, lamport) = views[who].next_references(&me);
            let body = if step % 5 == 4 {
                Body::ReadReceipt(seen.iter().map(|r| r.id).take(1).collect())
            } else {
                Body::text(format!("step {step}"))
            };
            let envelope = Envelope {
                channel: CHANNEL,
                sender: me,
                epoch: 1,
                seq,
                prev,
                prev_epoch: if seq == 1 { 0 } else { 1 },
                seen,
                lamport,
                claimed_time_ms: step as u64,
                body,
                deadline_ms: (step % 7 == 0).then_some(step as u64 + 1),
                signature: None,
            };
            let id = envelope.id();
            views[who].insert(envelope.clone(), id).map_err(fail)?;
            if delivered[who] == pool.len() {
                delivered[who] += 1;
            }
            pool.push((envelope, id));
        }
        Ok((identities, pool))
    }

    pub(super) fn store_promises(mut store: Box<dyn TranscriptStore>) -> Result<(), String> {
        let (_, pool) = history(1, 12)?;
        check(
            store.entry(&pool[0].1).map_err(fail)?.is_none(),
            "an empty store holds an entry",
        )?;
        for (index, (envelope, id)) in pool.iter().enumerate() {
            let entry = Entry {
                envelope: envelope.clone(),
                frontier: [(envelope.sender, envelope.seq)].into(),
                partial: index % 2 == 0,
                position: None,
            };
            store.insert(id, &entry).map_err(fail)?;
            check(
                store.entry(id).map_err(fail)? == Some(entry),
                "an entry comes back changed",
            )?;
            check(
                store.chain(&envelope.sender, envelope.seq).map_err(fail)? == Some(*id),
                "a chain place does not name its envelope",
            )?;
        }
        let mut order: Vec<OrderKey> = pool.iter().map(|(e, id)| (e.lamport, *id)).collect();
        order.sort();
        check(
            store.ids_after(None, usize::MAX).map_err(fail)? == order,
            "ids out of order",
        )?;
        check(
            store.ids_after(Some(order[3]), 2).map_err(fail)? == order[4..6],
            "paging forward skips or repeats",
        )?;
        let forward: Vec<EnvelopeId> = store
            .page_after(Some(order[1]), 3)
            .map_err(fail)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        check(
            forward == order[2..5].iter().map(|(_, id)| *id).collect::<Vec<_>>(),
            "pages forward are wrong",
        )?;
        let backward: Vec<EnvelopeId> = store
            .page_before(None, 2)
            .map_err(fail)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let newest: Vec<EnvelopeId> = order.iter().rev().take(2).map(|(_, id)| *id).collect();
        check(backward == newest, "the newest page is wrong")?;
        let before: Vec<EnvelopeId> = store
            .page_before(Some(order[2]), 5)
            .map_err(fail)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        check(
            before == [order[1].1, order[0].1],
            "paging backward is wrong",
        )?;
        store.set_position(&order[0].1, 0).map_err(fail)?;
        check(
            store
                .entry(&order[0].1)
                .map_err(fail)?
                .and_then(|e| e.position)
                == Some(0),
            "a settled position is lost",
        )?;
        check(
            store.set_position(&EnvelopeId([9; 32]), 1).is_err(),
            "an unknown envelope was settled",
        )?;
        let reader = pool[1].0.sender;
        store.add_reader(&order[0].1, &reader).map_err(fail)?;
        store.add_reader(&order[0].1, &reader).map_err(fail)?;
        check(
            store.readers(&order[0].1).map_err(fail)? == [reader].into(),
            "readers are lost or doubled",
        )?;
        check(
            store.readers(&order[1].1).map_err(fail)?.is_empty(),
            "readers leak",
        )?;
        check(
            !store.is_processed(&[1; 32]).map_err(fail)?,
            "an unknown hash is processed",
        )?;
        check(
            store.mark_processed(&[1; 32]).map_err(fail)?,
            "a new hash is not new",
        )?;
        check(
            !store.mark_processed(&[1; 32]).map_err(fail)?,
            "a hash counts twice",
        )?;
        check(
            store.is_processed(&[1; 32]).map_err(fail)?,
            "a processed hash is forgotten",
        )?;
        // Nodes are written as a log grows: each level from index 0 on.
        store.put_node(0, 0, [3; 32]).map_err(fail)?;
        store.put_node(0, 1, [4; 32]).map_err(fail)?;
        store.put_node(1, 0, [5; 32]).map_err(fail)?;
        check(
            store.node(0, 1).map_err(fail)? == Some([4; 32]),
            "a Merkle node is lost",
        )?;
        check(
            store.node(1, 0).map_err(fail)? == Some([5; 32]),
            "a Merkle node is lost",
        )?;
        check(
            store.node(1, 1).map_err(fail)?.is_none(),
            "a Merkle node appears",
        )?;
        check(
            store.node(2, 0).map_err(fail)?.is_none(),
            "a Merkle node appears",
        )?;
        Ok(())
    }

    pub(super) fn transcripts_agree(
        make: &mut dyn FnMut() -> Box<dyn TranscriptStore>,
    ) -> Result<(), String> {
        for seed in 0..4 {
            let (identities, pool) = history(seed, 60)?;
            let mut reference = Transcript::new(CHANNEL);
            let mut tested = Transcript::in_store(CHANNEL, 0, make());
            for identity in &identities {
                reference.admit(identity.info());
                tested.admit(identity.info());
            }
            // The same shuffled delivery, with repeats, into both.
            let mut rng = StdRng::seed_from_u64(seed + 100);
            let mut order: Vec<usize> = (0..pool.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.gen_range(0..=i));
            }
            order.extend((0..pool.len()).step_by(3));
            for index in order {
                let (envelope, id) = &pool[index];
                let a = reference.insert(envelope.clone(), *id);
                let b = tested.insert(envelope.clone(), *id);
                check(a == b, "an insertion went differently")?;
                check(
                    reference.settled_len() == tested.settled_len(),
                    "settling went differently",
                )?;
            }
            check(
                reference.canonical().map_err(fail)? == tested.canonical().map_err(fail)?,
                "canonical orders differ",
            )?;
            check(
                reference.root().map_err(fail)? == tested.root().map_err(fail)?,
                "roots differ",
            )?;
            check(reference.state() == tested.state(), "states differ")?;
            let settled = tested.settled_len();
            check(settled > 0, "nothing settled")?;
            for size in 1..=settled {
                check(
                    reference.settled_root(size).map_err(fail)?
                        == tested.settled_root(size).map_err(fail)?,
                    "settled roots differ",
                )?;
            }
            let proof = tested.consistency_proof(1, settled).map_err(fail)?;
            ct_root(tested.settled_root(settled).map_err(fail)?)
                .verify_consistency(&ct_root(tested.settled_root(1).map_err(fail)?), &proof)
                .map_err(|e| format!("a consistency proof does not verify: {e:?}"))?;
            for (_, id) in &pool {
                check(
                    reference.delivered_to(id).map_err(fail)?
                        == tested.delivered_to(id).map_err(fail)?
                        && reference.read_by(id).map_err(fail)?
                            == tested.read_by(id).map_err(fail)?,
                    "delivered or read state differs",
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_memory_store_keeps_every_promise() {
        super::conformance(&mut || super::MemoryStore::boxed()).unwrap();
    }
}
