//! `hotline verify FILE`: offline verification of an export.

use std::io::{BufReader, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use hotline_client::transcript_store::scratch as scratch_store;
use hotline_core::Export;
use hotline_core::export::VerifyReport;
use serde_json::json;

use crate::exit;
use crate::input::{self, MAX_EXPORT_FILE};

pub fn run(file: &Path, json_output: bool) -> ExitCode {
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
        Ok(store) => Export::verify_from(&mut reader, store),
        Err(error) => {
            eprintln!("hotline: cannot make a scratch database to verify in: {error}");
            return ExitCode::from(exit::ERROR);
        }
    };
    match verified {
        Ok(report) => {
            if json_output {
                out_json!(report_json(&report));
            } else {
                print_report(&report);
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
        "content   {} envelopes: {} messages, {} read receipts, {} checkpoints",
        report.envelopes,
        report.texts,
        report.read_receipts,
        report.checkpoints
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
