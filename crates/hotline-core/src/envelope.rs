//! The envelope: hotline's signed and chained unit of record, carried inside MLS
//! application messages.
//!
//! ```text
//!   sender A:  a1 ◄── a2 ◄── a3            prev: the sender's own chain
//!                ▲       ╲
//!   sender B:  b1 ◄────── b2               seen: latest envelope from each other sender
//! ```
//!
//! Every envelope names the hash of its sender's previous envelope (`prev`) and the
//! hash of the latest envelope it had accepted from every other sender (`seen`): the
//! envelopes form a DAG, and `seen` doubles as an implicit delivery receipt. The
//! envelope's id is the SHA-256 of its encoding without signature.
//!
//! **Epochs.** An envelope names the MLS epoch it was encrypted in, and each reference
//! names the epoch of the envelope it points to. A device that joined at epoch E cannot
//! decrypt anything from before E (by design); references to such envelopes are its
//! *horizon*, not gaps, and its transcript starts there.
//!
//! **Signatures.** MLS already authenticates every message to the group, but an MLS
//! signature cannot be shown to an outsider. hotline adds Ed25519 signatures by the
//! device key on *checkpoint* envelopes only: a checkpoint's id covers its `prev`
//! chain and its `seen` frontier, so one signature proves authorship of the sender's
//! whole chain up to it and attests what the sender had received. A signature on
//! every envelope would roughly double the cost of a message (see BENCHMARKS.md);
//! checkpoints are sent every few messages, when idle and before an export.
//!
//! Format (version 1): `u8 version | [32] channel | [32] sender | u64 epoch | u64 seq |
//! [32] prev | u64 prev epoch | u32 n, n × ([32] sender, [32] id, u64 epoch) | u64 lamport | u64 claimed time (ms since the
//! Unix epoch) | u8 kind | bytes body | u8 has deadline [u64 deadline ms] | u8 signed
//! [[64] signature]`. The id is `SHA-256("hotline-envelope-v1" || encoding up to and
//! excluding the signed flag)`; a checkpoint signs `"hotline-checkpoint-v1" || id`.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::agreement::{Agreement, MAX_REASON_LEN};
use crate::codec::{DecodeError, Reader, Writer};
use crate::cosign::Cosignature;
use crate::identity::{DeviceIdentity, DeviceKey, MAX_NAME_LEN};

/// Largest envelope body: one MiB.
pub const MAX_BODY_LEN: usize = 1 << 20;
/// Most senders an envelope can name in `seen`.
pub const MAX_SEEN: usize = 1024;
/// Most messages one read receipt can name.
pub const MAX_RECEIPT_IDS: usize = 4096;
const ENVELOPE_VERSION: u8 = 1;
const ID_CONTEXT: &[u8] = b"hotline-envelope-v1";
const CHECKPOINT_CONTEXT: &[u8] = b"hotline-checkpoint-v1";

/// A 32-byte SHA-256 hash naming an envelope.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct EnvelopeId(pub [u8; 32]);

impl EnvelopeId {
    /// The all-zero id, used as `prev` of a sender's first envelope.
    pub const NONE: Self = Self([0; 32]);

    /// Lower-case hexadecimal, as shown to users.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hexadecimal digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Debug for EnvelopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnvelopeId({})", hex::encode(&self.0[..6]))
    }
}

impl fmt::Display for EnvelopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The channel an envelope belongs to: its MLS group id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChannelId(pub [u8; 32]);

impl fmt::Debug for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelId({})", hex::encode(&self.0[..6]))
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// A reference from an envelope to an earlier one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reference {
    pub sender: DeviceKey,
    pub id: EnvelopeId,
    /// The MLS epoch the referenced envelope was encrypted in.
    pub epoch: u64,
}

/// What an envelope carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// A message written by a person, with its precedence.
    Message(Message),
    /// A person read these messages.
    ReadReceipt(Vec<EnvelopeId>),
    /// An end-to-end link test; the bytes are the tester's own (a nonce, a path tag).
    LinkTest(Vec<u8>),
    /// A signed statement of the sender's chain and of the transcript root over the
    /// checkpoint's ancestors from epoch `horizon` on (`size` envelopes). `horizon` is
    /// the sender's own: 0, or the epoch it joined at.
    Checkpoint {
        root: [u8; 32],
        size: u64,
        horizon: u64,
    },
    /// A change to the channel's membership or roles, for the record.
    Membership(MembershipNote),
    /// What the sender's link tests showed over a period, per relay path and party: the
    /// bounded record that stands for the raw probes (which are not in the transcript).
    Availability(Availability),
    /// The sender's signed statement that a party had not read one of its messages by
    /// the message's deadline, with what the line showed at that moment.
    NonResponse(NonResponse),
    /// A step of an agreed text: proposed, signed, rejected ([`crate::agreement`]).
    Agreement(Agreement),
    /// The sender's signature of a settled transcript root ([`crate::cosign`]).
    Cosignature(Cosignature),
}

