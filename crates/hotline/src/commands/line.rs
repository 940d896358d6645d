//! `hotline sync` and `hotline status`: the line followed, and its state.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Duration;

use hotline_client::Store;
use hotline_client::store::relay_label;
use hotline_client::sync::SyncReport;
use serde_json::json;

use crate::exit;

use super::{Failure, Outcome, failure, level_mark, now_ms, parse_duration};

/// One round of sync, or with `follow` (seconds between full rounds) a loop that runs
/// until Ctrl-C or SIGTERM, printing one report per change.
/// Link-test settings given on the command line (each kept in the device's database).
#[derive(Debug, Default)]
pub struct LinkTestSettings {
    pub interval_ms: Option<u64>,
    pub record_period_ms: Option<u64>,
    pub retention_ms: Option<u64>,
}

/// What a following device logs on stderr (`sync --follow`): the level, and whether
/// message text goes into the log (never by default).
#[derive(Debug, Default)]
pub struct Logging {
    pub level: Option<String>,
    pub show_text: bool,
}

pub fn sync(
    home: &Path,
    follow: Option<u64>,
    settings: LinkTestSettings,
    logging: Logging,
    json_output: bool,
) -> Outcome {
    if follow.is_some() {
        crate::logging::start(logging.level.as_deref())?;
    }
    hotline_relay::tls::install_provider();
    let mut store = Store::open(home)?;
    let _lock = store.home().lock_receiving()?;
    if let Some(ms) = settings.interval_ms {
        store.set_link_test_interval(ms)?;
    }
    if let Some(ms) = settings.record_period_ms {
        store.set_record_period(ms)?;
    }
    if let Some(ms) = settings.retention_ms {
        store.set_link_test_retention(ms)?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failure(format!("cannot start: {e}")))?;
    let Some(round) = follow else {
        let report = runtime.block_on(hotline_client::sync::sync_once(&mut store))?;
        print_report(&report, json_output, true);
        if !report.any_relay_reachable() {
            return Err(Failure {
                message: "no relay reachable; messages stay queued. Check the relays' addresses and that they run".into(),
                code: exit::NETWORK,
            });
        }
        return Ok(());
    };
    let config = hotline_client::sync::FollowConfig {
        round: Duration::from_secs(round),
        ..Default::default()
    };
    runtime.block_on(async {
        let mut first = true;
        // Whether each relay answered last time: its changes are events.
        let mut relays_up: std::collections::HashMap<String, bool> = Default::default();
        tracing::info!(home = %home.display(), "following the line; stop with SIGTERM or Ctrl-C");
        // `hotline send` beside it hands its push over (lock held: nobody else follows).
        let _listening = listen_for_hand_offs(store.home().path(), &config.wake);
        let following = hotline_client::sync::follow(&mut store, &config, |report| {
            log_report(
                report,
                first,
                json_output,
                logging.show_text,
                &mut relays_up,
            );
            first = false;
            ControlFlow::Continue(())
        });
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| failure(format!("cannot watch for SIGTERM: {e}")))?;
        tokio::select! {
            result = following => result.map_err(Failure::from),
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = terminate.recv() => Ok(()),
        }
    })
}

/// Serves `hotline send` and the other commands run beside a follower of `home`
/// (`wake` is the follower's): they hand it their push ([`hotline_client::handoff`]).
/// Without the socket they post themselves, so a failure is only logged. Call inside
/// the follower's runtime.
pub(crate) fn listen_for_hand_offs(
    home: &Path,
    wake: &hotline_client::sync::Wake,
) -> Option<hotline_client::handoff::Listening> {
    match hotline_client::handoff::listen(home, wake.clone()) {
        Ok(listening) => Some(listening),
        Err(error) => {
            tracing::warn!(
                "commands beside this follower post for themselves: {}",
                crate::inert::inert(&error.to_string())
            );
            None
        }
    }
}

