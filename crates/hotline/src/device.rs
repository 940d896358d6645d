//! The commands that work on this device's store.

use std::io::Write;
use std::ops::ControlFlow;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hotline_client::bundle;
use hotline_client::store::{StoreError, relay_label};
use hotline_client::sync::SyncReport;
use hotline_client::{HomeError, Store};
use hotline_core::{Body, ChannelError, Fingerprint, Message, Precedence};
use serde_json::json;

use crate::exit;
use crate::inert::{inert, inert_lines};
use crate::input::{self, InputError};

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
        Failure {
            message: error.to_string(),
            code,
        }
    }
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

pub fn init(
    home: &Path,
    party: &str,
    device: &str,
    relays: &[String],
    json_output: bool,
) -> Outcome {
    for relay in relays {
        check_relay_address(relay)?;
    }
    let store = Store::init(home, party, device, relays)?;
    let info = store.identity().info();
    if json_output {
        out_json!(
            json!({"party": info.party, "device": info.device, "fingerprint": info.fingerprint().to_string(), "home": home})
        );
    } else {
        out!(
            "Created device {}/{} in {}",
            info.party,
            info.device,
            home.display()
        );
        out!("fingerprint  {}", info.fingerprint());
        out!(
            "Read this fingerprint to the other parties over a trusted line; they need it to import your card."
        );
    }
    Ok(())
}

pub fn id(home: &Path, json_output: bool) -> Outcome {
    let store = Store::open(home)?;
    let info = store.identity().info();
    if json_output {
        out_json!(
            json!({"party": info.party, "device": info.device, "fingerprint": info.fingerprint().to_string(), "key": info.key.to_string()})
        );
    } else {
        out!(
            "party        {}\ndevice       {}\nfingerprint  {}",
            info.party,
            info.device,
            info.fingerprint()
        );
    }
    Ok(())
}

pub fn card_export(
    home: &Path,
    out: Option<&Path>,
    force: bool,
    armored: bool,
    json_output: bool,
) -> Outcome {
    let store = Store::open(home)?;
    let card = store.card()?;
    let card = if armored {
        hotline_core::card::armor(&card)
            .map_err(|e| failure(format!("this device's card: {e}")))?
            .into_bytes()
    } else {
        card
    };
    match out {
        Some(path) => {
            write_file(path, &card, "card", force)?;
            if json_output {
                out_json!(
                    json!({"file": path.display().to_string(), "bytes": card.len(),
                           "armored": armored,
                           "fingerprint": store.identity().fingerprint().to_string()})
                );
            }
        }
        None => std::io::stdout()
            .write_all(&card)
            .map_err(|e| failure(format!("cannot write the card: {e}")))?,
    }
    Ok(())
}

/// A card file's card: binary, or armoured text.
fn read_card(file: &Path) -> Result<Vec<u8>, Failure> {
    let bytes = input::read_limited(file, input::MAX_CARD_FILE, "a contact card")?;
    hotline_core::card::dearmor(&bytes)
        .map_err(|e| failure(format!("{} is not a contact card: {e}", file.display())))
}

/// `card show`: what a card claims, untrusted.
pub fn card_show(file: &Path, json_output: bool) -> Outcome {
    let card = read_card(file)?;
    let claimed = hotline_core::card::CardIn::decode(&card)
        .map_err(|e| failure(format!("{} is not a contact card: {e}", file.display())))?;
    let info = claimed.claimed();
    if json_output {
        out_json!(json!({"party": info.party, "device": info.device,
                         "fingerprint": info.fingerprint().to_string(),
                         "relays": claimed.relays(),
                         "inbox_capability": claimed.inbox_capability().is_some(),
                         "verified": false}));
    } else {
        out!("party       {}", info.party);
        out!("device      {}", info.device);
        out!("fingerprint {}", info.fingerprint());
        for relay in claimed.relays() {
            out!("relay       {relay}");
        }
        if claimed.inbox_capability().is_none() {
            out!("(an old card: ask for a new one, or invitations cannot reach its inbox)");
        }
        eprintln!(
            "claimed, not verified: import it with the fingerprint its owner reads to you \
             (hotline card import FILE --fingerprint '...')"
        );
    }
    Ok(())
}

