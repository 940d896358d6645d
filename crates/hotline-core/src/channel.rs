//! A channel: one MLS group (openmls) and its transcript.
//!
//! ```text
//!           create ──► add (commit) ──► relay accepted? ──yes──► merge, then Welcome
//!                          │                   └──no───► discard the commit
//!   member: propose (update) ──► committer commits ──► everyone merges
//! ```
//!
//! **One committer.** Each channel has one designated committer (its creator, until it
//! hands the role over). Only the committer commits; other members send proposals, which
//! the committer commits. Two commits can therefore never race for the same epoch, and
//! the group cannot fork, even across relays that know nothing of each other. A commit
//! from any other member is refused.
//!
//! **Commit only after the relay.** The committer merges its own commit only once the
//! outside world accepted it ([`Channel::commit_accepted`]), and only then releases the
//! Welcome, so that no invitee joins an epoch that may never exist.
//!
//! **Transactions.** openmls writes its key schedule into the provider's storage while
//! it processes a message. A caller that persists state must run [`Channel::receive`]
//! (or any other operation) inside one storage transaction together with the events it
//! returns, and roll back on error.
//!
//! **Duplicates and epochs.** The same ciphertext arrives over several relays; a second
//! copy would fail inside openmls (`SecretReuseError`), so duplicates are dropped by the
//! SHA-256 of their bytes before anything else. Messages of a future epoch wait in a
//! bounded buffer until their commit arrives; past epochs stay readable for
//! [`MAX_PAST_EPOCHS`] epochs.
//!
//! **Resending.** A member cut off while the group moved more than [`MAX_PAST_EPOCHS`]
//! epochs on can no longer open what was sealed before, and a relay may have expired or
//! lost a message some party never read. [`Channel::resend`] seals one of this device's
//! own envelopes again, byte for byte, in the current epoch, framed as a resend (the
//! plaintext starts with [`RESENT`]): receivers take it like the original (a duplicate
//! if they hold it), accept that its epoch field is older than the MLS epoch it came in,
//! and report [`Event::Resent`] so that a sync engine does not take it for a replay.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use openmls::prelude::{
    BasicCredential, Credential, DeserializeBytes as _, GroupId, LeafNodeIndex, LeafNodeParameters,
    MlsGroup, MlsGroupCreateConfig, MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn,
    MlsMessageOut, OpenMlsProvider, PURE_PLAINTEXT_WIRE_FORMAT_POLICY, ProcessMessageError,
    ProcessedMessageContent, ProtocolMessage, SenderRatchetConfiguration, StageCommitError,
    StagedWelcome,
};
use openmls::prelude::{Proposal, Sender, StagedCommit};
use openmls_traits::random::OpenMlsRand;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::CIPHERSUITE;
use crate::card::VerifiedContact;
use crate::envelope::{Body, ChannelId, Envelope, EnvelopeError, EnvelopeId, MembershipNote};
use crate::frame::{EPHEMERAL, Frame, MAX_FRAME_PAYLOAD};
use crate::identity::{DeviceIdentity, DeviceInfo, DeviceKey, Fingerprint};
use crate::merkle::StorageError;
use crate::transcript::{Finding, Inserted, Rejection, Transcript, TranscriptState};
use crate::transcript_store::{MemoryStore, TranscriptStore};

/// First byte of a resent envelope's plaintext (an envelope starts with its version, 1).
pub const RESENT: u8 = 0x81;

/// Past epochs whose messages stay readable.
pub const MAX_PAST_EPOCHS: usize = 5;
/// How far a message may lag behind newer ones of its sender and still be read.
pub const OUT_OF_ORDER_TOLERANCE: u32 = 1000;
/// How far ahead of the last one read a message may be.
pub const MAXIMUM_FORWARD_DISTANCE: u32 = 10_000;
/// Most messages held for a future epoch.
pub const MAX_BUFFERED: usize = 4096;
/// Longest channel name, in bytes.
pub const MAX_CHANNEL_NAME_LEN: usize = 128;

/// What to send after an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// Post to the channel's relays. `id` names the envelope inside, if any.
    Message {
        id: Option<EnvelopeId>,
        bytes: Vec<u8>,
    },
    /// A commit: post it, then report the relay's answer with
    /// [`Channel::commit_accepted`] or [`Channel::commit_rejected`].
    Commit(Vec<u8>),
    /// An invitation, for these devices' inboxes.
    Welcome { to: Vec<DeviceKey>, bytes: Vec<u8> },
}

/// What happened when a message was received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The same bytes were received before.
    Duplicate,
    /// From a future epoch: held until its commit arrives.
    Buffered { epoch: u64 },
    /// Envelopes entered the transcript (this one and any it unblocked).
    Accepted(Vec<EnvelopeId>),
    /// The envelope (`seq` of `sender`'s chain) waits for these parents.
    Waiting {
        id: EnvelopeId,
        sender: DeviceKey,
        seq: u64,
        missing: Vec<EnvelopeId>,
    },
    /// The envelope forks its sender's chain: kept as evidence only.
    Fork { kept: EnvelopeId },
    /// The transcript refused the envelope.
    Refused(Rejection),
    /// A proposal arrived; the committer should commit it.
    ProposalQueued,
    /// A commit was merged.
    EpochChanged {
        epoch: u64,
        added: Vec<DeviceInfo>,
        removed: Vec<DeviceKey>,
    },
    /// Someone this device never verified was added by the committer.
    UnverifiedMember(DeviceInfo),
    /// This device was removed: nothing that follows can be read.
    RemovedFromChannel,
    /// The committer role moved.
    CommitterChanged(DeviceKey),
    /// A member sent an MLS message whose envelope is malformed.
    BadEnvelope {
        sender: DeviceKey,
        error: EnvelopeError,
    },
    /// A member sent an envelope claiming another sender or epoch.
    Forgery {
        claimed: DeviceKey,
        actual: DeviceKey,
    },
    /// These bytes were its sender's resend of an envelope sealed before (see
    /// [`Channel::resend`]); the other events say what became of the envelope.
    Resent,
    /// A member's checkpoint claims a root over its history that differs from the one
    /// this device computes over the same envelopes: the two hold different histories,
    /// or the member lies about its own.
    CheckpointMismatch {
        checkpoint: EnvelopeId,
        sender: DeviceKey,
    },
    /// An ephemeral frame (see [`crate::frame`]): nothing entered the transcript, but
    /// what `sender` holds was noted (it counts as delivered to it).
    Ephemeral {
        sender: DeviceKey,
        sent_ms: u64,
        payload: Vec<u8>,
    },
    /// A message held for its epoch (reported [`Event::Buffered`] when it came) was
    /// processed now: the SHA-256 of its bytes and the envelope they carried, if any
    /// (`None` for a resend, or bytes that carried no new envelope). Its own events come
    /// just before.
    Unbuffered {
        hash: [u8; 32],
        envelope: Option<(EnvelopeId, DeviceKey, u64)>,
    },
    /// An application message sealed under this device's own MLS leaf that this device
    /// did not send (it marks everything it sends): another copy of this device is
    /// sending (a home restored from an older backup, or a copy of it), or a member
    /// forged the sender (the sender field is encrypted to the whole group, not
    /// signed). Nothing can be read from it: MLS never opens a device's own messages.
    SentElsewhere { epoch: u64 },
}