/// How urgent a message is, after allied message handling (ACP 121): FLASH is handled
/// before everything else, ROUTINE last. The order of the variants is the order of
/// urgency.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Precedence {
    #[default]
    Routine = 0,
    Priority = 1,
    Immediate = 2,
    Flash = 3,
}

impl Precedence {
    /// Every level, most urgent first.
    pub const ALL: [Precedence; 4] = [
        Precedence::Flash,
        Precedence::Immediate,
        Precedence::Priority,
        Precedence::Routine,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Precedence::Routine => "routine",
            Precedence::Priority => "priority",
            Precedence::Immediate => "immediate",
            Precedence::Flash => "flash",
        }
    }

    /// Parses a level's name (any case).
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|level| level.as_str().eq_ignore_ascii_case(text.trim()))
    }

    /// How long the other parties have to read a message of this level when its sender
    /// gives no deadline: 10 min, 30 min, 3 h, 6 h (ACP 121 handling times).
    pub fn read_within_ms(self) -> u64 {
        const MINUTE: u64 = 60_000;
        match self {
            Precedence::Flash => 10 * MINUTE,
            Precedence::Immediate => 30 * MINUTE,
            Precedence::Priority => 180 * MINUTE,
            Precedence::Routine => 360 * MINUTE,
        }
    }

    fn from_u8(byte: u8) -> Result<Self, DecodeError> {
        Ok(match byte {
            0 => Precedence::Routine,
            1 => Precedence::Priority,
            2 => Precedence::Immediate,
            3 => Precedence::Flash,
            _ => {
                return Err(DecodeError::Invalid {
                    field: "precedence",
                    reason: "unknown level",
                });
            }
        })
    }
}

impl fmt::Display for Precedence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message written by a person: free text, or an entry of the channel's adopted
/// code book with its fields (`text` is then empty: each party renders the entry in
/// its own language).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    pub precedence: Precedence,
    pub text: String,
    pub code: Option<Coded>,
}

/// A pre-agreed message: entry `id` of the code book whose SHA-256 is `catalogue`,
/// with its fields in the entry's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coded {
    pub catalogue: [u8; 32],
    pub id: String,
    pub fields: Vec<(String, String)>,
}

/// Longest code id, field name; most fields; longest field value.
pub const MAX_CODE_LEN: usize = 64;
pub const MAX_FIELDS: usize = 32;
pub const MAX_FIELD_LEN: usize = 1024;

/// The form byte of a message body of kind 7: plain text, or a code book entry.
const FORM_TEXT: u8 = 1;
const FORM_CODED: u8 = 2;

/// What the line showed of one relay path to the party when a deadline passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathNote {
    pub relay: String,
    /// When the party last answered a link test through this relay.
    pub last_answer_ms: Option<u64>,
    /// Whether the party answered through it within the last three link-test intervals.
    pub up: bool,
}

/// A signed statement: `party` had not read `message` (of the statement's sender) by
/// `deadline_ms`. `delivered` says whether a device of the party held the message by
/// then (it said so in its own envelopes or delivery receipts): "received it and did
/// not read it" and "it never reached them" are different, provable facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NonResponse {
    pub message: EnvelopeId,
    pub party: String,
    pub precedence: Precedence,
    pub deadline_ms: u64,
    pub delivered: bool,
    /// When anything of the party last reached the sender's device.
    pub last_heard_ms: Option<u64>,
    /// Every relay of the channel at that moment, at most [`MAX_RELAYS`].
    pub paths: Vec<PathNote>,
}

/// Most paths (relay × party) one availability record describes.
pub const MAX_PATHS: usize = 256;
/// Most outages listed per path (the longest ones; `outages_total` counts them all).
pub const MAX_OUTAGES: usize = 16;

/// A device's signed-by-the-record account of its link tests over `[from_ms, to_ms)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Availability {
    pub from_ms: u64,
    pub to_ms: u64,
    /// The link-test interval in force.
    pub interval_ms: u64,
    pub paths: Vec<PathRecord>,
}

/// One relay path to one party over an availability record's period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathRecord {
    pub relay: String,
    pub party: String,
    /// Probes sent through the relay.
    pub sent: u32,
    /// Of those, how many the party answered through it.
    pub answered: u32,
    /// Round trips of the answered ones (0 when none was answered).
    pub rtt_min_ms: u32,
    pub rtt_median_ms: u32,
    /// Every run of unanswered probes: from the first one's sending to the next
    /// answered probe's (or the period's end).
    pub outages_total: u32,
    /// The longest of them, at most [`MAX_OUTAGES`], in time order.
    pub outages: Vec<(u64, u64)>,
}