pub fn card_import(home: &Path, file: &Path, fingerprint: &str, json_output: bool) -> Outcome {
    let fingerprint = Fingerprint::parse(fingerprint).map_err(|e| Failure {
        message: format!("{e}; type the 30 digits the card's owner read to you"),
        code: exit::USAGE,
    })?;
    let card = read_card(file)?;
    let mut store = Store::open(home)?;
    let info = store.import_card(&card, &fingerprint)?;
    if json_output {
        out_json!(
            json!({"party": info.party, "device": info.device, "fingerprint": info.fingerprint().to_string(), "verified": true})
        );
    } else {
        out!(
            "Imported and verified {}/{} ({})",
            info.party,
            info.device,
            info.fingerprint()
        );
    }
    Ok(())
}

/// Checks relay arguments (`URL` or `NAME=URL`), names the named ones on this device,
/// and returns the addresses.
fn named_relays(store: &mut Store, arguments: &[String]) -> Result<Vec<String>, Failure> {
    let mut urls = Vec::with_capacity(arguments.len());
    for argument in arguments {
        let (name, url) = match argument.split_once('=') {
            Some((name, url)) if !name.starts_with("https:") => (Some(name), url),
            _ => (None, argument.as_str()),
        };
        check_relay_address(url)?;
        if let Some(name) = name {
            store.name_relay(url, name)?;
        }
        urls.push(url.to_owned());
    }
    Ok(urls)
}

pub fn channel_create(
    home: &Path,
    name: &str,
    with: &[String],
    relays: &[String],
    json_output: bool,
) -> Outcome {
    let mut store = Store::open(home)?;
    let relays = named_relays(&mut store, relays)?;
    let relays = &relays;
    // A fresh one-time key package of each invitee from its relays, if they have one
    // (the card's serve otherwise).
    let claimed = if relays.is_empty() {
        Default::default()
    } else {
        hotline_relay::tls::install_provider();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| failure(format!("cannot start: {e}")))?
            .block_on(hotline_client::sync::claim_key_packages(&mut store, with))?
    };
    let id = store.create_channel_with(name, with, relays, &claimed)?;
    // The commit takes effect (and the invitation goes out) once a relay holds it.
    let (relayed, _) = push_now(&mut store, name)?;
    if json_output {
        out_json!(
            json!({"channel": name, "id": id.to_string(), "invited": with, "relayed": relayed})
        );
    } else {
        out!("Created channel {name} ({id}) with {}.", with.join(", "));
        if relays.is_empty() {
            out!(
                "The invitation is in the outbox: hotline bundle export --out FILE, and hand the file over."
            );
        } else if relayed > 0 {
            out!("The invitation is on the invitees' relays; they join with hotline sync.");
        } else {
            out!(
                "No relay reachable now: the invitation waits in the outbox; hotline sync delivers it."
            );
        }
    }
    Ok(())
}

pub fn channel_join(home: &Path, file: &Path, json_output: bool) -> Outcome {
    let entries = bundle::decode(&input::read_limited(
        file,
        input::MAX_INVITATION_FILE,
        "an invitation",
    )?)
    .map_err(|e| failure(format!("{} is not a hotline bundle: {e}", file.display())))?;
    let mut store = Store::open(home)?;
    let _lock = store.home().lock_receiving()?;
    let before = store.channels()?.len();
    store.import_bundle(entries)?;
    let channels = store.channels()?;
    if channels.len() == before {
        return Err(failure(format!(
            "{} holds no invitation for this device ({}); ask the channel's committer to invite this device's card",
            file.display(),
            store.identity().fingerprint()
        )));
    }
    for channel in channels {
        if json_output {
            let parties: Vec<_> = channel.members.iter().map(|m| m.party.clone()).collect();
            out_json!(
                json!({"channel": channel.name, "members": channel.members.len(),
                             "parties": parties})
            );
        } else {
            out!(
                "Member of {} ({} members)",
                channel.name,
                channel.members.len()
            );
        }
    }
    Ok(())
}

