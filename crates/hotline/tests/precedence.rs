//! The crisis protocol's precedence, with real processes over a relay: a FLASH message
//! jumps a backlog of routine ones and is read first; a message unread by its deadline
//! is escalated with a signed non-response statement that tells "delivered, not read"
//! from "not delivered", and an export proves it offline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

mod common;

use common::{Follower, Relay, cli, data_dir, field, ok, verified_homes};
use hotline_client::Store;
use hotline_core::{Body, Precedence};

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn status(home: &Path) -> (i32, serde_json::Value) {
    let (code, out) = cli(home, &["status", "--json"]);
    (code, serde_json::from_str(&out).unwrap())
}

fn alarms_of<'a>(status: &'a serde_json::Value, kind: &str) -> Vec<&'a serde_json::Value> {
    status["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|alarm| alarm["kind"] == kind)
        .collect()
}

/// Two verified parties on one relay, in channel `crisis`, south joined.
fn crisis_line(dir: &Path, relay: &Relay) -> (std::path::PathBuf, std::path::PathBuf) {
    let homes = verified_homes(dir, &["north", "south"], &relay.url);
    let (north, south) = (homes[0].clone(), homes[1].clone());
    ok(
        &north,
        &[
            "channel", "create", "crisis", "--with", "south", "--relay", &relay.url,
        ],
    );
    ok(&south, &["sync"]);
    assert!(ok(&south, &["channel", "list"]).contains("crisis"));
    (north, south)
}

/// North's relay is gone while it writes 500 routine messages and then a FLASH: the
/// outbox posts the FLASH first when the relay is back. South receives them all; the
/// FLASH is alarmed until read, heads `log --unread`, and `ack --next` reads it first.
#[test]
fn a_flash_message_jumps_a_backlog_of_routine_ones_and_is_read_first() {
    let dir = data_dir("flash-backlog");
    let relay = Relay::start(&dir.join("relay"));
    let address = relay.address();
    let (north, south) = crisis_line(&dir, &relay);
    relay.stop();

    {
        let mut store = Store::open(&north).unwrap();
        for index in 0..500 {
            store
                .send("crisis", Body::text(format!("routine {index}")), None)
                .unwrap();
        }
    }
    let sent = ok(
        &north,
        &[
            "send",
            "crisis",
            "--precedence",
            "flash",
            "Launch detected: call now",
            "--json",
        ],
    );
    assert_eq!(field(&sent, "precedence"), "flash");
    let flash = field(&sent, "id").as_str().unwrap().to_owned();
    {
        let store = Store::open(&north).unwrap();
        let outbox = store.outbox().unwrap();
        assert_eq!(outbox.len(), 501);
        assert_eq!(
            outbox[0].precedence,
            Precedence::Flash,
            "the FLASH goes first"
        );
        assert!(
            outbox[1..]
                .iter()
                .all(|item| item.precedence == Precedence::Routine)
        );
    }

    let relay = Relay::start_on(&dir.join("relay"), &address);
    // The relay's rate limit (200 requests a second, bursts of 400, a batch costing one
    // per message) may leave some for a later round; rounds are paced, as a follower's
    // are, so that the device's allowance refills between them.
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while !Store::open(&north).unwrap().outbox().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < until,
            "north's outbox never emptied"
        );
        cli(&north, &["sync"]);
        std::thread::sleep(Duration::from_millis(500));
    }
    while json_lines(&ok(&south, &["log", "crisis", "--json"])).len() < 501 {
        assert!(std::time::Instant::now() < until, "south never got all 501");
        cli(&south, &["sync"]);
    }

    // South: the FLASH is alarmed from its arrival and heads the unread list.
    let (code, before) = status(&south);
    assert_eq!(code, 6, "{before}");
    let flashes = alarms_of(&before, "flash");
    assert_eq!(flashes.len(), 1, "{before}");
    assert_eq!(flashes[0]["message"], flash.as_str());
    assert_eq!(flashes[0]["party"], "north");
    let unread = json_lines(&ok(&south, &["log", "crisis", "--unread", "--json"]));
    assert_eq!(unread.len(), 501);
    assert_eq!(unread[0]["id"], flash.as_str());
    assert_eq!(unread[0]["precedence"], "flash");
    assert_eq!(unread[1]["text"], "routine 0");
    assert_eq!(unread[500]["text"], "routine 499");
    let text = ok(&south, &["log", "crisis", "--unread"]);
    assert!(
        text.lines()
            .next()
            .unwrap()
            .ends_with("FLASH Launch detected: call now"),
        "{text}"
    );

    // Read first: `ack --next` takes the FLASH; the alarm ends.
    ok(&south, &["ack", "crisis", "--next"]);
    let (_, after) = status(&south);
    assert!(alarms_of(&after, "flash").is_empty(), "{after}");
    let unread = json_lines(&ok(&south, &["log", "crisis", "--unread", "--json"]));
    assert_eq!(unread.len(), 500);
    assert_eq!(unread[0]["text"], "routine 0");

    // North sees the FLASH read by south, and nothing else read.
    ok(&north, &["sync"]);
    let log = json_lines(&ok(&north, &["log", "crisis", "--json"]));
    let read: Vec<&serde_json::Value> = log
        .iter()
        .filter(|entry| !entry["read_by"].as_array().unwrap().is_empty())
        .collect();
    assert_eq!(read.len(), 1, "only the FLASH is read");
    assert_eq!(read[0]["id"], flash.as_str());
    assert_eq!(read[0]["precedence"], "flash");
    relay.stop();
}

