//! Backups: the whole device comes back under the right passphrase, and a wrong
//! passphrase, another file, or a damaged or cut backup restores nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use age::secrecy::SecretString;
use hotline_client::backup::{self, BackupError};
use hotline_core::{Body, Event};

fn dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("hotline-backup-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn secret(text: &str) -> SecretString {
    SecretString::from(text.to_owned())
}

#[test]
fn a_backup_restores_the_device_and_nothing_else_restores_anything() {
    let root = dir("round-trip");
    let (mut north, mut south) =
        hotline_client::testing::verified_pair(&root.join("north"), &root.join("south"));
    north
        .send("crisis", Body::text("before the backup"), None)
        .unwrap();
    let mut file = Vec::new();
    let info = north
        .backup_to(&mut file, secret("a long enough passphrase"))
        .unwrap();
    assert_eq!((info.party.as_str(), info.channels), ("north", 1));
    assert!(!root.join("north").join("backup.snapshot").exists());

    let target = root.join("restored");
    let refused = |bytes: &[u8], passphrase: &str| {
        let error = backup::restore(bytes, secret(passphrase), &target).unwrap_err();
        assert!(
            !target.join("device.db").exists(),
            "{error}: nothing restored"
        );
        error
    };
    assert!(matches!(
        refused(&file, "another passphrase"),
        BackupError::Passphrase
    ));
    assert!(matches!(
        refused(b"SQLite format 3\0 not encrypted", "x"),
        BackupError::NotABackup(_)
    ));
    let cut = &file[..file.len() - 100];
    assert!(matches!(
        refused(cut, "a long enough passphrase"),
        BackupError::Damaged(_)
    ));
    let mut flipped = file.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 1;
    assert!(matches!(
        refused(&flipped, "a long enough passphrase"),
        BackupError::Damaged(_)
    ));
    assert_eq!(
        backup::inspect(&file[..], secret("a long enough passphrase")).unwrap(),
        info
    );

    let (restored_info, mut restored) =
        backup::restore(&file[..], secret("a long enough passphrase"), &target).unwrap();
    assert_eq!(restored_info, info);
    assert_eq!(restored.identity().key(), north.identity().key());
    let log = restored.log("crisis").unwrap();
    assert_eq!(log.last().unwrap().text, "before the backup");
    // The channel has no relay (bundles only): nothing to catch up, it seals at once,
    // and the other side reads what it seals.
    let id = restored.channel_id("crisis").unwrap();
    assert!(restored.catching_up(&id).unwrap().is_empty());
    restored
        .send("crisis", Body::text("after the restore"), None)
        .unwrap();
    south
        .import_bundle(restored.export_outbox().unwrap())
        .unwrap();
    let texts: Vec<String> = south
        .log("crisis")
        .unwrap()
        .into_iter()
        .map(|entry| entry.text)
        .collect();
    assert!(texts.contains(&"after the restore".to_owned()), "{texts:?}");
    // The original device sealing after the backup is what the restored one must
    // never do again: its message reaches the restored copy as sent elsewhere.
    north
        .send("crisis", Body::text("from the original"), None)
        .unwrap();
    let mut seen_elsewhere = false;
    for entry in north.export_outbox().unwrap() {
        if let hotline_client::bundle::Entry::Message(bytes) = entry
            && let Ok(events) = restored.receive(&bytes)
        {
            seen_elsewhere |= events
                .iter()
                .any(|event| matches!(event, Event::SentElsewhere { .. }));
        }
    }
    assert!(seen_elsewhere);
    std::fs::remove_dir_all(&root).unwrap();
}
