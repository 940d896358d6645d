//! Two devices, each with its own home, exchanging bundles.

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
        .send("crisis", Body::Text("hello south".into()), None)
        .unwrap();
    north
        .send("crisis", Body::Text("second".into()), None)
        .unwrap();
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
        .send("crisis", Body::Text("after restart".into()), None)
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
        north.send("nope", Body::Text("x".into()), None),
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
        north.send("crisis", Body::Text("before south".into()), None),
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