/// Why a channel operation failed. On error, nothing changed.
#[derive(Debug, Error)]
pub enum ChannelError {
    #[error("not an MLS message: {0}")]
    Malformed(String),
    #[error("the message belongs to another channel")]
    WrongChannel,
    #[error("an ephemeral payload of {0} bytes is over the limit of {MAX_FRAME_PAYLOAD}")]
    FrameTooLarge(usize),
    #[error("only the channel's committer can do this")]
    NotCommitter,
    #[error("a commit from {0:?}, who is not the committer, was refused")]
    CommitterViolation(DeviceKey),
    #[error("a membership change is waiting for the committer's commit; try again after it")]
    AwaitingCommit,
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("this device joined a running channel and holds nothing from the others yet")]
    AwaitingHistory,
    #[error(
        "this device was restored from a backup: it reads every relay of the channel to its end \
         before it seals anything"
    )]
    CatchingUp,
    #[error(
        "this device sent messages after the backup it was restored from (they came back from \
         the relays, sealed as its own): sealing from the backup's state would fork its chain in \
         every member's record"
    )]
    SentElsewhere,
    #[error("a membership change of this device waits for a relay to accept it")]
    CommitPending,
    #[error("this device is not a member of the channel (any more)")]
    NotAMember,
    #[error(
        "refused to join: {party}/{device} (fingerprint {fingerprint}) is in the channel but was never verified; \
         verify their card first"
    )]
    TrustRefused {
        party: String,
        device: String,
        fingerprint: Fingerprint,
    },
    #[error("only key-update proposals are accepted; membership changes are the committer's")]
    ProposalRefused,
    #[error("a member's credential does not match its key")]
    CredentialMismatch,
    #[error("malformed envelope: {0}")]
    BadEnvelope(#[from] EnvelopeError),
    #[error("no member with key {0:?}")]
    UnknownDevice(DeviceKey),
    #[error("too many messages wait for a future epoch")]
    BufferFull,
    #[error("no envelope {0} of this device in the channel")]
    UnknownEnvelope(EnvelopeId),
    #[error("invalid channel name")]
    BadName,
    #[error("MLS refused: {0}")]
    Mls(String),
}

fn mls<E: std::fmt::Display>(error: E) -> ChannelError {
    ChannelError::Mls(error.to_string())
}

/// Hash of a ciphertext, the key of duplicate detection.
pub fn ciphertext_hash(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct PendingCommit {
    welcome: Option<(Vec<DeviceKey>, Vec<u8>)>,
    notes: Vec<MembershipNote>,
    added: Vec<DeviceInfo>,
}

/// One device's view of one channel. See the module documentation.
#[derive(Debug)]
pub struct Channel {
    id: ChannelId,
    name: String,
    group: MlsGroup,
    me: DeviceKey,
    committer: DeviceKey,
    transcript: Transcript,
    future: BTreeMap<u64, Vec<Vec<u8>>>,
    /// Commits that reference a proposal not received yet.
    stalled: Vec<Vec<u8>>,
    buffered: HashSet<[u8; 32]>,
    contacts: BTreeMap<DeviceKey, DeviceInfo>,
    pending_commit: Option<PendingCommit>,
    /// Devices no longer in the group, with the epoch this device saw them gone at.
    departed: Vec<(DeviceKey, u64)>,
    /// Why this device may not seal anything now, if it may not (see [`Hold`]).
    hold: Option<Hold>,
}

/// Why a channel seals nothing for now: its state came from a backup, and sealing
/// from a state older than this device's last message would spend MLS keys a second
/// time and fork its chain in every member's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hold {
    /// Restored from a backup: waits until every relay of the channel was read to its end.
    CatchingUp,
    /// While catching up, messages sealed as this device's arrived that it never sent
    /// ([`Event::SentElsewhere`]): it sent after the backup was taken.
    SentElsewhere,
}

/// Everything of a [`Channel`] but its MLS group (which lives in the provider's
/// storage), its envelopes and its processed-ciphertext hashes (which the caller stores
/// as they come, see [`Channel::take_fresh`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelSnapshot {
    id: ChannelId,
    name: String,
    me: DeviceKey,
    committer: DeviceKey,
    horizon: u64,
    roster: Vec<DeviceInfo>,
    contacts: Vec<DeviceInfo>,
    future: BTreeMap<u64, Vec<Vec<u8>>>,
    stalled: Vec<Vec<u8>>,
    pending_commit: Option<PendingCommit>,
    /// Devices no longer in the group and the epoch they were seen gone at (absent in
    /// snapshots of earlier versions: then counted from the epoch of the first restore).
    #[serde(default)]
    departed: Vec<(DeviceKey, u64)>,
    /// The transcript's bounded state (absent in snapshots of earlier versions, whose
    /// transcripts are rebuilt from their envelopes once).
    #[serde(default)]
    transcript: Option<TranscriptState>,
    /// Absent in snapshots of earlier versions: nothing held.
    #[serde(default)]
    hold: Option<Hold>,
}

impl ChannelSnapshot {
    /// Whether the transcript must be rebuilt from stored envelopes (a snapshot written
    /// before the transcript kept its state in a store).
    pub fn needs_rebuild(&self) -> bool {
        self.transcript.is_none()
    }
}

/// What changed in a channel since the last [`Channel::take_fresh`].
#[derive(Debug, Default)]
pub struct Fresh {
    /// Envelopes set waiting for a parent. Store them: a waiting envelope's ciphertext
    /// is processed and will not come back; [`Channel::restore`] takes them back.
    pub waiting: Vec<(EnvelopeId, Envelope)>,
}

