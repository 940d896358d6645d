//! Export and offline verification of a transcript.
//!
//! An export is one file that anyone can check with nothing but the file: the channel's
//! roster (parties, devices, keys), the envelopes in canonical order, the references to
//! envelopes behind the exporter's horizon, and the exporter's Ed25519 signature over
//! all of it. The last envelope must be the exporter's own checkpoint, covering every
//! other envelope. The format is specified in `docs/export-format.md`.
//!
//! What a valid export proves (and what it does not) is spelled out in
//! [`VerifyReport::statements`].

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};
use crate::envelope::{Body, ChannelId, Envelope, EnvelopeError, EnvelopeId, Kind, MAX_BODY_LEN};
use crate::identity::{DeviceIdentity, DeviceInfo, DeviceKey, Fingerprint};
use crate::merkle::StorageError;
use crate::transcript::{Finding, Inserted, Rejection, Transcript};

const MAGIC: &[u8; 19] = b"HOTLINE-TRANSCRIPT\n";
const EXPORT_VERSION: u8 = 1;
const SIGNATURE_CONTEXT: &[u8] = b"hotline-export-v1";
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
    pub root: [u8; 32],
    /// Earliest and latest claimed send times, ms since the Unix epoch.
    pub first_time_ms: Option<u64>,
    pub last_time_ms: Option<u64>,
    /// Per device: envelopes sent, and how many of them the device's own signed
    /// checkpoints cover.
    pub senders: BTreeMap<DeviceKey, (u64, u64)>,
}

impl VerifyReport {
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
            let name = self
                .roster
                .iter()
                .find(|info| info.key == *device)
                .map_or_else(
                    || device.short(),
                    |info| format!("{}/{}", info.party, info.device),
                );
            out.push(format!(
                "{name}: {sent} envelopes, {covered} of them signed by its own device key through its checkpoints{}.",
                if covered < sent { " (the rest are attested by the exporter only)" } else { "" }
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

/// An export file in the making.
#[derive(Debug)]
pub struct Export;

impl Export {
    /// Writes the export of `transcript`, signed by `identity`, whose last envelope must
    /// be a checkpoint covering everything (see [`crate::Channel::checkpoint`]).
    pub fn write(
        transcript: &Transcript,
        channel_name: &str,
        identity: &DeviceIdentity,
    ) -> Result<Vec<u8>, ExportError> {
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
        let stubs: BTreeMap<_, _> = transcript.stubs().iter().collect();
        writer.u32(stubs.len() as u32);
        for (id, sender) in stubs {
            writer.fixed(&id.0);
            writer.fixed(&sender.0);
        }
        writer.u32(transcript.len() as u32);
        let mut after = None;
        loop {
            let page = transcript.page_after(after, 4096)?;
            let Some((id, envelope)) = page.last() else {
                break;
            };
            after = Some((envelope.lamport, *id));
            for (_, envelope) in &page {
                writer.bytes(&envelope.encode());
            }
        }
        writer.fixed(&identity.key().0);
        let signature = identity.sign(&signed_message(writer.as_bytes()));
        writer.fixed(&signature);
        Ok(writer.into_bytes())
    }

    /// Verifies an export with nothing but its bytes.
    pub fn verify(bytes: &[u8]) -> Result<VerifyReport, VerifyError> {
        let mut reader = Reader::new(bytes);
        if reader.take(MAGIC.len(), "magic")? != MAGIC {
            return Err(DecodeError::Invalid {
                field: "magic",
                reason: "not a hotline transcript export",
            }
            .into());
        }
        let version = reader.u8("export version")?;
        if version != EXPORT_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: "export",
                version,
            }
            .into());
        }
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
        let exporter = roster
            .iter()
            .find(|info| info.key == exporter_key)
            .cloned()
            .ok_or(VerifyError::ExporterNotOnRoster)?;

        let mut transcript = Transcript::with_horizon(channel, horizon);
        for info in &roster {
            transcript.admit(info);
        }
        let mut chains: BTreeMap<DeviceKey, (Vec<u64>, u64)> = BTreeMap::new();
        let mut times = BTreeSet::new();
        let (mut texts, mut read_receipts, mut checkpoints) = (0, 0, 0);
        let mut last = None;
        for (index, envelope_bytes) in raw.iter().enumerate() {
            let (envelope, id) = Envelope::decode(envelope_bytes)
                .map_err(|reason| VerifyError::BadEnvelope { index, reason })?;
            match &envelope.body {
                Body::Text(_) => texts += 1,
                Body::ReadReceipt(_) => read_receipts += 1,
                Body::Checkpoint { .. } => checkpoints += 1,
                _ => {}
            }
            times.insert(envelope.claimed_time_ms);
            let (seqs, signed_up_to) = chains.entry(envelope.sender).or_default();
            seqs.push(envelope.seq);
            if let Body::Checkpoint { .. } = envelope.body {
                *signed_up_to = envelope.seq;
            }
            if let Some(previous) = last
                && (envelope.lamport, id) <= previous
            {
                return Err(VerifyError::NotCanonical { index });
            }
            last = Some((envelope.lamport, id));
            match transcript.insert(envelope, id) {
                Ok(Inserted::Accepted(ids)) if ids.len() == 1 => {}
                Ok(Inserted::Duplicate) => return Err(VerifyError::Duplicate { index }),
                Ok(Inserted::Fork(_)) => return Err(VerifyError::Fork { index }),
                Ok(_) => return Err(VerifyError::NotCanonical { index }),
                Err(reason) => return Err(VerifyError::Refused { index, reason }),
            }
        }
        for finding in transcript.findings() {
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
        let computed: BTreeMap<_, _> = transcript.stubs().iter().map(|(id, s)| (*id, *s)).collect();
        if computed != stubs {
            return Err(VerifyError::HorizonMismatch);
        }
        let senders = chains
            .into_iter()
            .map(|(device, (seqs, signed_up_to))| {
                let covered = seqs.iter().filter(|seq| **seq <= signed_up_to).count() as u64;
                (device, (seqs.len() as u64, covered))
            })
            .collect();
        let (root, size) = transcript.root()?;
        Ok(VerifyReport {
            channel,
            channel_name,
            horizon,
            roster,
            exporter,
            envelopes: size,
            texts,
            read_receipts,
            checkpoints,
            root,
            first_time_ms: times.first().copied(),
            last_time_ms: times.last().copied(),
            senders,
        })
    }
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
