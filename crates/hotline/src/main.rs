//! `hotline`: the command line of hotline.
//!
//! `main` parses arguments and dispatches to one module per command family; the work
//! is done by `hotline-client` (the device store) and `hotline-core`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use hotline_core::{Message, Precedence};

/// `println!` that ends the process quietly when stdout is closed (`hotline log | head`)
/// instead of panicking.
/// Prints one line of text for people: whatever it carries from the other side, no
/// character in it acts on the terminal (see [`inert`]); line breaks stay.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::emit(format_args!($($arg)*))
    };
}

/// Prints one JSON value on a line: exact once parsed, inert on a terminal (every
/// character a terminal could act on is a `\uXXXX` escape).
macro_rules! out_json {
    ($value:expr) => {
        $crate::emit_json(&$value)
    };
}

mod commands;
mod console;
mod inert;
mod input;
mod logging;
mod settings;

/// Writes one line of text to stdout, inert; a closed pipe ends the process with
/// success.
pub fn emit(line: std::fmt::Arguments<'_>) {
    write_line(&inert::inert_lines(&line.to_string()).join("\n"));
}

/// Writes one JSON value to stdout on one line, inert (see [`out_json!`]).
pub fn emit_json(value: &serde_json::Value) {
    write_line(&inert::json_escaped(&value.to_string()));
}

fn write_line(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "{line}").is_err() {
        std::process::exit(0);
    }
}

/// Exit codes (docs/product.md).
pub mod exit {
    pub const ERROR: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NETWORK: u8 = 3;
    pub const TRUST: u8 = 4;
    pub const INTEGRITY: u8 = 5;
    pub const ALARM: u8 = 6;
}

/// The examples of `hotline --help` and of the manual's EXAMPLES section.
macro_rules! examples {
    () => {
        "  hotline demo
  hotline init --party north --device duty-desk
  hotline card export --out north.card
  hotline card import south.card --fingerprint '12345 67890 12345 67890 12345 67890'
  hotline channel create crisis --with south --with mediator
  hotline bundle export --out to-others.bundle      # until relays exist, files carry messages
  hotline send crisis 'Exercise ends at 18:00 UTC' --deadline 10m
  hotline send crisis --precedence flash 'Unidentified launch detected: call now'
  hotline log crisis
  hotline export crisis --out crisis.hotline && hotline verify crisis.hotline"
    };
}

/// Exit codes and what each means, for the manual's EXIT STATUS section (the
/// `--help` line says the same).
const EXIT_CODES: &[(u8, &str)] = &[
    (0, "ok"),
    (
        exit::ERROR,
        "error: the command failed (its message says why)",
    ),
    (
        exit::USAGE,
        "usage: a mistake on the command line (an unknown option, a malformed value, \
         a file that would be overwritten without --force)",
    ),
    (
        exit::NETWORK,
        "network: no relay could be reached; status: the line is down",
    ),
    (
        exit::TRUST,
        "trust refused: a fingerprint that does not match, a card or member not verified",
    ),
    (
        exit::INTEGRITY,
        "integrity failure: an export or receipt that does not verify, parties other \
         than expected",
    ),
    (
        exit::ALARM,
        "alarm: status found something that needs the duty officer",
    ),
];

#[derive(Parser, Debug)]
#[command(
    name = "hotline",
    version,
    about = "A direct, end-to-end encrypted line between parties who trust neither each other nor the network",
    after_help = concat!(
        "Examples:\n",
        examples!(),
        "\n\nExit codes: 0 ok, 1 error, 2 usage, 3 network, 4 trust refused, 5 integrity \
         failure, 6 alarm (status: something needs the duty officer)."
    )
)]
struct Cli {
    /// The device's home directory [default: $HOTLINE_HOME, else `home` in the settings
    /// file, else $XDG_DATA_HOME/hotline]
    #[arg(long, global = true)]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// `hotline man`: the manual from the command line's own definitions.
fn manual(out: Option<&std::path::Path>) -> Result<(), commands::Failure> {
    let command = <Cli as clap::CommandFactory>::command();
    let failed = |e: std::io::Error| commands::failure(format!("cannot write the manual: {e}"));
    let page = main_page(command.clone()).map_err(failed)?;
    match out {
        None => {
            use std::io::Write;
            std::io::stdout().write_all(&page).map_err(failed)
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| commands::failure(format!("cannot create {}: {e}", dir.display())))?;
            clap_mangen::generate_to(command, dir).map_err(failed)?;
            std::fs::write(dir.join("hotline.1"), page).map_err(failed)?;
            eprintln!("manual pages written to {}", dir.display());
            Ok(())
        }
    }
}

/// hotline(1): clap's sections, then EXAMPLES (as typed) and EXIT STATUS (one entry
/// per code) instead of clap's free-form EXTRA.
fn main_page(command: clap::Command) -> std::io::Result<Vec<u8>> {
    use clap_mangen::roff::{Roff, roman};
    let man = clap_mangen::Man::new(command);
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    man.render_subcommands_section(&mut page)?;
    let mut roff = Roff::new();
    roff.control("SH", ["EXAMPLES"]).control("nf", []);
    for line in examples!().lines() {
        roff.text([roman(line.trim_start())]);
    }
    roff.control("fi", []).control("SH", ["EXIT STATUS"]);
    for (code, meaning) in EXIT_CODES {
        roff.control("TP", [])
            .text([roman(code.to_string())])
            .text([roman(*meaning)]);
    }
    roff.to_writer(&mut page)?;
    man.render_version_section(&mut page)?;
    Ok(page)
}

fn parse_expectation(text: &str) -> Result<(String, hotline_core::Fingerprint), String> {
    let (party, fingerprint) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not PARTY=FINGERPRINT"))?;
    let fingerprint = hotline_core::Fingerprint::parse(fingerprint)
        .map_err(|e| format!("{fingerprint:?} is not a fingerprint: {e}"))?;
    Ok((party.trim().to_owned(), fingerprint))
}

fn parse_precedence(text: &str) -> Result<Precedence, String> {
    Precedence::parse(text).ok_or_else(|| {
        format!("{text:?} is not a precedence: flash, immediate, priority or routine")
    })
}