pub fn channel_list(home: &Path, json_output: bool) -> Outcome {
    let mut store = Store::open(home)?;
    for channel in store.channels()? {
        let parties: Vec<_> = channel.members.iter().map(|m| m.party.clone()).collect();
        let mut not_joined: Vec<String> =
            channel.not_joined.iter().map(|i| i.party.clone()).collect();
        not_joined.dedup();
        if json_output {
            // The transcript's root: equal on every member's device once they hold the
            // same envelopes (compare it over the out-of-band line).
            let (root, _) = store.transcript_root(&channel.name)?;
            out_json!(
                json!({"name": channel.name, "id": channel.id.to_string(), "parties": parties,
                       "epoch": channel.epoch, "envelopes": channel.envelopes, "committer": channel.committer,
                       "root": hex::encode(root), "settled": channel.settled, "not_joined": not_joined,
                       "settled_root": hex::encode(channel.settled_root)})
            );
        } else {
            out!(
                "{:<20} {} envelopes, parties: {}{}{}",
                channel.name,
                channel.envelopes,
                parties.join(", "),
                if channel.committer {
                    " (you commit)"
                } else {
                    ""
                },
                if not_joined.is_empty() {
                    String::new()
                } else {
                    format!("; invited, not joined: {}", not_joined.join(", "))
                }
            );
        }
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

/// Hands what is queued to the channel's relays at once (up to 5 s). Returns how many
/// of the channel's relays answered, and the relays.
pub(crate) fn push_now(store: &mut Store, channel: &str) -> Result<(usize, Vec<String>), Failure> {
    let relays = store.channel_relays(&store.channel_id(channel)?)?;
    if relays.is_empty() {
        return Ok((0, relays));
    }
    hotline_relay::tls::install_provider();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failure(format!("cannot start: {e}")))?;
    let pushed = runtime.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(5),
            hotline_client::sync::push_once(store),
        )
        .await
    });
    let relayed = match pushed {
        Ok(report) => {
            let report = report?;
            relays
                .iter()
                .filter(|url| report.relays.get(*url).is_some_and(Option::is_none))
                .count()
        }
        Err(_) => 0,
    };
    Ok((relayed, relays))
}

/// Says where a membership change stands after `push_now`.
fn report_change(what: &str, relayed: usize, relays: usize) {
    if relays == 0 {
        eprintln!("{what}: done; hand the bundle over with hotline bundle export");
    } else if relayed > 0 {
        eprintln!("{what}: accepted by {relayed} of {relays} relays, in effect");
    } else {
        eprintln!(
            "{what}: queued, takes effect once a relay accepts it (no relay reachable now; hotline sync retries)"
        );
    }
}

pub fn channel_remove(home: &Path, channel: &str, party: &str, json_output: bool) -> Outcome {
    let mut store = Store::open(home)?;
    let removed = store.remove_party(channel, party)?;
    let (relayed, relays) = push_now(&mut store, channel)?;
    if json_output {
        out_json!(
            json!({"channel": channel, "removed": party, "devices": removed.len(),
                   "relayed": relayed, "relays": relays.len()})
        );
    } else {
        out!(
            "Removed {party} ({} devices) from {channel}.",
            removed.len()
        );
    }
    report_change("the removal", relayed, relays.len());
    Ok(())
}

pub fn channel_relays(home: &Path, channel: &str, relays: &[String], json_output: bool) -> Outcome {
    let mut store = Store::open(home)?;
    let relays = named_relays(&mut store, relays)?;
    let relays = &relays;
    store.change_relays(channel, relays)?;
    let (relayed, _) = push_now(&mut store, channel)?;
    if json_output {
        out_json!(json!({"channel": channel, "relays": relays, "relayed": relayed}));
    } else {
        out!(
            "{channel} now runs on {} relay(s); every member follows when the change reaches it.",
            relays.len()
        );
    }
    report_change("the relay change", relayed, relays.len());
    Ok(())
}

pub fn channel_rekey(home: &Path, channel: &str, json_output: bool) -> Outcome {
    let mut store = Store::open(home)?;
    let committed = store.update_keys(channel)?;
    let (relayed, relays) = push_now(&mut store, channel)?;
    let how = if committed { "commit" } else { "proposal" };
    if json_output {
        out_json!(
            json!({"channel": channel, "update": how, "relayed": relayed, "relays": relays.len()})
        );
    } else if committed {
        out!("New keys for this device in {channel}.");
    } else {
        out!(
            "New keys proposed in {channel}; the channel's committer commits them on its next sync."
        );
    }
    report_change("the key update", relayed, relays.len());
    Ok(())
}

pub fn send(
    home: &Path,
    channel: &str,
    message: Message,
    deadline: Option<&str>,
    json_output: bool,
) -> Outcome {
    let deadline_ms = deadline_from_now(deadline)?;
    if message.text.is_empty() {
        return Err(failure("refusing to send an empty message"));
    }
    let precedence = message.precedence;
    let mut store = Store::open(home)?;
    let body = Body::Message(message);
    let id = match store.send(channel, body.clone(), deadline_ms) {
        // Restored from a backup: read the relays first, once.
        Err(StoreError::Channel(ChannelError::CatchingUp)) => {
            crate::backup::catch_up(&mut store, channel)?;
            store.send(channel, body, deadline_ms)?
        }
        sent => sent?,
    };
    // The message is durable now; try to hand it to the relays at once, briefly.
    let (relayed, relays) = push_now(&mut store, channel)?;
    if json_output {
        out_json!(
            json!({"id": id.to_hex(), "channel": channel, "precedence": precedence.as_str(),
                   "relayed": relayed, "relays": relays.len()})
        );
    } else {
        out!("{}", id.to_hex());
        if relayed > 0 {
            eprintln!("stored; relayed by {relayed} of {} relays", relays.len());
        } else if relays.is_empty() {
            eprintln!("stored; the channel has no relay: hand it over with hotline bundle export");
        } else {
            eprintln!("stored and queued: no relay reachable now; hotline sync retries");
        }
    }
    Ok(())
}