/// Membership events recorded in the transcript by the committer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipNote {
    Added {
        party: String,
        device: DeviceKey,
    },
    Removed {
        device: DeviceKey,
    },
    KeyUpdated {
        epoch: u64,
    },
    CommitterHandover {
        to: DeviceKey,
    },
    /// The channel's relays from now on (the committer's word; every member follows it).
    RelaysChanged {
        relays: Vec<String>,
    },
    /// How long the other parties have to read a message of each precedence when its
    /// sender gives no deadline, in ms, FLASH first (the committer's word, for the
    /// channel's agreed handling times; every member follows it).
    HandlingTimes {
        read_within_ms: [u64; 4],
    },
}

/// At most this many relays per channel, each address at most `MAX_RELAY_URL_LEN` bytes.
pub const MAX_RELAYS: usize = 16;
pub const MAX_RELAY_URL_LEN: usize = 512;

/// The kind byte of each body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Text = 1,
    ReadReceipt = 2,
    LinkTest = 3,
    Checkpoint = 4,
    Membership = 5,
    Availability = 6,
    /// A message with a precedence above routine (a routine text is kind 1, as it was
    /// before precedences).
    Message = 7,
    NonResponse = 8,
    Agreement = 9,
    Cosignature = 10,
}

impl Kind {
    /// Whether envelopes of this kind carry the sender's transferable signature (what
    /// an auditor may hold against the sender without the channel's keys).
    pub fn is_signed(self) -> bool {
        matches!(
            self,
            Kind::Checkpoint | Kind::Availability | Kind::NonResponse
        )
    }
}

impl Body {
    /// A routine text message.
    pub fn text(text: impl Into<String>) -> Self {
        Body::Message(Message {
            precedence: Precedence::Routine,
            text: text.into(),
            code: None,
        })
    }

    /// The message, if this is one.
    pub fn message(&self) -> Option<&Message> {
        match self {
            Body::Message(message) => Some(message),
            _ => None,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Body::Message(Message {
                precedence: Precedence::Routine,
                code: None,
                ..
            }) => Kind::Text,
            Body::Message(_) => Kind::Message,
            Body::ReadReceipt(_) => Kind::ReadReceipt,
            Body::LinkTest(_) => Kind::LinkTest,
            Body::Checkpoint { .. } => Kind::Checkpoint,
            Body::Membership(_) => Kind::Membership,
            Body::Availability(_) => Kind::Availability,
            Body::NonResponse(_) => Kind::NonResponse,
            Body::Agreement(_) => Kind::Agreement,
            Body::Cosignature(_) => Kind::Cosignature,
        }
    }

    /// Writes the body with its 32-bit length prefix, in place.
    fn encode_into(&self, writer: &mut Writer) {
        let length_at = writer.as_bytes().len();
        writer.u32(0);
        match self {
            Body::Message(Message {
                precedence,
                code: Some(coded),
                ..
            }) => {
                writer.u8(*precedence as u8);
                writer.u8(FORM_CODED);
                writer.fixed(&coded.catalogue);
                writer.string(&coded.id);
                writer.u32(coded.fields.len() as u32);
                for (name, value) in &coded.fields {
                    writer.string(name);
                    writer.string(value);
                }
            }
            Body::Message(message) => {
                if message.precedence != Precedence::Routine {
                    writer.u8(message.precedence as u8);
                    writer.u8(FORM_TEXT);
                }
                writer.fixed(message.text.as_bytes());
            }
            Body::ReadReceipt(ids) => {
                writer.u32(ids.len() as u32);
                for id in ids {
                    writer.fixed(&id.0);
                }
            }
            Body::LinkTest(bytes) => writer.fixed(bytes),
            Body::Checkpoint {
                root,
                size,
                horizon,
            } => {
                writer.fixed(root);
                writer.u64(*size);
                writer.u64(*horizon);
            }
            Body::Membership(note) => match note {
                MembershipNote::Added { party, device } => {
                    writer.u8(1);
                    writer.string(party);
                    writer.fixed(&device.0);
                }
                MembershipNote::Removed { device } => {
                    writer.u8(2);
                    writer.fixed(&device.0);
                }
                MembershipNote::KeyUpdated { epoch } => {
                    writer.u8(3);
                    writer.u64(*epoch);
                }
                MembershipNote::CommitterHandover { to } => {
                    writer.u8(4);
                    writer.fixed(&to.0);
                }
                MembershipNote::RelaysChanged { relays } => {
                    writer.u8(5);
                    writer.u32(relays.len() as u32);
                    for relay in relays {
                        writer.string(relay);
                    }
                }
                MembershipNote::HandlingTimes { read_within_ms } => {
                    writer.u8(6);
                    for ms in read_within_ms {
                        writer.u64(*ms);
                    }
                }
            },
            Body::Availability(record) => {
                writer.u64(record.from_ms);
                writer.u64(record.to_ms);
                writer.u64(record.interval_ms);
                writer.u32(record.paths.len() as u32);
                for path in &record.paths {
                    writer.string(&path.relay);
                    writer.string(&path.party);
                    writer.u32(path.sent);
                    writer.u32(path.answered);
                    writer.u32(path.rtt_min_ms);
                    writer.u32(path.rtt_median_ms);
                    writer.u32(path.outages_total);
                    writer.u32(path.outages.len() as u32);
                    for (from, to) in &path.outages {
                        writer.u64(*from);
                        writer.u64(*to);
                    }
                }
            }
            Body::NonResponse(statement) => statement.encode_into(writer),
            Body::Agreement(agreement) => agreement.encode_into(writer),
            Body::Cosignature(cosignature) => cosignature.encode_into(writer),
        }
        let length = writer.as_bytes().len() - length_at - 4;
        // Invariant: bodies are bounded by MAX_BODY_LEN, far below 4 GiB.
        writer.patch_u32(length_at, length as u32);
    }