#[derive(Args, Debug)]
struct Json {
    /// Print machine-readable JSON (one object; one per line for lists).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create this device's identity and print its fingerprint.
    #[command(
        after_help = "Example:\n  hotline init --party north --device duty-desk --relay 'https://relay.example:7443/#sha256=…'"
    )]
    Init {
        /// Your party (organisation, government, mediator).
        #[arg(long)]
        party: String,
        /// This device's name.
        #[arg(long, default_value = "main")]
        device: String,
        /// Relay addresses where this device receives invitations.
        #[arg(long = "relay")]
        relays: Vec<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Show this device's party, device name and fingerprint.
    #[command(after_help = "Example:\n  hotline id --json")]
    Id {
        #[command(flatten)]
        json: Json,
    },
    /// Contact cards: export yours, import others' with their fingerprint.
    #[command(subcommand)]
    Card(CardCommand),
    /// Channels: create, join, list.
    #[command(subcommand)]
    Channel(ChannelCommand),
    /// Send a message; prints its id once it is stored durably.
    #[command(
        after_help = "Examples:\n  hotline send crisis 'Exercise ends at 18:00 UTC' --deadline 10m\n  hotline send crisis --precedence flash 'Call now'\n  hotline send crisis - < statement.txt"
    )]
    Send {
        /// The channel's name (hotline channel list).
        channel: String,
        /// The message; `-` reads it from standard input (up to 1 MiB, UTF-8).
        #[arg(required_unless_present_any = ["file", "code"])]
        text: Option<String>,
        /// Read the message from FILE (up to 1 MiB, UTF-8) instead.
        #[arg(long, value_name = "FILE", conflicts_with = "text")]
        file: Option<PathBuf>,
        /// Send entry ID of the channel's code book instead of a text (each party
        /// reads it in its own language); see hotline code list.
        #[arg(long, value_name = "ID", conflicts_with_all = ["text", "file"])]
        code: Option<String>,
        /// A field of the code book entry: NAME=VALUE (repeat for each).
        #[arg(long = "field", value_name = "NAME=VALUE", requires = "code")]
        fields: Vec<String>,
        /// How urgent: flash, immediate, priority or routine. FLASH goes first in every
        /// queue and is shown at the receiver until read.
        #[arg(long, short = 'p', default_value = "routine", value_parser = parse_precedence)]
        precedence: Precedence,
        /// Read-by deadline (30s, 10m, 2h, 1d); by default the precedence's handling
        /// time: flash 10m, immediate 30m, priority 3h, routine 6h. Past it, the
        /// message is offered again and a signed non-response statement is recorded.
        #[arg(long)]
        deadline: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// The transcript, with delivered and read state per party.
    #[command(
        after_help = "Examples:\n  hotline log crisis --last 20\n  hotline log crisis --unread"
    )]
    Log {
        /// The channel's name (hotline channel list).
        channel: String,
        /// Show the link tests too (hidden by default).
        #[arg(long)]
        link_tests: bool,
        /// Show only the newest N messages.
        #[arg(long, value_name = "N")]
        last: Option<usize>,
        /// Show only the other parties' messages this party has not read, most urgent
        /// first (FLASH before IMMEDIATE before PRIORITY before ROUTINE).
        #[arg(long, conflicts_with_all = ["last", "link_tests"])]
        unread: bool,
        #[command(flatten)]
        json: Json,
    },
    /// Mark a message read (sends a read receipt).
    #[command(
        after_help = "Examples:\n  hotline ack crisis --next\n  hotline ack crisis 1a2b3c4d5e6f"
    )]
    Ack {
        /// The channel's name (hotline channel list).
        channel: String,
        /// The message id, or a unique prefix of at least 8 hex digits.
        #[arg(required_unless_present = "next")]
        message: Option<String>,
        /// Mark the most urgent unread message read (the first of log --unread).
        #[arg(long, conflicts_with = "message")]
        next: bool,
        #[command(flatten)]
        json: Json,
    },
    /// Push the outbox to the relays, pick up invitations, pull every channel.
    #[command(
        after_help = "Examples:\n  hotline sync\n  hotline sync --follow --link-test-interval 60s --log-level info"
    )]
    Sync {
        /// Keep running: wait on every relay for new messages (long-poll), process each
        /// at once, push the outbox every --round; stops on Ctrl-C or SIGTERM.
        #[arg(long)]
        follow: bool,
        /// With --follow: seconds between full rounds (outbox pushed, all pulled).
        /// [default: 10, or `round` in the settings]
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
        round: Option<u64>,
        /// Time between end-to-end link tests on every relay path, as 60 (seconds),
        /// 200ms, 5m; at least 100ms (kept; `status` judges paths by it).
        #[arg(long, value_name = "DURATION", value_parser = link_test_interval)]
        link_test_interval: Option<u64>,
        /// How often each device seals its signed availability record (what its link
        /// tests showed) into every channel's transcript, as 1h (the default), 10m (kept).
        #[arg(long, value_name = "DURATION", value_parser = record_period)]
        record_every: Option<u64>,
        /// How long raw link tests are kept in the device's database as evidence, as 7d
        /// (the default) (kept).
        #[arg(long, value_name = "DURATION", value_parser = record_period)]
        link_test_retention: Option<u64>,
        /// With --follow: what goes to the log on stderr (timestamps, one line per
        /// event: relay up or down, message received, alarm, round): error, warn, info
        /// or debug (every round). [default: info, or HOTLINE_LOG_LEVEL, log_level in
        /// the settings, RUST_LOG]
        #[arg(long, value_name = "LEVEL")]
        log_level: Option<String>,
        /// With --follow: put message text in the log (it never goes there otherwise).
        #[arg(long)]
        show_text: bool,
        #[command(flatten)]
        json: Json,
    },
    /// The line at a glance: each relay path (state, round trip, last success), each
    /// party (last heard), the backlog and the open alarms. Exits 3 while the line is
    /// down, 6 while an alarm is open.
    #[command(
        after_help = "Examples:\n  hotline status\n  hotline status --json --undelivered-after 5m"
    )]
    Status {
        /// Age after which a message not delivered to every party raises an alarm
        /// (kept), as in 5m.
        #[arg(long)]
        undelivered_after: Option<String>,
        /// Clear the stored alarms (relay misbehaviour) after reading them; their
        /// evidence stays in the database.
        #[arg(long)]
        clear: bool,
        /// Clear one stored alarm by its id (`status --json`: alarms[].id), after
        /// reading it; repeatable.
        #[arg(long = "clear-id", value_name = "ID")]
        clear_ids: Vec<u64>,
        #[command(flatten)]
        json: Json,
    },
    /// Write the signed transcript of a channel to a file.
    #[command(
        after_help = "Example:\n  hotline export crisis --out crisis.hotline && hotline verify crisis.hotline"
    )]
    Export {
        /// The channel's name (hotline channel list).
        channel: String,
        /// The file to write (mode 0600: it holds every message in clear).
        #[arg(long)]
        out: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        json: Json,
    },
    /// Write the whole device (identity, contacts, channels with their MLS state,
    /// outbox, transcripts, settings) to one file encrypted with a passphrase (age).
    #[command(after_help = "Examples:
  hotline backup --out north-desk.backup
  HOTLINE_PASSPHRASE=... hotline backup --out /srv/backups/north-desk.backup --force

