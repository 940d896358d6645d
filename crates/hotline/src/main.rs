//! `hotline`: the command line of hotline.
//!
//! This binary parses arguments and calls into the library code of its modules. What
//! exists today works without a network: `verify` checks an exported transcript
//! offline, and `demo` plays the whole story of a channel in memory. The device store
//! and the relay bring the other commands of DESIGN.md.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod demo;
mod verify;

/// Exit codes of DESIGN.md.
pub mod exit {
    pub const ERROR: u8 = 1;
    pub const INTEGRITY: u8 = 5;
}

#[derive(Parser, Debug)]
#[command(
    name = "hotline",
    version,
    about = "A direct, end-to-end encrypted line between parties who trust neither each other nor the network",
    after_help = "Examples:\n  hotline demo\n  hotline demo --json\n  hotline verify transcript.hotline --json"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Play the whole story in memory: three parties, fingerprints, a channel,
    /// messages, receipts, export and offline verification.
    Demo {
        /// Print a JSON summary instead of the narration.
        #[arg(long)]
        json: bool,
    },
    /// Verify an exported transcript offline, with nothing but the file.
    #[command(after_help = "Exit codes: 0 verified, 1 unreadable file, 5 integrity failure")]
    Verify {
        /// The export file.
        file: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo { json } => demo::run(json),
        Command::Verify { file, json } => verify::run(&file, json),
    }
}