/// `hotline status`: one line per relay path and per party, the backlog, the alarms.
pub fn status(
    home: &Path,
    undelivered_after: Option<&str>,
    clear: bool,
    clear_ids: &[u64],
    json_output: bool,
) -> Outcome {
    let mut store = Store::open(home)?;
    if let Some(after) = undelivered_after {
        let ms = parse_duration(after).ok_or_else(|| Failure {
            message: format!("invalid duration {after:?}: use a number and s, m, h or d, as in 5m"),
            code: exit::USAGE,
        })?;
        store.set_undelivered_after(ms)?;
    }
    let now = now_ms();
    let status = store.status(now)?;
    let names = store.relay_names()?;
    let ago =
        |ms: Option<u64>| ms.map(|ms| format!("{:.1} s ago", now.saturating_sub(ms) as f64 / 1e3));
    if json_output {
        let relays: Vec<_> = status
            .relays
            .iter()
            .map(|r| {
                json!({"url": r.url, "name": r.name, "state": r.state.as_str(), "rtt_ms": r.rtt_ms,
                       "last_ok": r.last_ok_ms, "error": r.error})
            })
            .collect();
        let parties: Vec<_> = status
            .parties
            .iter()
            .map(|p| json!({"party": p.party, "last_heard": p.last_heard_ms, "not_joined": p.not_joined}))
            .collect();
        let alarms: Vec<_> = status
            .alarms
            .iter()
            .map(|a| {
                json!({"id": a.id, "kind": a.kind, "relay": a.relay, "party": a.party,
                       "message": a.message, "since": a.since_ms, "detail": a.detail,
                       "receipts": a.receipts.iter().map(hex::encode).collect::<Vec<_>>()})
            })
            .collect();
        out_json!(
            json!({"line": if status.line_down() { "down" } else { "up" },
                   "relays": relays, "parties": parties, "outbox": status.outbox,
                   "undelivered": status.undelivered,
                   "unacknowledged": status.undelivered, "alarms": alarms,
                   "link_test_interval_ms": status.interval_ms, "now": now})
        );
    } else {
        out!(
            "line: {}   outbox: {} queued   undelivered: {}   link tests every {}",
            if status.line_down() { "DOWN" } else { "up" },
            status.outbox,
            status.undelivered,
            match status.interval_ms {
                ms if ms % 1000 == 0 => format!("{} s", ms / 1000),
                ms => format!("{ms} ms"),
            }
        );
        // One line per relay path and per party, in columns (like `wg show`).
        let width = status
            .relays
            .iter()
            .map(|r| r.name.len())
            .chain(status.parties.iter().map(|p| p.party.len()))
            .max()
            .unwrap_or(0);
        for relay in &status.relays {
            let rtt = relay
                .rtt_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms"));
            let error = relay
                .error
                .as_deref()
                .map(|e| format!("   {}", crate::inert::inert(e)))
                .unwrap_or_default();
            out!(
                "relay  {:<width$}  {:<8}  rtt {:>8}   last ok {}{error}",
                relay.name,
                relay.state.as_str(),
                rtt,
                ago(relay.last_ok_ms).unwrap_or_else(|| "never".into())
            );
        }
        for party in &status.parties {
            out!(
                "party  {:<width$}  last heard {}{}",
                party.party,
                ago(party.last_heard_ms).unwrap_or_else(|| "never".into()),
                if party.not_joined.is_empty() {
                    String::new()
                } else {
                    format!("   invited, not joined: {}", party.not_joined.join(", "))
                }
            );
        }
        for alarm in &status.alarms {
            let about: Vec<String> = [
                alarm
                    .relay
                    .as_ref()
                    .map(|r| format!("relay {}", relay_label(&names, r))),
                alarm.party.as_ref().map(|p| format!("party {p}")),
                alarm
                    .message
                    .as_ref()
                    .map(|m| format!("message {}", &m[..m.len().min(12)])),
            ]
            .into_iter()
            .flatten()
            .collect();
            let cited = match alarm.receipts.len() {
                0 => String::new(),
                n => format!(
                    " [evidence: {n} receipt(s) signed by the relay; status --json shows them, \
                     hotline relay check-receipt checks one]"
                ),
            };
            out!(
                "ALARM {}{} ({}) since {}: {}{cited}",
                alarm.id.map(|id| format!("#{id} ")).unwrap_or_default(),
                alarm.kind,
                about.join(", "),
                ago(Some(alarm.since_ms)).unwrap_or_default(),
                alarm.detail
            );
        }
    }
    if clear {
        let cleared = store.clear_alarms()?;
        eprintln!("{cleared} stored alarm(s) cleared; their evidence stays in the database");
    }
    for id in clear_ids {
        if !store.clear_alarm(*id)? {
            return Err(failure(format!(
                "no open stored alarm #{id}: see the ids in hotline status --json (alarms[].id); \
                 live alarms (relay-down, path-down, deadline, undelivered, not-joined, flash, unread) end \
                 with their cause"
            )));
        }
        eprintln!("alarm #{id} cleared; its evidence stays in the database");
    }
    if status.line_down() {
        return Err(Failure {
            message: "the line is down: no relay path answers; see the relays above".into(),
            code: exit::NETWORK,
        });
    }
    if !status.alarms.is_empty() {
        return Err(Failure {
            message: format!("{} alarm(s) open", status.alarms.len()),
            code: exit::ALARM,
        });
    }
    Ok(())
}