The passphrase comes from --passphrase-file, else HOTLINE_PASSPHRASE, else the
terminal (asked twice); at least 12 characters. The copy is consistent while a
follower runs. A device restored from it continues from this moment: see
hotline restore --help.")]
    Backup {
        /// The file to write (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
        /// Read the passphrase from the first line of this file.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        #[command(flatten)]
        json: Json,
    },
    /// Bring a device back from a backup into a new home (--home).
    #[command(after_help = "Example:
  hotline --home /var/lib/hotline/north restore north-desk.backup

The restored device is the one backed up: stop the old one for good first (two
copies of one device fork its record). Messages others sent after the backup come
again from the relays. Before it sends anything, each channel reads its relays to
the end (hotline sync, or the first send does it). If it finds messages this
device sent after the backup, it raises a `cloned` alarm and sends nothing in that
channel: sending from the older state would fork its chain. Have a new device
invited instead, or clear the alarm to send anyway.

Exit codes: 0 restored, 1 wrong passphrase or unreadable file, 2 a device exists
in the home, 5 the backup is damaged")]
    Restore {
        /// The backup file (hotline backup --out).
        file: PathBuf,
        /// Read the passphrase from the first line of this file.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        #[command(flatten)]
        json: Json,
    },
    /// Verify an exported transcript offline, with nothing but the file.
    #[command(
        after_help = "Example:\n  hotline verify crisis.hotline --expect 'north=12345 67890 12345 67890 12345 67890'\n\n\
                      Exit codes: 0 verified, 1 unreadable file, 2 usage, 5 integrity failure \
                      (or parties other than --expect names)"
    )]
    Verify {
        /// An exported transcript (hotline export --out).
        file: PathBuf,
        /// List the record: every message with its sender, time, precedence, who holds
        /// and who read it, and whether its sender's own signature proves it; the
        /// signed statements and records; membership changes.
        #[arg(long)]
        show: bool,
        /// Fail (exit 5) unless the roster is exactly these devices: PARTY=FINGERPRINT,
        /// as verified out of band (repeat for every device).
        #[arg(long, value_name = "PARTY=FINGERPRINT", value_parser = parse_expectation)]
        expect: Vec<(String, hotline_core::Fingerprint)>,
        #[command(flatten)]
        json: Json,
    },
    /// Cosign this device's settled transcript root now (also done every hour and
    /// before an export); the others cosign the same root when it is theirs too.
    #[command(after_help = "Example:\n  hotline cosign crisis --json")]
    Cosign {
        /// The channel's name (hotline channel list).
        channel: String,
        #[command(flatten)]
        json: Json,
    },
    /// Code books: pre-agreed messages, adopted when every party signs the book.
    #[command(subcommand)]
    Code(CodeCommand),
    /// Agreed texts: a text every party signs (a joint communiqué), in parallel
    /// language versions, equally authentic.
    #[command(subcommand)]
    Agree(AgreeCommand),
    /// Carry messages between devices as files, until relays exist.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Run a relay, or print its address.
    #[command(subcommand)]
    Relay(RelayCommand),
    /// The duty officer's screen: the line (relays, parties, alarms) and a channel's
    /// messages, live, receiving as `sync --follow` does; type to send. Needs a
    /// terminal.
    #[command(after_help = "Example:\n  hotline console --channel crisis")]
    Console {
        /// The channel shown first (Tab moves to the next).
        #[arg(long)]
        channel: Option<String>,
        /// Log the console's background work (receiving, sending, relays up and down,
        /// alarms) to this file (appended, mode 0600); no log without it.
        #[arg(long, value_name = "FILE", env = "HOTLINE_LOG_FILE")]
        log_file: Option<PathBuf>,
        /// The log's level: error, warn, info, debug, trace [default: RUST_LOG, else info].
        #[arg(long, value_name = "LEVEL", requires = "log_file")]
        log_level: Option<String>,
    },
    /// This device's settings (`hotline config show`).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish,
    /// powershell).
    #[command(after_help = "Examples:
  hotline completions bash > /etc/bash_completion.d/hotline
  hotline completions zsh > ~/.zfunc/_hotline
  hotline completions fish > ~/.config/fish/completions/hotline.fish")]
    Completions {
        /// The shell to write completions for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual: hotline(1) to standard output, or with --out DIR one page per
    /// command (hotline.1, hotline-send.1, hotline-relay-serve.1, ...).
    #[command(after_help = "Examples:
  hotline man | man -l -
  hotline man --out /usr/local/share/man/man1")]
    Man {
        /// Directory to write every page to (created if missing).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Play the whole story in memory: three parties, fingerprints, a channel,
    /// messages, receipts, export and offline verification.
    #[command(after_help = "Examples:\n  hotline demo\n  hotline demo --json")]
    Demo {
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// The device's effective settings and where each came from: --home, the
    /// environment (HOTLINE_HOME, HOTLINE_ROUND, ...), the settings file
    /// ($HOTLINE_CONFIG, else $XDG_CONFIG_HOME/hotline/config.toml), or the default. A
    /// flag given to a command wins over all of them.
    #[command(after_help = "Example:\n  hotline config show --json")]
    Show {
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Subcommand, Debug)]
enum CardCommand {
    /// Write this device's contact card: to a terminal as armoured text (to paste into
    /// a mail), to a file or a pipe as binary (unless --armor).
    #[command(after_help = "Examples:
  hotline card export --out north.card
  hotline card export --armor --out north.card.txt
  hotline card export            # armoured text, on a terminal")]
    Export {
        /// The file to write (mode 0600); standard output without it.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace FILE if it exists.
        #[arg(long, requires = "out")]
        force: bool,
        /// Armoured text (BEGIN HOTLINE CARD), wherever it goes.
        #[arg(long, conflicts_with = "binary")]
        armor: bool,
        /// Binary, even to a terminal.
        #[arg(long)]
        binary: bool,
        /// Print what was written as JSON (with --out: the card itself goes to the file).
        #[arg(long, requires = "out")]
        json: bool,
    },
    /// What a card (binary or armoured) claims, before importing it: party, device,
    /// fingerprint, relays. Nothing in it is trusted until its fingerprint is read out
    /// of band.
    #[command(after_help = "Example:\n  hotline card show south.card")]
    Show {
        /// A card file, armoured text or binary.
        file: PathBuf,
        #[command(flatten)]
        json: Json,
    },
    /// Import a contact card (binary or armoured); refused unless FP is the card's
    /// fingerprint.
    #[command(
        after_help = "Examples:\n  hotline card show south.card\n  hotline card import south.card --fingerprint '12345 67890 12345 67890 12345 67890'"
    )]
    Import {
        /// The card file, armoured text or binary.
        file: PathBuf,
        /// The fingerprint the card's owner read to you out of band.
        #[arg(long)]
        fingerprint: String,
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Subcommand, Debug)]
enum CodeCommand {
    /// Propose a code book (a JSON file, see docs/crisis-protocol.md) for the channel:
    /// adopted once every party signed it (hotline agree sign CHANNEL ID).
    #[command(after_help = "Example:\n  hotline code adopt crisis --book codes.json")]
    Adopt {
        /// The channel's name (hotline channel list).
        channel: String,
        /// The code book, a JSON file (docs/crisis-protocol.md).
        #[arg(long, value_name = "FILE")]
        book: PathBuf,
        /// Expires unless every party signed within this time.
        #[arg(long)]
        deadline: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// The channel's adopted code book: each entry, its fields, its text in your
    /// language (HOTLINE_LANGUAGE, else the locale's).
    #[command(after_help = "Example:\n  hotline code list crisis")]
    List {
        /// The channel's name (hotline channel list).
        channel: String,
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Subcommand, Debug)]
enum AgreeCommand {
    /// Propose a text for every party's signature (signed for yours at once); prints
    /// its id.
    #[command(
        after_help = "Example:\n  hotline agree propose crisis --text communique.en.txt --lang fr=communique.fr.txt --deadline 2h"
    )]
    Propose {
        /// The channel's name (hotline channel list).
        channel: String,
        /// The text (UTF-8, up to 1 MiB).
        #[arg(long, value_name = "FILE")]
        text: PathBuf,
        /// The language of --text.
        #[arg(long, default_value = "en", value_name = "CODE")]
        language: String,
        /// Another language version, equally authentic (repeat for several).
        #[arg(long = "lang", value_name = "CODE=FILE")]
        versions: Vec<String>,
        /// Expires unless every party signed within this time (30m, 2h, 1d).
        #[arg(long)]
        deadline: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Sign an agreed text for your party: its exact bytes, every version.
    #[command(after_help = "Example:\n  hotline agree sign crisis 1a2b3c4d5e6f")]
    Sign {
        /// The channel's name (hotline channel list).
        channel: String,
        /// The proposal's id, or a unique prefix of at least 8 hex digits.
        id: String,
    },
    /// Reject an agreed text for your party.
    #[command(after_help = "Example:\n  hotline agree reject crisis 1a2b3c4d5e6f")]
    Reject {
        /// The channel's name (hotline channel list).
        channel: String,
        /// The text's id, or a prefix of it (hotline agree list).
        id: String,
        /// Why, in words that go into the record.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// The channel's agreed texts and where each stands.
    #[command(after_help = "Example:\n  hotline agree list crisis --json")]
    List {
        /// The channel's name (hotline channel list).
        channel: String,
        #[command(flatten)]
        json: Json,
    },
    /// One agreed text: every version, who signed and when, who it waits for.
    #[command(after_help = "Example:\n  hotline agree show crisis 1a2b3c4d5e6f")]
    Show {
        /// The channel's name (hotline channel list).
        channel: String,
        /// The text's id, or a prefix of it (hotline agree list).
        id: String,
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Subcommand, Debug)]
enum ChannelCommand {
    /// Create a channel with every verified device of the named parties.
    #[command(
        after_help = "Example:\n  hotline channel create crisis --with south --with mediator --relay 'https://relay.example:7443/#sha256=…'"
    )]
    Create {
        /// The new channel's name (on this device; each member keeps the name it was given).
        name: String,
        /// A party to invite (repeat for several).
        #[arg(long = "with", required = true)]
        with: Vec<String>,
        /// Relays of the channel (repeat for several), as printed by `hotline relay url`,
        /// optionally named on this device as NAME=URL (shown by status and the console).
        #[arg(long = "relay", value_name = "[NAME=]URL")]
        relays: Vec<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Join from an invitation (a bundle holding a Welcome for this device).
    #[command(after_help = "Example:\n  hotline channel join invitation.bundle")]
    Join {
        /// An invitation file (hotline bundle export on the inviter's device).
        file: PathBuf,
        #[command(flatten)]
        json: Json,
    },
    /// Remove every device of a party from a channel (the channel's committer only).
    #[command(after_help = "Example:\n  hotline channel remove crisis --party mediator")]
    Remove {
        /// The channel's name (hotline channel list).
        name: String,
        /// The party whose devices leave the channel.
        #[arg(long)]
        party: String,
        #[command(flatten)]
        json: Json,
    },
    /// Set a channel's relays (the channel's committer only); every member follows.
    /// Keep at least one relay across a change.
    #[command(
        after_help = "Example:\n  hotline channel relays crisis --relay 'https://relay.example:7443/#sha256=…' --relay backup='https://relay.example:7443/#sha256=…'"
    )]
    Relays {
        /// The channel's name (hotline channel list).
        name: String,
        /// A relay of the channel from now on (repeat for several), optionally named on
        /// this device as NAME=URL.
        #[arg(long = "relay", required = true, value_name = "[NAME=]URL")]
        relays: Vec<String>,
        #[command(flatten)]
        json: Json,
    },
    /// The channel's handling times (read-by deadlines per precedence when a message
    /// gives none); the committer sets them for every member with the flags.
    #[command(
        after_help = "Examples:\n  hotline channel handling-times crisis --flash 5m --immediate 20m\n  hotline channel handling-times crisis"
    )]
    HandlingTimes {
        /// The channel's name (hotline channel list).
        name: String,
        /// How long a FLASH message may wait unread before it escalates (10s, 5m, 2h).
        #[arg(long, value_name = "DURATION")]
        flash: Option<String>,
        /// How long an IMMEDIATE message may wait unread.
        #[arg(long, value_name = "DURATION")]
        immediate: Option<String>,
        /// How long a PRIORITY message may wait unread.
        #[arg(long, value_name = "DURATION")]
        priority: Option<String>,
        /// How long a ROUTINE message may wait unread.
        #[arg(long, value_name = "DURATION")]
        routine: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Refresh this device's keys in a channel (forward secrecy, post-compromise
    /// security): a commit from the committer, a proposal from anyone else.
    #[command(after_help = "Example:\n  hotline channel rekey crisis")]
    Rekey {
        /// The channel's name (hotline channel list).
        name: String,
        #[command(flatten)]
        json: Json,
    },
    /// The channels of this device.
    #[command(after_help = "Example:\n  hotline channel list --json")]
    List {
        #[command(flatten)]
        json: Json,
    },
}