    fn decode(kind: u8, bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        let body = match kind {
            1 => return Ok(Body::text(utf8(bytes)?)),
            7 => {
                let precedence = Precedence::from_u8(reader.u8("precedence")?)?;
                match reader.u8("message form")? {
                    FORM_TEXT if precedence == Precedence::Routine => {
                        return Err(DecodeError::Invalid {
                            field: "precedence",
                            reason: "a routine text is a message of kind 1",
                        });
                    }
                    FORM_TEXT => {
                        let text = utf8(reader.take(reader.remaining(), "text")?)?;
                        return Ok(Body::Message(Message {
                            precedence,
                            text,
                            code: None,
                        }));
                    }
                    FORM_CODED => {
                        let catalogue = reader.array("code book")?;
                        let id = reader.string("code", MAX_CODE_LEN)?;
                        let count = reader.count("code fields", MAX_FIELDS, 8)?;
                        let mut fields = Vec::with_capacity(count);
                        for _ in 0..count {
                            let name = reader.string("field name", MAX_CODE_LEN)?;
                            let value = reader.string("field value", MAX_FIELD_LEN)?;
                            fields.push((name, value));
                        }
                        Body::Message(Message {
                            precedence,
                            text: String::new(),
                            code: Some(Coded {
                                catalogue,
                                id,
                                fields,
                            }),
                        })
                    }
                    _ => {
                        return Err(DecodeError::Invalid {
                            field: "message form",
                            reason: "unknown form",
                        });
                    }
                }
            }
            8 => Body::NonResponse(NonResponse::decode(&mut reader)?),
            9 => Body::Agreement(Agreement::decode(&mut reader)?),
            10 => Body::Cosignature(Cosignature::decode(&mut reader)?),
            2 => {
                let count = reader.count("read receipt", MAX_RECEIPT_IDS, 32)?;
                let mut ids = Vec::with_capacity(count);
                for _ in 0..count {
                    ids.push(EnvelopeId(reader.array("read message id")?));
                }
                Body::ReadReceipt(ids)
            }
            3 => return Ok(Body::LinkTest(bytes.to_vec())),
            4 => Body::Checkpoint {
                root: reader.array("checkpoint root")?,
                size: reader.u64("checkpoint size")?,
                horizon: reader.u64("checkpoint horizon")?,
            },
            5 => Body::Membership(match reader.u8("membership note")? {
                1 => MembershipNote::Added {
                    party: reader.string("party name", MAX_NAME_LEN)?,
                    device: DeviceKey(reader.array("device key")?),
                },
                2 => MembershipNote::Removed {
                    device: DeviceKey(reader.array("device key")?),
                },
                3 => MembershipNote::KeyUpdated {
                    epoch: reader.u64("epoch")?,
                },
                4 => MembershipNote::CommitterHandover {
                    to: DeviceKey(reader.array("device key")?),
                },
                5 => {
                    let count = reader.count("relays", MAX_RELAYS, 4)?;
                    let mut relays = Vec::with_capacity(count);
                    for _ in 0..count {
                        relays.push(reader.string("relay address", MAX_RELAY_URL_LEN)?);
                    }
                    MembershipNote::RelaysChanged { relays }
                }
                6 => {
                    let mut read_within_ms = [0u64; 4];
                    for ms in &mut read_within_ms {
                        *ms = reader.u64("handling time")?;
                    }
                    if read_within_ms.contains(&0) {
                        return Err(DecodeError::Invalid {
                            field: "handling time",
                            reason: "a handling time is at least 1 ms",
                        });
                    }
                    MembershipNote::HandlingTimes { read_within_ms }
                }
                _ => {
                    return Err(DecodeError::Invalid {
                        field: "membership note",
                        reason: "unknown note",
                    });
                }
            }),
            6 => Body::Availability(Availability::decode(&mut reader)?),
            _ => {
                return Err(DecodeError::Invalid {
                    field: "kind",
                    reason: "unknown kind",
                });
            }
        };
        reader.finish()?;
        Ok(body)
    }
}

