//! `hotline relay serve|url|renew-cert|check-receipt`: run a relay, print its pinned
//! address, renew its certificate, check one of its custody receipts.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hotline_relay::postgres::PostgresStorage;
use hotline_relay::server::{self, Limits};
use hotline_relay::storage::{Notary, Receipt, RelayStorage, SqliteStorage};
use hotline_relay::tls;

use crate::commands::Failure;
use crate::exit;
use crate::input;
use crate::settings::{Settings, Source, Spec, parse_size};

const ADDRESS_FILE: &str = "relay-address";

fn failure(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        code: exit::ERROR,
    }
}

/// Where the relay keeps its messages.
pub enum Backend<'a> {
    /// `relay.db` in the data directory.
    Sqlite,
    /// A PostgreSQL database (connection string) and schema, which several relay
    /// processes may share.
    Postgres { url: &'a str, schema: &'a str },
}

/// The relay's settings: key (as in the --config file; the flag with `-` for `_`),
/// environment variable, default.
pub const SETTINGS: &[Spec] = &[
    spec(
        "data",
        "HOTLINE_RELAY_DATA",
        None,
        "directory of the key, certificate and database",
    ),
    spec(
        "listen",
        "HOTLINE_RELAY_LISTEN",
        None,
        "HOST:PORT to listen on",
    ),
    spec(
        "postgres",
        "HOTLINE_RELAY_POSTGRES",
        None,
        "PostgreSQL connection string",
    ),
    spec(
        "postgres_schema",
        "HOTLINE_RELAY_POSTGRES_SCHEMA",
        Some("hotline"),
        "PostgreSQL schema",
    ),
    spec(
        "log_level",
        "HOTLINE_RELAY_LOG_LEVEL",
        Some("info"),
        "error, warn, info or debug",
    ),
    spec(
        "max_connections",
        "HOTLINE_RELAY_MAX_CONNECTIONS",
        Some("1024"),
        "connections at once",
    ),
    spec(
        "max_message",
        "HOTLINE_RELAY_MAX_MESSAGE",
        Some("1MiB"),
        "largest message",
    ),
    spec(
        "retention",
        "HOTLINE_RELAY_RETENTION",
        Some("30d"),
        "age at which messages go",
    ),
    spec(
        "quota_per_channel",
        "HOTLINE_RELAY_QUOTA_PER_CHANNEL",
        Some("1GiB"),
        "bytes per channel",
    ),
    spec(
        "quota_per_inbox",
        "HOTLINE_RELAY_QUOTA_PER_INBOX",
        Some("16MiB"),
        "bytes per inbox",
    ),
    spec(
        "max_storage",
        "HOTLINE_RELAY_MAX_STORAGE",
        Some("32GiB"),
        "bytes in all",
    ),
    spec(
        "requests_per_second",
        "HOTLINE_RELAY_REQUESTS_PER_SECOND",
        Some("200"),
        "per device",
    ),
    spec(
        "request_burst",
        "HOTLINE_RELAY_REQUEST_BURST",
        Some("400"),
        "per device",
    ),
    spec(
        "bytes_per_second",
        "HOTLINE_RELAY_BYTES_PER_SECOND",
        Some("1MiB"),
        "per device",
    ),
    spec(
        "byte_burst",
        "HOTLINE_RELAY_BYTE_BURST",
        Some("64MiB"),
        "per device",
    ),
    spec(
        "handshake_timeout",
        "HOTLINE_RELAY_HANDSHAKE_TIMEOUT",
        Some("5s"),
        "TLS and headers",
    ),
    spec(
        "committers",
        "HOTLINE_RELAY_COMMITTERS",
        None,
        "device keys that may register channels (comma-separated; anyone if unset)",
    ),
];

const fn spec(
    key: &'static str,
    env: &'static str,
    default: Option<&'static str>,
    help: &'static str,
) -> Spec {
    Spec {
        key,
        env,
        default,
        help,
    }
}

