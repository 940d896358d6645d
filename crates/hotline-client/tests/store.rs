//! Two devices, each with its own home, exchanging bundles.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hotline_client::Store;
use hotline_client::store::StoreError;
use hotline_core::Body;

fn home(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "hotline-store-{}-{name}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn pair() -> (Store, Store, std::path::PathBuf, std::path::PathBuf) {
    let (north_home, south_home) = (home("north"), home("south"));
    let (north, mut south) = hotline_client::testing::verified_pair(&north_home, &south_home);
    assert_eq!(south.channels().unwrap().len(), 1);
    (north, south, north_home, south_home)
}

#[test]
fn messages_receipts_and_state_survive_reopening() {
    let (mut north, mut south, north_home, south_home) = pair();
    let first = north
        .send("crisis", Body::text("hello south"), None)
        .unwrap();
    north.send("crisis", Body::text("second"), None).unwrap();
    south.import_bundle(north.export_outbox().unwrap()).unwrap();
    let log = south.log("crisis").unwrap();
    assert_eq!(
        log.iter().map(|e| e.text.as_str()).collect::<Vec<_>>(),
        ["hello south", "second"]
    );
    south.ack("crisis", &first.to_hex()[..12]).unwrap();
    north.import_bundle(south.export_outbox().unwrap()).unwrap();
    drop(north);
    drop(south);

    let mut north = Store::open(&north_home).unwrap();
    let south = Store::open(&south_home).unwrap();
    north.integrity_check().unwrap();
    south.integrity_check().unwrap();
    let log = north.log("crisis").unwrap();
    assert_eq!(log[0].read_by.iter().collect::<Vec<_>>(), ["south"]);
    assert_eq!(log[0].delivered_to.iter().collect::<Vec<_>>(), ["south"]);
    // And the channel still works after reopening.
    north
        .send("crisis", Body::text("after restart"), None)
        .unwrap();
    let export = north.export("crisis").unwrap();
    hotline_core::Export::verify(&export).unwrap();
}

#[test]
fn a_wrong_fingerprint_is_a_trust_refusal_and_imports_nothing() {
    let (north_home, south_home) = (home("n2"), home("s2"));
    let mut north = Store::init(&north_home, "north", "desk", &[]).unwrap();
    let south = Store::init(&south_home, "south", "desk", &[]).unwrap();
    let error = north
        .import_card(&south.card().unwrap(), &north.identity().fingerprint())
        .unwrap_err();
    assert!(error.is_trust_refusal(), "{error}");
    assert!(north.contacts().unwrap().is_empty());
}

#[test]
fn unknown_channel_and_party_are_clear_errors() {
    let (mut north, _, _, _) = pair();
    assert!(matches!(
        north.send("nope", Body::text("x"), None),
        Err(StoreError::UnknownChannel(_))
    ));
    assert!(matches!(
        north.create_channel("other", &["mars".into()], &[]),
        Err(StoreError::UnknownParty(_))
    ));
    assert!(matches!(
        north.create_channel("crisis", &[], &[]),
        Err(StoreError::ChannelExists(_))
    ));
}

/// A channel with relays merges its creating commit only once a relay holds it: until
/// then the outbox holds the commit alone (no Welcome), and the epoch has not moved.
#[test]
fn a_commit_is_merged_only_after_a_relay_accepted_it() {
    let (north_home, south_home) = (home("north-relayed"), home("south-relayed"));
    let mut north = Store::init(&north_home, "north", "desk", &[]).unwrap();
    let south = Store::init(&south_home, "south", "desk", &[]).unwrap();
    north
        .import_card(&south.card().unwrap(), &south.identity().fingerprint())
        .unwrap();
    let nowhere = format!("https://127.0.0.1:9/#sha256={}", "00".repeat(32));
    let id = north
        .create_channel("crisis", &["south".into()], &[nowhere])
        .unwrap();
    let outbox = north.outbox().unwrap();
    assert_eq!(outbox.len(), 1);
    assert!(outbox[0].commit && !outbox[0].welcome);
    let summary = &north.channels().unwrap()[0];
    assert_eq!((summary.epoch, summary.members.len()), (0, 1));
    // Sending meanwhile is refused: the message would belong to the epoch before the
    // add, which south could never read.
    assert!(matches!(
        north.send("crisis", Body::text("before south"), None),
        Err(StoreError::Channel(
            hotline_core::ChannelError::CommitPending
        ))
    ));

    assert!(north.commit_relayed(&id).unwrap());
    assert!(!north.commit_relayed(&id).unwrap(), "merged once only");
    let summary = &north.channels().unwrap()[0];
    assert_eq!((summary.epoch, summary.members.len()), (1, 2));
    let welcomes = north.outbox().unwrap().iter().filter(|i| i.welcome).count();
    assert_eq!(welcomes, 1, "the Welcome is released by the merge");
    drop(north);
    // The merge is durable.
    let mut north = Store::open(&north_home).unwrap();
    assert_eq!(north.channels().unwrap()[0].epoch, 1);
}

