//! Export and offline verification of a transcript.
//!
//! An export is one file that anyone can check with nothing but the file: the channel's
//! roster (parties, devices, keys), the envelopes in canonical order, the references to
//! envelopes behind the exporter's horizon, and the exporter's Ed25519 signature over
//! all of it. The last envelope must be the exporter's own checkpoint, covering every
//! other envelope. The format is specified in `docs/export-format.md`.
//!
//! Version 2 (written since the transcript moved into a store) is streamed: the writer
//! hands it to a sink page by page and signs a SHA-512 digest of everything before the
//! signature (Ed25519 over `"hotline-export-v2" ‖ SHA-512(body)`, the prehashing that
//! minisign uses), so neither writing nor verifying holds the file: with a transcript
//! store on disk, both run in bounded memory. Version 1 files (Ed25519 over the whole
//! body) still verify, from memory.
//!
//! What a valid export proves (and what it does not) is spelled out in
//! [`VerifyReport::statements`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use sha2::{Digest, Sha512};
use thiserror::Error;

use crate::agreement::Agreement;
use crate::codec::{DecodeError, Reader, Writer};
use crate::envelope::{
    Availability, Body, ChannelId, Envelope, EnvelopeError, EnvelopeId, Kind, MAX_BODY_LEN,
    MAX_OUTAGES, PathRecord,
};
use crate::identity::{DeviceIdentity, DeviceInfo, DeviceKey, Fingerprint};
use crate::merkle::StorageError;
use crate::transcript::{Finding, Inserted, Rejection, Transcript};
use crate::transcript_store::{MemoryStore, TranscriptStore};

const MAGIC: &[u8; 19] = b"HOTLINE-TRANSCRIPT\n";
const EXPORT_VERSION_1: u8 = 1;
const EXPORT_VERSION: u8 = 2;
const SIGNATURE_CONTEXT: &[u8] = b"hotline-export-v1";
const SIGNATURE_CONTEXT_2: &[u8] = b"hotline-export-v2";
/// Envelopes written or read per page.
const PAGE: usize = 4096;
const MAX_ROSTER: usize = 1024;
const MAX_ENVELOPES: usize = 10_000_000;
const MAX_ENVELOPE_LEN: usize = MAX_BODY_LEN + 96 * 1024;

/// Why an export could not be written.
#[derive(Debug, Error)]
pub enum ExportError {
    #[error(
        "the exporter's last envelope must be a checkpoint covering the whole transcript; send a checkpoint first"
    )]
    NeedsCheckpoint,
    #[error("the transcript has envelopes waiting for missing parents; sync first")]
    Incomplete,
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the export could not be written: {0}")]
    Write(String),
}

/// Why an export does not verify. Names the first problem found.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("not a hotline transcript export: {0}")]
    Malformed(#[from] DecodeError),
    #[error("the exporter's signature over the file does not verify: the file was altered")]
    BadFileSignature,
    #[error("the exporter is not on the roster")]
    ExporterNotOnRoster,
    #[error("envelope {index} is malformed: {reason}")]
    BadEnvelope { index: usize, reason: EnvelopeError },
    #[error("envelope {index} was refused: {reason}")]
    Refused { index: usize, reason: Rejection },
    #[error("envelope {index} appears twice")]
    Duplicate { index: usize },
    #[error(
        "envelope {index} is out of canonical order or references an envelope missing from the file"
    )]
    NotCanonical { index: usize },
    #[error("envelope {index} forks its sender's chain")]
    Fork { index: usize },
    #[error("checkpoint {checkpoint} by {sender:?} claims a root that the envelopes do not give")]
    CheckpointMismatch {
        checkpoint: EnvelopeId,
        sender: DeviceKey,
    },
    #[error("the last envelope is not the exporter's checkpoint covering every envelope")]
    NoFinalCheckpoint,
    #[error("the list of references behind the horizon does not match the envelopes")]
    HorizonMismatch,
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the export could not be read: {0}")]
    Read(String),
}

/// What a valid export proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub channel: ChannelId,
    pub channel_name: String,
    /// First MLS epoch of the transcript (0: from the channel's creation).
    pub horizon: u64,
    pub roster: Vec<DeviceInfo>,
    pub exporter: DeviceInfo,
    pub envelopes: u64,
    pub texts: u64,
    pub read_receipts: u64,
    pub checkpoints: u64,
    /// Signed statements that a party had not read a message by its deadline.
    pub non_responses: u64,
    pub root: [u8; 32],
    /// Earliest and latest claimed send times, ms since the Unix epoch.
    pub first_time_ms: Option<u64>,
    pub last_time_ms: Option<u64>,
    /// Per device: envelopes sent, and how many of them the device's own signed
    /// checkpoints cover.
    pub senders: BTreeMap<DeviceKey, (u64, u64)>,
    /// Per device: the sequence number of its latest signed envelope. Its envelopes
    /// up to there are proven its own by its signature; later ones are attested by
    /// the exporter only.
    pub signed_through: BTreeMap<DeviceKey, u64>,
    /// What the signed availability records say, per (device, relay, party).
    pub availability: BTreeMap<(DeviceKey, String, String), PathSummary>,
    /// Record paths not summed: beyond [`MAX_SUMMARIES`] distinct paths.
    pub availability_unsummed: u64,
    /// The agreed texts proposed in the transcript, at most [`MAX_SUMMARIES`], with
    /// the signatures that hold.
    pub agreements: BTreeMap<EnvelopeId, AgreedText>,
    /// Settled roots cosigned in the transcript, per (horizon, size, root), at most
    /// [`MAX_SUMMARIES`].
    pub cosigned: BTreeMap<(u64, u64, [u8; 32]), CosignedRoot>,
    /// Cosignature envelopes in the record.
    pub cosignatures: u64,
    /// Cosignatures whose signature does not hold.
    pub cosignatures_invalid: u64,
}

