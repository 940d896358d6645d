//! `hotline channel`: channels created, joined, listed and changed.

use std::path::Path;
use std::time::Duration;

use hotline_client::Store;
use hotline_client::bundle;
use hotline_client::handoff::Handed;
use hotline_core::Precedence;
use serde_json::json;

use crate::exit;
use crate::input::{self};

use super::{Failure, Outcome, check_relay_address, failure, human_duration, parse_duration};

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

/// Hands what is queued to the channel's relays at once (up to 5 s). Returns how many
/// of the channel's relays answered, and the relays.
pub(crate) fn push_now(store: &mut Store, channel: &str) -> Result<(usize, Vec<String>), Failure> {
    let (relayed, relays, _) = push_now_by(store, channel)?;
    Ok((relayed, relays))
}

/// As [`push_now`], and says whether the follower running on this home pushed (over
/// the stream connections it holds) rather than this process (over the one-shot route).
pub(crate) fn push_now_by(
    store: &mut Store,
    channel: &str,
) -> Result<(usize, Vec<String>, bool), Failure> {
    let relays = store.channel_relays(&store.channel_id(channel)?)?;
    if relays.is_empty() {
        return Ok((0, relays, false));
    }
    // A follower that could not reach a relay, or is still at it: this process would
    // not do better.
    match hotline_client::handoff::hand_off(store.home().path(), Duration::from_secs(5)) {
        Handed::Pushed(pushed) => {
            let relayed = relays
                .iter()
                .filter(|url| pushed.get(*url).is_some_and(Option::is_none))
                .count();
            return Ok((relayed, relays, true));
        }
        Handed::Late => return Ok((0, relays, true)),
        Handed::NoFollower => {}
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
    Ok((relayed, relays, false))
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
