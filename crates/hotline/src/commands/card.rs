//! `hotline card`: contact cards out, looked at, and in with the fingerprint read out of band.

use std::io::Write;
use std::path::Path;

use hotline_client::Store;
use hotline_core::Fingerprint;
use serde_json::json;

use crate::exit;
use crate::input::{self};

use super::{Failure, Outcome, failure, write_file};

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