/// The other parties' unread messages, most urgent first.
pub fn unread(home: &Path, channel: &str, json_output: bool) -> Outcome {
    let mut store = Store::open(home)?;
    print_log(&store.unread(channel, usize::MAX)?, json_output);
    Ok(())
}

pub fn log(
    home: &Path,
    channel: &str,
    link_tests: bool,
    last: Option<usize>,
    json_output: bool,
) -> Outcome {
    let mut store = Store::open(home)?;
    print_log(&store.log_last(channel, link_tests, last)?, json_output);
    Ok(())
}

fn print_log(entries: &[hotline_client::LogEntry], json_output: bool) {
    for entry in entries {
        if json_output {
            out_json!(
                json!({"id": entry.id.to_hex(), "from": entry.from, "time_ms": entry.time_ms, "text": entry.text,
                       "precedence": entry.precedence.as_str(), "deadline_ms": entry.deadline_ms,
                       "delivered_to": entry.delivered_to, "read_by": entry.read_by})
            );
        } else {
            let others = |set: &std::collections::BTreeSet<String>| {
                if set.is_empty() {
                    "-".to_owned()
                } else {
                    set.iter().cloned().collect::<Vec<_>>().join(",")
                }
            };
            // The other side's words, inert: no escape sequence or forged line. Every
            // line of a message shows, the later ones indented under it (a line of the
            // log begins with an id; a message's own lines never do).
            out!(
                "{} {:<10} {}  [delivered: {}; read: {}] {}{}",
                &entry.id.to_hex()[..12],
                inert(&entry.from),
                format_time(entry.time_ms),
                others(&entry.delivered_to),
                others(&entry.read_by),
                level_mark(entry.precedence),
                inert_lines(&entry.text).join("\n             ")
            );
        }
    }
}

/// How a message's precedence shows before its text: nothing for routine.
pub fn level_mark(precedence: Precedence) -> String {
    match precedence {
        Precedence::Routine => String::new(),
        level => format!("{} ", level.as_str().to_uppercase()),
    }
}