/// The channel messages in a store's outbox (its invitations left out), handed over.
fn outbox_messages(store: &mut Store) -> Vec<Vec<u8>> {
    store
        .export_outbox()
        .unwrap()
        .into_iter()
        .filter_map(|entry| match entry {
            hotline_client::bundle::Entry::Message(bytes) => Some(bytes),
            hotline_client::bundle::Entry::Welcome { .. } => None,
        })
        .collect()
}

/// Messages of an epoch whose commit has not arrived yet wait in the core; once the
/// commit comes (through another relay), they are placed in their sender's chain for the
/// relay they came through, so the next message through that relay is not taken for a
/// drop (a false `dropped` alarm found in review).
#[test]
fn messages_held_for_their_commit_are_placed_in_their_senders_chain() {
    use hotline_client::store::Cursor;
    let (mut north, mut south, _, _) = pair();
    let (r, q) = ("https://r.test/#sha256=00", "https://q.test/#sha256=11");
    let mut seq = 0;
    let mut through = |store: &mut Store, relay: &str, bytes: &[u8]| {
        seq += 1;
        store
            .receive_at(
                bytes,
                Some(Cursor {
                    relay,
                    log: "channel",
                    seq,
                    receipt: None,
                }),
            )
            .unwrap()
    };
    north.send("crisis", Body::text("before"), None).unwrap();
    for bytes in outbox_messages(&mut north) {
        through(&mut south, r, &bytes);
    }
    assert!(north.update_keys("crisis").unwrap());
    north
        .send("crisis", Body::text("first after"), None)
        .unwrap();
    north
        .send("crisis", Body::text("second after"), None)
        .unwrap();
    // [commit, key-update note, first after, second after]
    let after = outbox_messages(&mut north);
    assert_eq!(after.len(), 4);
    // Relay r lacks the commit: the note and the first message wait for it.
    for bytes in &after[1..3] {
        let events = through(&mut south, r, bytes);
        assert!(
            matches!(events[..], [hotline_core::Event::Buffered { .. }]),
            "{events:?}"
        );
    }
    through(&mut south, q, &after[0]);
    through(&mut south, r, &after[3]);
    let texts: Vec<String> = south
        .log("crisis")
        .unwrap()
        .into_iter()
        .map(|e| e.text)
        .collect();
    assert_eq!(texts, ["before", "first after", "second after"]);
    let status = south.status(u64::MAX / 2).unwrap();
    let stored: Vec<_> = status
        .alarms
        .iter()
        .filter(|alarm| alarm.relay.is_some())
        .collect();
    assert!(stored.is_empty(), "{stored:?}");
}

/// A relay that hands a sender's messages over out of order is named: the one served
/// early shows a gap (`dropped`), the one served late comes after a later one
/// (`replayed`). The transcript still holds all three, in their order.
#[test]
fn a_relay_reordering_a_senders_messages_is_named() {
    use hotline_client::store::Cursor;
    let (mut north, mut south, _, _) = pair();
    for text in ["one", "two", "three"] {
        north.send("crisis", Body::text(text), None).unwrap();
    }
    let bytes = outbox_messages(&mut north);
    assert_eq!(bytes.len(), 3);
    let relay = "https://r.test/#sha256=00";
    for (seq, index) in [0, 2, 1].into_iter().enumerate() {
        south
            .receive_at(
                &bytes[index],
                Some(Cursor {
                    relay,
                    log: "channel",
                    seq: seq as u64 + 1,
                    receipt: None,
                }),
            )
            .unwrap();
    }
    let texts: Vec<String> = south
        .log("crisis")
        .unwrap()
        .into_iter()
        .map(|e| e.text)
        .collect();
    assert_eq!(texts, ["one", "two", "three"]);
    let status = south.status(u64::MAX / 2).unwrap();
    let named: Vec<&str> = status
        .alarms
        .iter()
        .filter(|alarm| alarm.relay.as_deref() == Some(relay))
        .map(|alarm| alarm.kind.as_str())
        .collect();
    assert_eq!(named, ["dropped", "replayed"], "{:?}", status.alarms);
}

