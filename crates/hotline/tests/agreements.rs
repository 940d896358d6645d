//! Agreed texts with real processes over a relay: a text in two languages is accepted
//! only once every party's device signed its exact bytes, an export proves it offline,
//! and a rejection ends a proposal for good.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

mod common;

use common::{Relay, cli, data_dir, field, ok, three_parties_in_crisis};

fn agreement(home: &Path, id: &str) -> serde_json::Value {
    serde_json::from_str(&ok(home, &["agree", "show", "crisis", id, "--json"])).unwrap()
}

#[test]
fn an_agreed_text_is_accepted_only_with_every_partys_signature_and_an_export_proves_it() {
    let dir = data_dir("agreements");
    let relay = Relay::start(&dir.join("relay"));
    let homes = three_parties_in_crisis(&dir, &relay.url);
    let (north, south, mediator) = (&homes[0], &homes[1], &homes[2]);

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

/// `hotline log` in `home` with `HOTLINE_LANGUAGE=language`.
fn log_in(home: &Path, language: &str) -> String {
    let output = std::process::Command::new(assert_cmd::cargo::cargo_bin("hotline"))
        .env("HOTLINE_HOME", home)
        .env("HOTLINE_LANGUAGE", language)
        .args(["log", "crisis"])
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap()
}

/// A code book adopted by three parties (every party signs it as an agreed text):
/// before that, coded messages are refused; after, an entry sent with its fields is
/// read by each party in its own language, a code or a field that does not match the
/// book is refused, and the export shows the entry and the book's hash.
#[test]
fn a_code_book_adopted_by_every_party_renders_in_each_language_and_refuses_the_rest() {
    let dir = data_dir("code-book");
    let relay = Relay::start(&dir.join("relay"));
    let homes = three_parties_in_crisis(&dir, &relay.url);
    let (north, south, mediator) = (&homes[0], &homes[1], &homes[2]);

    let book = dir.join("cues.json");
    std::fs::write(
        &book,
        r#"{"catalogue": "border-cues", "version": 1, "entries": [
             {"id": "CALL",
              "fields": [{"name": "time", "type": "time"},
                         {"name": "line", "type": "choice", "values": ["1", "2"]}],
              "text": {"en": "Request a call at {time} on line {line}.",
                       "fr": "Demande d'appel à {time} sur la ligne {line}."}},
             {"id": "HOLD", "text": {"en": "Hold all exercises.", "fr": "Suspendez tout exercice."}}
           ]}"#,
    )
    .unwrap();
    let send_call = |home: &Path, time: &str| {
        cli(
            home,
            &[
                "send",
                "crisis",
                "-p",
                "immediate",
                "--code",
                "CALL",
                "--field",
                &format!("time={time}"),
                "--field",
                "line=2",
                "--json",
            ],
        )
    };
    assert_eq!(
        send_call(north, "2026-05-18T18:00Z").0,
        1,
        "no code book yet"
    );

    let proposed = ok(
        north,
        &[
            "code",
            "adopt",
            "crisis",
            "--book",
            book.to_str().unwrap(),
            "--json",
        ],
    );
    let id = field(&proposed, "id").as_str().unwrap().to_owned();
    for home in [south, mediator] {
        ok(home, &["sync"]);
        ok(home, &["agree", "sign", "crisis", &id]);
    }
    ok(north, &["sync"]);
    assert!(ok(north, &["code", "list", "crisis"]).contains("CALL"));

    let (code, sent) = send_call(north, "2026-05-18T18:00Z");
    assert_eq!(code, 0, "{sent}");
    // What does not match the book is refused, and nothing is sent.
    assert_eq!(send_call(north, "tomorrow at six").0, 1);
    let (code, _) = cli(north, &["send", "crisis", "--code", "NOPE"]);
    assert_eq!(code, 1);
    let (code, _) = cli(
        north,
        &["send", "crisis", "--code", "HOLD", "--field", "extra=1"],
    );
    assert_eq!(code, 1);

    ok(south, &["sync"]);
    ok(mediator, &["sync"]);
    let french = log_in(south, "fr");
    assert!(
        french.contains("IMMEDIATE [CALL] Demande d'appel à 2026-05-18T18:00Z sur la ligne 2."),
        "{french}"
    );
    let english = log_in(mediator, "en");
    assert!(
        english.contains("IMMEDIATE [CALL] Request a call at 2026-05-18T18:00Z on line 2."),
        "{english}"
    );
    assert_eq!(
        english.matches("[CALL]").count(),
        1,
        "one coded message went out"
    );

    let export = dir.join("crisis.hotline");
    ok(
        north,
        &["export", "crisis", "--out", export.to_str().unwrap()],
    );
    let shown = ok(north, &["verify", export.to_str().unwrap(), "--show"]);
    assert!(
        shown.contains("[CALL] time=2026-05-18T18:00Z, line=2 (code book "),
        "{shown}"
    );
    relay.stop();
}
