//! `hotline init` and `hotline id`: this device's identity.

use std::path::Path;

use hotline_client::Store;
use serde_json::json;

use super::{Outcome, check_relay_address};

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