/// The relay's settings as flags (each also `HOTLINE_RELAY_<KEY>` and `key = ...` in the
/// --config file; see `commands::relay::SETTINGS` for the defaults).
#[derive(Args, Debug)]
struct RelaySettings {
    /// A TOML file of settings, keys as the flags with `_` for `-` (data, listen,
    /// max_message, ...); an unknown key is an error. [env: HOTLINE_RELAY_CONFIG]
    #[arg(long, value_name = "FILE", env = "HOTLINE_RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of the relay's key, certificate and database (created if missing).
    #[arg(long, value_name = "DIR")]
    data: Option<String>,
    /// Address to listen on, as HOST:PORT (port 0 picks a free one).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Keep messages in PostgreSQL (a connection string, as in 'host=127.0.0.1
    /// user=postgres dbname=hotline') instead of DIR/relay.db; several relay processes
    /// may share one database.
    #[arg(long, value_name = "CONNINFO")]
    postgres: Option<String>,
    /// The PostgreSQL schema of the relay's tables [default: hotline].
    #[arg(long, value_name = "NAME")]
    postgres_schema: Option<String>,
    /// What the relay logs on stderr: error, warn, info (start, stop, a summary each
    /// minute with activity, limits hit, storage failures) or debug (every refusal
    /// with its reason and source); RUST_LOG, if a level, when not set. Never message
    /// bytes or keys. [default: info]
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Connections served at once (members' and strangers' together; beyond, new ones
    /// wait in the kernel's queue), 16 to 1,000,000. Each needs a file descriptor: the
    /// relay raises its open-file limit to the hard limit at start. [default: 1024]
    #[arg(long, value_name = "N")]
    max_connections: Option<String>,
    /// Largest message, at most 1MiB (devices read no larger). [default: 1MiB]
    #[arg(long, value_name = "SIZE")]
    max_message: Option<String>,
    /// Messages older than this are deleted even if not every member read them.
    /// [default: 30d]
    #[arg(long, value_name = "DURATION")]
    retention: Option<String>,
    /// Bytes one channel's log may hold (507 `quota` beyond). [default: 1GiB]
    #[arg(long, value_name = "SIZE")]
    quota_per_channel: Option<String>,
    /// Bytes one device's inbox may hold. [default: 16MiB]
    #[arg(long, value_name = "SIZE")]
    quota_per_inbox: Option<String>,
    /// Bytes the relay holds in all logs together (507 `storage-full` beyond).
    /// [default: 32GiB]
    #[arg(long, value_name = "SIZE")]
    max_storage: Option<String>,
    /// Requests a second one device may make, sustained (429 beyond). [default: 200]
    #[arg(long, value_name = "N")]
    requests_per_second: Option<String>,
    /// Requests one device may make in a burst; at least 256 (a batch of messages costs
    /// one each). [default: 400]
    #[arg(long, value_name = "N")]
    request_burst: Option<String>,
    /// Bytes a second one device may have stored, sustained. [default: 1MiB]
    #[arg(long, value_name = "SIZE")]
    bytes_per_second: Option<String>,
    /// Bytes one device may have stored in a burst. [default: 64MiB]
    #[arg(long, value_name = "SIZE")]
    byte_burst: Option<String>,
    /// Time a connection has to finish its TLS handshake and request headers (or its
    /// stream Hello). [default: 5s]
    #[arg(long, value_name = "DURATION")]
    handshake_timeout: Option<String>,
    /// Only these devices may register new channels here (their committers): device
    /// keys as `hotline id --json` prints them, comma-separated. Strangers' fresh keys
    /// then cannot open a channel's log at all. [default: anyone]
    #[arg(long, value_name = "KEY,KEY")]
    committers: Option<String>,
}

impl RelaySettings {
    /// The effective settings: these flags, then the environment, the file, defaults.
    fn resolve(&self) -> Result<settings::Settings, commands::Failure> {
        let given = [
            ("data", &self.data),
            ("listen", &self.listen),
            ("postgres", &self.postgres),
            ("postgres_schema", &self.postgres_schema),
            ("log_level", &self.log_level),
            ("max_connections", &self.max_connections),
            ("max_message", &self.max_message),
            ("retention", &self.retention),
            ("quota_per_channel", &self.quota_per_channel),
            ("quota_per_inbox", &self.quota_per_inbox),
            ("max_storage", &self.max_storage),
            ("requests_per_second", &self.requests_per_second),
            ("request_burst", &self.request_burst),
            ("bytes_per_second", &self.bytes_per_second),
            ("byte_burst", &self.byte_burst),
            ("handshake_timeout", &self.handshake_timeout),
            ("committers", &self.committers),
        ];
        let flags = given
            .into_iter()
            .filter_map(|(key, value)| value.clone().map(|value| (key, value)))
            .collect();
        settings::Settings::resolve(commands::relay::SETTINGS, &flags, self.config.as_deref())
    }
}

#[derive(Subcommand, Debug)]
enum RelayCommand {
    /// Serve a relay over HTTPS; prints its address (with the pin of its key).
    /// Settings: flag > HOTLINE_RELAY_* > --config FILE > default (`relay config`
    /// shows them).
    #[command(after_help = "Examples:
  hotline relay serve --data /var/lib/hotline-relay --listen 0.0.0.0:7443
  hotline relay serve --config /etc/hotline/relay.toml
  HOTLINE_RELAY_RETENTION=7d hotline relay serve --config /etc/hotline/relay.toml")]
    Serve {
        #[command(flatten)]
        settings: Box<RelaySettings>,
    },
    /// Print the relay's effective settings and where each came from (flag,
    /// environment, file, default), without starting it.
    #[command(
        after_help = "Example:\n  hotline relay config --config /etc/hotline/relay.toml --json"
    )]
    Config {
        #[command(flatten)]
        settings: Box<RelaySettings>,
        #[command(flatten)]
        json: Json,
    },
    /// Print the address of the relay whose data is in DIR.
    #[command(after_help = "Example:\n  hotline relay url --data /var/lib/hotline-relay")]
    Url {
        /// The relay's data directory (relay serve --data).
        #[arg(long)]
        data: PathBuf,
        #[command(flatten)]
        json: Json,
    },
    /// Issue the relay a new certificate for the key it has: its address (the pin is
    /// the key's) stays the same, so no member needs a new one. Send the running relay
    /// SIGHUP (systemctl reload hotline-relay) or restart it to serve it.
    #[command(
        after_help = "Example:\n  hotline relay renew-cert --data /var/lib/hotline-relay && systemctl reload hotline-relay"
    )]
    RenewCert {
        /// The relay's data directory (relay serve --data).
        #[arg(long)]
        data: PathBuf,
    },
    /// Give the relay a new key, signed over by the old one: members that pin the old
    /// key check the statement and follow; new members get the new address (printed).
    /// Restart the relay to serve the new key.
    #[command(
        after_help = "Example:\n  hotline relay rotate-key --data /var/lib/hotline-relay && systemctl restart hotline-relay"
    )]
    RotateKey {
        /// The relay's data directory (relay serve --data).
        #[arg(long)]
        data: PathBuf,
        #[command(flatten)]
        json: Json,
    },
    /// Check a relay's custody receipt (hex, as `status --json` shows an alarm's
    /// evidence): the relay that RELAY names signed that it stored the message with
    /// the receipt's hash in its log at the receipt's number. Needs nothing but the
    /// address; exits 5 if the receipt does not hold.
    #[command(
        after_help = "Example:\n  hotline relay check-receipt 'https://relay.example:7443/#sha256=…' 01000000…"
    )]
    CheckReceipt {
        /// The relay's address, with the pin of its key.
        relay: String,
        /// The receipt, in hex.
        receipt: String,
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Subcommand, Debug)]
enum BundleCommand {
    /// Write every outgoing message not yet handed on into a file.
    #[command(after_help = "Example:\n  hotline bundle export --out to-south.bundle")]
    Export {
        /// The file to write (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        json: Json,
    },
    /// Receive the messages of a bundle file.
    #[command(after_help = "Example:\n  hotline bundle import from-north.bundle")]
    Import {
        /// A bundle written by another device (hotline bundle export).
        file: PathBuf,
        #[command(flatten)]
        json: Json,
    },
}