/// One settled root and the devices that cosigned it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CosignedRoot {
    /// (device, its signature of the checkpoint note).
    pub signers: Vec<(DeviceKey, [u8; 64])>,
    /// Whether it is the root of the same prefix of this record; `None` when the
    /// record cannot tell (another horizon, or a prefix not settled here).
    pub matches: Option<bool>,
}

/// An agreed text as the export shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgreedText {
    pub proposer: DeviceKey,
    pub time_ms: u64,
    pub languages: Vec<String>,
    pub deadline_ms: Option<u64>,
    /// What every party signs ([`crate::agreement::digest`]).
    pub digest: [u8; 32],
    /// Valid signatures within the deadline: (device, claimed time).
    pub signed: Vec<(DeviceKey, u64)>,
    /// (device, reason).
    pub rejected: Vec<(DeviceKey, String)>,
    /// Signatures that do not hold (wrong digest or signature, or after the deadline).
    pub invalid: u64,
}

impl VerifyReport {
    /// Whether a device of every party on the roster cosigned this root.
    pub fn cosigned_by_every_party(&self, root: &CosignedRoot) -> bool {
        let parties: BTreeSet<&str> = root
            .signers
            .iter()
            .filter_map(|(key, _)| self.roster.iter().find(|info| info.key == *key))
            .map(|info| info.party.as_str())
            .collect();
        self.roster
            .iter()
            .all(|info| parties.contains(info.party.as_str()))
    }

    /// Whether a device of every party on the roster signed agreed text `id` and
    /// nobody rejected it.
    pub fn accepted(&self, id: &EnvelopeId) -> bool {
        let Some(text) = self.agreements.get(id) else {
            return false;
        };
        let party = |key: &DeviceKey| {
            self.roster
                .iter()
                .find(|info| info.key == *key)
                .map(|info| info.party.clone())
        };
        let signed: BTreeSet<String> = text
            .signed
            .iter()
            .filter_map(|(key, _)| party(key))
            .collect();
        text.rejected.is_empty() && self.roster.iter().all(|info| signed.contains(&info.party))
    }
}

/// The availability records of one device for one relay path to one party, summed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathSummary {
    pub records: u64,
    /// The earliest start and latest end of the records' periods.
    pub from_ms: u64,
    pub to_ms: u64,
    pub sent: u64,
    pub answered: u64,
    pub outages_total: u64,
    /// The longest outages the records list, at most [`MAX_OUTAGES`], in time order.
    pub longest: Vec<(u64, u64)>,
}

impl PathSummary {
    fn add(&mut self, record: &Availability, path: &PathRecord) {
        if self.records == 0 {
            self.from_ms = record.from_ms;
        }
        self.records += 1;
        self.from_ms = self.from_ms.min(record.from_ms);
        self.to_ms = self.to_ms.max(record.to_ms);
        self.sent += u64::from(path.sent);
        self.answered += u64::from(path.answered);
        self.outages_total += u64::from(path.outages_total);
        self.longest.extend(path.outages.iter().copied());
        // Keep the longest (ties: the earliest), then put them back in time order.
        self.longest
            .sort_by_key(|(from, to)| (std::cmp::Reverse(to.saturating_sub(*from)), *from));
        self.longest.truncate(MAX_OUTAGES);
        self.longest.sort();
    }
}

/// A time as `YYYY-MM-DD HH:MM:SS UTC` (the record's times are the senders' claims).
pub fn utc(ms: u64) -> String {
    let (year, month, day, hour, minute, second) = civil(ms);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02} UTC")
}

/// Milliseconds since the Unix epoch as UTC year, month, day, hour, minute, second.
pub fn civil(ms: u64) -> (i64, i64, i64, u64, u64, u64) {
    let seconds = ms / 1000;
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rest / 3600, rest / 60 % 60, rest % 60)
}

impl VerifyReport {
    fn name_of(&self, device: &DeviceKey) -> String {
        self.roster
            .iter()
            .find(|info| info.key == *device)
            .map_or_else(
                || device.short(),
                |info| format!("{}/{}", info.party, info.device),
            )
    }

    /// What differs between the export's roster and the parties an auditor expects
    /// (party name and device fingerprint, as verified out of band): every device on
    /// the roster must be expected, and every expectation met. Empty when they agree.
    pub fn unexpected(&self, expected: &[(String, crate::Fingerprint)]) -> Vec<String> {
        let mut out = Vec::new();
        let roster: Vec<(&DeviceInfo, crate::Fingerprint)> = self
            .roster
            .iter()
            .map(|info| (info, info.fingerprint()))
            .collect();
        for (info, fingerprint) in &roster {
            if !expected
                .iter()
                .any(|(party, expect)| *party == info.party && expect == fingerprint)
            {
                out.push(format!(
                    "{}/{} (fingerprint {fingerprint}) is on the roster but not expected",
                    info.party, info.device
                ));
            }
        }
        for (party, expect) in expected {
            if !roster
                .iter()
                .any(|(info, fingerprint)| info.party == *party && fingerprint == expect)
            {
                out.push(format!(
                    "no device of {party} with fingerprint {expect} is on the roster"
                ));
            }
        }
        out
    }