/// The relay's limits from its settings, each checked.
fn limits_of(settings: &Settings) -> Result<Limits, Failure> {
    let size = |key| settings.parse(key, parse_size, "a size such as 1MiB or 64KiB");
    let duration = |key| {
        settings.parse(
            key,
            |text| crate::commands::parse_duration(text).map(Duration::from_millis),
            "a duration such as 30s, 10m, 7d",
        )
    };
    let number = |key| {
        settings.parse(
            key,
            |text| {
                text.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite() && *n > 0.0)
            },
            "a positive number",
        )
    };
    let usage = |message: String| Failure {
        message,
        code: exit::USAGE,
    };
    let defaults = Limits::default();
    let max_connections = settings
        .parse(
            "max_connections",
            |text| {
                text.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (16..=1_000_000).contains(n))
            },
            "a number from 16 to 1000000",
        )?
        .unwrap_or(defaults.max_connections);
    let max_message = size("max_message")?.unwrap_or(defaults.max_message as u64);
    if max_message == 0 || max_message > hotline_relay::server::MAX_MESSAGE as u64 {
        return Err(usage(format!(
            "max_message {max_message} bytes: at most {} (devices read no larger)",
            hotline_relay::server::MAX_MESSAGE
        )));
    }
    let rate_burst = number("request_burst")?.unwrap_or(defaults.rate_burst);
    // A batch of messages costs one request each, and is admitted whole or not at all:
    // below the largest batch, a device with that many messages queued never gets one
    // through.
    let largest = hotline_relay::server::MAX_BATCH as f64;
    if rate_burst < largest {
        return Err(usage(format!(
            "request_burst {rate_burst}: at least {largest} (a device posts up to {largest} \
             messages in one batch, which costs one request each)"
        )));
    }
    Ok(Limits {
        max_connections,
        max_message: max_message as usize,
        retention: duration("retention")?.unwrap_or(defaults.retention),
        quota_per_log: size("quota_per_channel")?.unwrap_or(defaults.quota_per_log),
        quota_per_inbox: size("quota_per_inbox")?.unwrap_or(defaults.quota_per_inbox),
        max_storage: size("max_storage")?.unwrap_or(defaults.max_storage),
        rate_per_second: number("requests_per_second")?.unwrap_or(defaults.rate_per_second),
        rate_burst,
        sender_bytes_per_second: size("bytes_per_second")?
            .map_or(defaults.sender_bytes_per_second, |n| n as f64),
        sender_burst_bytes: size("byte_burst")?.map_or(defaults.sender_burst_bytes, |n| n as f64),
        header_timeout: duration("handshake_timeout")?.unwrap_or(defaults.header_timeout),
        committers: settings.parse(
            "committers",
            |text| {
                text.split(',')
                    .map(str::trim)
                    .filter(|key| !key.is_empty())
                    .map(|key| {
                        let mut out = [0u8; 32];
                        hex::decode_to_slice(key, &mut out).ok().map(|()| out)
                    })
                    .collect::<Option<Vec<_>>>()
                    .filter(|keys| !keys.is_empty())
            },
            "device keys of 64 hexadecimal digits, comma-separated (hotline id --json: key)",
        )?,
        ..defaults
    })
}

/// `relay config`: every setting, its value and where it came from (the limits
/// checked as `serve` would).
pub fn show_settings(settings: &Settings, json_output: bool) -> Result<(), Failure> {
    limits_of(settings)?;
    for (spec, value, source) in settings.report() {
        let source = source.map(|s| s.describe());
        if json_output {
            out_json!(
                serde_json::json!({"key": spec.key, "value": value, "source": source,
                                         "env": spec.env, "about": spec.help})
            );
        } else {
            out!(
                "{:<20} {:<24} {}",
                spec.key,
                value.unwrap_or("-"),
                source.unwrap_or_else(|| format!("not set ({})", spec.env))
            );
        }
    }
    Ok(())
}

