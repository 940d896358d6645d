//! `hotline agree`: agreed texts, proposed, signed or rejected by every party
//! (docs/crisis-protocol.md).

use std::path::{Path, PathBuf};

use hotline_client::Store;
use hotline_client::store::AgreementStatus;
use hotline_core::export::utc;
use serde_json::json;

use crate::commands::{Failure, Outcome, deadline_from_now, failure, push_now};
use crate::exit;
use crate::inert::{inert, inert_lines};
use crate::input;

pub fn propose(
    home: &Path,
    channel: &str,
    (language, text): (&str, &Path),
    others: &[String],
    deadline: Option<&str>,
    json_output: bool,
) -> Outcome {
    let mut files: Vec<(String, PathBuf)> = vec![(language.to_owned(), text.to_owned())];
    for other in others {
        let Some((code, file)) = other.split_once('=') else {
            return Err(Failure {
                message: format!("--lang {other:?}: use CODE=FILE, as in --lang fr=texte.txt"),
                code: exit::USAGE,
            });
        };
        files.push((code.to_owned(), PathBuf::from(file)));
    }
    let deadline_ms = deadline_from_now(deadline)?;
    let mut versions = Vec::with_capacity(files.len());
    for (code, file) in files {
        versions.push((code, input::message(None, Some(&file))?));
    }
    let mut store = Store::open(home)?;
    let id = store.propose_agreement(channel, versions, deadline_ms)?;
    hand_over(&mut store, channel, id, json_output)?;
    if !json_output {
        eprintln!("proposed and signed for your party; it is accepted once every party signs");
    }
    Ok(())
}

/// Hands what was just sealed to the channel's relays and prints its id (with `--json`,
/// the id and how many relays took it).
fn hand_over(
    store: &mut Store,
    channel: &str,
    id: hotline_core::EnvelopeId,
    json_output: bool,
) -> Outcome {
    let (relayed, relays) = push_now(store, channel)?;
    if json_output {
        out_json!(
            json!({"id": id.to_hex(), "channel": channel, "relayed": relayed, "relays": relays.len()})
        );
    } else {
        out!("{}", id.to_hex());
    }
    Ok(())
}

pub fn adopt_code_book(
    home: &Path,
    channel: &str,
    book: &Path,
    deadline: Option<&str>,
    json_output: bool,
) -> Outcome {
    let deadline_ms = deadline_from_now(deadline)?;
    let bytes = input::read_limited(book, input::MAX_MESSAGE_FILE, "a code book")?;
    let mut store = Store::open(home)?;
    let id = store.adopt_code_book(channel, &bytes, deadline_ms)?;
    hand_over(&mut store, channel, id, json_output)?;
    if !json_output {
        eprintln!(
            "proposed as the channel's code book and signed for your party; adopted once every \
             party signs it: hotline agree sign {channel} {}",
            &id.to_hex()[..12]
        );
    }
    Ok(())
}