/// Prints what a followed report brings, one line (with `--json`, one object) per event:
/// messages of other parties, deliveries and reads of this device's messages, alarms
/// raised, invitations joined or refused, relays going down or coming back.
/// A following device's round in the log: what moved (info), or nothing (debug).
/// One round of a receiving device in its log (and its events on stdout as JSON with
/// `json_output`): the follower's, and the console's background work.
pub(crate) fn log_report(
    report: &SyncReport,
    first: bool,
    json_output: bool,
    show_text: bool,
    relays_up: &mut std::collections::HashMap<String, bool>,
) {
    log_round(report, first);
    print_events(report, json_output, show_text, relays_up);
}

fn log_round(report: &SyncReport, first: bool) {
    let moved = report.pushed + report.received + report.reoffered > 0
        || !report.joined.is_empty()
        || !report.refused.is_empty();
    if moved || first {
        tracing::info!(
            pushed = report.pushed,
            received = report.received,
            reoffered = report.reoffered,
            link_tests = report.link_tests,
            "round"
        );
    } else {
        tracing::debug!(link_tests = report.link_tests, "round");
    }
    for refused in &report.refused {
        tracing::warn!("refused: {}", crate::inert::inert(refused));
    }
    for url in &report.rotated {
        tracing::warn!(relay = %url, "the relay's key rotated: followed its signed statements");
    }
}