pub fn serve(settings: &Settings) -> Result<(), Failure> {
    let limits = limits_of(settings)?;
    let data = std::path::PathBuf::from(settings.require("data")?);
    let data = data.as_path();
    let listen = settings.require("listen")?.to_owned();
    let schema = settings.get("postgres_schema").unwrap_or("hotline");
    let backend = match settings.get("postgres") {
        Some(url) => Backend::Postgres { url, schema },
        None => Backend::Sqlite,
    };
    // RUST_LOG still counts when the level is only the default.
    let log_level = match settings
        .report()
        .iter()
        .find(|(spec, ..)| spec.key == "log_level")
    {
        Some((_, Some(level), Some(source))) if **source != Source::Default => Some(*level),
        _ => None,
    };
    crate::logging::start(log_level)?;
    let listen: SocketAddr = listen.parse().map_err(|_| Failure {
        message: format!("invalid listen {listen:?}: use HOST:PORT, as in 127.0.0.1:8443"),
        code: exit::USAGE,
    })?;
    tls::install_provider();
    match server::raise_open_file_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
    std::fs::create_dir_all(data)
        .map_err(|e| failure(format!("cannot create {}: {e}", data.display())))?;
    let (cert, key) = tls::load_or_create(data).map_err(|e| failure(e.to_string()))?;
    let pin = tls::pin_of(&cert);
    let notary = Notary::new(&key)
        .and_then(|notary| Ok(notary.with_rotations(tls::load_rotations(data)?)))
        .map_err(|e| failure(e.to_string()))?;
    let config = tls::server_config(cert, key).map_err(|e| failure(e.to_string()))?;
    let config = (config, notary);
    let runtime =
        tokio::runtime::Runtime::new().map_err(|e| failure(format!("cannot start: {e}")))?;
    runtime.block_on(async {
        match backend {
            Backend::Sqlite => {
                let storage = SqliteStorage::open(&data.join("relay.db"), limits.quotas())
                    .map_err(|e| failure(e.to_string()))?;
                run(data, listen, config, storage, limits, &pin).await
            }
            Backend::Postgres { url, schema } => {
                let storage = PostgresStorage::connect(url, schema, limits.quotas(), 8)
                    .await
                    .map_err(|e| {
                        failure(format!(
                            "cannot use PostgreSQL: {e}; check --postgres (a connection string such as 'host=127.0.0.1 user=postgres dbname=hotline')"
                        ))
                    })?;
                run(data, listen, config, storage, limits, &pin).await
            }
        }
    })
}

async fn run<S: RelayStorage>(
    data: &Path,
    listen: SocketAddr,
    (config, notary): (hotline_relay::tls::ServerConfig, Notary),
    storage: S,
    limits: Limits,
    pin: &[u8; 32],
) -> Result<(), Failure> {
    let running = server::serve(listen, config, notary, storage, limits)
        .await
        .map_err(|e| failure(format!("cannot listen on {listen}: {e}")))?;
    let url = tls::relay_url(&running.address.to_string(), pin);
    std::fs::write(data.join(ADDRESS_FILE), &url).map_err(|e| failure(e.to_string()))?;
    out!("{url}");
    tracing::info!(
        address = %running.address,
        "relay listening; stop with SIGTERM or Ctrl-C, reload its certificate with SIGHUP"
    );
    let signal = |kind| {
        tokio::signal::unix::signal(kind).map_err(|e| failure(format!("cannot watch signals: {e}")))
    };
    let mut terminate = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hangup = signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hangup.recv() => reload_certificate(data, pin, &running),
        }
    }
    tracing::info!("relay stopping: finishing in-flight requests");
    running.shutdown().await;
    tracing::info!("relay stopped");
    Ok(())
}

/// SIGHUP: serves the certificate now in the data directory (after `relay renew-cert`)
/// to new connections. One for another key would change the relay's address: refused,
/// the running one kept.
fn reload_certificate(data: &Path, pin: &[u8; 32], running: &server::Running) {
    let loaded = tls::load_or_create(data).map_err(|e| e.to_string());
    match loaded.and_then(|(cert, key)| {
        if tls::pin_of(&cert) != *pin {
            return Err("its key is not the one the relay's address pins".into());
        }
        tls::server_config(cert, key).map_err(|e| e.to_string())
    }) {
        Ok(config) => {
            running.reload_tls(config);
            tracing::info!("SIGHUP: certificate reloaded; new connections get it");
        }
        Err(error) => tracing::warn!(%error, "SIGHUP: certificate not reloaded"),
    }
}

pub fn url(data: &Path, json_output: bool) -> Result<(), Failure> {
    let path = data.join(ADDRESS_FILE);
    let bytes = input::read_limited(&path, input::MAX_ADDRESS_FILE, "a relay address file")
        .map_err(|error| {
            if error.is_not_found() {
                failure(format!(
                    "no relay has run in {}; start one with: hotline relay serve --data DIR --listen ADDR",
                    data.display()
                ))
            } else {
                failure(error.to_string())
            }
        })?;
    let url = String::from_utf8(bytes)
        .map_err(|_| failure(format!("{} is not a relay address", path.display())))?;
    if json_output {
        out_json!(serde_json::json!({"url": url.trim()}));
    } else {
        out!("{}", url.trim());
    }
    Ok(())
}

