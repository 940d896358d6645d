//! `hotline backup` and `hotline restore`: the whole device in one file encrypted with
//! a passphrase, and back.

use std::io::{BufWriter, IsTerminal, Read};
use std::path::Path;
use std::time::Duration;

use age::secrecy::{ExposeSecret, SecretString};
use hotline_client::Store;
use hotline_client::backup::{self, BackupError, BackupInfo};
use hotline_client::store::StoreError;
use hotline_core::ChannelError;
use serde_json::json;

use crate::commands::{Failure, Outcome, create_private, failure};
use crate::exit;

/// Shortest passphrase a backup is written with: the file travels, and anyone holding
/// it can try passphrases offline (scrypt makes each try cost about a second).
pub const MIN_PASSPHRASE: usize = 12;
/// Longest passphrase file read.
const MAX_PASSPHRASE_FILE: u64 = 4096;
/// The environment variable a passphrase may come from (for scheduled backups).
pub const PASSPHRASE_ENV: &str = "HOTLINE_PASSPHRASE";

impl From<BackupError> for Failure {
    fn from(error: BackupError) -> Self {
        let code = match &error {
            BackupError::Damaged(_) => exit::INTEGRITY,
            BackupError::Home(hotline_client::HomeError::Exists { .. }) => exit::USAGE,
            BackupError::Store(StoreError::Home(hotline_client::HomeError::Exists { .. })) => {
                exit::USAGE
            }
            _ => exit::ERROR,
        };
        let message = match error {
            BackupError::Home(hotline_client::HomeError::Exists { path }) => format!(
                "a hotline device already exists in {}: restore into a new home \
                 (hotline --home DIR restore FILE), or move that one away first",
                path.display()
            ),
            other => other.to_string(),
        };
        Failure { message, code }
    }
}

pub fn backup(
    home: &Path,
    out: &Path,
    force: bool,
    passphrase_file: Option<&Path>,
    json_output: bool,
) -> Outcome {
    let passphrase = passphrase(passphrase_file, true)?;
    let mut store = Store::open(home)?;
    let cannot = |e: std::io::Error| failure(format!("cannot write backup {}: {e}", out.display()));
    let (file, temporary) = create_private(out, "backup", force)?;
    let mut writer = BufWriter::with_capacity(1 << 16, file);
    let written = store
        .backup_to(&mut writer, passphrase)
        .map_err(Failure::from)
        .and_then(|info| {
            let file = writer.into_inner().map_err(|e| cannot(e.into_error()))?;
            file.sync_all().map_err(cannot)?;
            std::fs::rename(&temporary, out).map_err(cannot)?;
            Ok((info, file.metadata().map(|m| m.len()).unwrap_or(0)))
        });
    let (info, bytes) = match written {
        Ok(written) => written,
        Err(error) => {
            let _ = std::fs::remove_file(&temporary);
            return Err(error);
        }
    };
    if json_output {
        out_json!(json!({
            "file": out.display().to_string(),
            "bytes": bytes,
            "backup": info,
        }));
    } else {
        eprintln!(
            "wrote {} ({bytes} bytes, {} channels, encrypted with the passphrase); \
             bring it back with: hotline --home NEW_HOME restore {}",
            out.display(),
            info.channels,
            out.display()
        );
    }
    Ok(())
}

pub fn restore(
    home: &Path,
    file: &Path,
    passphrase_file: Option<&Path>,
    json_output: bool,
) -> Outcome {
    let input = std::fs::File::open(file)
        .map_err(|e| failure(format!("cannot read backup {}: {e}", file.display())))?;
    let passphrase = passphrase(passphrase_file, false)?;
    let (info, store) = backup::restore(input, passphrase, home)?;
    let waiting = store.channels_catching_up().map_err(Failure::from)?;
    if json_output {
        out_json!(json!({
            "home": home.display().to_string(),
            "backup": info,
            "catching_up": waiting,
        }));
    } else {
        let BackupInfo {
            party,
            device,
            fingerprint,
            created_ms,
            channels,
            ..
        } = &info;
        out!("{fingerprint}");
        eprintln!(
            "restored {party}/{device} into {} from the backup of {} ({channels} channels).",
            home.display(),
            crate::commands::format_time(*created_ms)
        );
        if waiting > 0 {
            eprintln!(
                "{waiting} channels read their relays to the end before they send again \
                 (hotline sync, or the first send does it). Stop the old device for good: \
                 two copies of one device fork its record."
            );
        }
    }
    Ok(())
}

/// Before the first send of a restored channel: one round of sync, which reads every
/// relay to its end.
pub(crate) fn catch_up(store: &mut Store, channel: &str) -> Outcome {
    hotline_relay::tls::install_provider();
    let _lock = store.home().lock_receiving()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failure(format!("cannot start: {e}")))?;
    let synced = runtime.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(60),
            hotline_client::sync::sync_once(store),
        )
        .await
    });
    if let Ok(report) = synced {
        report?;
    }
    let left = store.catching_up(&store.channel_id(channel)?)?;
    if !left.is_empty() {
        return Err(Failure {
            message: format!(
                "{}; not read to the end yet: {}",
                ChannelError::CatchingUp,
                left.join(", ")
            ),
            code: exit::NETWORK,
        });
    }
    Ok(())
}

/// The passphrase: from `file` (its first line), else `HOTLINE_PASSPHRASE`, else asked
/// on the terminal (twice when `confirm`).
fn passphrase(file: Option<&Path>, confirm: bool) -> Result<SecretString, Failure> {
    let usage = |message: String| Failure {
        message,
        code: exit::USAGE,
    };
    let given = if let Some(file) = file {
        let mut text = String::new();
        std::fs::File::open(file)
            .and_then(|f| f.take(MAX_PASSPHRASE_FILE + 1).read_to_string(&mut text))
            .map_err(|e| {
                failure(format!(
                    "cannot read passphrase file {}: {e}",
                    file.display()
                ))
            })?;
        if text.len() as u64 > MAX_PASSPHRASE_FILE {
            return Err(usage(format!(
                "passphrase file {} is over {MAX_PASSPHRASE_FILE} bytes",
                file.display()
            )));
        }
        let line = text.lines().next().unwrap_or("").to_owned();
        SecretString::from(line)
    } else if let Some(value) = std::env::var_os(PASSPHRASE_ENV) {
        SecretString::from(value.to_string_lossy().into_owned())
    } else if std::io::stdin().is_terminal() {
        let ask = |prompt: &str| {
            rpassword::prompt_password(prompt)
                .map(SecretString::from)
                .map_err(|e| failure(format!("cannot read the passphrase: {e}")))
        };
        let first = ask("Passphrase: ")?;
        if confirm {
            let again = ask("Passphrase again: ")?;
            if again.expose_secret() != first.expose_secret() {
                return Err(usage("the two passphrases differ".into()));
            }
        }
        first
    } else {
        return Err(usage(format!(
            "no passphrase: give --passphrase-file FILE or {PASSPHRASE_ENV}, or run on a terminal"
        )));
    };
    let length = given.expose_secret().chars().count();
    if length == 0 {
        return Err(usage("the passphrase is empty".into()));
    }
    if confirm && length < MIN_PASSPHRASE {
        return Err(usage(format!(
            "the passphrase has {length} characters; a backup needs at least {MIN_PASSPHRASE}"
        )));
    }
    Ok(given)
}
