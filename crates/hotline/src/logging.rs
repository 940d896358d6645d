//! Logs on stderr for the relay and a following device: one line per event, with its
//! time and level, never message bytes, keys or (unless asked) message text.

use crate::commands::Failure;
use crate::exit;

/// Logs to stderr, one line per event with its time: `level` (`--log-level`), else
/// `RUST_LOG` if it names a level, else `info`.
pub fn start(level: Option<&str>) -> Result<(), Failure> {
    let chosen = level
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let filter: tracing_subscriber::filter::LevelFilter =
        chosen.trim().parse().map_err(|_| Failure {
            message: format!(
                "invalid log level {chosen:?}: use error, warn, info, debug, trace or off"
            ),
            code: exit::USAGE,
        })?;
    let _ = tracing_subscriber::fmt()
        .with_max_level(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
    Ok(())
}