    /// Plain sentences of what the verification established.
    pub fn statements(&self) -> Vec<String> {
        let mut out = vec![
            format!(
                "The file is intact: {} ({}, fingerprint {}) signed every byte of it.",
                self.exporter.party,
                self.exporter.device,
                self.exporter.fingerprint()
            ),
            format!(
                "Its {} envelopes form one history without gaps, forks or reordering; transcript root {}.",
                self.envelopes,
                hex::encode(self.root)
            ),
            "The exporter's final checkpoint attests that it received every envelope listed, through the channel's MLS group.".into(),
        ];
        for (device, (sent, covered)) in &self.senders {
            let name = self.name_of(device);
            out.push(format!(
                "{name}: {sent} envelopes, {covered} of them signed by its own device key through its checkpoints{}.",
                if covered < sent { " (the rest are attested by the exporter only)" } else { "" }
            ));
        }
        for ((device, relay, party), path) in &self.availability {
            let name = self.name_of(device);
            let outages = path
                .longest
                .iter()
                .map(|(from, to)| format!("{} to {}", utc(*from), utc(*to)))
                .collect::<Vec<_>>();
            out.push(format!(
                "{name} tested the path through {relay} to {party} from {} to {} ({} signed records): {} of {} link tests answered; {}.",
                utc(path.from_ms),
                utc(path.to_ms),
                path.records,
                path.answered,
                path.sent,
                match path.outages_total {
                    0 => "no outage".to_owned(),
                    n if n as usize > outages.len() => {
                        format!("{n} outages, the longest {}", outages.join(", "))
                    }
                    _ => format!("down {}", outages.join(", ")),
                }
            ));
        }
        for ((horizon, size, root), cosigned) in &self.cosigned {
            let signers: Vec<String> = cosigned
                .signers
                .iter()
                .map(|(key, _)| self.name_of(key))
                .collect();
            out.push(format!(
                "The root {} of the first {size} settled envelopes{} was cosigned by {}{}: {}.",
                &hex::encode(root)[..16],
                if *horizon > 0 {
                    format!(" from epoch {horizon}")
                } else {
                    String::new()
                },
                signers.join(", "),
                if self.cosigned_by_every_party(cosigned) {
                    ", every party"
                } else {
                    ""
                },
                match cosigned.matches {
                    Some(true) => "it is this record's",
                    Some(false) => "it is NOT this record's (someone was shown another history)",
                    None => "this record cannot check it (another horizon, or not settled here)",
                }
            ));
        }
        if self.cosignatures_invalid > 0 {
            out.push(format!(
                "{} cosignature(s) in the record do not hold.",
                self.cosignatures_invalid
            ));
        }
        for (id, text) in &self.agreements {
            let signers: Vec<String> = text
                .signed
                .iter()
                .map(|(key, time)| format!("{} at {}", self.name_of(key), utc(*time)))
                .collect();
            out.push(format!(
                "Agreed text {} ({}), proposed by {}: {}; signed by {}{}{}.",
                &id.to_hex()[..12],
                text.languages.join(", "),
                self.name_of(&text.proposer),
                if self.accepted(id) {
                    "ACCEPTED, every party signed its exact bytes"
                } else if !text.rejected.is_empty() {
                    "REJECTED"
                } else {
                    "not accepted"
                },
                if signers.is_empty() {
                    "nobody".to_owned()
                } else {
                    signers.join(", ")
                },
                if text.rejected.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; rejected by {}",
                        text.rejected
                            .iter()
                            .map(|(key, _)| self.name_of(key))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
                if text.invalid > 0 {
                    format!("; {} signature(s) that do not hold", text.invalid)
                } else {
                    String::new()
                }
            ));
        }
        if self.availability_unsummed > 0 {
            out.push(format!(
                "{} more availability record paths are not summarised here (more than {MAX_SUMMARIES} distinct paths).",
                self.availability_unsummed
            ));
        }
        if self.horizon > 0 {
            out.push(format!(
                "The exporter joined at epoch {}: what came before is referenced by hash only.",
                self.horizon
            ));
        }
        out.push(
            "Send times are the senders' claims; the order is the transcript's, not the clocks'."
                .into(),
        );
        out
    }
}

/// Most (device, relay, party) paths a verification report sums availability for.
pub const MAX_SUMMARIES: usize = 4096;

/// An export file in the making.
#[derive(Debug)]
pub struct Export;

/// What an export starts with, before its envelopes.
struct Header {
    channel: ChannelId,
    channel_name: String,
    horizon: u64,
    roster: Vec<DeviceInfo>,
    stubs: BTreeMap<EnvelopeId, DeviceKey>,
    count: u64,
}

impl Export {
    /// Writes the export of `transcript`, signed by `identity`, whose last envelope must
    /// be a checkpoint covering everything (see [`crate::Channel::checkpoint`]), into
    /// memory.
    pub fn write(
        transcript: &Transcript,
        channel_name: &str,
        identity: &DeviceIdentity,
    ) -> Result<Vec<u8>, ExportError> {
        let mut out = Vec::new();
        Self::write_to(transcript, channel_name, identity, &mut |bytes: &[u8]| {
            out.extend_from_slice(bytes);
            Ok(())
        })?;
        Ok(out)
    }

