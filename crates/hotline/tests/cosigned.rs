//! Cosigned roots with real processes over a relay: the three parties' devices end up
//! cosigning the same settled root, an export proves it offline (as a C2SP signed
//! note), and a device that cosigns another root is alarmed by the others.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

mod common;

use common::{Relay, data_dir, field, ok, three_parties_in_crisis};
use hotline_client::Store;
use hotline_core::{Body, Cosignature, DeviceIdentity};

fn sync_all(homes: &[std::path::PathBuf]) {
    for home in homes {
        ok(home, &["sync"]);
    }
}

fn status(home: &Path) -> serde_json::Value {
    let (_, out) = common::cli(home, &["status", "--json"]);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn every_party_cosigns_the_same_root_and_another_root_is_alarmed() {
    let dir = data_dir("cosigned");
    let relay = Relay::start(&dir.join("relay"));
    let homes = three_parties_in_crisis(&dir, &relay.url);
    let (north, south) = (&homes[0], &homes[1]);
    sync_all(&homes);
    for (home, text) in homes.iter().zip(["one", "two", "three"]) {
        ok(home, &["send", "crisis", text]);
        sync_all(&homes);
    }
    sync_all(&homes);

    // Each device cosigned its settled root at its first sync; north now cosigns its
    // newest, at the horizon the others joined at; they cosign the same root as they
    // sync.
    let cosigned = ok(north, &["cosign", "crisis", "--json"]);
    let size = field(&cosigned, "size").as_u64().unwrap();
    let root = field(&cosigned, "root").as_str().unwrap().to_owned();
    assert_eq!(field(&cosigned, "horizon"), 1, "{cosigned}");
    for _ in 0..3 {
        sync_all(&homes);
    }

    let export = dir.join("crisis.hotline");
    ok(
        north,
        &["export", "crisis", "--out", export.to_str().unwrap()],
    );
    let verified = ok(north, &["verify", export.to_str().unwrap(), "--json"]);
    let roots = field(&verified, "cosigned");
    let everyone: Vec<&serde_json::Value> = roots
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["every_party"] == true)
        .collect();
    assert!(
        !everyone.is_empty(),
        "no root cosigned by every party: {verified}"
    );
    for entry in &everyone {
        assert_eq!(entry["matches"], true, "{entry}");
        assert_eq!(entry["by"].as_array().unwrap().len(), 3);
        let note = entry["note"].as_str().unwrap();
        assert!(note.starts_with("hotline/"), "{note}");
        assert_eq!(
            note.lines().filter(|line| line.starts_with("— ")).count(),
            3,
            "{note}"
        );
    }
    assert!(
        everyone
            .iter()
            .any(|entry| entry["size"] == size && entry["root"] == root.as_str()),
        "north's root is cosigned by every party: {verified}"
    );
    assert_eq!(field(&verified, "cosignatures_invalid"), 0);

    // South's device cosigns another root of the same size: north and the mediator
    // see that it is not theirs, and raise an alarm naming south.
    {
        let mut store = Store::open(south).unwrap();
        let identity =
            DeviceIdentity::from_secret_bytes(&store.identity().to_secret_bytes()).unwrap();
        let channel = store.channel_id("crisis").unwrap();
        let other = Cosignature::sign(&identity, &channel, 1, size, [7; 32]);
        store
            .send("crisis", Body::Cosignature(other), None)
            .unwrap();
    }
    sync_all(&homes);
    sync_all(&homes);
    for home in [&homes[0], &homes[2]] {
        let status = status(home);
        let alarm = status["alarms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|alarm| alarm["kind"] == "cosigned-root")
            .unwrap_or_else(|| panic!("no cosigned-root alarm: {status}"));
        assert_eq!(alarm["party"], "south");
    }
    // And the export says so: that root is not this record's.
    let export = dir.join("crisis-2.hotline");
    ok(
        north,
        &["export", "crisis", "--out", export.to_str().unwrap()],
    );
    let verified = ok(north, &["verify", export.to_str().unwrap(), "--json"]);
    let forged = field(&verified, "cosigned")
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["root"] == hex::encode([7u8; 32]).as_str())
        .cloned()
        .expect("south's other root in the export");
    assert_eq!(forged["matches"], false);
    assert_eq!(forged["every_party"], false);
    relay.stop();
}
