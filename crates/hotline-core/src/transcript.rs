//! The transcript: the DAG of a channel's envelopes, in one canonical order.
//!
//! **Canonical order.** Each envelope's Lamport time is checked to be one more than the
//! largest of its parents', so sorting by `(lamport, id)` is a topological order of the
//! DAG that depends on the DAG alone: every member that holds the same envelopes holds
//! them in the same order, whatever order they arrived in and whatever the clocks say.
//!
//! **Root.** The transcript root is the RFC 6962 Merkle tree hash (ct-merkle, SHA-256)
//! over the ids in canonical order. A checkpoint carries the root over its own
//! ancestors, which every member can recompute, so members cross-check each other's
//! view of history without any extra round trip.
//!
//! **Horizon.** A device that joined at epoch E cannot decrypt what came before
//! (MLS guarantees it). References to envelopes of earlier epochs are its horizon: they
//! are recorded as opaque stubs, not waited for, and checks that need the content
//! behind them (the Lamport time's exact value, the roots of checkpoints that reach
//! behind the horizon) are skipped for that device only.
//!
//! **Settled prefix.** An envelope is *settled* once its Lamport time is at most the
//! smallest Lamport time among the latest envelopes of every current member (a removed
//! device is retired and no longer counts). Every member's later envelopes carry a larger
//! Lamport time than its latest, so nothing can ever be ordered before a settled
//! envelope: the settled envelopes are a prefix of the canonical order that only grows.
//! They are appended, in order, to an incremental Merkle log ([`crate::merkle`]), so its
//! roots are final and any two are linked by an RFC 6962 consistency proof. The root over
//! the whole transcript is that log plus the unsettled tail, in O(log n + tail). An
//! envelope that would land inside the settled prefix (only a removed member's late
//! envelope, or a member breaking the sealing rule of [`Transcript::may_seal`]) is
//! refused.
//!
//! **Detection.** An envelope whose parents are missing waits (a gap in a sender's
//! sequence, or an unknown parent). Two envelopes with the same sender and sequence
//! number are a fork: the first stays, the second is kept as evidence. A broken
//! chain, a wrong Lamport time or a bad checkpoint signature is refused and recorded.
//! Refusal changes nothing but the list of findings.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ct_merkle::ConsistencyProof;
use sha2::Sha256;
use thiserror::Error;

use crate::envelope::{Body, ChannelId, Envelope, EnvelopeError, EnvelopeId, Kind, Reference};
use crate::identity::{DeviceInfo, DeviceKey};
use crate::merkle::{MemoryNodes, MerkleLog, ProofError, StorageError};

/// Most envelopes waiting for a parent; beyond it, new orphans are refused so that a
/// hostile peer cannot grow memory without bound.
pub const MAX_PENDING: usize = 65_536;

/// An accepted envelope with what the transcript derived from it.
#[derive(Clone, Debug)]
pub struct Entry {
    pub envelope: Envelope,
    /// Highest sequence number of each sender among this envelope and its ancestors.
    frontier: BTreeMap<DeviceKey, u64>,
    /// Whether some ancestor lies behind the horizon.
    partial: bool,
}

/// What became of an inserted envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inserted {
    /// Accepted, with every waiting envelope it unblocked, in acceptance order.
    Accepted(Vec<EnvelopeId>),
    /// Already known (accepted or waiting).
    Duplicate,
    /// Waits for these parents.
    Pending(Vec<EnvelopeId>),
    /// Same sender and sequence as an accepted envelope: kept as evidence only.
    Fork(EnvelopeId),
}

/// Why an envelope was refused. Nothing but the findings changed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum Rejection {
    #[error("envelope belongs to another channel")]
    ForeignChannel,
    #[error("sender {0:?} is not a member of this channel")]
    UnknownSender(DeviceKey),
    #[error(transparent)]
    Malformed(#[from] EnvelopeError),
    #[error("previous envelope is not the sender's preceding one")]
    ChainBroken,
    #[error("a reference names an envelope of another sender or epoch")]
    SeenMismatch,
    #[error("lamport time {found} should be {expected}")]
    WrongLamport { found: u64, expected: u64 },
    #[error("too many envelopes are waiting for missing parents")]
    TooManyPending,
    #[error(
        "lamport time {lamport} lies inside the settled part of the transcript (up to {settled}): \
         it would rewrite history every member holds as final"
    )]
    BehindSettled { lamport: u64, settled: u64 },
}

