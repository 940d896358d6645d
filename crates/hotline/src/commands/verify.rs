//! `hotline verify FILE`: offline verification of an export.

use std::io::{BufReader, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use hotline_client::transcript_store::scratch as scratch_store;
use hotline_core::export::{VerifyReport, utc};
use hotline_core::{
    Agreement, Body, DeviceKey, Envelope, EnvelopeId, Export, Fingerprint, MembershipNote,
    Transcript,
};
use serde_json::json;

use crate::exit;
use crate::input::{self, MAX_EXPORT_FILE};

pub fn run(
    file: &Path,
    show: bool,
    expect: &[(String, Fingerprint)],
    json_output: bool,
) -> ExitCode {
    let opened = input::open_limited(file, MAX_EXPORT_FILE, "a transcript export");
    let source = match opened {
        Ok((source, _)) => source,
        Err(error) => {
            eprintln!("hotline: {error}");
            return ExitCode::from(exit::ERROR);
        }
    };
    // Read in pieces (at most the limit), the transcript rebuilt in a scratch database
    // beside nothing else: memory stays bounded whatever the export's length.
    let mut reader = BufReader::with_capacity(1 << 16, source.take(MAX_EXPORT_FILE + 1));
    let scratch = match Scratch::new() {
        Ok(scratch) => scratch,
        Err(error) => {
            eprintln!("hotline: cannot make a scratch database to verify in: {error}");
            return ExitCode::from(exit::ERROR);
        }
    };
    let verified = match scratch_store(&scratch.0.join("transcript.db"), [0; 32]) {
        Ok(store) => Export::verify_keeping(&mut reader, store),
        Err(error) => {
            eprintln!("hotline: cannot make a scratch database to verify in: {error}");
            return ExitCode::from(exit::ERROR);
        }
    };
    match verified {
        Ok((report, transcript)) => {
            let unexpected = if expect.is_empty() {
                Vec::new()
            } else {
                report.unexpected(expect)
            };
            if json_output {
                let mut object = report_json(&report);
                object["expected_parties"] = json!(unexpected.is_empty());
                out_json!(object);
            } else {
                print_report(&report);
            }
            if show && let Err(error) = show_record(&report, &transcript, json_output) {
                eprintln!("hotline: cannot read back the verified transcript: {error}");
                return ExitCode::from(exit::ERROR);
            }
            if !unexpected.is_empty() {
                for complaint in &unexpected {
                    eprintln!("hotline: {}", crate::inert::inert(complaint));
                }
                eprintln!(
                    "hotline: {} verifies, but its parties are not the ones expected: do not rely on it",
                    file.display()
                );
                return ExitCode::from(exit::INTEGRITY);
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            if json_output {
                out_json!(json!({"verified": false, "error": error.to_string()}));
            }
            eprintln!(
                "hotline: {} does NOT verify: {error}\n\
                 Do not rely on this file; ask its exporter for a fresh export and compare transcript roots.",
                file.display()
            );
            ExitCode::from(exit::INTEGRITY)
        }
    }
}

/// Lists the verified record, oldest first, a page at a time (memory stays bounded): one
/// entry per message, statement, record, checkpoint and membership change (read
/// receipts show as who read what; link tests are left out). With `--json`, one object
/// per line after the report.
fn show_record(
    report: &VerifyReport,
    transcript: &Transcript,
    json_output: bool,
) -> Result<(), hotline_core::merkle::StorageError> {
    if !json_output {
        out!("record");
    }
    let name = |key: &DeviceKey| {
        report
            .roster
            .iter()
            .find(|info| info.key == *key)
            .map_or_else(
                || (key.short(), String::new()),
                |info| (info.party.clone(), info.device.clone()),
            )
    };
    let parties = |keys: std::collections::BTreeSet<DeviceKey>, sender: &str| {
        keys.iter()
            .map(|key| name(key).0)
            .filter(|party| party != sender)
            .collect::<std::collections::BTreeSet<String>>()
    };
    let mut after: Option<(u64, EnvelopeId)> = None;
    loop {
        let page = transcript.page_after(after, 256)?;
        let Some((id, envelope)) = page.last() else {
            break;
        };
        after = Some((envelope.lamport, *id));
        for (id, envelope) in page {
            let Some((kind, text)) = describe(&envelope, report) else {
                continue;
            };
            let (party, device) = name(&envelope.sender);
            let signed = report
                .signed_through
                .get(&envelope.sender)
                .is_some_and(|through| envelope.seq <= *through);
            let message = envelope.body.message();
            let (delivered, read) = match message {
                Some(_) => (
                    parties(transcript.delivered_to(&id)?, &party),
                    parties(transcript.read_by(&id)?, &party),
                ),
                None => Default::default(),
            };
            if json_output {
                out_json!(json!({
                    "id": id.to_hex(),
                    "sender": {"party": party, "device": device},
                    "time_ms": envelope.claimed_time_ms,
                    "kind": kind,
                    "precedence": message.map(|m| m.precedence.as_str()),
                    "deadline_ms": message.and(envelope.deadline_ms),
                    "text": text,
                    "delivered_to": message.map(|_| &delivered),
                    "read_by": message.map(|_| &read),
                    "proven_by": if signed { "sender" } else { "exporter" },
                }));
                continue;
            }
            let list = |set: &std::collections::BTreeSet<String>| match set.len() {
                0 => "-".to_owned(),
                _ => set.iter().cloned().collect::<Vec<_>>().join(","),
            };
            out!(
                "  {} {} {}/{} {}{}",
                utc(envelope.claimed_time_ms),
                &id.to_hex()[..12],
                crate::inert::inert(&party),
                crate::inert::inert(&device),
                kind.to_uppercase(),
                if signed {
                    " (signed by its sender)"
                } else {
                    " (attested by the exporter only)"
                }
            );
            for line in crate::inert::inert_lines(&text) {
                out!("      {line}");
            }
            if message.is_some() {
                out!(
                    "      delivered to {}; read by {}{}",
                    list(&delivered),
                    list(&read),
                    envelope
                        .deadline_ms
                        .map(|ms| format!("; read-by deadline {}", utc(ms)))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

/// What one envelope says in the auditor's view: its kind and text; `None` for what
/// the view leaves out (read receipts, which show on the messages, and link tests).
fn describe(envelope: &Envelope, report: &VerifyReport) -> Option<(String, String)> {
    let device = |key: &DeviceKey| {
        report
            .roster
            .iter()
            .find(|info| info.key == *key)
            .map_or_else(
                || key.short(),
                |info| format!("{}/{}", info.party, info.device),
            )
    };
    Some(match &envelope.body {
        Body::Message(message) => (
            match message.precedence {
                hotline_core::Precedence::Routine => "message".to_owned(),
                level => format!("{level} message"),
            },
            match &message.code {
                Some(coded) => format!(
                    "[{}] {} (code book {})",
                    coded.id,
                    coded
                        .fields
                        .iter()
                        .map(|(name, value)| format!("{name}={value}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    &hex::encode(coded.catalogue)[..12]
                ),
                None => message.text.clone(),
            },
        ),
        Body::NonResponse(statement) => (
            "non-response statement".into(),
            hotline_client::payload::describe_non_response(statement),
        ),
        Body::Availability(record) => (
            "availability record".into(),
            hotline_client::payload::describe_availability(record),
        ),
        Body::Checkpoint { root, size, .. } => (
            "checkpoint".into(),
            format!("root {} over {size} envelopes", hex::encode(root)),
        ),
        Body::Membership(note) => (
            "membership".into(),
            match note {
                MembershipNote::Added { party, device: key } => {
                    format!("added {party} (device {})", device(key))
                }
                MembershipNote::Removed { device: key } => format!("removed {}", device(key)),
                MembershipNote::KeyUpdated { epoch } => format!("key update, epoch {epoch}"),
                MembershipNote::CommitterHandover { to } => {
                    format!("committer role handed to {}", device(to))
                }
                MembershipNote::RelaysChanged { relays } => {
                    format!("relays now: {}", relays.join(", "))
                }
                MembershipNote::HandlingTimes { read_within_ms } => format!(
                    "handling times now: {}",
                    hotline_core::Precedence::ALL
                        .iter()
                        .zip(read_within_ms)
                        .map(|(level, ms)| format!(
                            "{level} {}",
                            crate::commands::human_duration(*ms)
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
        ),
        Body::Agreement(Agreement::Propose(proposal)) => {
            (
                "agreed text proposed".into(),
                proposal
                    .versions
                    .iter()
                    // Each version's later lines indented under its header: a
                    // version's text cannot pass for another version.
                    .map(|(language, text)| {
                        format!("[{language}] {}", text.replace('\n', "\n    "))
                    })
                    .chain(proposal.deadline_ms.map(|deadline| {
                        format!("(to be signed by every party by {})", utc(deadline))
                    }))
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        }
        Body::Agreement(Agreement::Sign {
            proposal,
            digest,
            signature,
        }) => {
            let holds = report.agreements.get(proposal).is_some_and(|text| {
                text.digest == *digest
                    && text
                        .deadline_ms
                        .is_none_or(|deadline| envelope.claimed_time_ms <= deadline)
                    && hotline_core::agreement::check(&envelope.sender, digest, signature)
            });
            (
                "agreed text signed".into(),
                format!(
                    "signed agreed text {} ({}): signature {}",
                    &proposal.to_hex()[..12],
                    if holds {
                        "the signature holds"
                    } else {
                        "the signature does NOT hold"
                    },
                    hex::encode(signature)
                ),
            )
        }
        Body::Agreement(Agreement::Reject { proposal, reason }) => (
            "agreed text rejected".into(),
            format!(
                "rejected agreed text {}: {reason}",
                &proposal.to_hex()[..12]
            ),
        ),
        Body::Cosignature(cosignature) => (
            "cosigned root".into(),
            format!(
                "root {} of the first {} settled envelopes{} ({})",
                hex::encode(cosignature.root),
                cosignature.size,
                if cosignature.horizon > 0 {
                    format!(" from epoch {}", cosignature.horizon)
                } else {
                    String::new()
                },
                if cosignature.holds(&report.channel, &envelope.sender) {
                    "the signature holds"
                } else {
                    "the signature does NOT hold"
                }
            ),
        ),
        Body::ReadReceipt(_) | Body::LinkTest(_) => return None,
    })
}

/// A private directory for the verifier's scratch database, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> std::io::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("hotline-verify-{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn report_json(report: &VerifyReport) -> serde_json::Value {
    json!({
        "verified": true,
        "channel": report.channel.to_string(),
        "channel_name": report.channel_name,
        "horizon_epoch": report.horizon,
        "parties": report.roster.iter().map(|info| json!({
            "party": info.party,
            "device": info.device,
            "fingerprint": info.fingerprint().to_string(),
        })).collect::<Vec<_>>(),
        "exporter": {"party": report.exporter.party, "device": report.exporter.device},
        "envelopes": report.envelopes,
        "messages": report.texts,
        "read_receipts": report.read_receipts,
        "checkpoints": report.checkpoints,
        "non_responses": report.non_responses,
        "availability": report.availability.iter().map(|((device, relay, party), path)| {
            let tester = report.roster.iter().find(|info| info.key == *device);
            json!({
                "tester": tester.map(|info| json!({"party": info.party, "device": info.device})),
                "relay": relay,
                "party": party,
                "records": path.records,
                "from_ms": path.from_ms,
                "to_ms": path.to_ms,
                "sent": path.sent,
                "answered": path.answered,
                "outages": path.outages_total,
                "longest_outages": path.longest.iter()
                    .map(|(from, to)| json!({"from_ms": from, "to_ms": to}))
                    .collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
        "root": hex::encode(report.root),
        "first_time_ms": report.first_time_ms,
        "last_time_ms": report.last_time_ms,
        "agreements": report.agreements.iter().map(|(id, text)| {
            let device = |key: &DeviceKey| report.roster.iter().find(|info| info.key == *key)
                .map(|info| json!({"party": info.party, "device": info.device}));
            json!({
                "id": id.to_hex(),
                "accepted": report.accepted(id),
                "proposer": device(&text.proposer),
                "time_ms": text.time_ms,
                "languages": text.languages,
                "deadline_ms": text.deadline_ms,
                "digest": hex::encode(text.digest),
                "signed": text.signed.iter().map(|(key, time)| json!({"by": device(key), "time_ms": time})).collect::<Vec<_>>(),
                "rejected": text.rejected.iter().map(|(key, reason)| json!({"by": device(key), "reason": reason})).collect::<Vec<_>>(),
                "invalid_signatures": text.invalid,
            })
        }).collect::<Vec<_>>(),
        "cosigned": report.cosigned.iter().map(|((horizon, size, root), cosigned)| {
            let signers: Vec<(hotline_core::DeviceInfo, [u8; 64])> = cosigned.signers.iter()
                .filter_map(|(key, signature)| report.roster.iter().find(|info| info.key == *key)
                    .map(|info| (info.clone(), *signature)))
                .collect();
            json!({
                "horizon": horizon,
                "size": size,
                "root": hex::encode(root),
                "by": signers.iter().map(|(info, _)| json!({"party": info.party, "device": info.device})).collect::<Vec<_>>(),
                "every_party": report.cosigned_by_every_party(cosigned),
                "matches": cosigned.matches,
                "note": hotline_core::cosign::signed_note(&report.channel, *horizon, *size, root, &signers),
            })
        }).collect::<Vec<_>>(),
        "cosignatures": report.cosignatures,
        "cosignatures_invalid": report.cosignatures_invalid,
        "statements": report.statements(),
    })
}

fn print_report(report: &VerifyReport) {
    out!(
        "VERIFIED  channel {:?} ({})",
        report.channel_name,
        report.channel
    );
    out!("root      {}", hex::encode(report.root));
    out!(
        "content   {} envelopes: {} messages, {} read receipts, {} checkpoints, {} non-response statements, {} cosigned roots",
        report.envelopes,
        report.texts,
        report.read_receipts,
        report.checkpoints,
        report.non_responses,
        report.cosignatures
    );
    out!("parties");
    for info in &report.roster {
        out!(
            "  {:<16} {:<12} {}",
            crate::inert::inert(&info.party),
            crate::inert::inert(&info.device),
            info.fingerprint()
        );
    }
    out!("what this proves");
    // Names in the file are the parties' own words: shown inert.
    for statement in report.statements() {
        out!("  - {}", crate::inert::inert(&statement));
    }
}