/// The events of a following device's round: on stdout as JSON with `--json` (message
/// text included: scripts asked for it), and always in the log on stderr, one line
/// each (message text only with `--show-text`).
fn print_events(
    report: &SyncReport,
    json_output: bool,
    show_text: bool,
    relays_up: &mut std::collections::HashMap<String, bool>,
) {
    use hotline_client::line::LineEvent;
    let short = |id: &hotline_core::EnvelopeId| id.to_hex()[..12].to_owned();
    for event in &report.events {
        let (object, text) = match event {
            LineEvent::Message {
                channel,
                id,
                from,
                text,
                precedence,
                time_ms,
                deadline_ms,
            } => (
                json!({"event": "message", "channel": channel, "id": id.to_hex(), "from": from,
                       "text": text, "precedence": precedence.as_str(), "time_ms": time_ms,
                       "deadline_ms": deadline_ms}),
                if show_text {
                    format!(
                        "message {} in {channel} from {from}: {}{}",
                        short(id),
                        level_mark(*precedence),
                        crate::inert::inert(text)
                    )
                } else {
                    format!(
                        "message {} in {channel} from {from}: {}{} characters",
                        short(id),
                        level_mark(*precedence),
                        text.chars().count()
                    )
                },
            ),
            LineEvent::Escalated(escalation) => (
                json!({"event": "escalated", "channel": escalation.channel,
                       "message": escalation.message.to_hex(), "party": escalation.party,
                       "precedence": escalation.precedence.as_str(),
                       "statement": escalation.statement.to_hex(),
                       "delivered": escalation.delivered}),
                format!(
                    "ESCALATED {} in {}: {} has not read it by its deadline ({}); offered again, \
                     non-response statement {}",
                    short(&escalation.message),
                    escalation.channel,
                    escalation.party,
                    if escalation.delivered {
                        "delivered, not read"
                    } else {
                        "not delivered"
                    },
                    short(&escalation.statement)
                ),
            ),
            LineEvent::Delivered {
                channel,
                message,
                to,
            } => (
                json!({"event": "delivered", "channel": channel, "message": message.to_hex(), "to": to}),
                format!("delivered {} in {channel} to {to}", short(message)),
            ),
            LineEvent::Read {
                channel,
                message,
                by,
            } => (
                json!({"event": "read", "channel": channel, "message": message.to_hex(), "by": by}),
                format!("read {} in {channel} by {by}", short(message)),
            ),
        };
        emit_event(json_output, &object, &text, tracing::Level::INFO);
    }
    for (kind, relay, detail) in &report.alarms {
        emit_event(
            json_output,
            &json!({"event": "alarm", "kind": kind, "relay": relay, "detail": detail}),
            &format!("ALARM {kind} relay {relay}: {detail}"),
            tracing::Level::WARN,
        );
    }
    for name in &report.joined {
        emit_event(
            json_output,
            &json!({"event": "joined", "channel": name}),
            &format!("joined channel {name}"),
            tracing::Level::INFO,
        );
    }
    for (url, error) in &report.relays {
        let up = error.is_none();
        if relays_up.insert(url.clone(), up) == Some(up) {
            continue;
        }
        let text = match error {
            None => format!("relay {url}: up"),
            Some(error) => format!("relay {url}: down: {error}"),
        };
        emit_event(
            json_output,
            &json!({"event": "relay", "url": url, "state": if up { "up" } else { "down" }, "error": error}),
            &text,
            if up {
                tracing::Level::INFO
            } else {
                tracing::Level::WARN
            },
        );
    }
}

fn emit_event(json_output: bool, object: &serde_json::Value, text: &str, level: tracing::Level) {
    if json_output {
        out_json!(object);
    }
    // Inert: names and text from the other side never act on a terminal.
    let line = crate::inert::inert(text);
    if level == tracing::Level::WARN {
        tracing::warn!("{line}");
    } else {
        tracing::info!("{line}");
    }
}

/// Prints one sync report; a round where nothing happened prints only when `always`.
fn print_report(report: &SyncReport, json_output: bool, always: bool) {
    let quiet = report.pushed == 0
        && report.received == 0
        && report.reoffered == 0
        && report.joined.is_empty()
        && report.refused.is_empty()
        && report.relays.values().all(Option::is_none);
    if quiet && !always {
        return;
    }
    if json_output {
        let relays: Vec<_> = report
            .relays
            .iter()
            .map(|(url, error)| json!({"url": url, "ok": error.is_none(), "error": error}))
            .collect();
        out_json!(
            json!({"pushed": report.pushed, "received": report.received, "joined": report.joined,
                   "refused": report.refused, "reoffered": report.reoffered, "relays": relays})
        );
        return;
    }
    out!("pushed {}, received {}", report.pushed, report.received);
    for name in &report.joined {
        out!("joined channel {name}");
    }
    for (url, error) in &report.relays {
        match error {
            None if always => out!("relay {url}: ok"),
            None => {}
            Some(error) => out!("relay {url}: {error}"),
        }
    }
    for refused in &report.refused {
        eprintln!("refused: {refused}");
    }
}
