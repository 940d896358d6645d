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
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;

use crate::cosign::HorizonCursor;
use crate::envelope::{Body, ChannelId, Envelope, EnvelopeError, EnvelopeId, Reference};
use crate::identity::{DeviceInfo, DeviceKey};
use crate::merkle::{Hash, MemoryNodes, MerkleLog, ProofError, StorageError};
pub use crate::transcript_store::{Entry, MemoryStore, OrderKey, TranscriptStore};

/// Most envelopes waiting for a parent; beyond it, new orphans are refused so that a
/// hostile peer cannot grow memory without bound.
pub const MAX_PENDING: usize = 65_536;

/// Most envelopes a received checkpoint's check reads beyond the settled prefix; a
/// checkpoint whose ancestors differ from the canonical order further back than this is
/// not checked (see ARCHITECTURE.md, "Settled prefix").
pub const MAX_CHECKPOINT_SCAN: usize = 65_536;

/// Most unsettled envelopes whose order keys the transcript keeps in memory; beyond it
/// (a member silent for long), the store answers instead.
pub const MAX_TAIL_CACHE: usize = 4096;

/// Most horizons besides this device's whose settled roots the transcript keeps, to
/// check the checkpoints of devices that joined later (one per epoch at which a
/// current member joined, in practice a handful); beyond it the lowest is dropped.
pub const MAX_HORIZONS: usize = 16;

/// Largest Lamport time accepted: far beyond any real channel (each envelope adds one),
/// and small enough for every store to keep it as a signed 64-bit integer.
pub const MAX_LAMPORT: u64 = 1 << 62;

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
    #[error("lamport time {0} is beyond what any channel reaches (2^62)")]
    LamportTooLarge(u64),
    #[error(transparent)]
    Storage(#[from] StorageError),
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

/// A sender's latest accepted envelope, kept in memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub id: EnvelopeId,
    pub seq: u64,
    pub lamport: u64,
    pub epoch: u64,
    pub partial: bool,
    pub frontier: Vec<(DeviceKey, u64)>,
}

/// The bounded part of a transcript's state, for the caller to persist beside its store
/// (the roster and horizon are the channel's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranscriptState {
    pub len: u64,
    pub heads: Vec<(DeviceKey, Head)>,
    pub stubs: Vec<(EnvelopeId, DeviceKey)>,
    pub retired: Vec<DeviceKey>,
    pub settled_len: u64,
    pub settled_lamport: u64,
    pub last_settled: Option<OrderKey>,
    /// What each device said it holds in its ephemeral frames (absent before them).
    #[serde(default)]
    pub held: Vec<(DeviceKey, Vec<(DeviceKey, u64)>)>,
    /// The settled roots of later joiners' horizons, as far as read
    /// ([`HorizonCursor::encode`], hex; absent before them).
    #[serde(default)]
    pub horizons: Vec<String>,
}

/// What the checks need to know of a parent.
struct Parent {
    sender: DeviceKey,
    seq: u64,
    epoch: u64,
    lamport: u64,
    partial: bool,
    frontier: BTreeMap<DeviceKey, u64>,
}

impl From<Entry> for Parent {
    fn from(entry: Entry) -> Self {
        Self {
            sender: entry.envelope.sender,
            seq: entry.envelope.seq,
            epoch: entry.envelope.epoch,
            lamport: entry.envelope.lamport,
            partial: entry.partial,
            frontier: entry.frontier,
        }
    }
}