fn sender_ratchet() -> SenderRatchetConfiguration {
    SenderRatchetConfiguration::new(OUT_OF_ORDER_TOLERANCE, MAXIMUM_FORWARD_DISTANCE)
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(sender_ratchet())
        .build()
}

fn serialize(message: &MlsMessageOut) -> Result<Vec<u8>, ChannelError> {
    message.to_bytes().map_err(mls)
}

/// The device a credential names, checked against the signature key beside it.
fn device_of(credential: &Credential, signature_key: &[u8]) -> Result<DeviceInfo, ChannelError> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| ChannelError::CredentialMismatch)?;
    let info = DeviceInfo::from_credential_bytes(basic.identity())
        .map_err(|_| ChannelError::CredentialMismatch)?;
    if info.key.0.as_slice() != signature_key {
        return Err(ChannelError::CredentialMismatch);
    }
    Ok(info)
}

/// The channel a message from a relay belongs to, read from its MLS header (which is
/// authenticated later, by [`Channel::receive`]). Welcomes name no channel.
pub fn channel_of_message(bytes: &[u8]) -> Result<ChannelId, ChannelError> {
    split_group_id(protocol_message(bytes)?.group_id()).map(|(id, _)| id)
}

/// The MLS epoch a channel message claims (as sent; unauthenticated until processed).
pub fn epoch_of_message(bytes: &[u8]) -> Result<u64, ChannelError> {
    Ok(protocol_message(bytes)?.epoch().as_u64())
}

/// Parses a channel message (commit, proposal or application message).
fn protocol_message(bytes: &[u8]) -> Result<ProtocolMessage, ChannelError> {
    let message = MlsMessageIn::tls_deserialize_exact_bytes(bytes)
        .map_err(|e| ChannelError::Malformed(e.to_string()))?;
    match message.extract() {
        MlsMessageBodyIn::PrivateMessage(message) => Ok(message.into()),
        MlsMessageBodyIn::PublicMessage(message) => Ok(message.into()),
        _ => Err(ChannelError::Malformed("not a channel message".into())),
    }
}

fn group_id_for(id: &ChannelId, name: &str) -> GroupId {
    GroupId::from_slice(&[&id.0[..], name.as_bytes()].concat())
}

fn split_group_id(group_id: &GroupId) -> Result<(ChannelId, String), ChannelError> {
    let bytes = group_id.as_slice();
    if bytes.len() < 32 || bytes.len() > 32 + MAX_CHANNEL_NAME_LEN {
        return Err(ChannelError::BadName);
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&bytes[..32]);
    let name = std::str::from_utf8(&bytes[32..]).map_err(|_| ChannelError::BadName)?;
    Ok((ChannelId(id), name.to_owned()))
}

impl Channel {
    /// Creates a channel with this device as its only member and committer, its
    /// transcript in memory.
    pub fn create(
        provider: &impl OpenMlsProvider,
        identity: &DeviceIdentity,
        name: &str,
    ) -> Result<Self, ChannelError> {
        Self::create_with(provider, identity, name, |_| MemoryStore::boxed())
    }

    /// Creates a channel whose transcript lives in the store `open_store` gives for its
    /// id (which must hold nothing of it yet).
    pub fn create_with(
        provider: &impl OpenMlsProvider,
        identity: &DeviceIdentity,
        name: &str,
        open_store: impl FnOnce(&ChannelId) -> Box<dyn TranscriptStore>,
    ) -> Result<Self, ChannelError> {
        if name.is_empty()
            || name.len() > MAX_CHANNEL_NAME_LEN
            || name.chars().any(char::is_control)
        {
            return Err(ChannelError::BadName);
        }
        let id = ChannelId(provider.rand().random_array().map_err(mls)?);
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(true)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .sender_ratchet_configuration(sender_ratchet())
            .build();
        let group = MlsGroup::new_with_group_id(
            provider,
            identity,
            &config,
            group_id_for(&id, name),
            identity.credential_with_key(),
        )
        .map_err(mls)?;
        let mut transcript = Transcript::in_store(id, 0, open_store(&id));
        transcript.admit(identity.info());
        Ok(Self {
            id,
            name: name.to_owned(),
            group,
            me: identity.key(),
            committer: identity.key(),
            transcript,
            future: BTreeMap::new(),
            stalled: Vec::new(),
            buffered: HashSet::new(),
            contacts: BTreeMap::new(),
            pending_commit: None,
            departed: Vec::new(),
            hold: None,
        })
    }

    /// Joins from a Welcome, after checking every member against `contacts`, the
    /// devices this device verified. Refuses if any member is unknown. The transcript
    /// is kept in memory.
    pub fn join(
        provider: &impl OpenMlsProvider,
        identity: &DeviceIdentity,
        welcome: &[u8],
        contacts: &[DeviceInfo],
    ) -> Result<Self, ChannelError> {
        Self::join_with(provider, identity, welcome, contacts, |_| {
            MemoryStore::boxed()
        })
    }

    /// Joins from a Welcome, the transcript in the store `open_store` gives.
    pub fn join_with(
        provider: &impl OpenMlsProvider,
        identity: &DeviceIdentity,
        welcome: &[u8],
        contacts: &[DeviceInfo],
        open_store: impl FnOnce(&ChannelId) -> Box<dyn TranscriptStore>,
    ) -> Result<Self, ChannelError> {
        let message = MlsMessageIn::tls_deserialize_exact_bytes(welcome)
            .map_err(|e| ChannelError::Malformed(e.to_string()))?;
        let MlsMessageBodyIn::Welcome(welcome) = message.extract() else {
            return Err(ChannelError::Malformed("not a Welcome".into()));
        };
        let staged = StagedWelcome::new_from_welcome(provider, &join_config(), welcome, None)
            .map_err(mls)?;
        let known: BTreeMap<DeviceKey, &DeviceInfo> =
            contacts.iter().map(|info| (info.key, info)).collect();
        let mut members = Vec::new();
        for member in staged.members() {
            let info = device_of(&member.credential, &member.signature_key)?;
            if info.key != identity.key() && known.get(&info.key) != Some(&&info) {
                return Err(ChannelError::TrustRefused {
                    fingerprint: info.fingerprint(),
                    party: info.party,
                    device: info.device,
                });
            }
            members.push(info);
        }
        let sender = staged.welcome_sender().map_err(mls)?;
        let committer = DeviceKey(
            sender
                .signature_key()
                .as_slice()
                .try_into()
                .map_err(|_| ChannelError::CredentialMismatch)?,
        );
        let group = staged.into_group(provider).map_err(mls)?;
        let (id, name) = split_group_id(group.group_id())?;
        let mut transcript = Transcript::in_store(id, group.epoch().as_u64(), open_store(&id));
        for member in &members {
            transcript.admit(member);
        }
        Ok(Self {
            id,
            name,
            group,
            me: identity.key(),
            committer,
            transcript,
            future: BTreeMap::new(),
            stalled: Vec::new(),
            buffered: HashSet::new(),
            contacts: contacts
                .iter()
                .map(|info| (info.key, info.clone()))
                .collect(),
            pending_commit: None,
            departed: Vec::new(),
            hold: None,
        })
    }

