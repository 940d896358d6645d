//! `hotline send`, `log`, `ack` and `cosign`: messages in and out of a channel.

use std::path::Path;

use hotline_client::Store;
use hotline_client::store::StoreError;
use hotline_core::{Body, ChannelError, Message};
use serde_json::json;

use crate::inert::{inert, inert_lines};

use super::channel::{push_now, push_now_by};
use super::{Outcome, deadline_from_now, failure, format_time, level_mark};

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
            crate::commands::backup::catch_up(&mut store, channel)?;
            store.send(channel, body, deadline_ms)?
        }
        sent => sent?,
    };
    // The message is durable now; try to hand it to the relays at once, briefly.
    let (relayed, relays, by_follower) = push_now_by(&mut store, channel)?;
    if json_output {
        out_json!(
            json!({"id": id.to_hex(), "channel": channel, "precedence": precedence.as_str(),
                   "relayed": relayed, "relays": relays.len(), "by_follower": by_follower})
        );
    } else {
        out!("{}", id.to_hex());
        if relayed > 0 {
            let by = if by_follower {
                " (handed to the follower running on this home)"
            } else {
                ""
            };
            eprintln!(
                "stored; relayed by {relayed} of {} relays{by}",
                relays.len()
            );
        } else if relays.is_empty() {
            eprintln!("stored; the channel has no relay: hand it over with hotline bundle export");
        } else if by_follower {
            eprintln!(
                "stored and queued: no relay reachable now; the follower running on this home retries"
            );
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
