//! Logs for the relay and a following device (on stderr) and for the console (in a
//! file: the terminal is the console's): one line per event, with its time and level,
//! never message bytes, keys or (unless asked) message text.

use crate::commands::Failure;
use crate::exit;

/// Logs to stderr, one line per event with its time: `level` (`--log-level`), else
/// `RUST_LOG` if it names a level, else `info`.
pub fn start(level: Option<&str>) -> Result<(), Failure> {
    let filter = level_filter(level)?;
    let _ = tracing_subscriber::fmt()
        .with_max_level(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
    Ok(())
}

/// Logs to `path` (appended; created mode 0600), as [`start`] does to stderr.
pub fn start_file(level: Option<&str>, path: &std::path::Path) -> Result<(), Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    let filter = level_filter(level)?;
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Failure {
            message: format!("cannot write the log {}: {e}", path.display()),
            code: exit::ERROR,
        })?;
    let _ = tracing_subscriber::fmt()
        .with_max_level(filter)
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .with_target(false)
        .try_init();
    Ok(())
}

fn level_filter(level: Option<&str>) -> Result<tracing_subscriber::filter::LevelFilter, Failure> {
    let chosen = level
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    chosen.trim().parse().map_err(|_| Failure {
        message: format!(
            "invalid log level {chosen:?}: use error, warn, info, debug, trace or off"
        ),
        code: exit::USAGE,
    })
}