    /// Writes the export piece by piece to `sink` (which does the I/O), reading the
    /// transcript a page at a time: memory stays bounded whatever its length.
    pub fn write_to(
        transcript: &Transcript,
        channel_name: &str,
        identity: &DeviceIdentity,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), ExportError> {
        if !transcript.pending().is_empty() {
            return Err(ExportError::Incomplete);
        }
        let last = transcript.page_before(None, 1)?.into_iter().next();
        match last {
            Some((id, envelope))
                if envelope.sender == identity.key()
                    && envelope.body.kind() == Kind::Checkpoint
                    && transcript.covers_everything(&id)? => {}
            _ => return Err(ExportError::NeedsCheckpoint),
        }
        let mut digest = Sha512::new();
        let mut emit = |bytes: &[u8]| -> Result<(), ExportError> {
            digest.update(bytes);
            sink(bytes).map_err(ExportError::Write)
        };
        let mut writer = Writer::new();
        writer.fixed(MAGIC);
        writer.u8(EXPORT_VERSION);
        writer.fixed(&transcript.channel().0);
        writer.string(channel_name);
        writer.u64(transcript.horizon());
        writer.u32(transcript.roster().len() as u32);
        for info in transcript.roster().values() {
            info.encode(&mut writer);
        }
        writer.u32(transcript.stubs().len() as u32);
        for (id, sender) in transcript.stubs() {
            writer.fixed(&id.0);
            writer.fixed(&sender.0);
        }
        writer.u64(transcript.len() as u64);
        emit(writer.as_bytes())?;
        let mut after = None;
        loop {
            let page = transcript.page_after(after, PAGE)?;
            let Some((id, envelope)) = page.last() else {
                break;
            };
            after = Some((envelope.lamport, *id));
            let mut writer = Writer::new();
            for (_, envelope) in &page {
                writer.bytes(&envelope.encode());
            }
            emit(writer.as_bytes())?;
        }
        emit(&identity.key().0)?;
        let signature = identity.sign(&prehashed_message(digest));
        sink(&signature).map_err(ExportError::Write)
    }

    /// Verifies an export with nothing but its bytes (either version), in memory.
    pub fn verify(bytes: &[u8]) -> Result<VerifyReport, VerifyError> {
        Self::verify_from(&mut &bytes[..], MemoryStore::boxed())
    }

    /// Verifies an export read from `source`, rebuilding its transcript in `store`
    /// (which must be empty): a version 2 export is read once, in pieces, so with a
    /// store on disk memory stays bounded whatever its length. A version 1 export is
    /// read whole first (its signature covers the bytes, not a digest).
    pub fn verify_from(
        source: &mut dyn Read,
        store: Box<dyn TranscriptStore>,
    ) -> Result<VerifyReport, VerifyError> {
        Self::verify_keeping(source, store).map(|(report, _)| report)
    }

    /// [`Export::verify_from`], keeping the rebuilt transcript: what an auditor's view
    /// walks, page by page, to list the record (who said what, who holds and who read
    /// it).
    pub fn verify_keeping(
        source: &mut dyn Read,
        store: Box<dyn TranscriptStore>,
    ) -> Result<(VerifyReport, Transcript), VerifyError> {
        let mut input = Source::new(source);
        if input.take(MAGIC.len(), "magic")? != MAGIC {
            return Err(DecodeError::Invalid {
                field: "magic",
                reason: "not a hotline transcript export",
            }
            .into());
        }
        let version = input.u8("export version")?;
        match version {
            EXPORT_VERSION_1 => {
                let mut bytes = [MAGIC.as_slice(), &[EXPORT_VERSION_1]].concat();
                input
                    .source
                    .read_to_end(&mut bytes)
                    .map_err(|e| VerifyError::Read(e.to_string()))?;
                verify_version_1(&bytes, store)
            }
            EXPORT_VERSION => verify_streamed(input, store),
            version => Err(DecodeError::UnsupportedVersion {
                what: "export",
                version,
            }
            .into()),
        }
    }
}

/// Reads a version 2 export after its version byte.
fn verify_streamed(
    mut input: Source<'_>,
    store: Box<dyn TranscriptStore>,
) -> Result<(VerifyReport, Transcript), VerifyError> {
    let channel = ChannelId(input.array("channel")?);
    let channel_name = input.string("channel name", crate::channel::MAX_CHANNEL_NAME_LEN)?;
    let horizon = input.u64("horizon")?;
    let count = input.count("roster", MAX_ROSTER)?;
    let mut roster = Vec::with_capacity(count);
    for _ in 0..count {
        let bytes = [
            input.bytes_with_prefix("party name", crate::identity::MAX_NAME_LEN)?,
            input.bytes_with_prefix("device name", crate::identity::MAX_NAME_LEN)?,
            input.take(32, "key")?,
        ]
        .concat();
        roster.push(DeviceInfo::decode(&mut Reader::new(&bytes))?);
    }
    let count = input.count("horizon references", MAX_STUBS)?;
    let mut stubs = BTreeMap::new();
    for _ in 0..count {
        let id = EnvelopeId(input.array("horizon reference")?);
        stubs.insert(id, DeviceKey(input.array("horizon sender")?));
    }
    let envelopes = input.u64("envelopes")?;
    if envelopes > MAX_ENVELOPES as u64 {
        return Err(DecodeError::TooLong {
            field: "envelopes",
            len: envelopes,
            limit: MAX_ENVELOPES as u64,
        }
        .into());
    }
    let header = Header {
        channel,
        channel_name,
        horizon,
        roster,
        stubs,
        count: envelopes,
    };
    let mut verifier = Verifier::new(&header, store);
    for index in 0..envelopes {
        let bytes = input.bytes("envelope", MAX_ENVELOPE_LEN)?;
        verifier.add(index as usize, &bytes)?;
    }
    let exporter_key = DeviceKey(input.array("exporter")?);
    let digest = std::mem::take(&mut input.digest);
    let signature = input.array_unhashed::<64>("export signature")?;
    input.finish()?;
    exporter_key
        .verify(&prehashed_message(digest), &signature)
        .map_err(|_| VerifyError::BadFileSignature)?;
    verifier.finish(header, exporter_key)
}