fn utf8(bytes: &[u8]) -> Result<String, DecodeError> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| DecodeError::Invalid {
            field: "text",
            reason: "not valid UTF-8",
        })
}

impl NonResponse {
    fn encode_into(&self, writer: &mut Writer) {
        writer.fixed(&self.message.0);
        writer.string(&self.party);
        writer.u8(self.precedence as u8);
        writer.u64(self.deadline_ms);
        writer.u8(u8::from(self.delivered));
        optional_u64(writer, self.last_heard_ms);
        writer.u32(self.paths.len() as u32);
        for path in &self.paths {
            writer.string(&path.relay);
            optional_u64(writer, path.last_answer_ms);
            writer.u8(u8::from(path.up));
        }
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let message = EnvelopeId(reader.array("unread message")?);
        let party = reader.string("party name", MAX_NAME_LEN)?;
        let precedence = Precedence::from_u8(reader.u8("precedence")?)?;
        let deadline_ms = reader.u64("deadline")?;
        let delivered = reader.flag("delivered")?;
        let last_heard_ms = read_optional_u64(reader, "last heard")?;
        let count = reader.count("paths", MAX_RELAYS, 6)?;
        let mut paths = Vec::with_capacity(count);
        for _ in 0..count {
            let relay = reader.string("relay address", MAX_RELAY_URL_LEN)?;
            let last_answer_ms = read_optional_u64(reader, "last answer")?;
            let up = reader.flag("path up")?;
            if !path_names_ok(&relay, &party) {
                return Err(DecodeError::Invalid {
                    field: "non-response path",
                    reason: "a relay address must be printable ASCII, a party a name",
                });
            }
            paths.push(PathNote {
                relay,
                last_answer_ms,
                up,
            });
        }
        crate::identity::check_name("party", &party).map_err(|_| DecodeError::Invalid {
            field: "party name",
            reason: "not a name",
        })?;
        Ok(Self {
            message,
            party,
            precedence,
            deadline_ms,
            delivered,
            last_heard_ms,
            paths,
        })
    }
}

fn optional_u64(writer: &mut Writer, value: Option<u64>) {
    match value {
        Some(value) => {
            writer.u8(1);
            writer.u64(value);
        }
        None => writer.u8(0),
    }
}

fn read_optional_u64(
    reader: &mut Reader<'_>,
    field: &'static str,
) -> Result<Option<u64>, DecodeError> {
    Ok(match reader.flag(field)? {
        true => Some(reader.u64(field)?),
        false => None,
    })
}

/// Whether a path's strings are what they claim: a relay address in printable ASCII, a
/// party name as names go (what an auditor's terminal shows cannot carry controls).
fn path_names_ok(relay: &str, party: &str) -> bool {
    !relay.is_empty()
        && relay.bytes().all(|b| b.is_ascii_graphic())
        && crate::identity::check_name("party", party).is_ok()
}

impl Availability {
    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let from_ms = reader.u64("availability start")?;
        let to_ms = reader.u64("availability end")?;
        let interval_ms = reader.u64("link-test interval")?;
        if to_ms < from_ms {
            return Err(DecodeError::Invalid {
                field: "availability period",
                reason: "ends before it starts",
            });
        }
        let count = reader.count("availability paths", MAX_PATHS, 36)?;
        let mut paths = Vec::with_capacity(count);
        for _ in 0..count {
            let relay = reader.string("relay address", MAX_RELAY_URL_LEN)?;
            let party = reader.string("party name", MAX_NAME_LEN)?;
            let sent = reader.u32("probes sent")?;
            let answered = reader.u32("probes answered")?;
            let rtt_min_ms = reader.u32("shortest round trip")?;
            let rtt_median_ms = reader.u32("median round trip")?;
            let outages_total = reader.u32("outages")?;
            let listed = reader.count("outages listed", MAX_OUTAGES, 16)?;
            let mut outages = Vec::with_capacity(listed);
            for _ in 0..listed {
                let from = reader.u64("outage start")?;
                let to = reader.u64("outage end")?;
                outages.push((from, to));
            }
            if !path_names_ok(&relay, &party) {
                return Err(DecodeError::Invalid {
                    field: "availability path",
                    reason: "a relay address must be printable ASCII, a party a name",
                });
            }
            if answered > sent || (listed as u32) > outages_total {
                return Err(DecodeError::Invalid {
                    field: "availability path",
                    reason: "more answered than sent, or more outages listed than counted",
                });
            }
            paths.push(PathRecord {
                relay,
                party,
                sent,
                answered,
                rtt_min_ms,
                rtt_median_ms,
                outages_total,
                outages,
            });
        }
        Ok(Self {
            from_ms,
            to_ms,
            interval_ms,
            paths,
        })
    }
}