/// The DAG of a channel's envelopes. See the module documentation.
#[derive(Debug)]
pub struct Transcript {
    channel: ChannelId,
    horizon: u64,
    stubs: BTreeMap<EnvelopeId, DeviceKey>,
    roster: BTreeMap<DeviceKey, DeviceInfo>,
    heads: BTreeMap<DeviceKey, Head>,
    len: u64,
    pending: HashMap<EnvelopeId, Envelope>,
    waiting: HashMap<EnvelopeId, Vec<EnvelopeId>>,
    /// Devices removed from the channel: they no longer hold the settled prefix back.
    retired: BTreeSet<DeviceKey>,
    /// The store, seen as the Merkle log of the settled prefix.
    log: MerkleLog<Box<dyn TranscriptStore>>,
    /// Every envelope with a Lamport time up to this one is settled.
    settled_lamport: u64,
    /// The last settled envelope.
    last_settled: Option<OrderKey>,
    /// The order keys of every accepted envelope after `last_settled`, in order, while
    /// there are at most [`MAX_TAIL_CACHE`]; `None` when unknown or more (then the
    /// store is asked).
    tail: Option<Vec<OrderKey>>,
    /// Per device, per sender: the last sequence number the device said it holds in an
    /// ephemeral frame (bounded by the roster, squared).
    held: BTreeMap<DeviceKey, BTreeMap<DeviceKey, u64>>,
    /// Per later joiner's horizon: the root of the settled envelopes of epoch ≥ it, read
    /// forward as checkpoints with that horizon need it (at most [`MAX_HORIZONS`]).
    horizons: BTreeMap<u64, HorizonCursor>,
    /// Skip the roots of checkpoints (rebuilding from envelopes checked before).
    trusting: bool,
    findings: Vec<Finding>,
    /// Accepted since the last [`Transcript::take_fresh`], in acceptance order.
    fresh: Vec<EnvelopeId>,
    /// Set waiting since the last [`Transcript::take_fresh_pending`].
    fresh_pending: Vec<EnvelopeId>,
}

impl Transcript {
    /// An empty transcript for `channel`, in memory.
    pub fn new(channel: ChannelId) -> Self {
        Self::with_horizon(channel, 0)
    }

    /// An empty transcript in memory for a device that joined at epoch `horizon`.
    pub fn with_horizon(channel: ChannelId, horizon: u64) -> Self {
        Self::in_store(channel, horizon, MemoryStore::boxed())
    }

    /// An empty transcript kept in `store` (which must hold nothing of this channel).
    pub fn in_store(channel: ChannelId, horizon: u64, store: Box<dyn TranscriptStore>) -> Self {
        let mut transcript = Self::restore(channel, horizon, TranscriptState::default(), store);
        // An empty store has an empty tail.
        transcript.tail = Some(Vec::new());
        transcript
    }

    /// Reads the unsettled tail's order keys from the store, if there are few: call it
    /// once after [`Transcript::restore`] (without it, every tail is read from the store).
    pub fn load_tail(&mut self) -> Result<(), StorageError> {
        self.log.load_frontier()?;
        let keys = self
            .store()
            .ids_after(self.last_settled, MAX_TAIL_CACHE + 1)?;
        self.tail = (keys.len() <= MAX_TAIL_CACHE).then_some(keys);
        Ok(())
    }

    /// A transcript from its persisted state and the store that holds the rest. The
    /// envelopes that were waiting come back through [`Transcript::insert`].
    pub fn restore(
        channel: ChannelId,
        horizon: u64,
        state: TranscriptState,
        store: Box<dyn TranscriptStore>,
    ) -> Self {
        Self {
            channel,
            horizon,
            stubs: state.stubs.into_iter().collect(),
            roster: BTreeMap::new(),
            heads: state.heads.into_iter().collect(),
            len: state.len,
            pending: HashMap::new(),
            waiting: HashMap::new(),
            retired: state.retired.into_iter().collect(),
            log: MerkleLog::open(store, state.settled_len),
            settled_lamport: state.settled_lamport,
            last_settled: state.last_settled,
            tail: None,
            held: state
                .held
                .into_iter()
                .map(|(device, held)| (device, held.into_iter().collect()))
                .collect(),
            // A cursor that does not decode is dropped: it is read again from the start.
            horizons: state
                .horizons
                .iter()
                .filter_map(|hex| HorizonCursor::decode(&hex::decode(hex).ok()?))
                .map(|cursor| (cursor.horizon, cursor))
                .collect(),
            trusting: false,
            findings: Vec::new(),
            fresh: Vec::new(),
            fresh_pending: Vec::new(),
        }
    }

    /// The bounded state to persist (with the store's contents, it is the transcript).
    pub fn state(&self) -> TranscriptState {
        TranscriptState {
            len: self.len,
            heads: self.heads.iter().map(|(k, h)| (*k, h.clone())).collect(),
            stubs: self.stubs.iter().map(|(id, s)| (*id, *s)).collect(),
            retired: self.retired.iter().copied().collect(),
            settled_len: self.log.len(),
            settled_lamport: self.settled_lamport,
            last_settled: self.last_settled,
            held: self
                .held
                .iter()
                .map(|(device, held)| (*device, held.iter().map(|(s, q)| (*s, *q)).collect()))
                .collect(),
            horizons: self
                .horizons
                .values()
                .map(|cursor| hex::encode(cursor.encode()))
                .collect(),
        }
    }