/// A version 1 export, whole in memory: its signature first, then its envelopes.
fn verify_version_1(
    bytes: &[u8],
    store: Box<dyn TranscriptStore>,
) -> Result<(VerifyReport, Transcript), VerifyError> {
    let mut reader = Reader::new(bytes);
    reader.take(MAGIC.len() + 1, "magic")?;
    let channel = ChannelId(reader.array("channel")?);
    let channel_name = reader.string("channel name", crate::channel::MAX_CHANNEL_NAME_LEN)?;
    let horizon = reader.u64("horizon")?;
    let count = reader.count("roster", MAX_ROSTER, 40)?;
    let mut roster = Vec::with_capacity(count);
    for _ in 0..count {
        roster.push(DeviceInfo::decode(&mut reader)?);
    }
    let count = reader.count("horizon references", MAX_ENVELOPES, 64)?;
    let mut stubs = BTreeMap::new();
    for _ in 0..count {
        let id = EnvelopeId(reader.array("horizon reference")?);
        stubs.insert(id, DeviceKey(reader.array("horizon sender")?));
    }
    let count = reader.count("envelopes", MAX_ENVELOPES, 4)?;
    let mut raw = Vec::with_capacity(count);
    for _ in 0..count {
        raw.push(reader.bytes("envelope", MAX_ENVELOPE_LEN)?);
    }
    let exporter_key = DeviceKey(reader.array("exporter")?);
    let signed_len = reader.position();
    let signature = reader.array::<64>("export signature")?;
    reader.finish()?;
    exporter_key
        .verify(&signed_message(&bytes[..signed_len]), &signature)
        .map_err(|_| VerifyError::BadFileSignature)?;
    let header = Header {
        channel,
        channel_name,
        horizon,
        roster,
        stubs,
        count: raw.len() as u64,
    };
    let mut verifier = Verifier::new(&header, store);
    for (index, envelope_bytes) in raw.iter().enumerate() {
        verifier.add(index, envelope_bytes)?;
    }
    verifier.finish(header, exporter_key)
}

/// Rebuilds a transcript from an export's envelopes, one at a time, and keeps the
/// counts of the report (nothing that grows with the number of envelopes).
struct Verifier {
    transcript: Transcript,
    /// Per sender: envelopes, and envelopes up to its latest checkpoint.
    chains: BTreeMap<DeviceKey, (u64, u64)>,
    /// Per sender: the sequence number of its latest signed envelope.
    signed_through: BTreeMap<DeviceKey, u64>,
    first_time_ms: Option<u64>,
    last_time_ms: Option<u64>,
    texts: u64,
    read_receipts: u64,
    checkpoints: u64,
    non_responses: u64,
    availability: BTreeMap<(DeviceKey, String, String), PathSummary>,
    availability_unsummed: u64,
    agreements: BTreeMap<EnvelopeId, AgreedText>,
    cosigned: BTreeMap<(u64, u64, [u8; 32]), CosignedRoot>,
    cosignatures: u64,
    cosignatures_invalid: u64,
    channel: ChannelId,
    horizon: u64,
    last: Option<(u64, EnvelopeId)>,
}

impl Verifier {
    fn new(header: &Header, store: Box<dyn TranscriptStore>) -> Self {
        let mut transcript = Transcript::in_store(header.channel, header.horizon, store);
        for info in &header.roster {
            transcript.admit(info);
        }
        Self {
            transcript,
            chains: BTreeMap::new(),
            signed_through: BTreeMap::new(),
            first_time_ms: None,
            last_time_ms: None,
            texts: 0,
            read_receipts: 0,
            checkpoints: 0,
            non_responses: 0,
            availability: BTreeMap::new(),
            availability_unsummed: 0,
            agreements: BTreeMap::new(),
            cosigned: BTreeMap::new(),
            cosignatures: 0,
            cosignatures_invalid: 0,
            channel: header.channel,
            horizon: header.horizon,
            last: None,
        }
    }