/// Something wrong that a member must be told about, with its evidence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// Two envelopes with the same sender and sequence number.
    Fork {
        sender: DeviceKey,
        seq: u64,
        kept: EnvelopeId,
        other: Box<Envelope>,
    },
    /// A checkpoint whose root disagrees with the ancestors this member holds.
    CheckpointMismatch {
        checkpoint: EnvelopeId,
        sender: DeviceKey,
        claimed: ([u8; 32], u64),
        computed: ([u8; 32], u64),
    },
    /// An envelope refused, and why.
    Refused {
        id: EnvelopeId,
        sender: DeviceKey,
        reason: Rejection,
    },
}

/// A hole in one sender's chain: envelopes `from..=to` are missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    pub sender: DeviceKey,
    pub from: u64,
    pub to: u64,
}

/// The DAG of a channel's envelopes. See the module documentation.
#[derive(Clone, Debug)]
pub struct Transcript {
    channel: ChannelId,
    horizon: u64,
    stubs: HashMap<EnvelopeId, DeviceKey>,
    roster: BTreeMap<DeviceKey, DeviceInfo>,
    entries: HashMap<EnvelopeId, Entry>,
    order: BTreeSet<(u64, EnvelopeId)>,
    chain: HashMap<(DeviceKey, u64), EnvelopeId>,
    heads: BTreeMap<DeviceKey, EnvelopeId>,
    pending: HashMap<EnvelopeId, Envelope>,
    waiting: HashMap<EnvelopeId, Vec<EnvelopeId>>,
    read: HashMap<EnvelopeId, BTreeSet<DeviceKey>>,
    /// Devices removed from the channel: they no longer hold the settled prefix back.
    retired: BTreeSet<DeviceKey>,
    /// The settled prefix of the canonical order, as a Merkle log.
    settled: MerkleLog<MemoryNodes>,
    /// Every envelope with a Lamport time up to this one is settled.
    settled_lamport: u64,
    findings: Vec<Finding>,
    /// Accepted since the last [`Transcript::take_fresh`], in acceptance order.
    fresh: Vec<EnvelopeId>,
    /// Set waiting since the last [`Transcript::take_fresh_pending`].
    fresh_pending: Vec<EnvelopeId>,
}

impl Transcript {
    /// An empty transcript for `channel`.
    pub fn new(channel: ChannelId) -> Self {
        Self::with_horizon(channel, 0)
    }

    /// An empty transcript for a device that joined at epoch `horizon`.
    pub fn with_horizon(channel: ChannelId, horizon: u64) -> Self {
        Self {
            channel,
            horizon,
            stubs: HashMap::new(),
            roster: BTreeMap::new(),
            entries: HashMap::new(),
            order: BTreeSet::new(),
            chain: HashMap::new(),
            heads: BTreeMap::new(),
            pending: HashMap::new(),
            waiting: HashMap::new(),
            read: HashMap::new(),
            retired: BTreeSet::new(),
            settled: MerkleLog::default(),
            settled_lamport: 0,
            findings: Vec::new(),
            fresh: Vec::new(),
            fresh_pending: Vec::new(),
        }
    }

    pub fn channel(&self) -> ChannelId {
        self.channel
    }

    /// The first epoch this transcript holds (0: from the channel's creation).
    pub fn horizon(&self) -> u64 {
        self.horizon
    }

    /// References to envelopes behind the horizon, with their senders.
    pub fn stubs(&self) -> &HashMap<EnvelopeId, DeviceKey> {
        &self.stubs
    }

    /// Admits a device as a sender. Devices stay on the roster after removal, so that
    /// their past envelopes still verify.
    pub fn admit(&mut self, device: &DeviceInfo) {
        self.roster.insert(device.key, device.clone());
    }

    /// Marks a device as removed from the channel: settling no longer waits for it.
    pub fn retire(&mut self, device: &DeviceKey) {
        if self.retired.insert(*device) {
            self.settle();
        }
    }

    /// Whether `sender` may seal an envelope now without breaking the settled prefix:
    /// a device that joined a running channel (horizon above 0) must first hold an
    /// envelope of someone else, so that its Lamport time lands after what the others
    /// settled while it was being added (see ARCHITECTURE.md, "Settled prefix").
    pub fn may_seal(&self, sender: &DeviceKey) -> bool {
        self.horizon == 0
            || self.heads.contains_key(sender)
            || self.heads.keys().any(|device| device != sender)
    }