/// A link-test interval: a duration (200ms, 5s, 1m) or a number of seconds; 100 ms to
/// a day.
fn link_test_interval(text: &str) -> Result<u64, String> {
    let ms = match text.parse::<u64>() {
        Ok(seconds) => seconds.checked_mul(1000),
        Err(_) => commands::parse_duration(text),
    }
    .ok_or_else(|| format!("{text:?} is not a duration such as 200ms, 60s or 5m"))?;
    if !(100..=86_400_000).contains(&ms) {
        return Err("a link-test interval is between 100ms and 1d".into());
    }
    Ok(ms)
}

/// Seconds between full rounds of `sync --follow`: 1 to 3600.
fn round_seconds(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|seconds| (1..=3600).contains(seconds))
        .ok_or_else(|| format!("{text:?} is not a number of seconds from 1 to 3600"))
}

/// `config show`: the device's settings, each with where it came from.
fn show_device_settings(
    settings: &settings::Settings,
    json_output: bool,
) -> Result<(), commands::Failure> {
    let file = settings::device_file();
    if json_output {
        for (spec, value, source) in settings.report() {
            out_json!(serde_json::json!({"key": spec.key, "value": value,
                "source": source.map(|s| s.describe()), "env": spec.env, "about": spec.help}));
        }
    } else {
        match &file {
            Some(path) => out!("settings file: {}", path.display()),
            None => out!(
                "settings file: none ($XDG_CONFIG_HOME/hotline/config.toml, or HOTLINE_CONFIG)"
            ),
        }
        for (spec, value, source) in settings.report() {
            out!(
                "{:<20} {:<28} {}",
                spec.key,
                value.unwrap_or("-"),
                source.map_or_else(|| format!("not set ({})", spec.env), |s| s.describe())
            );
        }
    }
    Ok(())
}