pub(crate) fn format_time(ms: u64) -> String {
    let seconds = ms / 1000;
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
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

/// Shows the channel's handling times, or (committer) sets those given.
pub fn handling_times(
    home: &Path,
    channel: &str,
    given: [Option<String>; 4],
    json_output: bool,
) -> Outcome {
    let mut store = Store::open(home)?;
    let mut times = store.handling_times(channel)?;
    let mut changed = false;
    for (slot, text) in times.iter_mut().zip(&given) {
        if let Some(text) = text {
            *slot = parse_duration(text).ok_or_else(|| Failure {
                message: format!(
                    "invalid duration {text:?}: use a number and s, m, h or d, as in 10m"
                ),
                code: exit::USAGE,
            })?;
            changed = true;
        }
    }
    if changed {
        store.set_handling_times(channel, times)?;
        let (relayed, relays) = push_now(&mut store, channel)?;
        report_change("the handling times", relayed, relays.len());
    }
    if json_output {
        let object: serde_json::Map<String, serde_json::Value> = Precedence::ALL
            .iter()
            .zip(times)
            .map(|(level, ms)| (format!("{}_ms", level.as_str()), json!(ms)))
            .collect();
        out_json!(serde_json::Value::Object(object));
    } else {
        for (level, ms) in Precedence::ALL.iter().zip(times) {
            out!("{:<10} read within {}", level.as_str(), human_duration(ms));
        }
    }
    Ok(())
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

pub fn cosign(home: &Path, channel: &str, json_output: bool) -> Outcome {
    let mut store = Store::open(home)?;
    let sealed = store.cosign(channel)?;
    if sealed.is_some() {
        push_now(&mut store, channel)?;
    }
    match (&sealed, json_output) {
        (Some((id, cosignature)), true) => out_json!(json!({
            "cosignature": id.to_hex(), "horizon": cosignature.horizon,
            "size": cosignature.size, "root": hex::encode(cosignature.root)})),
        (None, true) => out_json!(json!({"cosignature": null})),
        (Some((id, cosignature)), false) => {
            out!("{}", id.to_hex());
            eprintln!(
                "cosigned the root {} of the first {} settled envelopes from epoch {}; \
                 the others cosign it when it is theirs too",
                hex::encode(cosignature.root),
                cosignature.size,
                cosignature.horizon
            );
        }
        (None, false) => eprintln!("nothing new to cosign: this settled root is cosigned already"),
    }
    Ok(())
}

/// Marks `message` read, or with `None` the most urgent unread message.
pub fn ack(home: &Path, channel: &str, message: Option<&str>, json_output: bool) -> Outcome {
    let mut store = Store::open(home)?;
    let (read, receipt) = match message {
        Some(message) => (None, store.ack(channel, message)?),
        None => {
            let Some((read, receipt)) = store.ack_next(channel)? else {
                if json_output {
                    out_json!(json!({"channel": channel, "read": null, "receipt": null}));
                } else {
                    eprintln!("nothing unread in {channel}");
                }
                return Ok(());
            };
            if !json_output {
                eprintln!("marked {} read", read.to_hex());
            }
            (Some(read), receipt)
        }
    };
    // Durable now; handed to the relays at once, like a message.
    let (relayed, relays) = push_now(&mut store, channel)?;
    if json_output {
        out_json!(
            json!({"channel": channel, "read": read.map(|id| id.to_hex()),
                         "receipt": receipt.to_hex(), "relayed": relayed,
                         "relays": relays.len()})
        );
        return Ok(());
    }
    out!("{}", receipt.to_hex());
    if relays.is_empty() {
        eprintln!("stored; the channel has no relay: hand it over with hotline bundle export");
    } else if relayed == 0 {
        eprintln!("stored and queued: no relay reachable now; hotline sync retries");
    }
    Ok(())
}

pub fn export(home: &Path, channel: &str, out: &Path, force: bool, json_output: bool) -> Outcome {
    let mut store = Store::open(home)?;
    // Streamed into a private file beside the target (0600: it holds the plaintext of
    // every message), synced, then renamed: a crash never leaves half an export.
    let cannot = |e: std::io::Error| failure(format!("cannot write export {}: {e}", out.display()));
    let (file, temporary) = create_private(out, "export", force)?;
    let mut writer = std::io::BufWriter::with_capacity(1 << 16, file);
    let written = store.export_to(channel, &mut writer);
    let finished = written.map_err(Failure::from).and_then(|()| {
        let file = writer.into_inner().map_err(|e| cannot(e.into_error()))?;
        file.sync_all().map_err(cannot)?;
        std::fs::rename(&temporary, out).map_err(cannot)?;
        Ok(file.metadata().map(|m| m.len()).unwrap_or(0))
    });
    let bytes = match finished {
        Ok(bytes) => bytes,
        Err(error) => {
            let _ = std::fs::remove_file(&temporary);
            return Err(error);
        }
    };
    if json_output {
        out_json!(json!({"channel": channel, "file": out.display().to_string(), "bytes": bytes}));
    } else {
        eprintln!(
            "wrote {bytes} bytes; check it anywhere with: hotline verify {}",
            out.display()
        );
    }
    Ok(())
}

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
        let following = hotline_client::sync::follow(&mut store, &config, |report| {
            log_round(report, first);
            print_events(report, json_output, logging.show_text, &mut relays_up);
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

pub fn bundle_export(home: &Path, out: &Path, force: bool, json_output: bool) -> Outcome {
    let mut store = Store::open(home)?;
    let entries = store.export_outbox()?;
    write_file(out, &bundle::encode(&entries), "bundle", force)?;
    if json_output {
        out_json!(json!({"messages": entries.len(), "out": out}));
    } else {
        out!("{} messages written to {}", entries.len(), out.display());
    }
    Ok(())
}

pub fn bundle_import(home: &Path, file: &Path, json_output: bool) -> Outcome {
    let entries = bundle::decode(&input::read_limited(
        file,
        input::MAX_BUNDLE_FILE,
        "a bundle",
    )?)
    .map_err(|e| failure(format!("{} is not a hotline bundle: {e}", file.display())))?;
    let total = entries.len();
    let mut store = Store::open(home)?;
    let _lock = store.home().lock_receiving()?;
    let new = store.import_bundle(entries)?;
    if json_output {
        out_json!(json!({"messages": total, "new": new}));
    } else {
        out!("{new} new of {total} messages");
    }
    Ok(())
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