    fn add(&mut self, index: usize, envelope_bytes: &[u8]) -> Result<(), VerifyError> {
        let (envelope, id) = Envelope::decode(envelope_bytes)
            .map_err(|reason| VerifyError::BadEnvelope { index, reason })?;
        match &envelope.body {
            Body::Message(_) => self.texts += 1,
            Body::ReadReceipt(_) => self.read_receipts += 1,
            Body::Checkpoint { .. } => self.checkpoints += 1,
            Body::NonResponse(_) => self.non_responses += 1,
            Body::Agreement(step) => self.note_agreement(&envelope, id, step),
            Body::Cosignature(cosignature) => self.note_cosignature(&envelope, cosignature)?,
            Body::Availability(record) => {
                for path in &record.paths {
                    // Bounded: one entry per (device, relay, party), at most
                    // MAX_SUMMARIES; paths beyond are counted, not summed.
                    let key = (envelope.sender, path.relay.clone(), path.party.clone());
                    let room = self.availability.len() < MAX_SUMMARIES;
                    if room || self.availability.contains_key(&key) {
                        self.availability.entry(key).or_default().add(record, path);
                    } else {
                        self.availability_unsummed += 1;
                    }
                }
            }
            _ => {}
        }
        let time = envelope.claimed_time_ms;
        self.first_time_ms = Some(self.first_time_ms.map_or(time, |t| t.min(time)));
        self.last_time_ms = Some(self.last_time_ms.map_or(time, |t| t.max(time)));
        let (sent, signed) = self.chains.entry(envelope.sender).or_default();
        *sent += 1;
        if envelope.body.kind().is_signed() {
            // A sender's chain arrives in order: everything so far is signed by it.
            *signed = *sent;
            self.signed_through.insert(envelope.sender, envelope.seq);
        }
        if let Some(previous) = self.last
            && (envelope.lamport, id) <= previous
        {
            return Err(VerifyError::NotCanonical { index });
        }
        self.last = Some((envelope.lamport, id));
        let findings = self.transcript.findings().len();
        let inserted = self.transcript.insert(envelope, id);
        for finding in &self.transcript.findings()[findings..] {
            if let Finding::CheckpointMismatch {
                checkpoint, sender, ..
            } = finding
            {
                return Err(VerifyError::CheckpointMismatch {
                    checkpoint: *checkpoint,
                    sender: *sender,
                });
            }
        }
        self.transcript.clear_findings();
        match inserted {
            Ok(Inserted::Accepted(ids)) if ids.len() == 1 => Ok(()),
            Ok(Inserted::Duplicate) => Err(VerifyError::Duplicate { index }),
            Ok(Inserted::Fork(_)) => Err(VerifyError::Fork { index }),
            Ok(_) => Err(VerifyError::NotCanonical { index }),
            Err(Rejection::Storage(error)) => Err(error.into()),
            Err(reason) => Err(VerifyError::Refused { index, reason }),
        }
    }

    /// Keeps an agreed text's proposal and checks each signature of it (a signature
    /// that does not hold is counted, never accepted: a member's bad signature cannot
    /// make the whole record unverifiable).
    fn note_agreement(&mut self, envelope: &Envelope, id: EnvelopeId, step: &Agreement) {
        match step {
            Agreement::Propose(proposal) => {
                if self.agreements.len() < MAX_SUMMARIES {
                    self.agreements.insert(
                        id,
                        AgreedText {
                            proposer: envelope.sender,
                            time_ms: envelope.claimed_time_ms,
                            languages: proposal.versions.iter().map(|(l, _)| l.clone()).collect(),
                            deadline_ms: proposal.deadline_ms,
                            digest: crate::agreement::digest(
                                &self.channel,
                                &id,
                                &proposal.versions,
                            ),
                            signed: Vec::new(),
                            rejected: Vec::new(),
                            invalid: 0,
                        },
                    );
                }
            }
            Agreement::Sign {
                proposal,
                digest,
                signature,
            } => {
                if let Some(text) = self.agreements.get_mut(proposal) {
                    let holds = *digest == text.digest
                        && text
                            .deadline_ms
                            .is_none_or(|deadline| envelope.claimed_time_ms <= deadline)
                        && crate::agreement::check(&envelope.sender, digest, signature);
                    if holds && text.signed.len() < MAX_ROSTER {
                        text.signed
                            .push((envelope.sender, envelope.claimed_time_ms));
                    } else if !holds {
                        text.invalid += 1;
                    }
                }
            }
            Agreement::Reject { proposal, reason } => {
                if let Some(text) = self.agreements.get_mut(proposal)
                    && text.rejected.len() < MAX_ROSTER
                {
                    text.rejected.push((envelope.sender, reason.clone()));
                }
            }
        }
    }

    /// Keeps a cosignature with the others of the same root, and checks the root
    /// against this record's settled prefix when it can.
    fn note_cosignature(
        &mut self,
        envelope: &Envelope,
        cosignature: &crate::cosign::Cosignature,
    ) -> Result<(), VerifyError> {
        self.cosignatures += 1;
        if !cosignature.holds(&self.channel, &envelope.sender) {
            self.cosignatures_invalid += 1;
            return Ok(());
        }
        let key = (cosignature.horizon, cosignature.size, cosignature.root);
        if self.cosigned.len() >= MAX_SUMMARIES && !self.cosigned.contains_key(&key) {
            return Ok(());
        }
        let matches =
            self.root_matches(cosignature.horizon, cosignature.size, &cosignature.root)?;
        let entry = self.cosigned.entry(key).or_default();
        if entry.matches.is_none() {
            entry.matches = matches;
        }
        if entry.signers.len() < MAX_ROSTER
            && !entry.signers.iter().any(|(key, _)| *key == envelope.sender)
        {
            entry.signers.push((envelope.sender, cosignature.signature));
        }
        Ok(())
    }

    /// Whether `root` is this record's root of its first `size` settled envelopes;
    /// `None` if the record cannot tell yet.
    fn root_matches(
        &self,
        horizon: u64,
        size: u64,
        root: &[u8; 32],
    ) -> Result<Option<bool>, StorageError> {
        if horizon != self.horizon || size == 0 || size > self.transcript.settled_len() {
            return Ok(None);
        }
        Ok(Some(self.transcript.settled_root(size)?.0 == *root))
    }

