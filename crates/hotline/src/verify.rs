//! `hotline verify FILE`: offline verification of an export.

use std::path::Path;
use std::process::ExitCode;

use hotline_core::Export;
use hotline_core::export::VerifyReport;
use serde_json::json;

use crate::exit;
use crate::input::{self, MAX_EXPORT_FILE};

/// The first bytes of every export (`docs/export-format.md`); checked again, with the
/// rest, by `Export::verify`.
const EXPORT_MAGIC: &[u8] = b"HOTLINE-TRANSCRIPT\n";

pub fn run(file: &Path, json_output: bool) -> ExitCode {
    // The whole export is held in memory (a streaming verifier is separate work): a
    // regular file over the limit is refused from its length, anything else once it
    // passes the limit; input that does not start as an export does is not read on,
    // and `Export::verify` refuses its first bytes (reading /dev/zero up to 4 GiB took
    // 13 s and 4 GiB of memory).
    let read =
        input::read_limited_expecting(file, MAX_EXPORT_FILE, "a transcript export", EXPORT_MAGIC);
    let bytes = match read {
        Ok(bytes) => bytes,
        Err(error) => {
            eprintln!("hotline: {error}");
            return ExitCode::from(exit::ERROR);
        }
    };
    match Export::verify(&bytes) {
        Ok(report) => {
            if json_output {
                out!("{}", report_json(&report));
            } else {
                print_report(&report);
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            if json_output {
                out!("{}", json!({"verified": false, "error": error.to_string()}));
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
            info.party,
            info.device,
            info.fingerprint()
        );
    }
    out!("what this proves");
    for statement in report.statements() {
        out!("  - {statement}");
    }
}