/// One envelope, decoded. Its fields are checked for format only: whether it fits the
/// transcript is for [`crate::transcript::Transcript`] to decide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub channel: ChannelId,
    pub sender: DeviceKey,
    /// The MLS epoch this envelope was encrypted in.
    pub epoch: u64,
    pub seq: u64,
    pub prev: EnvelopeId,
    /// The MLS epoch `prev` was encrypted in.
    pub prev_epoch: u64,
    /// Latest envelope accepted from every other sender, sorted by sender.
    pub seen: Vec<Reference>,
    pub lamport: u64,
    /// The sender's clock, as a claim only: nothing orders by it.
    pub claimed_time_ms: u64,
    pub body: Body,
    /// When a person must have read this message by (ms since the Unix epoch).
    pub deadline_ms: Option<u64>,
    /// Present on checkpoints only.
    pub signature: Option<[u8; 64]>,
}

/// Why an envelope is malformed beyond its byte format.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EnvelopeError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("a checkpoint must be signed and nothing else may be")]
    SignatureMisplaced,
    #[error("seen entries must be sorted, unique and name other senders")]
    SeenNotCanonical,
    #[error("sequence numbers start at 1, and only the first envelope has no predecessor")]
    BadSequence,
    #[error("body of {0} bytes exceeds the limit of {MAX_BODY_LEN}")]
    BodyTooLarge(usize),
    #[error("an envelope cannot reference one from a later epoch")]
    EpochFromFuture,
    #[error("the checkpoint signature does not verify")]
    BadSignature,
}

impl Envelope {
    /// The id: SHA-256 over the unsigned encoding.
    pub fn id(&self) -> EnvelopeId {
        let mut writer = Writer::with_capacity(self.encoded_len_estimate());
        self.encode_unsigned(&mut writer);
        Self::id_of_unsigned(writer.as_bytes())
    }

    fn id_of_unsigned(unsigned: &[u8]) -> EnvelopeId {
        EnvelopeId(
            Sha256::new()
                .chain_update(ID_CONTEXT)
                .chain_update(unsigned)
                .finalize()
                .into(),
        )
    }

    fn encode_unsigned(&self, writer: &mut Writer) {
        writer.u8(ENVELOPE_VERSION);
        writer.fixed(&self.channel.0);
        writer.fixed(&self.sender.0);
        writer.u64(self.epoch);
        writer.u64(self.seq);
        writer.fixed(&self.prev.0);
        writer.u64(self.prev_epoch);
        writer.u32(self.seen.len() as u32);
        for seen in &self.seen {
            writer.fixed(&seen.sender.0);
            writer.fixed(&seen.id.0);
            writer.u64(seen.epoch);
        }
        writer.u64(self.lamport);
        writer.u64(self.claimed_time_ms);
        writer.u8(self.body.kind() as u8);
        self.body.encode_into(writer);
        optional_u64(writer, self.deadline_ms);
    }

    /// An upper bound of the encoding's length for the common bodies, so that encoding
    /// allocates once.
    fn encoded_len_estimate(&self) -> usize {
        let body = match &self.body {
            Body::Message(message) => 2 + message.text.len(),
            Body::ReadReceipt(ids) => 4 + 32 * ids.len(),
            Body::LinkTest(bytes) => bytes.len(),
            Body::Checkpoint { .. } => 48,
            Body::Membership(MembershipNote::RelaysChanged { relays }) => {
                4 + relays.iter().map(|r| 4 + r.len()).sum::<usize>()
            }
            Body::Membership(_) => 128,
            Body::Availability(record) => 28 + 600 * record.paths.len(),
            Body::NonResponse(statement) => 128 + 540 * statement.paths.len(),
            Body::Agreement(Agreement::Propose(proposal)) => {
                16 + proposal
                    .versions
                    .iter()
                    .map(|(l, t)| 8 + l.len() + t.len())
                    .sum::<usize>()
            }
            Body::Agreement(_) => 1 + 32 + 32 + 64 + 4 + MAX_REASON_LEN,
            Body::Cosignature(_) => 112,
        };
        160 + 72 * self.seen.len() + body + 80
    }