/// A record period or retention: a duration (10m, 1h, 7d), at least a second.
fn record_period(text: &str) -> Result<u64, String> {
    commands::parse_duration(text)
        .filter(|ms| *ms >= 1000)
        .ok_or_else(|| format!("{text:?} is not a duration of at least 1s, such as 1h or 7d"))
}

/// The device's settings: `--home`, then the environment, the settings file, defaults.
fn device_settings(
    home: Option<&std::path::Path>,
) -> Result<settings::Settings, commands::Failure> {
    let flags = home
        .map(|home| ("home", home.display().to_string()))
        .into_iter()
        .collect();
    let mut settings =
        settings::Settings::resolve(settings::DEVICE, &flags, settings::device_file().as_deref())?;
    settings.default_to("home", commands::default_home().display().to_string());
    Ok(settings)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match device_settings(cli.home.as_deref()) {
        Ok(settings) => settings,
        Err(failure) => {
            eprintln!("hotline: {}", failure.message);
            return ExitCode::from(failure.code);
        }
    };
    let home = PathBuf::from(settings.get("home").unwrap_or_default());
    let result = match cli.command {
        Command::Config(ConfigCommand::Show { json }) => show_device_settings(&settings, json.json),
        Command::Demo { json } => return commands::demo::run(json.json),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "hotline",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { out } => manual(out.as_deref()),
        Command::Console {
            channel,
            log_file,
            log_level,
        } => log_file
            .as_deref()
            .map_or(Ok(()), |file| {
                logging::start_file(log_level.as_deref(), file)
            })
            .and_then(|()| console::run(&home, channel.as_deref())),
        Command::Verify {
            file,
            show,
            expect,
            json,
        } => return commands::verify::run(&file, show, &expect, json.json),
        Command::Init {
            party,
            device,
            relays,
            json,
        } => commands::init(&home, &party, &device, &relays, json.json),
        Command::Id { json } => commands::id(&home, json.json),
        Command::Card(CardCommand::Export {
            out,
            force,
            armor,
            binary,
            json,
        }) => {
            // Armoured on a terminal (never binary there), binary elsewhere, unless asked.
            use std::io::IsTerminal;
            let armored = armor || (!binary && out.is_none() && std::io::stdout().is_terminal());
            commands::card_export(&home, out.as_deref(), force, armored, json)
        }
        Command::Card(CardCommand::Show { file, json }) => commands::card_show(&file, json.json),
        Command::Card(CardCommand::Import {
            file,
            fingerprint,
            json,
        }) => commands::card_import(&home, &file, &fingerprint, json.json),
        Command::Channel(ChannelCommand::Create {
            name,
            with,
            relays,
            json,
        }) => commands::channel_create(&home, &name, &with, &relays, json.json),
        Command::Channel(ChannelCommand::Join { file, json }) => {
            commands::channel_join(&home, &file, json.json)
        }
        Command::Channel(ChannelCommand::Remove { name, party, json }) => {
            commands::channel_remove(&home, &name, &party, json.json)
        }
        Command::Channel(ChannelCommand::Relays { name, relays, json }) => {
            commands::channel_relays(&home, &name, &relays, json.json)
        }
        Command::Channel(ChannelCommand::Rekey { name, json }) => {
            commands::channel_rekey(&home, &name, json.json)
        }
        Command::Channel(ChannelCommand::List { json }) => commands::channel_list(&home, json.json),
        Command::Channel(ChannelCommand::HandlingTimes {
            name,
            flash,
            immediate,
            priority,
            routine,
            json,
        }) => commands::handling_times(
            &home,
            &name,
            [flash, immediate, priority, routine],
            json.json,
        ),
        Command::Send {
            channel,
            code: Some(code),
            fields,
            precedence,
            deadline,
            json,
            ..
        } => commands::agree::send_code(
            &home,
            &channel,
            (&code, &fields),
            precedence,
            deadline.as_deref(),
            json.json,
        ),
        Command::Send {
            channel,
            text,
            file,
            precedence,
            deadline,
            json,
            ..
        } => input::message(text.as_deref(), file.as_deref()).and_then(|text| {
            let message = Message {
                precedence,
                text,
                code: None,
            };
            commands::send(&home, &channel, message, deadline.as_deref(), json.json)
        }),
        Command::Cosign { channel, json } => commands::cosign(&home, &channel, json.json),
        Command::Code(CodeCommand::Adopt {
            channel,
            book,
            deadline,
            json,
        }) => {
            commands::agree::adopt_code_book(&home, &channel, &book, deadline.as_deref(), json.json)
        }
        Command::Code(CodeCommand::List { channel, json }) => {
            commands::agree::list_code_book(&home, &channel, json.json)
        }
        Command::Agree(AgreeCommand::Propose {
            channel,
            text,
            language,
            versions,
            deadline,
            json,
        }) => commands::agree::propose(
            &home,
            &channel,
            (&language, &text),
            &versions,
            deadline.as_deref(),
            json.json,
        ),
        Command::Agree(AgreeCommand::Sign { channel, id }) => {
            commands::agree::sign(&home, &channel, &id)
        }
        Command::Agree(AgreeCommand::Reject {
            channel,
            id,
            reason,
        }) => commands::agree::reject(&home, &channel, &id, &reason),
        Command::Agree(AgreeCommand::List { channel, json }) => {
            commands::agree::list(&home, &channel, json.json)
        }
        Command::Agree(AgreeCommand::Show { channel, id, json }) => {
            commands::agree::show(&home, &channel, &id, json.json)
        }
        Command::Log {
            channel,
            unread: true,
            json,
            ..
        } => commands::unread(&home, &channel, json.json),
        Command::Log {
            channel,
            link_tests,
            last,
            json,
            ..
        } => commands::log(&home, &channel, link_tests, last, json.json),
        Command::Ack {
            channel,
            message,
            json,
            ..
        } => commands::ack(&home, &channel, message.as_deref(), json.json),
        Command::Sync {
            follow,
            round,
            link_test_interval: interval,
            record_every,
            link_test_retention,
            log_level,
            show_text,
            json,
        } => (|| {
            // A flag given wins; else the settings (environment, file).
            let or_setting =
                |given: Option<u64>, key, parse: fn(&str) -> Result<u64, String>| match given {
                    Some(value) => Ok(Some(value)),
                    None => settings.parse(key, |text| parse(text).ok(), "see hotline sync --help"),
                };
            let round = or_setting(round, "round", round_seconds)?.unwrap_or(10);
            commands::sync(
                &home,
                follow.then_some(round),
                commands::LinkTestSettings {
                    interval_ms: or_setting(interval, "link_test_interval", link_test_interval)?,
                    record_period_ms: or_setting(record_every, "record_every", record_period)?,
                    retention_ms: or_setting(
                        link_test_retention,
                        "link_test_retention",
                        record_period,
                    )?,
                },
                commands::Logging {
                    level: log_level.or_else(|| settings.get("log_level").map(str::to_owned)),
                    show_text,
                },
                json.json,
            )
        })(),
        Command::Status {
            undelivered_after,
            clear,
            clear_ids,
            json,
        } => commands::status(
            &home,
            undelivered_after
                .as_deref()
                .or(settings.get("undelivered_after")),
            clear,
            &clear_ids,
            json.json,
        ),
        Command::Export {
            channel,
            out,
            force,
            json,
        } => commands::export(&home, &channel, &out, force, json.json),
        Command::Backup {
            out,
            force,
            passphrase_file,
            json,
        } => commands::backup::backup(&home, &out, force, passphrase_file.as_deref(), json.json),
        Command::Restore {
            file,
            passphrase_file,
            json,
        } => commands::backup::restore(&home, &file, passphrase_file.as_deref(), json.json),
        Command::Relay(RelayCommand::Serve { settings }) => settings
            .resolve()
            .and_then(|settings| commands::relay::serve(&settings)),
        Command::Relay(RelayCommand::Config { settings, json }) => settings
            .resolve()
            .and_then(|settings| commands::relay::show_settings(&settings, json.json)),
        Command::Relay(RelayCommand::Url { data, json }) => commands::relay::url(&data, json.json),
        Command::Relay(RelayCommand::RenewCert { data }) => {
            commands::relay::renew_certificate(&data)
        }
        Command::Relay(RelayCommand::RotateKey { data, json }) => {
            commands::relay::rotate_key(&data, json.json)
        }
        Command::Relay(RelayCommand::CheckReceipt {
            relay,
            receipt,
            json,
        }) => commands::relay::check_receipt(&relay, &receipt, json.json),
        Command::Bundle(BundleCommand::Export { out, force, json }) => {
            commands::bundle_export(&home, &out, force, json.json)
        }
        Command::Bundle(BundleCommand::Import { file, json }) => {
            commands::bundle_import(&home, &file, json.json)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("hotline: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command a person runs (each leaf of the tree) shows an example in its
    /// `--help`, and the top level lists the exit codes.
    #[test]
    fn every_command_has_an_example_and_the_exit_codes_are_listed() {
        fn leaves(command: &clap::Command, path: String, out: &mut Vec<(String, bool)>) {
            let mut any = false;
            for sub in command.get_subcommands() {
                any = true;
                leaves(sub, format!("{path} {}", sub.get_name()), out);
            }
            if !any {
                let example = command
                    .get_after_help()
                    .is_some_and(|help| help.to_string().contains("Example"));
                out.push((path, example));
            }
        }
        let command = <Cli as clap::CommandFactory>::command();
        let mut found = Vec::new();
        leaves(&command, "hotline".into(), &mut found);
        let missing: Vec<&str> = found
            .iter()
            .filter(|(_, example)| !example)
            .map(|(path, _)| path.as_str())
            .collect();
        assert!(missing.is_empty(), "no example in --help of: {missing:#?}");
        // Every argument and option says what it is.
        fn undocumented(command: &clap::Command, path: &str, out: &mut Vec<String>) {
            for arg in command.get_arguments() {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    out.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                undocumented(sub, &format!("{path} {}", sub.get_name()), out);
            }
        }
        let mut bare = Vec::new();
        undocumented(&command, "hotline", &mut bare);
        assert!(bare.is_empty(), "arguments without help: {bare:#?}");
        let top = command.get_after_help().unwrap().to_string();
        for code in 0..=6 {
            assert!(top.contains(&format!("{code} ")), "exit code {code}: {top}");
        }
    }

    /// The `--help` of every command, the top level and each group included, is the
    /// one recorded in `tests/help/` (a change to any is a change people see, reviewed
    /// as a diff). `HOTLINE_BLESS=1` writes them anew; stale files fail.
    #[test]
    fn every_help_matches_its_snapshot() {
        fn walk(command: &mut clap::Command, path: &str, out: &mut Vec<(String, String)>) {
            out.push((path.to_owned(), command.render_long_help().to_string()));
            for sub in command.get_subcommands_mut() {
                if sub.get_name() == "help" {
                    continue;
                }
                let name = format!("{path}-{}", sub.get_name());
                walk(sub, &name, out);
            }
        }
        let mut command = <Cli as clap::CommandFactory>::command().term_width(100);
        command.build();
        let mut helps = Vec::new();
        walk(&mut command, "hotline", &mut helps);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/help");
        let bless = std::env::var_os("HOTLINE_BLESS").is_some();
        if bless {
            std::fs::create_dir_all(&dir).unwrap();
        }
        let mut differ = Vec::new();
        for (path, help) in &helps {
            let file = dir.join(format!("{path}.txt"));
            if bless {
                std::fs::write(&file, help).unwrap();
            } else if std::fs::read_to_string(&file).ok().as_deref() != Some(help.as_str()) {
                differ.push(path.clone());
            }
        }
        let known: std::collections::BTreeSet<String> = helps
            .iter()
            .map(|(path, _)| format!("{path}.txt"))
            .collect();
        let stale: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| !known.contains(name))
            .collect();
        if bless {
            for name in &stale {
                std::fs::remove_file(dir.join(name)).unwrap();
            }
            return;
        }
        assert!(
            differ.is_empty() && stale.is_empty(),
            "--help differs from tests/help/ for {differ:?}, stale snapshots {stale:?}; \
             review the change, then run: HOTLINE_BLESS=1 cargo test -p hotline --bin hotline help"
        );
    }
}