/// A FLASH with a 2 s deadline that south holds but does not read: north's follower
/// escalates at the deadline (an `escalated` event, the message offered again, a signed
/// statement "delivered, not read"). A second one sent while the relay is down never
/// reaches south: its statement says "not delivered", with the path down. Both
/// statements are in the record: south sees them, and an export verifies them offline.
#[test]
fn an_unread_flash_is_escalated_with_a_signed_statement_delivered_or_not() {
    let dir = data_dir("flash-escalation");
    let relay = Relay::start(&dir.join("relay"));
    let address = relay.address();
    let (north, south) = crisis_line(&dir, &relay);
    let mut follower = Follower::start_with(&north, &["--round", "1", "--link-test-interval", "1"]);

    let sent = ok(
        &north,
        &[
            "send",
            "crisis",
            "-p",
            "flash",
            "Stand down the exercise",
            "--deadline",
            "3s",
            "--json",
        ],
    );
    let held = field(&sent, "id").as_str().unwrap().to_owned();
    ok(&south, &["sync"]);
    assert!(ok(&south, &["log", "crisis"]).contains("Stand down the exercise"));
    let escalated = follower.expect_event("escalated");
    assert_eq!(escalated["message"], held.as_str());
    assert_eq!(escalated["party"], "south");
    assert_eq!(escalated["precedence"], "flash");
    assert_eq!(escalated["delivered"], true, "{escalated}");
    follower.stop();

    // Exit 6 (an alarm), or 3 once the paths to south, which does not follow and so
    // answers no link test, are judged down.
    let (code, north_status) = status(&north);
    assert!(code == 6 || code == 3, "{code}: {north_status}");
    let deadline = alarms_of(&north_status, "deadline");
    assert_eq!(deadline.len(), 1, "{north_status}");
    let detail = deadline[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("escalated") && detail.contains("delivered, not read"),
        "{detail}"
    );

    // The relay goes down: the next FLASH cannot reach south.
    relay.stop();
    let sent = ok(
        &north,
        &[
            "send",
            "crisis",
            "-p",
            "flash",
            "Confirm receipt",
            "--deadline",
            "1s",
            "--json",
        ],
    );
    let lost = field(&sent, "id").as_str().unwrap().to_owned();
    // Past the deadline and three link-test intervals after south's last answer.
    std::thread::sleep(Duration::from_millis(3500));
    cli(&north, &["sync"]);
    let log = ok(&north, &["log", "crisis"]);
    let statements: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("[no response:"))
        .collect();
    assert_eq!(statements.len(), 2, "{log}");
    assert!(
        statements[0].contains(&held[..12])
            && statements[0].contains("delivered to its device, not read"),
        "{log}"
    );
    assert!(
        statements[1].contains(&lost[..12])
            && statements[1].contains("not delivered to its device")
            && statements[1].contains(" down"),
        "{log}"
    );

    // Back: south receives the second FLASH and both statements, signed by north.
    let relay = Relay::start_on(&dir.join("relay"), &address);
    ok(&north, &["sync"]);
    ok(&south, &["sync"]);
    let south_log = ok(&south, &["log", "crisis"]);
    assert_eq!(south_log.matches("[no response:").count(), 2, "{south_log}");
    assert!(south_log.contains("Confirm receipt"));
    // South writes (without reading the FLASHes): its envelope records what it holds.
    ok(&south, &["send", "crisis", "South here: the line is back"]);
    ok(&north, &["sync"]);

    let export = dir.join("crisis.hotline");
    ok(
        &north,
        &["export", "crisis", "--out", export.to_str().unwrap()],
    );
    let verified = ok(&north, &["verify", export.to_str().unwrap(), "--json"]);
    assert_eq!(field(&verified, "non_responses"), 2, "{verified}");
    // The auditor's view lists the record: the FLASH held and unread, proven north's
    // by its own signature, and the statements.
    let export_path = export.to_str().unwrap();
    let shown = ok(&north, &["verify", export_path, "--show"]);
    assert!(
        shown.contains("FLASH MESSAGE (signed by its sender)"),
        "{shown}"
    );
    assert_eq!(
        shown
            .matches("NON-RESPONSE STATEMENT (signed by its sender)")
            .count(),
        2,
        "{shown}"
    );
    let record = json_lines(&ok(&north, &["verify", export_path, "--show", "--json"]));
    let entry = record[1..]
        .iter()
        .find(|entry| entry["id"] == held.as_str())
        .expect("the FLASH in the record");
    assert_eq!(entry["precedence"], "flash");
    assert_eq!(entry["sender"]["party"], "north");
    assert_eq!(entry["delivered_to"], serde_json::json!(["south"]));
    assert_eq!(entry["read_by"], serde_json::json!([]));
    assert_eq!(entry["proven_by"], "sender");
    let statements: Vec<&serde_json::Value> = record[1..]
        .iter()
        .filter(|entry| entry["kind"] == "non-response statement")
        .collect();
    assert_eq!(statements.len(), 2);
    // The auditor's expectations: the right fingerprints verify, a wrong one exits 5.
    let print = |home: &Path| {
        field(&ok(home, &["id", "--json"]), "fingerprint")
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (north_print, south_print) = (print(&north), print(&south));
    let expect_north = format!("north={north_print}");
    let (code, _) = cli(
        &north,
        &[
            "verify",
            export_path,
            "--expect",
            &expect_north,
            "--expect",
            &format!("south={south_print}"),
        ],
    );
    assert_eq!(code, 0);
    let (code, out) = cli(
        &north,
        &[
            "verify",
            export_path,
            "--json",
            "--expect",
            &expect_north,
            "--expect",
            &format!("south={north_print}"),
        ],
    );
    assert_eq!(code, 5);
    assert_eq!(field(&out, "expected_parties"), false);
    assert_eq!(
        cli(&north, &["verify", export_path, "--expect", &expect_north]).0,
        5
    );

    // Any change to a statement fails verification (exit 5): here its precedence,
    // after the message id and the party's name.
    let mut bytes = std::fs::read(&export).unwrap();
    let mut statement = hex::decode(&held).unwrap();
    statement.extend_from_slice(&[0, 0, 0, 5]);
    statement.extend_from_slice(b"south");
    let at = find(&bytes, &statement).expect("the first statement in the export");
    assert_eq!(bytes[at + statement.len()], Precedence::Flash as u8);
    bytes[at + statement.len()] = Precedence::Immediate as u8;
    let altered = dir.join("altered.hotline");
    std::fs::write(&altered, &bytes).unwrap();
    assert_eq!(cli(&north, &["verify", altered.to_str().unwrap()]).0, 5);
    relay.stop();
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The committer sets the channel's handling times; every member follows them, a
/// message without a deadline gets its precedence's, and a member that is not the
/// committer cannot change them.
#[test]
fn the_committer_sets_the_channels_handling_times_and_members_follow() {
    let dir = data_dir("handling-times");
    let relay = Relay::start(&dir.join("relay"));
    let (north, south) = crisis_line(&dir, &relay);
    let defaults = ok(&south, &["channel", "handling-times", "crisis", "--json"]);
    assert_eq!(field(&defaults, "flash_ms"), 600_000);
    assert_eq!(field(&defaults, "routine_ms"), 21_600_000);
    ok(
        &north,
        &[
            "channel",
            "handling-times",
            "crisis",
            "--flash",
            "2m",
            "--routine",
            "1d",
        ],
    );
    ok(&south, &["sync"]);
    let followed = ok(&south, &["channel", "handling-times", "crisis", "--json"]);
    assert_eq!(field(&followed, "flash_ms"), 120_000);
    assert_eq!(field(&followed, "immediate_ms"), 1_800_000);
    assert_eq!(field(&followed, "routine_ms"), 86_400_000);
    let (code, _) = cli(
        &south,
        &["channel", "handling-times", "crisis", "--flash", "1m"],
    );
    assert_eq!(code, 1, "only the committer sets them");

    ok(
        &south,
        &["send", "crisis", "-p", "flash", "Answer within two minutes"],
    );
    let log = json_lines(&ok(&south, &["log", "crisis", "--json"]));
    let flash = log
        .iter()
        .find(|entry| entry["precedence"] == "flash")
        .unwrap();
    let given = flash["deadline_ms"].as_u64().unwrap() - flash["time_ms"].as_u64().unwrap();
    assert!((120_000..121_000).contains(&given), "{flash}");
    relay.stop();
}