    /// The channel's state besides MLS, envelopes and processed hashes.
    pub fn snapshot(&self) -> ChannelSnapshot {
        ChannelSnapshot {
            id: self.id,
            name: self.name.clone(),
            me: self.me,
            committer: self.committer,
            horizon: self.transcript.horizon(),
            roster: self.transcript.roster().values().cloned().collect(),
            contacts: self.contacts.values().cloned().collect(),
            future: self.future.clone(),
            stalled: self.stalled.clone(),
            pending_commit: self.pending_commit.clone(),
            departed: self.departed.clone(),
            transcript: Some(self.transcript.state()),
            hold: self.hold,
        }
    }

    /// Rebuilds a channel from its snapshot, its MLS group in `provider`'s storage and
    /// its transcript `store`. `waiting` are the envelopes that were waiting for a
    /// parent; for a snapshot that [`ChannelSnapshot::needs_rebuild`], every stored
    /// envelope, in any order, re-inserted into the (empty) store once.
    pub fn restore(
        provider: &impl OpenMlsProvider,
        snapshot: ChannelSnapshot,
        store: Box<dyn TranscriptStore>,
        waiting: impl IntoIterator<Item = Envelope>,
    ) -> Result<Self, ChannelError> {
        let group = MlsGroup::load(
            provider.storage(),
            &group_id_for(&snapshot.id, &snapshot.name),
        )
        .map_err(mls)?
        .ok_or_else(|| {
            ChannelError::Mls("the channel's MLS group is missing from storage".into())
        })?;
        let rebuild = snapshot.transcript.is_none();
        let mut transcript = Transcript::restore(
            snapshot.id,
            snapshot.horizon,
            snapshot.transcript.unwrap_or_default(),
            store,
        );
        for info in &snapshot.roster {
            transcript.admit(info);
        }
        transcript.load_tail()?;
        let mut envelopes: Vec<_> = waiting
            .into_iter()
            .map(|e| (e.lamport, e.id(), e))
            .collect();
        envelopes.sort_by_key(|(lamport, id, _)| (*lamport, *id));
        // Envelopes stored before were checked when they arrived.
        transcript.set_trusting(true);
        for (_, id, envelope) in envelopes {
            match transcript.insert(envelope, id) {
                Ok(_) => {}
                Err(Rejection::Storage(error)) => return Err(error.into()),
                Err(reason) if rebuild => {
                    return Err(ChannelError::Mls(format!(
                        "stored envelope refused: {reason}"
                    )));
                }
                Err(_) => {}
            }
        }
        transcript.set_trusting(false);
        // What was kept as waiting and is accepted now (all of it, when rebuilding).
        let accepted = transcript.take_fresh();
        transcript.forget_waiting(&accepted)?;
        transcript.take_fresh_pending();
        transcript.clear_findings();
        let buffered: HashSet<[u8; 32]> = snapshot
            .future
            .values()
            .flatten()
            .chain(&snapshot.stalled)
            .map(|bytes| ciphertext_hash(bytes))
            .collect();
        Self {
            id: snapshot.id,
            name: snapshot.name,
            group,
            me: snapshot.me,
            committer: snapshot.committer,
            transcript,
            future: snapshot.future,
            stalled: snapshot.stalled,
            buffered,
            contacts: snapshot.contacts.into_iter().map(|i| (i.key, i)).collect(),
            pending_commit: snapshot.pending_commit,
            departed: snapshot.departed,
            hold: snapshot.hold,
        }
        .with_departed_retired()
    }

    /// What changed since the last call, for the caller to persist with the MLS state:
    /// the envelopes now waiting for a parent (accepted ones are in the store already).
    pub fn take_fresh(&mut self) -> Fresh {
        self.transcript.take_fresh();
        self.transcript.clear_findings();
        Fresh {
            waiting: self.transcript.take_fresh_pending(),
        }
    }

    fn mark_processed(&mut self, hash: [u8; 32]) -> Result<(), ChannelError> {
        self.transcript.mark_processed(&hash)?;
        Ok(())
    }

    fn with_departed_retired(mut self) -> Result<Self, ChannelError> {
        // Retired after the envelopes are back: in canonical order, no stored envelope
        // can fall inside the prefix settled so far (see `Transcript::settle`).
        self.retire_departed()?;
        Ok(self)
    }