    /// While set, checkpoints' roots are not recomputed: for rebuilding a transcript
    /// from envelopes this device checked when they first arrived.
    pub fn set_trusting(&mut self, trusting: bool) {
        self.trusting = trusting;
    }

    fn store(&self) -> &dyn TranscriptStore {
        self.log.nodes().as_ref()
    }

    fn store_mut(&mut self) -> &mut dyn TranscriptStore {
        self.log.nodes_mut().as_mut()
    }

    pub fn channel(&self) -> ChannelId {
        self.channel
    }

    /// The first epoch this transcript holds (0: from the channel's creation).
    pub fn horizon(&self) -> u64 {
        self.horizon
    }

    /// References to envelopes behind the horizon, with their senders.
    pub fn stubs(&self) -> &BTreeMap<EnvelopeId, DeviceKey> {
        &self.stubs
    }

    /// Admits a device as a sender. Devices stay on the roster after removal, so that
    /// their past envelopes still verify.
    pub fn admit(&mut self, device: &DeviceInfo) {
        self.roster.insert(device.key, device.clone());
    }

    /// Marks a device as removed from the channel: settling no longer waits for it.
    pub fn retire(&mut self, device: &DeviceKey) -> Result<(), StorageError> {
        if self.retired.insert(*device) {
            self.settle()?;
        }
        Ok(())
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
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every accepted envelope in canonical order (O(n): for exports and tests; use
    /// [`Transcript::page_after`] to walk a long transcript).
    pub fn canonical(&self) -> Result<Vec<(EnvelopeId, Envelope)>, StorageError> {
        self.store().page_after(None, usize::MAX)
    }

    /// Up to `limit` accepted envelopes after `after`, in canonical order.
    pub fn page_after(
        &self,
        after: Option<OrderKey>,
        limit: usize,
    ) -> Result<Vec<(EnvelopeId, Envelope)>, StorageError> {
        self.store().page_after(after, limit)
    }

    /// Up to `limit` accepted envelopes before `before` (from the newest with `None`),
    /// newest first.
    pub fn page_before(
        &self,
        before: Option<OrderKey>,
        limit: usize,
    ) -> Result<Vec<(EnvelopeId, Envelope)>, StorageError> {
        self.store().page_before(before, limit)
    }

    pub fn get(&self, id: &EnvelopeId) -> Result<Option<Envelope>, StorageError> {
        Ok(self.store().entry(id)?.map(|entry| entry.envelope))
    }

    /// Tells the store that these envelopes, kept as waiting beside it, are accepted
    /// (for envelopes accepted other than by [`Transcript::insert`] releasing them).
    pub fn forget_waiting(&mut self, ids: &[EnvelopeId]) -> Result<(), StorageError> {
        for id in ids {
            self.store_mut().forget_waiting(id)?;
        }
        Ok(())
    }

    /// Whether a ciphertext with this hash was processed already.
    pub fn is_processed(&self, hash: &[u8; 32]) -> Result<bool, StorageError> {
        self.store().is_processed(hash)
    }

    /// Records a processed ciphertext; `false` if it was known.
    pub fn mark_processed(&mut self, hash: &[u8; 32]) -> Result<bool, StorageError> {
        self.store_mut().mark_processed(hash)
    }

    /// The latest accepted envelope of each sender.
    pub fn heads(&self) -> BTreeMap<DeviceKey, EnvelopeId> {
        self.heads.iter().map(|(k, head)| (*k, head.id)).collect()
    }

    /// Sequence number, id and Lamport time of `sender`'s latest accepted envelope.
    pub fn head_of(&self, sender: &DeviceKey) -> Option<(u64, EnvelopeId, u64)> {
        let head = self.heads.get(sender)?;
        Some((head.seq, head.id, head.lamport))
    }

    /// The highest sequence number of `sender` that `device`'s latest envelope covers
    /// (0: none): `device` holds `sender`'s envelopes up to it.
    pub fn seen_by(&self, device: &DeviceKey, sender: &DeviceKey) -> u64 {
        let covered = self.heads.get(device).map_or(0, |head| {
            head.frontier
                .iter()
                .find(|(d, _)| d == sender)
                .map_or(0, |(_, seq)| *seq)
        });
        let held = self
            .held
            .get(device)
            .and_then(|held| held.get(sender))
            .copied()
            .unwrap_or(0);
        covered.max(held)
    }

    /// The last sequence number of each sender's chain this transcript holds: what
    /// an ephemeral frame tells the members.
    pub fn held_frontier(&self) -> Vec<(DeviceKey, u64)> {
        self.heads
            .iter()
            .map(|(sender, head)| (*sender, head.seq))
            .take(crate::envelope::MAX_SEEN)
            .collect()
    }

    /// Notes what `device` says it holds (from its ephemeral frame): a member of the
    /// roster, about senders this transcript knows, never beyond what it holds itself
    /// (nobody can hold more of a chain than exists), never going back.
    pub fn note_held(&mut self, device: &DeviceKey, held: &[(DeviceKey, u64)]) {
        if !self.roster.contains_key(device) {
            return;
        }
        for (sender, seq) in held {
            let Some(head) = self.heads.get(sender) else {
                continue;
            };
            let seq = (*seq).min(head.seq);
            let slot = self
                .held
                .entry(*device)
                .or_default()
                .entry(*sender)
                .or_insert(0);
            *slot = (*slot).max(seq);
        }
    }

    /// `sender`'s accepted envelopes numbered `from` on, in chain order, at most `limit`.
    pub fn chain_from(
        &self,
        sender: &DeviceKey,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(EnvelopeId, Envelope)>, StorageError> {
        let last = self.heads.get(sender).map_or(0, |head| head.seq);
        let mut out = Vec::new();
        let mut seq = from.max(1);
        while seq <= last && out.len() < limit {
            if let Some(id) = self.store().chain(sender, seq)?
                && let Some(entry) = self.store().entry(&id)?
            {
                out.push((id, entry.envelope));
            }
            seq += 1;
        }
        Ok(out)
    }

    /// The MLS epoch of `sender`'s latest accepted envelope.
    pub fn head_epoch(&self, sender: &DeviceKey) -> Option<u64> {
        self.heads.get(sender).map(|head| head.epoch)
    }

    /// What a new envelope by `sender` must reference: its `seen` list and Lamport time.
    pub fn next_references(&self, sender: &DeviceKey) -> (Vec<Reference>, u64) {
        let seen: Vec<_> = self
            .heads
            .iter()
            .filter(|(device, _)| *device != sender)
            .map(|(device, head)| Reference {
                sender: *device,
                id: head.id,
                epoch: head.epoch,
            })
            .collect();
        let lamport = self
            .heads
            .values()
            .map(|head| head.lamport)
            .max()
            .unwrap_or(0)
            + 1;
        (seen, lamport)
    }

    /// Envelopes accepted since the last call, for the caller to know (the store holds
    /// them already).
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

    /// Everything found wrong since the last [`Transcript::clear_findings`].
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    /// Forgets the findings (the caller reported them).
    pub fn clear_findings(&mut self) {
        self.findings.clear();
    }

    /// Ids of envelopes still waiting, with the parents they wait for.
    pub fn pending(&self) -> Vec<(EnvelopeId, Vec<EnvelopeId>)> {
        let mut out: Vec<_> = self
            .pending
            .iter()
            .map(|(id, envelope)| (*id, self.missing_parents(envelope).unwrap_or_default()))
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

    /// What the checks need of an accepted envelope: from the heads when it is one
    /// (the usual case), else from the store.
    fn parent(&self, id: &EnvelopeId) -> Result<Option<Parent>, StorageError> {
        if let Some((sender, head)) = self.heads.iter().find(|(_, head)| head.id == *id) {
            return Ok(Some(Parent {
                sender: *sender,
                seq: head.seq,
                epoch: head.epoch,
                lamport: head.lamport,
                partial: head.partial,
                frontier: head.frontier.iter().copied().collect(),
            }));
        }
        Ok(self.store().entry(id)?.map(Parent::from))
    }

    fn holds(&self, id: &EnvelopeId) -> Result<bool, StorageError> {
        if self.heads.values().any(|head| head.id == *id) {
            return Ok(true);
        }
        Ok(self.store().entry(id)?.is_some())
    }

    fn behind_horizon(&self, reference: &Reference) -> Result<bool, StorageError> {
        Ok(reference.epoch < self.horizon && !self.holds(&reference.id)?)
    }

    fn missing_parents(&self, envelope: &Envelope) -> Result<Vec<EnvelopeId>, StorageError> {
        let mut missing = Vec::new();
        for reference in Self::parents(envelope) {
            if !self.holds(&reference.id)? && !self.behind_horizon(&reference)? {
                missing.push(reference.id);
            }
        }
        Ok(missing)
    }

    /// Inserts an envelope whose id the caller computed (by [`Envelope::decode`] or
    /// [`Envelope::id`]). See [`Inserted`] and [`Rejection`]; a storage failure is
    /// [`Rejection::Storage`], is not recorded as a finding, and the caller must drop
    /// this transcript (its store may hold part of the insertion).
    pub fn insert(&mut self, envelope: Envelope, id: EnvelopeId) -> Result<Inserted, Rejection> {
        if self.pending.contains_key(&id) || self.holds(&id)? {
            return Ok(Inserted::Duplicate);
        }
        let sender = envelope.sender;
        let result = self.insert_new(envelope, id);
        match &result {
            Err(Rejection::Storage(_)) | Ok(_) => {}
            Err(reason) => self.findings.push(Finding::Refused {
                id,
                sender,
                reason: reason.clone(),
            }),
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
        if envelope.lamport > MAX_LAMPORT {
            return Err(Rejection::LamportTooLarge(envelope.lamport));
        }
        if envelope.body.kind().is_signed() {
            envelope.verify_signature(&id)?;
        }
        let missing = self.missing_parents(&envelope)?;
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
            self.release_waiting(&mut accepted)?;
            self.settle()?;
            return Ok(Inserted::Accepted(accepted));
        }
        Ok(outcome)
    }

    /// Appends to the settled log every envelope that no current member can precede any
    /// more: Lamport time at most the smallest among the current members' latest
    /// envelopes (a current member that wrote nothing yet holds everything back).
    fn settle(&mut self) -> Result<(), StorageError> {
        let boundary = self
            .roster
            .keys()
            .filter(|device| !self.retired.contains(device))
            .map(|device| self.heads.get(device).map_or(0, |head| head.lamport))
            .min()
            .unwrap_or(0);
        if boundary > self.settled_lamport {
            match self.tail.take() {
                Some(mut tail) => {
                    let count = tail.partition_point(|(lamport, _)| *lamport <= boundary);
                    for (lamport, id) in tail.drain(..count) {
                        self.append_settled(lamport, id)?;
                    }
                    self.tail = Some(tail);
                }
                None => {
                    loop {
                        let batch = self.store().ids_after(self.last_settled, 1024)?;
                        let mut progressed = false;
                        for (lamport, id) in batch {
                            if lamport > boundary {
                                break;
                            }
                            self.append_settled(lamport, id)?;
                            progressed = true;
                        }
                        if !progressed {
                            break;
                        }
                    }
                    self.load_tail()?;
                }
            }
        }
        self.settled_lamport = self.settled_lamport.max(boundary);
        Ok(())
    }

    /// Appends one envelope to the settled log, at the next position.
    fn append_settled(&mut self, lamport: u64, id: EnvelopeId) -> Result<(), StorageError> {
        let position = self.log.len();
        self.log.push(&id.0)?;
        self.store_mut().set_position(&id, position)?;
        self.last_settled = Some((lamport, id));
        Ok(())
    }

    /// The order key of the last settled envelope.
    fn settled_key(&self) -> Option<OrderKey> {
        self.last_settled
    }

    /// Accepts, one after the other, the envelopes that waited on the ones just accepted.
    fn release_waiting(&mut self, accepted: &mut Vec<EnvelopeId>) -> Result<(), StorageError> {
        let mut cursor = 0;
        while cursor < accepted.len() {
            let parent = accepted[cursor];
            cursor += 1;
            for child in self.waiting.remove(&parent).unwrap_or_default() {
                let ready = match self.pending.get(&child) {
                    Some(envelope) => self.missing_parents(envelope)?.is_empty(),
                    None => false,
                };
                if !ready {
                    continue;
                }
                let Some(envelope) = self.pending.remove(&child) else {
                    continue;
                };
                let sender = envelope.sender;
                match self.accept(envelope, child) {
                    Ok(Inserted::Accepted(_)) => {
                        self.store_mut().forget_waiting(&child)?;
                        accepted.push(child);
                    }
                    Ok(_) => {}
                    Err(Rejection::Storage(error)) => return Err(error),
                    Err(reason) => self.findings.push(Finding::Refused {
                        id: child,
                        sender,
                        reason,
                    }),
                }
            }
        }
        Ok(())
    }

    /// Accepts an envelope whose parents are all present.
    fn accept(&mut self, envelope: Envelope, id: EnvelopeId) -> Result<Inserted, Rejection> {
        if envelope.lamport <= self.settled_lamport {
            return Err(Rejection::BehindSettled {
                lamport: envelope.lamport,
                settled: self.settled_lamport,
            });
        }
        let mut frontier = BTreeMap::new();
        let mut max_lamport = 0;
        let mut partial = false;
        let mut stubs = Vec::new();
        let prev_reference = Reference {
            sender: envelope.sender,
            id: envelope.prev,
            epoch: envelope.prev_epoch,
        };
        if envelope.seq > 1 && !self.behind_horizon(&prev_reference)? {
            let prev = self.parent(&envelope.prev)?.ok_or(Rejection::ChainBroken)?;
            if prev.sender != envelope.sender || prev.seq + 1 != envelope.seq {
                return Err(Rejection::ChainBroken);
            }
        }
        for reference in Self::parents(&envelope) {
            if self.behind_horizon(&reference)? {
                partial = true;
                stubs.push((reference.id, reference.sender));
                continue;
            }
            let parent = self.parent(&reference.id)?.ok_or(Rejection::ChainBroken)?;
            if parent.sender != reference.sender || parent.epoch != reference.epoch {
                return Err(Rejection::SeenMismatch);
            }
            max_lamport = max_lamport.max(parent.lamport);
            partial |= parent.partial;
            merge_frontier(&mut frontier, &parent.frontier);
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
        if let Some(kept) = self.store().chain(&envelope.sender, envelope.seq)? {
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
            false,
        ) = (&envelope.body, partial, self.trusting)
            && *horizon >= self.horizon
            && let Some(computed) = self.root_within(&frontier, *horizon)?
            && computed != (*root, *size)
        {
            self.findings.push(Finding::CheckpointMismatch {
                checkpoint: id,
                sender: envelope.sender,
                claimed: (*root, *size),
                computed,
            });
        }
        let mut readers = Vec::new();
        if let Body::ReadReceipt(ids) = &envelope.body {
            for read in ids {
                let covered = self
                    .parent(read)?
                    .is_some_and(|target| covers_seq(&frontier, &target.sender, target.seq));
                if covered {
                    readers.push(*read);
                }
            }
        }
        for read in readers {
            self.store_mut().add_reader(&read, &envelope.sender)?;
        }
        self.stubs.extend(stubs);
        frontier.insert(envelope.sender, envelope.seq);
        let newer = self
            .head_of(&envelope.sender)
            .is_none_or(|(seq, _, _)| seq < envelope.seq);
        if newer {
            self.heads.insert(
                envelope.sender,
                Head {
                    id,
                    seq: envelope.seq,
                    lamport: envelope.lamport,
                    epoch: envelope.epoch,
                    partial,
                    frontier: frontier.iter().map(|(k, v)| (*k, *v)).collect(),
                },
            );
        }
        let entry = Entry {
            envelope,
            frontier,
            partial,
            position: None,
        };
        let key = (entry.envelope.lamport, id);
        self.store_mut().insert(&id, &entry)?;
        if let Some(tail) = &mut self.tail {
            // Above the settled boundary (checked first), so it belongs to the tail.
            tail.insert(tail.partition_point(|k| *k < key), key);
            if tail.len() > MAX_TAIL_CACHE {
                self.tail = None;
            }
        }
        self.len += 1;
        self.fresh.push(id);
        Ok(Inserted::Accepted(vec![id]))
    }

    /// The root over the whole transcript: (Merkle tree hash, number of envelopes):
    /// the settled log plus the unsettled tail, O(log n + tail).
    pub fn root(&self) -> Result<([u8; 32], u64), StorageError> {
        let tail: Vec<Hash> = match &self.tail {
            Some(tail) => tail.iter().map(|(_, id)| id.0).collect(),
            None => self
                .store()
                .ids_after(self.settled_key(), usize::MAX)?
                .into_iter()
                .map(|(_, id)| id.0)
                .collect(),
        };
        self.log.root_with(self.log.len(), &tail)
    }

    /// Number of settled envelopes: the first this many of the canonical order are
    /// final.
    pub fn settled_len(&self) -> u64 {
        self.log.len()
    }

    /// The Lamport time up to which the transcript is settled.
    pub fn settled_lamport(&self) -> u64 {
        self.settled_lamport
    }

    /// The root over the first `size` settled envelopes (final once returned).
    pub fn settled_root(&self, size: u64) -> Result<([u8; 32], u64), StorageError> {
        self.log.root_at(size)
    }

    /// An RFC 6962 consistency proof that the settled root of `old` envelopes is a
    /// prefix of the settled root of `new` envelopes.
    pub fn consistency_proof(
        &self,
        old: u64,
        new: u64,
    ) -> Result<ConsistencyProof<Sha256>, ProofError> {
        self.log.consistency_proof(old, new)
    }

    /// The root over the envelopes that a frontier covers, from epoch `horizon` on:
    /// what a checkpoint with these parents must claim. `None` when it cannot be
    /// computed cheaply: a horizon before this device's, a later joiner's horizon whose
    /// settled root is not read up to date yet (see [`Transcript::read_horizon`]) or
    /// that the frontier does not cover wholly, or ancestors that part from the canonical
    /// order more than [`MAX_CHECKPOINT_SCAN`] envelopes back.
    ///
    /// Everything before the first envelope the frontier does not cover is covered, so
    /// the root is the stored prefix up to there, then the covered envelopes after it.
    fn root_within(
        &mut self,
        frontier: &BTreeMap<DeviceKey, u64>,
        horizon: u64,
    ) -> Result<Option<([u8; 32], u64)>, StorageError> {
        let own = horizon == self.horizon;
        if !own && (horizon < self.horizon || !self.read_horizon(horizon)?) {
            return Ok(None);
        }
        // Each sender's first envelope the frontier does not cover.
        let mut first_uncovered: Option<(OrderKey, Option<u64>)> = None;
        for sender in self.roster.keys() {
            let next = frontier.get(sender).copied().unwrap_or(0) + 1;
            let Some(id) = self.store().chain(sender, next)? else {
                continue;
            };
            let Some(entry) = self.store().entry(&id)? else {
                continue;
            };
            let key = (entry.envelope.lamport, id);
            if first_uncovered.is_none_or(|(first, _)| key < first) {
                first_uncovered = Some((key, entry.position));
            }
        }
        // Where the covered envelopes stop being a prefix of what is stored, and the
        // walk over the rest starts.
        let (prefix, start) = match (own, first_uncovered) {
            (true, None) => return self.root().map(Some),
            // Include `key` itself in the walk (it is not covered, so it is skipped).
            (true, Some((key, Some(position)))) => (position, self.before(key)?),
            (true, Some((_, None))) => (self.log.len(), self.settled_key()),
            // A later joiner's root is kept over the whole settled prefix only.
            (false, Some((_, Some(_)))) => return Ok(None),
            (false, _) => (0, self.settled_key()),
        };
        let mut rest = Vec::new();
        let mut after = start;
        let mut scanned = 0;
        loop {
            let page = self.store().page_after(after, 1024)?;
            let Some(last) = page.last() else { break };
            after = Some((last.1.lamport, last.0));
            for (id, envelope) in page {
                scanned += 1;
                if envelope.epoch >= horizon && covers_seq(frontier, &envelope.sender, envelope.seq)
                {
                    rest.push(id.0);
                }
            }
            if scanned > MAX_CHECKPOINT_SCAN {
                return Ok(None);
            }
        }
        if own {
            return self.log.root_with(prefix, &rest).map(Some);
        }
        let Some(cursor) = self.horizons.get(&horizon) else {
            return Ok(None);
        };
        let mut root = cursor.frontier.clone();
        for leaf in &rest {
            root.push(leaf);
        }
        Ok(Some((root.root(), root.len())))
    }

    /// Starts keeping the settled root of epoch `horizon` on, at which devices join now
    /// (call it when the commit that adds them is merged: nothing settled is of that
    /// epoch yet, so the root starts empty at the end of the settled prefix). Their
    /// checkpoints are checked from then on.
    pub fn note_horizon(&mut self, horizon: u64) {
        if horizon <= self.horizon || self.horizons.contains_key(&horizon) {
            return;
        }
        let mut cursor = HorizonCursor::new(horizon);
        cursor.read = self.log.len();
        cursor.after = self.last_settled;
        self.keep_horizon(cursor);
    }

    /// Brings the settled root of a later joiner's `horizon` up to the end of the
    /// settled prefix, reading at most [`MAX_CHECKPOINT_SCAN`] settled envelopes (a
    /// horizon not noted when its devices joined, as in a channel older than this, is
    /// read from the start, over as many checkpoints as that takes); whether it got
    /// there.
    fn read_horizon(&mut self, horizon: u64) -> Result<bool, StorageError> {
        let mut cursor = self
            .horizons
            .remove(&horizon)
            .unwrap_or_else(|| HorizonCursor::new(horizon));
        let read = cursor.read_settled(self, MAX_CHECKPOINT_SCAN as u64);
        self.keep_horizon(cursor);
        read
    }

    fn keep_horizon(&mut self, cursor: HorizonCursor) {
        self.horizons.insert(cursor.horizon, cursor);
        while self.horizons.len() > MAX_HORIZONS {
            self.horizons.pop_first();
        }
    }

    /// The order key just before `key` (`None` at the start).
    fn before(&self, key: OrderKey) -> Result<Option<OrderKey>, StorageError> {
        Ok(self
            .store()
            .page_before(Some(key), 1)?
            .first()
            .map(|(id, envelope)| (envelope.lamport, *id)))
    }

    /// The root a new checkpoint by `sender` must carry: over everything it will
    /// reference, which is everything accepted so far (every accepted envelope is an
    /// ancestor of its sender's latest, and a checkpoint references every latest).
    pub fn root_for_next_checkpoint(&self) -> Result<([u8; 32], u64), StorageError> {
        self.root()
    }

    /// Devices whose latest envelope shows they hold `id` (its sender included).
    pub fn delivered_to(&self, id: &EnvelopeId) -> Result<BTreeSet<DeviceKey>, StorageError> {
        let Some(target) = self.parent(id)? else {
            return Ok(BTreeSet::new());
        };
        let mut devices: BTreeSet<DeviceKey> = self
            .heads
            .iter()
            .filter(|(_, head)| {
                head.frontier
                    .iter()
                    .any(|(sender, seq)| *sender == target.sender && *seq >= target.seq)
            })
            .map(|(device, _)| *device)
            .collect();
        devices.extend(
            self.held
                .iter()
                .filter(|(_, held)| held.get(&target.sender).is_some_and(|s| *s >= target.seq))
                .map(|(device, _)| *device),
        );
        Ok(devices)
    }

    /// Devices that sent a read receipt for `id`.
    pub fn read_by(&self, id: &EnvelopeId) -> Result<BTreeSet<DeviceKey>, StorageError> {
        self.store().readers(id)
    }

    /// Whether every envelope is an ancestor of (or is) `id`: its frontier reaches every
    /// sender's latest envelope.
    pub fn covers_everything(&self, id: &EnvelopeId) -> Result<bool, StorageError> {
        let Some(top) = self.parent(id)? else {
            return Ok(false);
        };
        Ok(self
            .heads
            .iter()
            .all(|(sender, head)| covers_seq(&top.frontier, sender, head.seq)))
    }

    /// Whether `ancestor` is an ancestor of (or is) `descendant`.
    pub fn is_covered_by(
        &self,
        ancestor: &EnvelopeId,
        descendant: &EnvelopeId,
    ) -> Result<bool, StorageError> {
        Ok(match (self.parent(ancestor)?, self.parent(descendant)?) {
            (Some(a), Some(d)) => covers_seq(&d.frontier, &a.sender, a.seq),
            _ => false,
        })
    }
}

fn covers_seq(frontier: &BTreeMap<DeviceKey, u64>, sender: &DeviceKey, seq: u64) -> bool {
    frontier.get(sender).is_some_and(|have| *have >= seq)
}

fn merge_frontier(into: &mut BTreeMap<DeviceKey, u64>, from: &BTreeMap<DeviceKey, u64>) {
    for (device, seq) in from {
        let slot = into.entry(*device).or_insert(0);
        *slot = (*slot).max(*seq);
    }
}

/// RFC 6962 Merkle tree hash over envelope ids, with the number of leaves.
pub fn merkle_root<'a>(ids: impl Iterator<Item = &'a EnvelopeId>) -> ([u8; 32], u64) {
    let leaves: Vec<Hash> = ids.map(|id| id.0).collect();
    MerkleLog::<MemoryNodes>::default()
        .root_with(0, &leaves)
        .unwrap_or((crate::merkle::empty_root(), 0))
}