    /// Every device that ever was a member.
    pub fn roster(&self) -> &BTreeMap<DeviceKey, DeviceInfo> {
        &self.roster
    }

    /// The party of a device.
    pub fn party_of(&self, device: &DeviceKey) -> Option<&str> {
        self.roster.get(device).map(|info| info.party.as_str())
    }

    /// Number of accepted envelopes.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Accepted envelopes in canonical order.
    pub fn canonical(&self) -> impl Iterator<Item = (EnvelopeId, &Envelope)> + '_ {
        self.order
            .iter()
            .filter_map(|(_, id)| self.entries.get(id).map(|entry| (*id, &entry.envelope)))
    }

    /// Accepted envelopes in reverse canonical order: the newest first.
    pub fn canonical_rev(&self) -> impl Iterator<Item = (EnvelopeId, &Envelope)> + '_ {
        self.order
            .iter()
            .rev()
            .filter_map(|(_, id)| self.entries.get(id).map(|entry| (*id, &entry.envelope)))
    }

    pub fn get(&self, id: &EnvelopeId) -> Option<&Envelope> {
        self.entries.get(id).map(|entry| &entry.envelope)
    }

    /// The latest accepted envelope of each sender.
    pub fn heads(&self) -> &BTreeMap<DeviceKey, EnvelopeId> {
        &self.heads
    }

    /// Sequence number, id and Lamport time of `sender`'s latest accepted envelope.
    pub fn head_of(&self, sender: &DeviceKey) -> Option<(u64, EnvelopeId, u64)> {
        let id = self.heads.get(sender)?;
        let entry = self.entries.get(id)?;
        Some((entry.envelope.seq, *id, entry.envelope.lamport))
    }

    /// What a new envelope by `sender` must reference: its `seen` list and Lamport time.
    pub fn next_references(&self, sender: &DeviceKey) -> (Vec<Reference>, u64) {
        let seen: Vec<_> = self
            .heads
            .iter()
            .filter(|(device, _)| *device != sender)
            .filter_map(|(device, id)| {
                let entry = self.entries.get(id)?;
                Some(Reference {
                    sender: *device,
                    id: *id,
                    epoch: entry.envelope.epoch,
                })
            })
            .collect();
        let lamport = self
            .heads
            .values()
            .filter_map(|id| self.entries.get(id))
            .map(|entry| entry.envelope.lamport)
            .max()
            .unwrap_or(0)
            + 1;
        (seen, lamport)
    }

    /// Envelopes accepted since the last call, for the caller to persist.
    pub fn take_fresh(&mut self) -> Vec<EnvelopeId> {
        std::mem::take(&mut self.fresh)
    }

    /// Envelopes set waiting since the last call (still waiting now), for the caller to
    /// persist: they are as much received as accepted ones.
    pub fn take_fresh_pending(&mut self) -> Vec<(EnvelopeId, Envelope)> {
        std::mem::take(&mut self.fresh_pending)
            .into_iter()
            .filter_map(|id| self.pending.get(&id).map(|e| (id, e.clone())))
            .collect()
    }

    /// Everything found wrong so far.
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    /// Ids of envelopes still waiting, with the parents they wait for.
    pub fn pending(&self) -> Vec<(EnvelopeId, Vec<EnvelopeId>)> {
        let mut out: Vec<_> = self
            .pending
            .iter()
            .map(|(id, envelope)| (*id, self.missing_parents(envelope)))
            .collect();
        out.sort();
        out
    }

    /// Holes in each sender's chain, judged from the envelopes that wait.
    pub fn gaps(&self) -> Vec<Gap> {
        let mut lowest_waiting: BTreeMap<DeviceKey, u64> = BTreeMap::new();
        for envelope in self.pending.values() {
            let seq = lowest_waiting.entry(envelope.sender).or_insert(u64::MAX);
            *seq = (*seq).min(envelope.seq);
        }
        lowest_waiting
            .into_iter()
            .filter_map(|(sender, waiting)| {
                let have = self.head_of(&sender).map_or(0, |(seq, _, _)| seq);
                (waiting > have + 1).then_some(Gap {
                    sender,
                    from: have + 1,
                    to: waiting - 1,
                })
            })
            .collect()
    }

    fn parents(envelope: &Envelope) -> impl Iterator<Item = Reference> + '_ {
        let prev = Reference {
            sender: envelope.sender,
            id: envelope.prev,
            epoch: envelope.prev_epoch,
        };
        (envelope.prev != EnvelopeId::NONE)
            .then_some(prev)
            .into_iter()
            .chain(envelope.seen.iter().copied())
    }

    fn behind_horizon(&self, reference: &Reference) -> bool {
        reference.epoch < self.horizon && !self.entries.contains_key(&reference.id)
    }

    fn missing_parents(&self, envelope: &Envelope) -> Vec<EnvelopeId> {
        Self::parents(envelope)
            .filter(|r| !self.entries.contains_key(&r.id) && !self.behind_horizon(r))
            .map(|r| r.id)
            .collect()
    }

    /// Inserts an envelope whose id the caller computed (by [`Envelope::decode`] or
    /// [`Envelope::id`]). See [`Inserted`] and [`Rejection`].
    pub fn insert(&mut self, envelope: Envelope, id: EnvelopeId) -> Result<Inserted, Rejection> {
        if self.entries.contains_key(&id) || self.pending.contains_key(&id) {
            return Ok(Inserted::Duplicate);
        }
        let sender = envelope.sender;
        let result = self.insert_new(envelope, id);
        if let Err(reason) = &result {
            self.findings.push(Finding::Refused {
                id,
                sender,
                reason: reason.clone(),
            });
        }
        result
    }

    fn insert_new(&mut self, envelope: Envelope, id: EnvelopeId) -> Result<Inserted, Rejection> {
        if envelope.channel != self.channel {
            return Err(Rejection::ForeignChannel);
        }
        if !self.roster.contains_key(&envelope.sender) {
            return Err(Rejection::UnknownSender(envelope.sender));
        }
        envelope.check_format()?;
        if envelope.body.kind() == Kind::Checkpoint {
            envelope.verify_signature(&id)?;
        }
        let missing = self.missing_parents(&envelope);
        if !missing.is_empty() {
            if self.pending.len() >= MAX_PENDING {
                return Err(Rejection::TooManyPending);
            }
            for parent in &missing {
                self.waiting.entry(*parent).or_default().push(id);
            }
            self.pending.insert(id, envelope);
            self.fresh_pending.push(id);
            return Ok(Inserted::Pending(missing));
        }
        let outcome = self.accept(envelope, id)?;
        if let Inserted::Accepted(mut accepted) = outcome {
            self.release_waiting(&mut accepted);
            self.settle();
            return Ok(Inserted::Accepted(accepted));
        }
        Ok(outcome)
    }

    /// Appends to the settled log every envelope that no current member can precede any
    /// more: Lamport time at most the smallest among the current members' latest
    /// envelopes (a current member that wrote nothing yet holds everything back).
    fn settle(&mut self) {
        let boundary = self
            .roster
            .keys()
            .filter(|device| !self.retired.contains(device))
            .map(|device| self.head_of(device).map_or(0, |(_, _, lamport)| lamport))
            .min()
            .unwrap_or(0);
        if boundary <= self.settled_lamport {
            return;
        }
        let newly: Vec<EnvelopeId> = self
            .order
            .range((self.settled_lamport + 1, EnvelopeId([0; 32]))..)
            .take_while(|(lamport, _)| *lamport <= boundary)
            .map(|(_, id)| *id)
            .collect();
        for id in newly {
            // In memory the log cannot fail; a failure would leave the log behind
            // `settled_lamport`, which `root` would then report.
            if self.settled.push(&id.0).is_err() {
                return;
            }
        }
        self.settled_lamport = boundary;
    }

    /// Accepts, one after the other, the envelopes that waited on the ones just accepted.
    fn release_waiting(&mut self, accepted: &mut Vec<EnvelopeId>) {
        let mut cursor = 0;
        while cursor < accepted.len() {
            let parent = accepted[cursor];
            cursor += 1;
            for child in self.waiting.remove(&parent).unwrap_or_default() {
                let ready = self
                    .pending
                    .get(&child)
                    .is_some_and(|envelope| self.missing_parents(envelope).is_empty());
                if !ready {
                    continue;
                }
                let Some(envelope) = self.pending.remove(&child) else {
                    continue;
                };
                let sender = envelope.sender;
                match self.accept(envelope, child) {
                    Ok(Inserted::Accepted(_)) => accepted.push(child),
                    Ok(_) => {}
                    Err(reason) => self.findings.push(Finding::Refused {
                        id: child,
                        sender,
                        reason,
                    }),
                }
            }
        }
    }

    /// Accepts an envelope whose parents are all present.
    fn accept(&mut self, envelope: Envelope, id: EnvelopeId) -> Result<Inserted, Rejection> {
        let mut frontier = BTreeMap::new();
        let mut max_lamport = 0;
        let mut partial = false;
        let mut stubs = Vec::new();
        let prev_reference = Reference {
            sender: envelope.sender,
            id: envelope.prev,
            epoch: envelope.prev_epoch,
        };
        if envelope.lamport <= self.settled_lamport {
            return Err(Rejection::BehindSettled {
                lamport: envelope.lamport,
                settled: self.settled_lamport,
            });
        }
        if envelope.seq > 1 && !self.behind_horizon(&prev_reference) {
            let prev = self
                .entries
                .get(&envelope.prev)
                .ok_or(Rejection::ChainBroken)?;
            if prev.envelope.sender != envelope.sender || prev.envelope.seq + 1 != envelope.seq {
                return Err(Rejection::ChainBroken);
            }
        }
        for parent in Self::parents(&envelope) {
            if self.behind_horizon(&parent) {
                partial = true;
                stubs.push((parent.id, parent.sender));
                continue;
            }
            let entry = self.entries.get(&parent.id).ok_or(Rejection::ChainBroken)?;
            if entry.envelope.sender != parent.sender || entry.envelope.epoch != parent.epoch {
                return Err(Rejection::SeenMismatch);
            }
            max_lamport = max_lamport.max(entry.envelope.lamport);
            partial |= entry.partial;
            merge_frontier(&mut frontier, &entry.frontier);
        }
        let lamport_ok = if partial {
            envelope.lamport > max_lamport
        } else {
            envelope.lamport == max_lamport + 1
        };
        if !lamport_ok {
            return Err(Rejection::WrongLamport {
                found: envelope.lamport,
                expected: max_lamport + 1,
            });
        }
        if let Some(kept) = self.chain.get(&(envelope.sender, envelope.seq)) {
            let kept = *kept;
            self.findings.push(Finding::Fork {
                sender: envelope.sender,
                seq: envelope.seq,
                kept,
                other: Box::new(envelope),
            });
            return Ok(Inserted::Fork(kept));
        }
        // A checkpoint reaching behind this device's horizon cannot be checked here.
        if let (
            Body::Checkpoint {
                root,
                size,
                horizon,
            },
            false,
        ) = (&envelope.body, partial)
            && *horizon >= self.horizon
        {
            let computed = self.root_within(&frontier, *horizon);
            if computed != (*root, *size) {
                self.findings.push(Finding::CheckpointMismatch {
                    checkpoint: id,
                    sender: envelope.sender,
                    claimed: (*root, *size),
                    computed,
                });
            }
        }
        if let Body::ReadReceipt(ids) = &envelope.body {
            for read in ids {
                let covered = self
                    .entries
                    .get(read)
                    .is_some_and(|entry| covers(&frontier, &entry.envelope));
                if covered {
                    self.read.entry(*read).or_default().insert(envelope.sender);
                }
            }
        }
        self.stubs.extend(stubs);
        frontier.insert(envelope.sender, envelope.seq);
        self.chain.insert((envelope.sender, envelope.seq), id);
        let newer = self
            .head_of(&envelope.sender)
            .is_none_or(|(seq, _, _)| seq < envelope.seq);
        if newer {
            self.heads.insert(envelope.sender, id);
        }
        self.order.insert((envelope.lamport, id));
        self.fresh.push(id);
        self.entries.insert(
            id,
            Entry {
                envelope,
                frontier,
                partial,
            },
        );
        Ok(Inserted::Accepted(vec![id]))
    }

    /// The root over the whole transcript: (Merkle tree hash, number of envelopes):
    /// the settled log plus the unsettled tail, O(log n + tail).
    pub fn root(&self) -> ([u8; 32], u64) {
        let tail: Vec<[u8; 32]> = self.unsettled().map(|id| id.0).collect();
        self.settled
            .root_with(&tail)
            .unwrap_or_else(|_| merkle_root(self.order.iter().map(|(_, id)| id)))
    }

    /// Accepted envelopes not settled yet, in canonical order.
    fn unsettled(&self) -> impl Iterator<Item = &EnvelopeId> + '_ {
        self.order
            .range((self.settled_lamport + 1, EnvelopeId([0; 32]))..)
            .map(|(_, id)| id)
    }

    /// Number of settled envelopes: the first this many of the canonical order are
    /// final.
    pub fn settled_len(&self) -> u64 {
        self.settled.len()
    }

    /// The Lamport time up to which the transcript is settled.
    pub fn settled_lamport(&self) -> u64 {
        self.settled_lamport
    }

    /// The root over the first `size` settled envelopes (final once returned).
    pub fn settled_root(&self, size: u64) -> Result<([u8; 32], u64), StorageError> {
        self.settled.root_at(size)
    }

    /// An RFC 6962 consistency proof that the settled root of `old` envelopes is a
    /// prefix of the settled root of `new` envelopes.
    pub fn consistency_proof(
        &self,
        old: u64,
        new: u64,
    ) -> Result<ConsistencyProof<Sha256>, ProofError> {
        self.settled.consistency_proof(old, new)
    }

    /// The root over the envelopes that a frontier covers: what a checkpoint with
    /// these parents must claim.
    fn root_within(&self, frontier: &BTreeMap<DeviceKey, u64>, horizon: u64) -> ([u8; 32], u64) {
        merkle_root(self.order.iter().map(|(_, id)| id).filter(|id| {
            self.entries.get(id).is_some_and(|entry| {
                entry.envelope.epoch >= horizon && covers(frontier, &entry.envelope)
            })
        }))
    }

    /// The root a new checkpoint by `sender` must carry: over everything it will
    /// reference, which is everything accepted so far.
    pub fn root_for_next_checkpoint(&self) -> ([u8; 32], u64) {
        let mut frontier = BTreeMap::new();
        for id in self.heads.values() {
            if let Some(entry) = self.entries.get(id) {
                merge_frontier(&mut frontier, &entry.frontier);
            }
        }
        self.root_within(&frontier, self.horizon)
    }

    /// Devices whose latest envelope shows they hold `id` (its sender included).
    pub fn delivered_to(&self, id: &EnvelopeId) -> BTreeSet<DeviceKey> {
        let Some(target) = self.entries.get(id) else {
            return BTreeSet::new();
        };
        self.heads
            .iter()
            .filter(|(_, head)| {
                self.entries
                    .get(head)
                    .is_some_and(|entry| covers(&entry.frontier, &target.envelope))
            })
            .map(|(device, _)| *device)
            .collect()
    }

    /// Devices that sent a read receipt for `id`.
    pub fn read_by(&self, id: &EnvelopeId) -> BTreeSet<DeviceKey> {
        self.read.get(id).cloned().unwrap_or_default()
    }

    /// Whether every envelope is an ancestor of (or is) `id`.
    pub fn covers_everything(&self, id: &EnvelopeId) -> bool {
        let Some(top) = self.entries.get(id) else {
            return false;
        };
        self.entries
            .values()
            .all(|entry| covers(&top.frontier, &entry.envelope))
    }

    /// Whether `ancestor` is an ancestor of (or is) `descendant`.
    pub fn is_covered_by(&self, ancestor: &EnvelopeId, descendant: &EnvelopeId) -> bool {
        match (self.entries.get(ancestor), self.entries.get(descendant)) {
            (Some(a), Some(d)) => covers(&d.frontier, &a.envelope),
            _ => false,
        }
    }
}

fn covers(frontier: &BTreeMap<DeviceKey, u64>, envelope: &Envelope) -> bool {
    frontier
        .get(&envelope.sender)
        .is_some_and(|seq| *seq >= envelope.seq)
}

fn merge_frontier(into: &mut BTreeMap<DeviceKey, u64>, from: &BTreeMap<DeviceKey, u64>) {
    for (device, seq) in from {
        let slot = into.entry(*device).or_insert(0);
        *slot = (*slot).max(*seq);
    }
}

/// RFC 6962 Merkle tree hash over envelope ids, with the number of leaves.
pub fn merkle_root<'a>(ids: impl Iterator<Item = &'a EnvelopeId>) -> ([u8; 32], u64) {
    let mut log = MerkleLog::<MemoryNodes>::default();
    for id in ids {
        // In memory, pushing cannot fail.
        let _ = log.push(&id.0);
    }
    log.root().unwrap_or((crate::merkle::empty_root(), 0))
}