    pub fn id(&self) -> ChannelId {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn epoch(&self) -> u64 {
        self.group.epoch().as_u64()
    }

    pub fn committer(&self) -> DeviceKey {
        self.committer
    }

    pub fn is_committer(&self) -> bool {
        self.committer == self.me
    }

    /// Why this device seals nothing in this channel now, if it does not.
    pub fn hold(&self) -> Option<Hold> {
        self.hold
    }

    /// Stops sealing (messages, frames, resends, commits) until [`Channel::release`]:
    /// for a state restored from a backup, until its relays were read.
    pub fn hold_sealing(&mut self) {
        self.hold = Some(Hold::CatchingUp);
    }

    /// Seals again.
    pub fn release(&mut self) {
        self.hold = None;
    }

    fn check_hold(&self) -> Result<(), ChannelError> {
        match self.hold {
            None => Ok(()),
            Some(Hold::CatchingUp) => Err(ChannelError::CatchingUp),
            Some(Hold::SentElsewhere) => Err(ChannelError::SentElsewhere),
        }
    }

    pub fn is_active(&self) -> bool {
        self.group.is_active()
    }

    pub fn transcript(&self) -> &Transcript {
        &self.transcript
    }

    /// The current members.
    pub fn members(&self) -> Vec<DeviceInfo> {
        self.group
            .members()
            .filter_map(|member| device_of(&member.credential, &member.signature_key).ok())
            .collect()
    }

    /// Whether proposals wait for a commit (the committer should call
    /// [`Channel::commit_proposals`]).
    /// Whether this device staged a commit that no relay has accepted yet.
    pub fn has_pending_commit(&self) -> bool {
        self.pending_commit.is_some()
    }

    pub fn has_pending_proposals(&self) -> bool {
        self.group.pending_proposals().next().is_some()
    }

    /// Remembers verified contacts, to check members that the committer adds later.
    pub fn remember_contacts(&mut self, contacts: impl IntoIterator<Item = DeviceInfo>) {
        self.contacts
            .extend(contacts.into_iter().map(|info| (info.key, info)));
    }

    /// Seals `body` in a new envelope and encrypts it for the channel.
    pub fn send(
        &mut self,
        provider: &impl OpenMlsProvider,
        identity: &DeviceIdentity,
        body: Body,
        now_ms: u64,
        deadline_ms: Option<u64>,
    ) -> Result<(EnvelopeId, Vec<u8>), ChannelError> {
        if !self.group.is_active() {
            return Err(ChannelError::NotAMember);
        }
        self.check_hold()?;
        if self.has_pending_proposals() {
            return Err(ChannelError::AwaitingCommit);
        }
        if !self.transcript.may_seal(&self.me) {
            return Err(ChannelError::AwaitingHistory);
        }
        let (seq, prev, prev_epoch) = match self.transcript.head_of(&self.me) {
            Some((seq, id, _)) => {
                let epoch = self.transcript.head_epoch(&self.me).unwrap_or(0);
                (seq + 1, id, epoch)
            }
            None => (1, EnvelopeId::NONE, 0),
        };
        let (seen, lamport) = self.transcript.next_references(&self.me);
        let mut envelope = Envelope {
            channel: self.id,
            sender: self.me,
            epoch: self.epoch(),
            seq,
            prev,
            prev_epoch,
            seen,
            lamport,
            claimed_time_ms: now_ms,
            body,
            deadline_ms,
            signature: None,
        };
        if let Body::Checkpoint { .. } = envelope.body {
            let (root, size) = self.transcript.root_for_next_checkpoint()?;
            envelope.body = Body::Checkpoint {
                root,
                size,
                horizon: self.transcript.horizon(),
            };
        }
        if envelope.body.kind().is_signed() {
            envelope.sign(identity);
        }
        envelope.check_format()?;
        let (plaintext, id) = envelope.encode_with_id();
        let message = self
            .group
            .create_message(provider, identity, &plaintext)
            .map_err(mls)?;
        let bytes = serialize(&message)?;
        self.mark_processed(ciphertext_hash(&bytes))?;
        match self.transcript.insert(envelope, id) {
            Ok(Inserted::Accepted(_)) => Ok((id, bytes)),
            // Invariant: an envelope built from this transcript's own heads always fits.
            other => Err(ChannelError::Mls(format!(
                "internal: own envelope not accepted: {other:?}"
            ))),
        }
    }

    /// Seals this device's own envelope `id` again in the current epoch (see the module
    /// documentation), for members who never got it. Its id, and so its place in every
    /// transcript, stays the same.
    pub fn resend(
        &mut self,
        provider: &impl OpenMlsProvider,
        identity: &DeviceIdentity,
        id: &EnvelopeId,
    ) -> Result<Vec<u8>, ChannelError> {
        if !self.group.is_active() {
            return Err(ChannelError::NotAMember);
        }
        self.check_hold()?;
        if self.has_pending_proposals() {
            return Err(ChannelError::AwaitingCommit);
        }
        if self.pending_commit.is_some() {
            return Err(ChannelError::CommitPending);
        }
        let envelope = self
            .transcript
            .get(id)?
            .filter(|envelope| envelope.sender == self.me)
            .ok_or(ChannelError::UnknownEnvelope(*id))?;
        let mut plaintext = vec![RESENT];
        plaintext.extend_from_slice(&envelope.encode());
        let message = self
            .group
            .create_message(provider, identity, &plaintext)
            .map_err(mls)?;
        let bytes = serialize(&message)?;
        self.mark_processed(ciphertext_hash(&bytes))?;
        Ok(bytes)
    }

    /// Seals `payload` in an ephemeral frame (see [`crate::frame`]) that tells the
    /// members what this device holds. Nothing enters the transcript and the frame is
    /// not marked processed: the caller remembers its hash (relays serve a member its
    /// own messages too).
    pub fn send_ephemeral(
        &mut self,
        provider: &impl OpenMlsProvider,
        identity: &DeviceIdentity,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<Vec<u8>, ChannelError> {
        if !self.group.is_active() {
            return Err(ChannelError::NotAMember);
        }
        self.check_hold()?;
        if self.has_pending_proposals() {
            return Err(ChannelError::AwaitingCommit);
        }
        if payload.len() > MAX_FRAME_PAYLOAD {
            return Err(ChannelError::FrameTooLarge(payload.len()));
        }
        let frame = Frame {
            sent_ms: now_ms,
            held: self.transcript.held_frontier(),
            payload: payload.to_vec(),
        };
        let message = self
            .group
            .create_message(provider, identity, &frame.encode())
            .map_err(mls)?;
        serialize(&message)
    }

    /// Sends a signed checkpoint over everything this device holds.
    pub fn checkpoint(
        &mut self,
        provider: &impl OpenMlsProvider,
        identity: &DeviceIdentity,
        now_ms: u64,
    ) -> Result<(EnvelopeId, Vec<u8>), ChannelError> {
        let body = Body::Checkpoint {
            root: [0; 32],
            size: 0,
            horizon: 0,
        };
        self.send(provider, identity, body, now_ms, None)
    }

    fn start_commit(&self) -> Result<(), ChannelError> {
        if !self.is_committer() {
            return Err(ChannelError::NotCommitter);
        }
        self.check_hold()?;
        if self.pending_commit.is_some() {
            return Err(ChannelError::CommitPending);
        }
        Ok(())
    }

    fn stage(
        &mut self,
        commit: &MlsMessageOut,
        pending: PendingCommit,
    ) -> Result<Outgoing, ChannelError> {
        let bytes = serialize(commit)?;
        self.mark_processed(ciphertext_hash(&bytes))?;
        self.pending_commit = Some(pending);
        Ok(Outgoing::Commit(bytes))
    }

    /// Adds verified contacts (committer only). Returns the commit to post.
    pub fn add(
        &mut self,
        provider: &impl OpenMlsProvider,
        identity: &DeviceIdentity,
        contacts: Vec<VerifiedContact>,
    ) -> Result<Outgoing, ChannelError> {
        self.start_commit()?;
        let mut key_packages = Vec::new();
        let mut added = Vec::new();
        for mut contact in contacts {
            key_packages.push(contact.take_key_package());
            added.push(contact.info.clone());
        }
        let (commit, welcome, _) = self
            .group
            .add_members(provider, identity, &key_packages)
            .map_err(mls)?;
        let pending = PendingCommit {
            welcome: Some((added.iter().map(|i| i.key).collect(), serialize(&welcome)?)),
            notes: added
                .iter()
                .map(|info| MembershipNote::Added {
                    party: info.party.clone(),
                    device: info.key,
                })
                .collect(),
            added,
        };
        self.remember_contacts(pending.added.iter().cloned());
        self.stage(&commit, pending)
    }

    fn leaf_of(&self, device: &DeviceKey) -> Result<LeafNodeIndex, ChannelError> {
        self.group
            .members()
            .find(|member| member.signature_key.as_slice() == device.0.as_slice())
            .map(|member| member.index)
            .ok_or(ChannelError::UnknownDevice(*device))
    }

    /// Removes devices (committer only). Returns the commit to post.
    pub fn remove(
        &mut self,
        provider: &impl OpenMlsProvider,
        identity: &DeviceIdentity,
        devices: &[DeviceKey],
    ) -> Result<Outgoing, ChannelError> {
        self.start_commit()?;
        let leaves = devices
            .iter()
            .map(|device| self.leaf_of(device))
            .collect::<Result<Vec<_>, _>>()?;
        let (commit, _, _) = self
            .group
            .remove_members(provider, identity, &leaves)
            .map_err(mls)?;
        let pending = PendingCommit {
            notes: devices
                .iter()
                .map(|device| MembershipNote::Removed { device: *device })
                .collect(),
            ..PendingCommit::default()
        };
        self.stage(&commit, pending)
    }

    /// Refreshes this device's keys: a commit from the committer, a proposal from
    /// anyone else (for the committer to commit).
    pub fn update_keys(
        &mut self,
        provider: &impl OpenMlsProvider,
        identity: &DeviceIdentity,
    ) -> Result<Outgoing, ChannelError> {
        if self.is_committer() {
            self.start_commit()?;
            let bundle = self
                .group
                .self_update(provider, identity, LeafNodeParameters::default())
                .map_err(mls)?;
            let pending = PendingCommit {
                notes: vec![MembershipNote::KeyUpdated {
                    epoch: self.epoch() + 1,
                }],
                ..PendingCommit::default()
            };
            return self.stage(bundle.commit(), pending);
        }
        let (proposal, _) = self
            .group
            .propose_self_update(provider, identity, LeafNodeParameters::default())
            .map_err(mls)?;
        let bytes = serialize(&proposal)?;
        self.mark_processed(ciphertext_hash(&bytes))?;
        Ok(Outgoing::Message { id: None, bytes })
    }

    /// Commits the proposals that wait (committer only), if any.
    pub fn commit_proposals(
        &mut self,
        provider: &impl OpenMlsProvider,
        identity: &DeviceIdentity,
    ) -> Result<Option<Outgoing>, ChannelError> {
        if !self.has_pending_proposals() {
            return Ok(None);
        }
        self.start_commit()?;
        let (commit, _, _) = self
            .group
            .commit_to_pending_proposals(provider, identity)
            .map_err(mls)?;
        let pending = PendingCommit {
            notes: vec![MembershipNote::KeyUpdated {
                epoch: self.epoch() + 1,
            }],
            ..PendingCommit::default()
        };
        self.stage(&commit, pending).map(Some)
    }

    /// The relay durably accepted our commit: merge it, then release the Welcome and
    /// the membership notes for the record.
    pub fn commit_accepted(
        &mut self,
        provider: &impl OpenMlsProvider,
        identity: &DeviceIdentity,
        now_ms: u64,
    ) -> Result<Vec<Outgoing>, ChannelError> {
        let Some(pending) = self.pending_commit.take() else {
            return Ok(Vec::new());
        };
        if let Err(error) = self.group.merge_pending_commit(provider) {
            self.pending_commit = Some(pending);
            return Err(mls(error));
        }
        for info in &pending.added {
            self.transcript.admit(info);
        }
        if !pending.added.is_empty() {
            self.transcript.note_horizon(self.epoch());
        }
        self.retire_departed()?;
        let mut out = Vec::new();
        if let Some((to, bytes)) = pending.welcome {
            out.push(Outgoing::Welcome { to, bytes });
        }
        // The commit is merged: from here on nothing may fail, or the Welcome would be
        // lost. A note that cannot be sent (it cannot, right after a merge) is skipped;
        // notes are for the record, the MLS epoch is the truth.
        for note in pending.notes {
            let sent = self.send(provider, identity, Body::Membership(note), now_ms, None);
            if let Ok((id, bytes)) = sent {
                out.push(Outgoing::Message {
                    id: Some(id),
                    bytes,
                });
            }
        }
        Ok(out)
    }

    /// The relay refused our commit: forget it, as if it never happened.
    pub fn commit_rejected(&mut self, provider: &impl OpenMlsProvider) -> Result<(), ChannelError> {
        if self.pending_commit.take().is_some() {
            self.group
                .clear_pending_commit(provider.storage())
                .map_err(mls)?;
        }
        Ok(())
    }

    /// Hands the committer role to another member (committer only).
    pub fn hand_over(
        &mut self,
        provider: &impl OpenMlsProvider,
        identity: &DeviceIdentity,
        to: DeviceKey,
        now_ms: u64,
    ) -> Result<(EnvelopeId, Vec<u8>), ChannelError> {
        self.start_commit()?;
        self.leaf_of(&to)?;
        let note = Body::Membership(MembershipNote::CommitterHandover { to });
        let sent = self.send(provider, identity, note, now_ms, None)?;
        self.committer = to;
        Ok(sent)
    }

    /// Processes bytes from a relay. Returns what happened; on error nothing changed.
    pub fn receive(
        &mut self,
        provider: &impl OpenMlsProvider,
        bytes: &[u8],
    ) -> Result<Vec<Event>, ChannelError> {
        let hash = ciphertext_hash(bytes);
        if self.buffered.contains(&hash) || self.transcript.is_processed(&hash)? {
            return Ok(vec![Event::Duplicate]);
        }
        let protocol = protocol_message(bytes)?;
        if protocol.group_id() != self.group.group_id() {
            return Err(ChannelError::WrongChannel);
        }
        if !self.group.is_active() {
            return Err(ChannelError::NotAMember);
        }
        let epoch = protocol.epoch().as_u64();
        if epoch > self.epoch() {
            if self.buffered.len() >= MAX_BUFFERED {
                return Err(ChannelError::BufferFull);
            }
            self.buffered.insert(hash);
            self.future.entry(epoch).or_default().push(bytes.to_vec());
            return Ok(vec![Event::Buffered { epoch }]);
        }
        let processed = match self.group.process_message(provider, protocol) {
            Ok(processed) => processed,
            Err(ProcessMessageError::InvalidCommit(StageCommitError::MissingProposal)) => {
                // The proposal it commits was delayed or reordered behind it. Handshake
                // messages are public (signed, not encrypted), so no key was spent:
                // retry when the next proposal arrives.
                if self.buffered.len() >= MAX_BUFFERED {
                    return Err(ChannelError::BufferFull);
                }
                self.buffered.insert(hash);
                self.stalled.push(bytes.to_vec());
                return Ok(vec![Event::Buffered { epoch }]);
            }
            Err(error) => return Err(mls(error)),
        };
        let sender_leaf = match processed.sender() {
            Sender::Member(index) => Some(*index),
            _ => None,
        };
        let credential = processed.credential().clone();
        let message_epoch = processed.epoch().as_u64();
        let mut events = Vec::new();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(application) => {
                let basic = BasicCredential::try_from(credential)
                    .map_err(|_| ChannelError::CredentialMismatch)?;
                let actual = DeviceInfo::from_credential_bytes(basic.identity())
                    .map_err(|_| ChannelError::CredentialMismatch)?
                    .key;
                // From here on, MLS has spent the message's key: a bad envelope is the
                // sender's misbehaviour, reported as an event, and the message counts as
                // processed.
                let plaintext = application.into_bytes();
                if plaintext.first() == Some(&EPHEMERAL) {
                    match Frame::decode(&plaintext) {
                        Ok(frame) => {
                            self.transcript.note_held(&actual, &frame.held);
                            events.push(Event::Ephemeral {
                                sender: actual,
                                sent_ms: frame.sent_ms,
                                payload: frame.payload,
                            });
                        }
                        Err(error) => events.push(Event::BadEnvelope {
                            sender: actual,
                            error: error.into(),
                        }),
                    }
                    return Ok(events);
                }
                self.mark_processed(hash)?;
                let (resent, plaintext) = match plaintext.split_first() {
                    Some((&RESENT, rest)) => (true, rest),
                    _ => (false, &plaintext[..]),
                };
                match Envelope::decode(plaintext) {
                    Err(error) => events.push(Event::BadEnvelope {
                        sender: actual,
                        error,
                    }),
                    // The original is sealed in its own epoch; a resend in a later one.
                    Ok((envelope, _))
                        if envelope.sender != actual
                            || envelope.epoch > message_epoch
                            || (!resent && envelope.epoch != message_epoch) =>
                    {
                        events.push(Event::Forgery {
                            claimed: envelope.sender,
                            actual,
                        })
                    }
                    // Sealed before this device joined: never part of its transcript.
                    Ok((envelope, _)) if envelope.epoch < self.transcript.horizon() => {
                        events.push(Event::Duplicate);
                    }
                    Ok((envelope, id)) => events.extend(self.insert_envelope(envelope, id)?),
                }
                if resent {
                    events.push(Event::Resent);
                }
            }
            ProcessedMessageContent::ProposalMessage(proposal) => {
                // Members may only ask to refresh their own keys; membership is the
                // committer's to change, through its own commits. Proposals are public
                // messages, so refusing one spends no key and changes nothing.
                if !matches!(proposal.proposal(), Proposal::Update(_)) {
                    return Err(ChannelError::ProposalRefused);
                }
                self.group
                    .store_pending_proposal(provider.storage(), *proposal)
                    .map_err(mls)?;
                self.mark_processed(hash)?;
                events.push(Event::ProposalQueued);
                for commit in std::mem::take(&mut self.stalled) {
                    self.buffered.remove(&ciphertext_hash(&commit));
                    // A commit that still cannot be staged is stalled again by `receive`;
                    // one that fails otherwise would fail again, and is dropped.
                    if let Ok(more) = self.receive(provider, &commit) {
                        events.extend(more);
                    }
                }
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let leaf =
                    sender_leaf.ok_or(ChannelError::CommitterViolation(DeviceKey([0; 32])))?;
                events.extend(self.merge_commit(provider, leaf, *staged)?);
                self.mark_processed(hash)?;
                events.extend(self.drain_future(provider));
            }
            ProcessedMessageContent::OwnPrivateMessage => {
                // Everything this device sends is marked processed (frames are
                // remembered by the caller), so these bytes came from elsewhere.
                self.mark_processed(hash)?;
                if self.hold.is_some() {
                    self.hold = Some(Hold::SentElsewhere);
                }
                events.push(Event::SentElsewhere {
                    epoch: message_epoch,
                });
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => {
                return Err(ChannelError::Malformed(
                    "external joins are not allowed".into(),
                ));
            }
            _ => {
                self.mark_processed(hash)?;
                events.push(Event::Duplicate);
            }
        }
        Ok(events)
    }

    fn insert_envelope(
        &mut self,
        envelope: Envelope,
        id: EnvelopeId,
    ) -> Result<Vec<Event>, ChannelError> {
        let handover = match &envelope.body {
            Body::Membership(MembershipNote::CommitterHandover { to })
                if envelope.sender == self.committer =>
            {
                Some(*to)
            }
            _ => None,
        };
        let mut events = Vec::new();
        let (sender, seq) = (envelope.sender, envelope.seq);
        let findings = self.transcript.findings().len();
        let inserted = self.transcript.insert(envelope, id);
        // Checkpoints are checked as they enter the transcript, released ones included.
        for finding in &self.transcript.findings()[findings..] {
            if let Finding::CheckpointMismatch {
                checkpoint, sender, ..
            } = finding
            {
                events.push(Event::CheckpointMismatch {
                    checkpoint: *checkpoint,
                    sender: *sender,
                });
            }
        }
        match inserted {
            Ok(Inserted::Accepted(ids)) => {
                if let Some(to) = handover {
                    self.committer = to;
                    events.push(Event::CommitterChanged(to));
                }
                events.push(Event::Accepted(ids));
            }
            Ok(Inserted::Duplicate) => events.push(Event::Duplicate),
            Ok(Inserted::Pending(missing)) => events.push(Event::Waiting {
                id,
                sender,
                seq,
                missing,
            }),
            Ok(Inserted::Fork(kept)) => events.push(Event::Fork { kept }),
            Err(Rejection::Storage(error)) => return Err(error.into()),
            Err(reason) => events.push(Event::Refused(reason)),
        }
        Ok(events)
    }

    fn merge_commit(
        &mut self,
        provider: &impl OpenMlsProvider,
        sender: LeafNodeIndex,
        staged: StagedCommit,
    ) -> Result<Vec<Event>, ChannelError> {
        let author = self
            .group
            .member_at(sender)
            .map(|member| member.signature_key)
            .unwrap_or_default();
        if author.as_slice() != self.committer.0.as_slice() {
            let key = author
                .as_slice()
                .try_into()
                .map(DeviceKey)
                .unwrap_or(DeviceKey([0; 32]));
            return Err(ChannelError::CommitterViolation(key));
        }
        let mut added = Vec::new();
        for add in staged.add_proposals() {
            let leaf = add.add_proposal().key_package().leaf_node();
            added.push(device_of(
                leaf.credential(),
                leaf.signature_key().as_slice(),
            )?);
        }
        for update in staged.update_proposals() {
            let leaf = update.update_proposal().leaf_node();
            device_of(leaf.credential(), leaf.signature_key().as_slice())?;
        }
        if let Some(leaf) = staged.update_path_leaf_node() {
            device_of(leaf.credential(), leaf.signature_key().as_slice())?;
        }
        let mut removed = Vec::new();
        for remove in staged.remove_proposals() {
            if let Some(member) = self.group.member_at(remove.remove_proposal().removed())
                && let Ok(key) = member.signature_key.as_slice().try_into()
            {
                removed.push(DeviceKey(key));
            }
        }
        let self_removed = staged.self_removed();
        self.group
            .merge_staged_commit(provider, staged)
            .map_err(mls)?;
        self.retire_departed()?;
        let mut events = Vec::new();
        if !added.is_empty() {
            self.transcript.note_horizon(self.epoch());
        }
        for info in &added {
            self.transcript.admit(info);
            if info.key != self.me && self.contacts.get(&info.key) != Some(info) {
                events.push(Event::UnverifiedMember(info.clone()));
            }
        }
        events.push(Event::EpochChanged {
            epoch: self.epoch(),
            added,
            removed,
        });
        if self_removed {
            events.push(Event::RemovedFromChannel);
        }
        Ok(events)
    }

    /// Notes every device no longer in the group, and retires from the transcript's
    /// settling those gone for [`MAX_PAST_EPOCHS`] epochs: until then MLS may still open
    /// what they sealed before their removal, and such a late envelope must not find the
    /// prefix settled past it.
    fn retire_departed(&mut self) -> Result<(), ChannelError> {
        let current: BTreeSet<DeviceKey> = self
            .group
            .members()
            .filter_map(|member| member.signature_key.as_slice().try_into().ok())
            .map(DeviceKey)
            .collect();
        let epoch = self.epoch();
        for device in self.transcript.roster().keys() {
            if !current.contains(device) && !self.departed.iter().any(|(d, _)| d == device) {
                self.departed.push((*device, epoch));
            }
        }
        let due: Vec<DeviceKey> = self
            .departed
            .iter()
            .filter(|(_, since)| epoch >= since + MAX_PAST_EPOCHS as u64)
            .map(|(device, _)| *device)
            .collect();
        for device in due {
            self.transcript.retire(&device)?;
        }
        Ok(())
    }

    /// Processes buffered messages whose epoch has come.
    fn drain_future(&mut self, provider: &impl OpenMlsProvider) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            let epoch = self.epoch();
            let Some(ready) = self.future.keys().next().copied().filter(|e| *e <= epoch) else {
                break;
            };
            if !self.group.is_active() {
                break;
            }
            for bytes in self.future.remove(&ready).unwrap_or_default() {
                let hash = ciphertext_hash(&bytes);
                self.buffered.remove(&hash);
                // A buffered message that fails now is dropped: it would fail again.
                if let Ok(more) = self.receive(provider, &bytes) {
                    let envelope = if more.contains(&Event::Resent) {
                        None
                    } else {
                        self.carried(&more)
                    };
                    events.extend(more);
                    events.push(Event::Unbuffered { hash, envelope });
                }
            }
        }
        events
    }