    /// The encoding, with signature when there is one.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with_id().0
    }

    /// The encoding and the id, from one pass over the envelope.
    pub fn encode_with_id(&self) -> (Vec<u8>, EnvelopeId) {
        let mut writer = Writer::with_capacity(self.encoded_len_estimate());
        self.encode_unsigned(&mut writer);
        let id = Self::id_of_unsigned(writer.as_bytes());
        match &self.signature {
            Some(signature) => {
                writer.u8(1);
                writer.fixed(signature);
            }
            None => writer.u8(0),
        }
        (writer.into_bytes(), id)
    }

    /// Decodes and checks the format rules; returns the envelope and its id.
    pub fn decode(bytes: &[u8]) -> Result<(Self, EnvelopeId), EnvelopeError> {
        let mut reader = Reader::new(bytes);
        let version = reader.u8("envelope version")?;
        if version != ENVELOPE_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "envelope",
                version,
            }
            .into());
        }
        let channel = ChannelId(reader.array("channel")?);
        let sender = DeviceKey(reader.array("sender")?);
        let epoch = reader.u64("epoch")?;
        let seq = reader.u64("sequence number")?;
        let prev = EnvelopeId(reader.array("previous envelope")?);
        let prev_epoch = reader.u64("previous epoch")?;
        let count = reader.count("seen", MAX_SEEN, 72)?;
        let mut seen = Vec::with_capacity(count);
        for _ in 0..count {
            seen.push(Reference {
                sender: DeviceKey(reader.array("seen sender")?),
                id: EnvelopeId(reader.array("seen envelope")?),
                epoch: reader.u64("seen epoch")?,
            });
        }
        let lamport = reader.u64("lamport time")?;
        let claimed_time_ms = reader.u64("claimed time")?;
        let kind = reader.u8("kind")?;
        let body = Body::decode(kind, reader.bytes("body", MAX_BODY_LEN)?)?;
        let deadline_ms = read_optional_u64(&mut reader, "deadline")?;
        let unsigned_len = reader.position();
        let signature = match reader.flag("signature flag")? {
            true => Some(reader.array::<64>("signature")?),
            false => None,
        };
        reader.finish()?;
        let envelope = Self {
            channel,
            sender,
            epoch,
            seq,
            prev,
            prev_epoch,
            seen,
            lamport,
            claimed_time_ms,
            body,
            deadline_ms,
            signature,
        };
        envelope.check_format()?;
        Ok((envelope, Self::id_of_unsigned(&bytes[..unsigned_len])))
    }

    /// The rules that need no context: sequence, `seen` order, signature placement.
    pub fn check_format(&self) -> Result<(), EnvelopeError> {
        if self.seq == 0 || (self.seq == 1) != (self.prev == EnvelopeId::NONE) {
            return Err(EnvelopeError::BadSequence);
        }
        let sorted = self
            .seen
            .windows(2)
            .all(|pair| pair[0].sender < pair[1].sender);
        let epochs_ordered =
            self.prev_epoch <= self.epoch && self.seen.iter().all(|seen| seen.epoch <= self.epoch);
        if !epochs_ordered {
            return Err(EnvelopeError::EpochFromFuture);
        }
        if !sorted || self.seen.iter().any(|seen| seen.sender == self.sender) {
            return Err(EnvelopeError::SeenNotCanonical);
        }
        if self.body.kind().is_signed() != self.signature.is_some() {
            return Err(EnvelopeError::SignatureMisplaced);
        }
        if let Body::Availability(record) = &self.body {
            let bounded = record.paths.len() <= MAX_PATHS
                && record.from_ms <= record.to_ms
                && record.paths.iter().all(|path| {
                    path.relay.len() <= MAX_RELAY_URL_LEN
                        && path_names_ok(&path.relay, &path.party)
                        && path.outages.len() <= MAX_OUTAGES
                        && path.answered <= path.sent
                        && path.outages.len() as u64 <= u64::from(path.outages_total)
                });
            if !bounded {
                return Err(EnvelopeError::Decode(DecodeError::Invalid {
                    field: "availability record",
                    reason: "out of bounds",
                }));
            }
        }
        Ok(())
    }

    /// Signs a checkpoint with the sender's identity.
    pub fn sign(&mut self, identity: &DeviceIdentity) {
        let id = self.id();
        self.signature = Some(identity.sign(&checkpoint_message(&id)));
    }

    /// Verifies a checkpoint's signature against its sender's key.
    pub fn verify_signature(&self, id: &EnvelopeId) -> Result<(), EnvelopeError> {
        match &self.signature {
            Some(signature) => self
                .sender
                .verify(&checkpoint_message(id), signature)
                .map_err(|_| EnvelopeError::BadSignature),
            None => Err(EnvelopeError::SignatureMisplaced),
        }
    }
}