/// Turns a home back into what schema 7 kept: every envelope in `envelopes`, no
/// transcript tables, snapshots without the transcript's state, link tests' tables of
/// the time.
fn downgrade_to_schema_7(database: &std::path::Path) {
    let connection = rusqlite::Connection::open(database).unwrap();
    connection
        .execute_batch(
            "INSERT OR IGNORE INTO envelopes (channel, id, lamport, bytes)
                 SELECT channel, id, lamport, bytes FROM entries;
             DROP TABLE entries; DROP TABLE readers; DROP TABLE merkle_nodes;
             DROP TABLE deadlines; DROP TABLE rebuild; DROP TABLE outbox_waiting;
             DROP TRIGGER outbox_waits; DROP TRIGGER outbox_left;
             DROP TRIGGER outbox_back; DROP TRIGGER outbox_gone;
             DROP TABLE probes; DROP TABLE answers; DROP TABLE frames;
             DROP TABLE frames_out; DROP TABLE link_state; DROP TABLE receipts_due;
             DROP TABLE answer_floor;
             ALTER TABLE contacts DROP COLUMN key_packages_used; DROP TABLE relay_names;
             DROP TABLE delivered_reported; DROP TABLE invited;
             DROP TABLE key_package_stock; DROP TABLE stocked_key_packages;
             ALTER TABLE outbox DROP COLUMN precedence; DROP TABLE escalations;
             DROP TABLE agreements; DROP TABLE agreement_steps;
             DROP TABLE cosigns; DROP TABLE cosigned; DROP TABLE cosign_cursors;
             DROP TABLE cosign_horizons; DROP TABLE handling_times; DROP TABLE custody;
             DROP TABLE relay_rotations; DROP TABLE catch_up;
             ALTER TABLE channels DROP COLUMN registers;
             CREATE TABLE probes (id BLOB PRIMARY KEY, channel BLOB NOT NULL,
                                  sent_ms INTEGER NOT NULL);
             CREATE INDEX probes_by_channel ON probes (channel, sent_ms);
             CREATE TABLE probe_copies (hash BLOB PRIMARY KEY, probe BLOB NOT NULL);
             CREATE TABLE answered (probe BLOB NOT NULL, relay TEXT NOT NULL,
                                    PRIMARY KEY (probe, relay));
             UPDATE channels SET snapshot = json_remove(snapshot, '$.transcript', '$.departed');
             PRAGMA user_version = 7;",
        )
        .unwrap();
}

#[test]
fn a_home_of_the_previous_schema_opens_with_its_roots_unchanged() {
    let (mut north, mut south, north_home, south_home) = pair();
    let first = north.send("crisis", Body::text("one"), Some(1)).unwrap();
    for text in ["two", "three"] {
        north.send("crisis", Body::text(text), None).unwrap();
    }
    south.import_bundle(north.export_outbox().unwrap()).unwrap();
    south.ack("crisis", &first.to_hex()[..12]).unwrap();
    south.send("crisis", Body::text("four"), None).unwrap();
    north.import_bundle(south.export_outbox().unwrap()).unwrap();
    let root = north.transcript_root("crisis").unwrap();
    let log = north.log("crisis").unwrap();
    const NOW: u64 = 4_000_000_000_000;
    let status = north.status(NOW).unwrap();
    let database = north.home().database();
    drop(north);
    drop(south);
    downgrade_to_schema_7(&database);

    let mut north = Store::open(&north_home).unwrap();
    north.integrity_check().unwrap();
    assert_eq!(north.transcript_root("crisis").unwrap(), root);
    assert_eq!(north.log("crisis").unwrap(), log);
    let after = north.status(NOW).unwrap();
    assert_eq!(after.alarms.len(), status.alarms.len());
    assert_eq!(after.outbox, status.outbox);
    // Rebuilt once, in place: every envelope now in the transcript's table, nothing
    // left to rebuild; the next open finds nothing to do, and the channel goes on.
    drop(north);
    let connection = rusqlite::Connection::open(&database).unwrap();
    let count = |sql: &str| -> i64 { connection.query_row(sql, [], |row| row.get(0)).unwrap() };
    assert_eq!(count("SELECT COUNT(*) FROM envelopes"), 0);
    assert_eq!(count("SELECT COUNT(*) FROM rebuild"), 0);
    assert_eq!(count("SELECT COUNT(*) FROM entries"), root.1 as i64);
    assert_eq!(
        count("SELECT rows FROM outbox_waiting"),
        count("SELECT COUNT(*) FROM outbox WHERE settled = 0 AND exported = 0")
    );
    drop(connection);
    let mut north = Store::open(&north_home).unwrap();
    assert_eq!(north.transcript_root("crisis").unwrap(), root);
    north.send("crisis", Body::text("five"), None).unwrap();
    let mut south = Store::open(&south_home).unwrap();
    south.import_bundle(north.export_outbox().unwrap()).unwrap();
    assert_eq!(
        south.transcript_root("crisis").unwrap(),
        north.transcript_root("crisis").unwrap()
    );
    hotline_core::Export::verify(&north.export("crisis").unwrap()).unwrap();
}