    fn finish(
        self,
        header: Header,
        exporter_key: DeviceKey,
    ) -> Result<(VerifyReport, Transcript), VerifyError> {
        let transcript = self.transcript;
        let exporter = header
            .roster
            .iter()
            .find(|info| info.key == exporter_key)
            .cloned()
            .ok_or(VerifyError::ExporterNotOnRoster)?;
        if transcript.len() as u64 != header.count {
            return Err(VerifyError::NotCanonical {
                index: transcript.len(),
            });
        }
        let last = transcript.page_before(None, 1)?.into_iter().next();
        let final_ok = match last {
            Some((id, envelope)) => {
                envelope.sender == exporter_key
                    && envelope.body.kind() == Kind::Checkpoint
                    && transcript.covers_everything(&id)?
            }
            None => false,
        };
        if !final_ok {
            return Err(VerifyError::NoFinalCheckpoint);
        }
        if transcript.stubs() != &header.stubs {
            return Err(VerifyError::HorizonMismatch);
        }
        let (root, size) = transcript.root()?;
        // Roots not checked on the way: this record's own horizon now that everything
        // is in; later horizons (members who joined later) by reading the settled
        // prefix forward once per horizon, sizes in ascending order.
        let mut cosigned = self.cosigned;
        let mut cursors: BTreeMap<u64, crate::cosign::HorizonCursor> = BTreeMap::new();
        for ((horizon, cosigned_size, cosigned_root), entry) in cosigned.iter_mut() {
            if entry.matches.is_some() || *cosigned_size == 0 || *horizon < header.horizon {
                continue;
            }
            if *horizon == header.horizon {
                if *cosigned_size <= transcript.settled_len() {
                    entry.matches =
                        Some(transcript.settled_root(*cosigned_size)?.0 == *cosigned_root);
                }
                continue;
            }
            let cursor = cursors
                .entry(*horizon)
                .or_insert_with(|| crate::cosign::HorizonCursor::new(*horizon));
            if let Some(root) = cursor.root_at(&transcript, *cosigned_size)? {
                entry.matches = Some(root == *cosigned_root);
            }
        }
        let report = VerifyReport {
            channel: header.channel,
            channel_name: header.channel_name,
            horizon: header.horizon,
            roster: header.roster,
            exporter,
            envelopes: size,
            texts: self.texts,
            read_receipts: self.read_receipts,
            non_responses: self.non_responses,
            checkpoints: self.checkpoints,
            root,
            first_time_ms: self.first_time_ms,
            last_time_ms: self.last_time_ms,
            senders: self.chains,
            signed_through: self.signed_through,
            availability: self.availability,
            availability_unsummed: self.availability_unsummed,
            agreements: self.agreements,
            cosigned,
            cosignatures: self.cosignatures,
            cosignatures_invalid: self.cosignatures_invalid,
        };
        Ok((report, transcript))
    }
}

/// Most horizon references a version 2 export may list.
const MAX_STUBS: usize = 1 << 20;

/// A byte source read in pieces, every byte hashed until the signature.
struct Source<'r> {
    source: &'r mut dyn Read,
    digest: Sha512,
}

impl<'r> Source<'r> {
    fn new(source: &'r mut dyn Read) -> Self {
        Self {
            source,
            digest: Sha512::new(),
        }
    }

    fn take_unhashed(&mut self, len: usize, field: &'static str) -> Result<Vec<u8>, VerifyError> {
        let mut buffer = Vec::new();
        let read = (&mut *self.source)
            .take(len as u64)
            .read_to_end(&mut buffer)
            .map_err(|e| VerifyError::Read(e.to_string()))?;
        if read < len {
            return Err(DecodeError::Truncated(field).into());
        }
        Ok(buffer)
    }

    fn take(&mut self, len: usize, field: &'static str) -> Result<Vec<u8>, VerifyError> {
        let bytes = self.take_unhashed(len, field)?;
        self.digest.update(&bytes);
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], VerifyError> {
        let bytes = self.take(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&bytes);
        Ok(out)
    }

    fn array_unhashed<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], VerifyError> {
        let bytes = self.take_unhashed(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&bytes);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, VerifyError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, VerifyError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, VerifyError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// A `u32` count of items, at most `limit` (checked before anything is reserved).
    fn count(&mut self, field: &'static str, limit: usize) -> Result<usize, VerifyError> {
        let count = self.u32(field)? as usize;
        if count > limit {
            return Err(DecodeError::TooLong {
                field,
                len: count as u64,
                limit: limit as u64,
            }
            .into());
        }
        Ok(count)
    }

    /// `u32` length then bytes, at most `limit` (checked before reading).
    fn bytes(&mut self, field: &'static str, limit: usize) -> Result<Vec<u8>, VerifyError> {
        let len = self.u32(field)? as usize;
        if len > limit {
            return Err(DecodeError::TooLong {
                field,
                len: len as u64,
                limit: limit as u64,
            }
            .into());
        }
        self.take(len, field)
    }

    /// Like [`Source::bytes`], keeping the length prefix (for a decoder that reads it).
    fn bytes_with_prefix(
        &mut self,
        field: &'static str,
        limit: usize,
    ) -> Result<Vec<u8>, VerifyError> {
        let bytes = self.bytes(field, limit)?;
        Ok([(bytes.len() as u32).to_be_bytes().as_slice(), &bytes].concat())
    }

    fn string(&mut self, field: &'static str, limit: usize) -> Result<String, VerifyError> {
        String::from_utf8(self.bytes(field, limit)?).map_err(|_| {
            DecodeError::Invalid {
                field,
                reason: "not UTF-8",
            }
            .into()
        })
    }

    /// Nothing may follow the signature.
    fn finish(&mut self) -> Result<(), VerifyError> {
        let mut rest = Vec::new();
        let extra = (&mut *self.source)
            .take(64)
            .read_to_end(&mut rest)
            .map_err(|e| VerifyError::Read(e.to_string()))?;
        if extra > 0 {
            return Err(DecodeError::TrailingBytes(extra).into());
        }
        Ok(())
    }
}

