//! Agreed texts with real processes over a relay: a text in two languages is accepted
//! only once every party's device signed its exact bytes, an export proves it offline,
//! and a rejection ends a proposal for good.

use std::path::Path;

mod common;

use common::{Relay, cli, data_dir, field, ok, verified_homes};

fn agreement(home: &Path, id: &str) -> serde_json::Value {
    serde_json::from_str(&ok(home, &["agree", "show", "crisis", id, "--json"])).unwrap()
}

#[test]
fn an_agreed_text_is_accepted_only_with_every_partys_signature_and_an_export_proves_it() {
    let dir = data_dir("agreements");
    let relay = Relay::start(&dir.join("relay"));
    let parties = ["north", "south", "mediator"];
    let homes = verified_homes(&dir, &parties, &relay.url);
    let (north, south, mediator) = (&homes[0], &homes[1], &homes[2]);
    ok(
        north,
        &[
            "channel", "create", "crisis", "--with", "south", "--with", "mediator", "--relay",
            &relay.url,
        ],
    );
    ok(south, &["sync"]);
    ok(mediator, &["sync"]);

    let english = dir.join("en.txt");
    let french = dir.join("fr.txt");
    std::fs::write(
        &english,
        "The ceasefire holds until 18 May 2026, 24:00 UTC.\n",
    )
    .unwrap();
    std::fs::write(
        &french,
        "Le cessez-le-feu tient jusqu'au 18 mai 2026, 24 h UTC.\n",
    )
    .unwrap();
    let proposed = ok(
        north,
        &[
            "agree",
            "propose",
            "crisis",
            "--text",
            english.to_str().unwrap(),
            "--lang",
            &format!("fr={}", french.display()),
            "--deadline",
            "1d",
            "--json",
        ],
    );
    let id = field(&proposed, "id").as_str().unwrap().to_owned();
    let open = agreement(north, &id[..10]);
    assert_eq!(open["state"], "open");
    assert_eq!(
        open["waiting_for"],
        serde_json::json!(["mediator", "south"])
    );
    assert_eq!(open["versions"][1]["language"], "fr");

    // South sees the same two versions and the same digest, and signs.
    ok(south, &["sync"]);
    let at_south = agreement(south, &id);
    assert_eq!(at_south["digest"], open["digest"]);
    assert_eq!(at_south["versions"], open["versions"]);
    ok(south, &["agree", "sign", "crisis", &id]);
    // Signing twice is refused, and changes nothing.
    assert_eq!(cli(south, &["agree", "sign", "crisis", &id]).0, 1);
    ok(north, &["sync"]);
    let two = agreement(north, &id);
    assert_eq!(two["state"], "open", "two of three parties signed: {two}");
    assert_eq!(two["waiting_for"], serde_json::json!(["mediator"]));

    // The mediator signs: accepted, on every device.
    ok(mediator, &["sync"]);
    ok(mediator, &["agree", "sign", "crisis", &id]);
    for home in [north, south] {
        ok(home, &["sync"]);
        let accepted = agreement(home, &id);
        assert_eq!(accepted["state"], "accepted", "{accepted}");
        assert_eq!(accepted["signed"].as_array().unwrap().len(), 3);
    }
    assert!(ok(north, &["agree", "list", "crisis"]).contains("accepted"));

    // A second text, rejected by south: rejected for good.
    let second = dir.join("second.txt");
    std::fs::write(&second, "The ceasefire ends on 18 May.\n").unwrap();
    let proposed = ok(
        north,
        &[
            "agree",
            "propose",
            "crisis",
            "--text",
            second.to_str().unwrap(),
            "--json",
        ],
    );
    let rejected = field(&proposed, "id").as_str().unwrap().to_owned();
    ok(south, &["sync"]);
    ok(
        south,
        &[
            "agree",
            "reject",
            "crisis",
            &rejected,
            "--reason",
            "no end date was agreed",
        ],
    );
    ok(mediator, &["sync"]);
    let (code, _) = cli(mediator, &["agree", "sign", "crisis", &rejected]);
    assert_eq!(code, 1, "signing a rejected text is refused");
    ok(north, &["sync"]);
    let state = agreement(north, &rejected);
    assert_eq!(state["state"], "rejected");
    assert_eq!(state["rejected"][0]["reason"], "no end date was agreed");

    // Offline: the export proves the first text accepted, with three signatures, and
    // the second not.
    let export = dir.join("crisis.hotline");
    ok(
        north,
        &["export", "crisis", "--out", export.to_str().unwrap()],
    );
    let verified = ok(north, &["verify", export.to_str().unwrap(), "--json"]);
    let texts = field(&verified, "agreements");
    let texts = texts.as_array().unwrap();
    assert_eq!(texts.len(), 2, "{verified}");
    let first = texts.iter().find(|t| t["id"] == id.as_str()).unwrap();
    assert_eq!(first["accepted"], true);
    assert_eq!(first["signed"].as_array().unwrap().len(), 3);
    assert_eq!(first["invalid_signatures"], 0);
    assert_eq!(first["languages"], serde_json::json!(["en", "fr"]));
    let other = texts.iter().find(|t| t["id"] == rejected.as_str()).unwrap();
    assert_eq!(other["accepted"], false);
    assert_eq!(other["rejected"][0]["by"]["party"], "south");
    let text = ok(north, &["verify", export.to_str().unwrap(), "--show"]);
    assert!(
        text.contains("ACCEPTED, every party signed its exact bytes"),
        "{text}"
    );
    // Three signatures of the first text, north's of the second.
    let holding = text
        .lines()
        .filter(|line| line.contains("signed agreed text") && line.contains("the signature holds"))
        .count();
    assert_eq!(holding, 4, "{text}");
    assert!(text.contains("[fr] Le cessez-le-feu"), "{text}");

    // Changing one letter of the French version fails verification (exit 5).
    let mut bytes = std::fs::read(&export).unwrap();
    let at = bytes
        .windows(8)
        .position(|w| w == b"cessez-l")
        .expect("the French version in the export");
    bytes[at] = b'C';
    let altered = dir.join("altered.hotline");
    std::fs::write(&altered, &bytes).unwrap();
    assert_eq!(cli(north, &["verify", altered.to_str().unwrap()]).0, 5);
    relay.stop();
}