fn checkpoint_message(id: &EnvelopeId) -> Vec<u8> {
    [CHECKPOINT_CONTEXT, &id.0[..]].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(body: Body) -> Envelope {
        Envelope {
            channel: ChannelId([7; 32]),
            sender: DeviceKey([1; 32]),
            epoch: 3,
            seq: 2,
            prev: EnvelopeId([9; 32]),
            prev_epoch: 2,
            seen: vec![
                Reference {
                    sender: DeviceKey([0; 32]),
                    id: EnvelopeId([3; 32]),
                    epoch: 1,
                },
                Reference {
                    sender: DeviceKey([2; 32]),
                    id: EnvelopeId([4; 32]),
                    epoch: 3,
                },
            ],
            lamport: 5,
            claimed_time_ms: 1_700_000_000_000,
            body,
            deadline_ms: Some(1_700_000_600_000),
            signature: None,
        }
    }

    #[test]
    fn every_body_round_trips() {
        let bodies = [
            Body::text("de-escalate"),
            Body::ReadReceipt(vec![EnvelopeId([5; 32])]),
            Body::LinkTest(vec![1, 2, 3]),
            Body::Membership(MembershipNote::Added {
                party: "mediator".into(),
                device: DeviceKey([6; 32]),
            }),
            Body::Membership(MembershipNote::Removed {
                device: DeviceKey([6; 32]),
            }),
            Body::Membership(MembershipNote::KeyUpdated { epoch: 4 }),
            Body::Membership(MembershipNote::RelaysChanged {
                relays: vec!["https://127.0.0.1:1/#sha256=00".into(), String::new()],
            }),
            Body::Membership(MembershipNote::CommitterHandover {
                to: DeviceKey([6; 32]),
            }),
        ];
        for body in bodies {
            let envelope = sample(body);
            let (decoded, id) = Envelope::decode(&envelope.encode()).unwrap();
            assert_eq!(decoded, envelope);
            assert_eq!(id, envelope.id());
        }
    }

    #[test]
    fn unsigned_checkpoint_and_signed_text_are_refused() {
        let checkpoint = sample(Body::Checkpoint {
            root: [1; 32],
            size: 3,
            horizon: 0,
        });
        assert_eq!(
            Envelope::decode(&checkpoint.encode()).unwrap_err(),
            EnvelopeError::SignatureMisplaced
        );
        let mut text = sample(Body::text("x"));
        text.signature = Some([0; 64]);
        assert_eq!(
            Envelope::decode(&text.encode()).unwrap_err(),
            EnvelopeError::SignatureMisplaced
        );
    }

    #[test]
    fn unsorted_seen_is_refused() {
        let mut envelope = sample(Body::text("x"));
        envelope.seen.reverse();
        assert_eq!(
            Envelope::decode(&envelope.encode()).unwrap_err(),
            EnvelopeError::SeenNotCanonical
        );
    }

    /// A message body of kind 7 must be canonical: a precedence above routine (a
    /// routine text is kind 1, byte for byte what it was before precedences) and a
    /// known form; anything else is a typed error.
    #[test]
    fn message_bodies_are_canonical() {
        let flash = Body::Message(Message {
            precedence: Precedence::Flash,
            text: "now".into(),
            code: None,
        });
        assert_eq!(flash.kind(), Kind::Message);
        assert_eq!(Body::text("now").kind(), Kind::Text);
        let routine = sample(Body::text("now")).encode();
        let encoded = sample(flash.clone()).encode();
        assert_eq!(encoded.len(), routine.len() + 2);
        assert_eq!(Envelope::decode(&encoded).unwrap().0.body, flash);
        let body_at = routine.len() - 1 - 9 - 3 - 4 - 1;
        assert_eq!(routine[body_at], Kind::Text as u8);
        assert_eq!(encoded[body_at], Kind::Message as u8);
        for (offset, byte, field) in [
            (5, 0, "precedence"),
            (5, 4, "precedence"),
            (6, 3, "message form"),
        ] {
            let mut bad = encoded.clone();
            bad[body_at + offset] = byte;
            match Envelope::decode(&bad) {
                Err(EnvelopeError::Decode(DecodeError::Invalid { field: got, .. })) => {
                    assert_eq!(got, field)
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