/// What a version 2 signature signs: the context, then the body's SHA-512.
fn prehashed_message(digest: Sha512) -> Vec<u8> {
    [SIGNATURE_CONTEXT_2, digest.finalize().as_slice()].concat()
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    [SIGNATURE_CONTEXT, body].concat()
}

/// The fingerprint of each roster entry, for display.
pub fn roster_fingerprints(report: &VerifyReport) -> Vec<(String, String, Fingerprint)> {
    report
        .roster
        .iter()
        .map(|info| (info.party.clone(), info.device.clone(), info.fingerprint()))
        .collect()
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::envelope::Reference;

    /// A small transcript ending with the exporter's checkpoint.
    fn sample() -> (Transcript, DeviceIdentity) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let identity = DeviceIdentity::generate("north", "desk", &mut rng).unwrap();
        let mut transcript = Transcript::new(ChannelId([1; 32]));
        transcript.admit(identity.info());
        let mut prev = EnvelopeId::NONE;
        for seq in 1..=4u64 {
            let body = if seq == 4 {
                let (root, size) = transcript.root_for_next_checkpoint().unwrap();
                Body::Checkpoint {
                    root,
                    size,
                    horizon: 0,
                }
            } else {
                Body::text(format!("line {seq}"))
            };
            let mut envelope = Envelope {
                channel: ChannelId([1; 32]),
                sender: identity.key(),
                epoch: 1,
                seq,
                prev,
                prev_epoch: if seq == 1 { 0 } else { 1 },
                seen: Vec::<Reference>::new(),
                lamport: seq,
                claimed_time_ms: seq,
                body,
                deadline_ms: None,
                signature: None,
            };
            if seq == 4 {
                envelope.sign(&identity);
            }
            prev = envelope.id();
            transcript.insert(envelope, prev).unwrap();
        }
        (transcript, identity)
    }

    /// The version 1 layout, as the previous release wrote it.
    fn write_version_1(transcript: &Transcript, name: &str, identity: &DeviceIdentity) -> Vec<u8> {
        let mut writer = Writer::new();
        writer.fixed(MAGIC);
        writer.u8(EXPORT_VERSION_1);
        writer.fixed(&transcript.channel().0);
        writer.string(name);
        writer.u64(transcript.horizon());
        writer.u32(transcript.roster().len() as u32);
        for info in transcript.roster().values() {
            info.encode(&mut writer);
        }
        writer.u32(0);
        writer.u32(transcript.len() as u32);
        for (_, envelope) in transcript.canonical().unwrap() {
            writer.bytes(&envelope.encode());
        }
        writer.fixed(&identity.key().0);
        let signature = identity.sign(&signed_message(writer.as_bytes()));
        writer.fixed(&signature);
        writer.into_bytes()
    }

    /// Hands out one byte per read: the streaming verifier must not care.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((byte, rest)), Some(slot)) => {
                    *slot = *byte;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    #[test]
    fn a_version_1_export_still_verifies_and_its_tampering_is_caught() {
        let (transcript, identity) = sample();
        let old = write_version_1(&transcript, "crisis", &identity);
        let report = Export::verify(&old).unwrap();
        assert_eq!(report.root, transcript.root().unwrap().0);
        assert_eq!(report.texts, 3);
        let mut tampered = old.clone();
        let middle = tampered.len() / 2;
        tampered[middle] ^= 1;
        assert!(Export::verify(&tampered).is_err());
    }

    #[test]
    fn a_streamed_export_verifies_read_a_byte_at_a_time_and_says_the_same() {
        let (transcript, identity) = sample();
        let new = Export::write(&transcript, "crisis", &identity).unwrap();
        assert_eq!(new[MAGIC.len()], EXPORT_VERSION);
        let whole = Export::verify(&new).unwrap();
        let trickled = Export::verify_from(&mut Trickle(&new), MemoryStore::boxed()).unwrap();
        assert_eq!(whole, trickled);
        assert_eq!(whole.root, transcript.root().unwrap().0);
        assert_eq!(whole.senders[&identity.key()], (4, 4));
        // Cut anywhere, or one byte more: refused.
        for cut in [0, 10, new.len() / 2, new.len() - 1] {
            assert!(Export::verify(&new[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = new.clone();
        longer.push(0);
        assert!(matches!(
            Export::verify(&longer),
            Err(VerifyError::Malformed(DecodeError::TrailingBytes(1)))
        ));
        // The signature covers the digest of every byte before it.
        let mut tampered = new.clone();
        let middle = tampered.len() / 2;
        tampered[middle] ^= 0x40;
        assert!(Export::verify(&tampered).is_err());
        let last = tampered.len() - 70;
        let mut key_changed = new.clone();
        key_changed[last] ^= 1;
        assert!(Export::verify(&key_changed).is_err());
    }
}