    /// The envelope (id, sender, sequence number) that the bytes whose processing gave
    /// `events` carried: an application message's events start with it (accepted, or
    /// waiting for parents); a commit's start with the epoch change, and the envelopes it
    /// releases came in other bytes.
    pub fn carried(&self, events: &[Event]) -> Option<(EnvelopeId, DeviceKey, u64)> {
        match events
            .iter()
            .find(|event| !matches!(event, Event::CommitterChanged(_)))?
        {
            Event::Accepted(ids) => {
                let id = ids.first()?;
                let envelope = self.transcript.get(id).ok().flatten()?;
                Some((*id, envelope.sender, envelope.seq))
            }
            Event::Waiting {
                id, sender, seq, ..
            } => Some((*id, *sender, *seq)),
            _ => None,
        }
    }

    /// Whether the bytes with SHA-256 `hash` wait in this channel for their epoch (or
    /// for a proposal their commit needs).
    pub fn holds_buffered(&self, hash: &[u8; 32]) -> bool {
        self.buffered.contains(hash)
    }

    /// Parties (by name) that hold `id`, judged from their latest envelopes.
    pub fn delivered_to(&self, id: &EnvelopeId) -> Result<BTreeSet<String>, StorageError> {
        Ok(self.parties_of(self.transcript.delivered_to(id)?))
    }

    /// Parties that sent a read receipt for `id`.
    pub fn read_by(&self, id: &EnvelopeId) -> Result<BTreeSet<String>, StorageError> {
        Ok(self.parties_of(self.transcript.read_by(id)?))
    }

    fn parties_of(&self, devices: BTreeSet<DeviceKey>) -> BTreeSet<String> {
        devices
            .iter()
            .filter_map(|device| self.transcript.party_of(device).map(str::to_owned))
            .collect()
    }
}
