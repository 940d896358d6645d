//! The commands, one module per command group, and what they share: how a command
//! fails (`Failure`, its exit code and the advice the user reads), files written safely,
//! and times and durations as people type and read them.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hotline_client::HomeError;
use hotline_client::store::StoreError;
use hotline_core::Precedence;

use crate::exit;
use crate::input::InputError;

pub mod agree;
pub mod backup;
pub mod card;
pub mod channel;
pub mod demo;
pub mod export;
pub mod identity;
pub mod line;
pub mod message;
pub mod relay;
pub mod verify;

pub use card::*;
pub use channel::*;
pub use export::*;
pub use identity::*;
pub use line::*;
pub use message::*;

/// A failed command: what to tell the user, and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        let code = if error.is_trust_refusal() {
            exit::TRUST
        } else {
            exit::ERROR
        };
        let message = match advice(&error) {
            Some(advice) => format!("{error}; {advice}"),
            None => error.to_string(),
        };
        Failure { message, code }
    }
}

/// What to do next, for the errors a person can act on: the libraries say what went
/// wrong, the command line says which command helps.
fn advice(error: &StoreError) -> Option<String> {
    use hotline_core::ChannelError as C;
    Some(match error {
        StoreError::UnknownChannel(_) | StoreError::NotInChannel(_) => {
            "see: hotline channel list".into()
        }
        StoreError::UnknownParty(_) => {
            "import their card first: hotline card import FILE --fingerprint DIGITS".into()
        }
        StoreError::UnknownAgreement(_) => "see: hotline agree list CHANNEL".into(),
        StoreError::Home(HomeError::Missing { .. }) => {
            "create one with: hotline init --party NAME (or point --home at it)".into()
        }
        StoreError::Home(HomeError::TooOpen { path, .. }) => {
            format!("fix it with: chmod 700 {}", path.display())
        }
        StoreError::Channel(C::AwaitingHistory) => {
            "run hotline sync until their messages arrive, then try again".into()
        }
        StoreError::Channel(C::CatchingUp) => "run hotline sync with the relays reachable".into(),
        StoreError::Channel(C::CommitPending) => {
            "run hotline sync (with a relay reachable) first".into()
        }
        StoreError::Channel(C::SentElsewhere) => "have a new device invited \
             (docs/operations.md, \"Backup and restore\"), or clear the cloned alarm \
             (hotline status --clear) to send anyway"
            .into(),
        _ => return None,
    })
}

impl From<InputError> for Failure {
    fn from(error: InputError) -> Self {
        failure(error.to_string())
    }
}

impl From<HomeError> for Failure {
    fn from(error: HomeError) -> Self {
        StoreError::from(error).into()
    }
}

pub(crate) fn failure(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        code: exit::ERROR,
    }
}

pub(crate) type Outcome = Result<(), Failure>;

/// `$XDG_DATA_HOME/hotline`, else `~/.local/share/hotline`.
pub fn default_home() -> PathBuf {
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(data).join("hotline");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".local/share/hotline")
}

/// Writes `bytes` to `path` (mode 0600) through a private temporary file beside it,
/// synced, then renamed: a crash never leaves half a file.
fn write_file(path: &Path, bytes: &[u8], what: &str, force: bool) -> Outcome {
    let (file, temporary) = create_private(path, what, force)?;
    let result = (|| -> std::io::Result<()> {
        let mut file = file;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        failure(format!("cannot write {what} {}: {e}", path.display()))
    })
}

/// Opens `PATH.partial` (mode 0600) to be renamed over `path` once written. An
/// existing `path` is refused (exit 2) unless `force`; an existing `PATH.partial` (an
/// earlier write interrupted) is never deleted silently.
pub(crate) fn create_private(
    path: &Path,
    what: &str,
    force: bool,
) -> Result<(std::fs::File, PathBuf), Failure> {
    if !force && std::fs::symlink_metadata(path).is_ok() {
        return Err(Failure {
            message: format!(
                "{} exists: choose another file, or replace it with --force",
                path.display()
            ),
            code: exit::USAGE,
        });
    }
    let temporary = path.with_extension("partial");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(|e| {
            failure(format!(
                "cannot write {what} {}: {e}{}",
                temporary.display(),
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    " (an earlier write was interrupted: remove it first)"
                } else {
                    ""
                }
            ))
        })?;
    Ok((file, temporary))
}

/// Refuses (exit 2) a relay address that is not `https://HOST:PORT/#sha256=PIN`: it
/// would go into a signed card or a channel and nothing would ever arrive through it.
fn check_relay_address(url: &str) -> Result<(), Failure> {
    let usage = |why: &str| Failure {
        message: format!(
            "invalid relay address {url:?}: {why}; a relay address looks like \
             https://HOST:PORT/#sha256=<64 hex digits>, as hotline relay url --data DIR prints it"
        ),
        code: exit::USAGE,
    };
    let (base, _) = hotline_relay::tls::parse_url(url)
        .map_err(|_| usage("no #sha256= pin of 64 hex digits"))?;
    let authority = base
        .strip_prefix("https://")
        .ok_or_else(|| usage("not https://"))?;
    let (host, port) = authority.rsplit_once(':').ok_or_else(|| usage("no port"))?;
    if host.is_empty() || authority.contains('/') || port.parse::<u16>().is_err() {
        return Err(usage("not HOST:PORT"));
    }
    Ok(())
}

/// Parses `30s`, `10m`, `2h`, `1d` into milliseconds.
pub fn parse_duration(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    number.checked_mul(unit_ms).filter(|ms| *ms > 0)
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How a message's precedence shows before its text: nothing for routine.
pub fn level_mark(precedence: Precedence) -> String {
    match precedence {
        Precedence::Routine => String::new(),
        level => format!("{} ", level.as_str().to_uppercase()),
    }
}

pub(crate) fn format_time(ms: u64) -> String {
    let (year, month, day, hour, minute, second) = hotline_core::export::civil(ms);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}Z")
}

/// A deadline given as a duration from now (`30s`, `10m`, `2h`, `1d`), in ms since
/// the Unix epoch; a usage error (exit 2) if it is not one.
pub(crate) fn deadline_from_now(deadline: Option<&str>) -> Result<Option<u64>, Failure> {
    deadline
        .map(|text| {
            parse_duration(text)
                .map(|ms| now_ms() + ms)
                .ok_or_else(|| Failure {
                    message: format!(
                        "invalid deadline {text:?}: use a number and s, m, h or d, as in 10m"
                    ),
                    code: exit::USAGE,
                })
        })
        .transpose()
}

pub(crate) fn human_duration(ms: u64) -> String {
    match ms {
        ms if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Some(600_000));
        assert_eq!(parse_duration("1d"), Some(86_400_000));
        assert_eq!(parse_duration("200ms"), Some(200));
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("5y"), None);
    }

    #[test]
    fn times() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_time(1_795_000_000_000), "2026-11-18 11:06:40Z");
    }
}