#[test]
fn the_sqlite_transcript_store_keeps_every_promise() {
    let dir = home("conformance");
    let mut made = 0;
    let mut make = || {
        made += 1;
        let path = dir.with_extension(format!("{made}.db"));
        let _ = std::fs::remove_file(&path);
        hotline_client::transcript_store::scratch(&path, [7; 32]).unwrap()
    };
    hotline_core::transcript_store::conformance(&mut make).unwrap();
    for index in 1..=made {
        let _ = std::fs::remove_file(dir.with_extension(format!("{index}.db")));
    }
}

/// Each channel created with the same party takes a key package of its card that no
/// earlier channel took, then the last-resort one: eighteen channels with one card of
/// sixteen one-time key packages all join.
#[test]
fn many_channels_with_the_same_party_all_join() {
    let (mut north, mut south, _, _) = pair();
    for index in 1..=18 {
        let name = format!("line-{index}");
        north.create_channel(&name, &["south".into()], &[]).unwrap();
        south.import_bundle(north.export_outbox().unwrap()).unwrap();
        assert!(
            south.channels().unwrap().iter().any(|c| c.name == name),
            "south did not join {name}"
        );
        north
            .send(&name, Body::text(format!("on {name}")), None)
            .unwrap();
        south.import_bundle(north.export_outbox().unwrap()).unwrap();
        assert_eq!(south.log(&name).unwrap()[0].text, format!("on {name}"));
    }
}

/// How many of south's card key packages north used, from north's database.
fn card_packages_used(north_home: &std::path::Path) -> i64 {
    let db = rusqlite::Connection::open(north_home.join("device.db")).unwrap();
    db.query_row(
        "SELECT key_packages_used FROM contacts WHERE party = 'south'",
        [],
        |row| row.get(0),
    )
    .unwrap()
}

/// A fresh key package claimed from a relay opens the channel and spares the card's;
/// one that does not check out (not south's, or not a key package at all) is set
/// aside for the card's next one, and the channel is joined all the same.
#[test]
fn a_claimed_key_package_is_used_if_it_checks_out_and_the_card_serves_otherwise() {
    let (mut north, mut south, north_home, _) = pair();
    let used = card_packages_used(&north_home);
    let south_key = south.identity().key();
    let fresh = south.fresh_key_packages(2).unwrap();
    let north_own = north.fresh_key_packages(1).unwrap();
    let attempts: [(&str, Vec<u8>, i64); 3] = [
        ("fresh", fresh[0].clone(), 0),
        ("not-souths", north_own[0].clone(), 1),
        ("garbage", b"not a key package".to_vec(), 1),
    ];
    let mut expected = used;
    for (name, package, card) in attempts {
        let claimed = [(south_key, package)].into_iter().collect();
        north
            .create_channel_with(name, &["south".into()], &[], &claimed)
            .unwrap();
        expected += card;
        assert_eq!(card_packages_used(&north_home), expected, "{name}");
        south.import_bundle(north.export_outbox().unwrap()).unwrap();
        assert!(
            south.channels().unwrap().iter().any(|c| c.name == name),
            "south did not join {name}"
        );
    }
}