pub fn list_code_book(home: &Path, channel: &str, json_output: bool) -> Outcome {
    let mut store = Store::open(home)?;
    let Some((hash, book)) = store.code_book(channel)? else {
        return Err(failure(format!(
            "channel {channel} has no code book: adopt one with hotline code adopt"
        )));
    };
    let language = hotline_client::store::preferred_language();
    if json_output {
        out_json!(json!({
            "catalogue": book.catalogue, "version": book.version, "sha256": hex::encode(hash),
            "entries": book.entries.iter().map(|entry| json!({
                "id": entry.id,
                "fields": entry.fields.iter().map(|f| json!({"name": f.name, "type": format!("{:?}", f.kind).to_lowercase(), "values": f.values})).collect::<Vec<_>>(),
                "text": entry.text,
            })).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    out!(
        "code book {} version {} (sha256 {})",
        inert(&book.catalogue),
        book.version,
        hex::encode(hash)
    );
    for entry in &book.entries {
        let text = language
            .as_deref()
            .and_then(|l| entry.text.get(l))
            .or_else(|| entry.text.values().next())
            .cloned()
            .unwrap_or_default();
        let fields: Vec<String> = entry
            .fields
            .iter()
            .map(|f| {
                format!(
                    "--field {}=<{}>",
                    f.name,
                    format!("{:?}", f.kind).to_lowercase()
                )
            })
            .collect();
        out!("  {:<12} {}", inert(&entry.id), inert(&text));
        if !fields.is_empty() {
            out!("  {:<12} {}", "", fields.join(" "));
        }
    }
    Ok(())
}

pub fn send_code(
    home: &Path,
    channel: &str,
    (code, fields): (&str, &[String]),
    precedence: hotline_core::Precedence,
    deadline: Option<&str>,
    json_output: bool,
) -> Outcome {
    let deadline_ms = deadline_from_now(deadline)?;
    let mut pairs = Vec::with_capacity(fields.len());
    for field in fields {
        let Some((name, value)) = field.split_once('=') else {
            return Err(Failure {
                message: format!("--field {field:?}: use NAME=VALUE"),
                code: exit::USAGE,
            });
        };
        pairs.push((name.to_owned(), value.to_owned()));
    }
    let mut store = Store::open(home)?;
    let id = store.send_code(channel, precedence, code, &pairs, deadline_ms)?;
    let (relayed, relays) = push_now(&mut store, channel)?;
    if json_output {
        out_json!(json!({"id": id.to_hex(), "channel": channel, "code": code,
                         "precedence": precedence.as_str(), "relayed": relayed, "relays": relays.len()}));
    } else {
        out!("{}", id.to_hex());
    }
    Ok(())
}

pub fn sign(home: &Path, channel: &str, id: &str) -> Outcome {
    let mut store = Store::open(home)?;
    let signed = store.sign_agreement(channel, id)?;
    push_now(&mut store, channel)?;
    out!("{}", signed.to_hex());
    let status = store.agreement(channel, id)?;
    eprintln!("signed; the agreed text is {}", status.state.as_str());
    Ok(())
}

pub fn reject(home: &Path, channel: &str, id: &str, reason: &str) -> Outcome {
    let mut store = Store::open(home)?;
    let rejected = store.reject_agreement(channel, id, reason)?;
    push_now(&mut store, channel)?;
    out!("{}", rejected.to_hex());
    Ok(())
}

pub fn list(home: &Path, channel: &str, json_output: bool) -> Outcome {
    let mut store = Store::open(home)?;
    for status in store.agreements(channel)? {
        if json_output {
            out_json!(status_json(&status));
        } else {
            let first = status
                .versions
                .first()
                .map(|(_, text)| text.lines().next().unwrap_or_default().to_owned())
                .unwrap_or_default();
            out!(
                "{} {:<9} proposed by {} {}  signed: {}; waiting for: {}  {}",
                &status.id.to_hex()[..12],
                status.state.as_str(),
                inert(&status.proposer),
                utc(status.time_ms),
                names(status.signed.iter().map(|s| s.party.as_str())),
                names(status.waiting_for.iter().map(String::as_str)),
                inert(&first.chars().take(60).collect::<String>())
            );
        }
    }
    Ok(())
}

pub fn show(home: &Path, channel: &str, id: &str, json_output: bool) -> Outcome {
    let mut store = Store::open(home)?;
    let status = store.agreement(channel, id)?;
    if json_output {
        out_json!(status_json(&status));
        return Ok(());
    }
    out!("agreed text {}", status.id.to_hex());
    out!("state       {}", status.state.as_str());
    out!(
        "proposed    by {} at {}",
        inert(&status.proposer),
        utc(status.time_ms)
    );
    if let Some(deadline) = status.deadline_ms {
        out!("deadline    {}", utc(deadline));
    }
    out!("digest      {}", hex::encode(status.digest));
    for signed in &status.signed {
        out!(
            "signed      by {}/{} at {}: {}",
            inert(&signed.party),
            inert(&signed.device),
            utc(signed.time_ms),
            hex::encode(signed.signature)
        );
    }
    for (party, reason) in &status.rejected {
        out!("rejected    by {}: {}", inert(party), inert(reason));
    }
    if !status.waiting_for.is_empty() {
        out!(
            "waiting for {}",
            names(status.waiting_for.iter().map(String::as_str))
        );
    }
    for (language, text) in &status.versions {
        out!("--- {} ---", inert(language));
        for line in inert_lines(text) {
            out!("{line}");
        }
    }
    Ok(())
}

fn names<'a>(parties: impl Iterator<Item = &'a str>) -> String {
    let list: Vec<String> = parties.map(inert).collect();
    if list.is_empty() {
        "-".to_owned()
    } else {
        list.join(",")
    }
}

fn status_json(status: &AgreementStatus) -> serde_json::Value {
    json!({
        "id": status.id.to_hex(),
        "state": status.state.as_str(),
        "proposer": status.proposer,
        "time_ms": status.time_ms,
        "deadline_ms": status.deadline_ms,
        "digest": hex::encode(status.digest),
        "versions": status.versions.iter()
            .map(|(language, text)| json!({"language": language, "text": text}))
            .collect::<Vec<_>>(),
        "signed": status.signed.iter().map(|signed| json!({
            "party": signed.party, "device": signed.device, "time_ms": signed.time_ms,
            "signature": hex::encode(signed.signature),
        })).collect::<Vec<_>>(),
        "rejected": status.rejected.iter()
            .map(|(party, reason)| json!({"party": party, "reason": reason}))
            .collect::<Vec<_>>(),
        "waiting_for": status.waiting_for,
    })
}