/// `relay check-receipt`: whether the relay that `url` names signed `receipt` (hex).
pub fn check_receipt(url: &str, receipt: &str, json_output: bool) -> Result<(), Failure> {
    let usage = |message: String| Failure {
        message,
        code: exit::USAGE,
    };
    let (_, pin) = tls::parse_url(url).map_err(|e| usage(e.to_string()))?;
    let bytes = hex::decode(receipt.trim())
        .map_err(|_| usage("the receipt is not hex (copy it from status --json)".into()))?;
    let receipt = Receipt::decode(&bytes).map_err(|e| Failure {
        message: format!("not a receipt: {e}"),
        code: exit::INTEGRITY,
    })?;
    let verdict = receipt.verify(&pin);
    let log = match receipt.leaf.log.split_first() {
        Some((1, id)) => format!("channel {}", hex::encode(id)),
        Some((2, id)) => format!("inbox {}", hex::encode(id)),
        Some((3, id)) => format!("key packages {}", hex::encode(id)),
        _ => format!("log {}", hex::encode(&receipt.leaf.log)),
    };
    if json_output {
        out_json!(serde_json::json!({
            "valid": verdict.is_ok(),
            "error": verdict.as_ref().err().map(ToString::to_string),
            "relay_pin": hex::encode(receipt.pin()),
            "log": log,
            "seq": receipt.leaf.seq,
            "hash": hex::encode(receipt.leaf.hash),
            "stored_ms": receipt.time_ms,
            "batch": {"size": receipt.size, "index": receipt.index, "root": hex::encode(receipt.root)},
        }));
    } else {
        out!(
            "{log}, message {} (SHA-256 {}), committed at {} ms in a batch of {}",
            receipt.leaf.seq,
            hex::encode(receipt.leaf.hash),
            receipt.time_ms,
            receipt.size
        );
    }
    match verdict {
        Ok(()) => {
            if !json_output {
                out!("valid: signed by the relay this address pins");
            }
            Ok(())
        }
        Err(error) => Err(Failure {
            message: format!("the receipt does not hold: {error}"),
            code: exit::INTEGRITY,
        }),
    }
}

/// `relay rotate-key`: a new key for the relay, with the old key's signed statement
/// that members follow; prints the relay's new address.
pub fn rotate_key(data: &Path, json_output: bool) -> Result<(), Failure> {
    tls::install_provider();
    let certificate = tls::rotate_key(data).map_err(|e| failure(e.to_string()))?;
    let pin = tls::pin_of(&certificate);
    let address = std::fs::read_to_string(data.join(ADDRESS_FILE))
        .ok()
        .and_then(|url| tls::parse_url(url.trim()).ok())
        .map(|(base, _)| tls::relay_url(base.trim_start_matches("https://"), &pin));
    if json_output {
        out_json!(serde_json::json!({"pin": hex::encode(pin), "url": address}));
    } else {
        match &address {
            Some(url) => out!("{url}"),
            None => out!("sha256={}", hex::encode(pin)),
        }
    }
    eprintln!(
        "new key in {}, with the old key's signed statement: restart the relay to serve it. \
         Members follow it (their addresses keep the old pin); give new members the new address.",
        data.display()
    );
    Ok(())
}

pub fn renew_certificate(data: &Path) -> Result<(), Failure> {
    tls::install_provider();
    let certificate = tls::renew_certificate(data).map_err(|e| failure(e.to_string()))?;
    let pin = tls::pin_of(&certificate);
    eprintln!(
        "new certificate in {} for the same key: send the relay SIGHUP (or restart it) to serve it",
        data.display()
    );
    // The address it printed when it last ran, if it did: the same, since the pin is the
    // key's (an address printed before key pins carried the old certificate's).
    let Ok(url) = std::fs::read_to_string(data.join(ADDRESS_FILE)) else {
        return Ok(());
    };
    let (base, old) = tls::parse_url(url.trim()).map_err(|e| failure(e.to_string()))?;
    let url = tls::relay_url(base.trim_start_matches("https://"), &pin);
    if old != pin {
        std::fs::write(data.join(ADDRESS_FILE), &url).map_err(|e| failure(e.to_string()))?;
        eprintln!(
            "the address printed before pinned the old certificate, which no longer serves: \
             give members this one"
        );
    }
    out!("{url}");
    Ok(())
}
