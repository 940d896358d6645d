//! Backup and restore with real processes: a device moved to a new home carries on in
//! its channel; a device restored from a backup older than its last message is caught
//! before it forks its own record.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{Follower, Relay, cli, data_dir, field, ok, two_parties_in_crisis};

const PASSPHRASE: &str = "correct horse battery staple";

fn passphrase_file(dir: &Path) -> String {
    let file = dir.join("passphrase");
    std::fs::write(&file, format!("{PASSPHRASE}\n")).unwrap();
    file.to_str().unwrap().to_owned()
}

fn alarms(home: &Path) -> Vec<serde_json::Value> {
    let (_, status) = cli(home, &["status", "--json"]);
    field(&status, "alarms").as_array().unwrap().clone()
}

fn log_text(home: &Path) -> String {
    ok(home, &["log", "crisis", "--json"])
}

#[test]
fn a_restored_device_carries_on_in_its_channel() {
    let dir = data_dir("backup-move");
    let relay = Relay::start(&dir.join("relay"));
    let homes = two_parties_in_crisis(&dir, &relay.url);
    let (north, south) = (&homes[0], &homes[1]);
    let secret = passphrase_file(&dir);
    ok(north, &["send", "crisis", "before the backup"]);
    ok(south, &["sync"]);
    let fingerprint = field(&ok(north, &["id", "--json"]), "fingerprint");

    // Backed up while its follower receives.
    let mut follower = Follower::start(north);
    ok(south, &["send", "crisis", "while following"]);
    follower.expect_received();
    let backup = dir.join("north.backup");
    let backup_path = backup.to_str().unwrap();
    let written = ok(
        north,
        &[
            "backup",
            "--out",
            backup_path,
            "--passphrase-file",
            &secret,
            "--json",
        ],
    );
    assert_eq!(field(&written, "backup")["channels"], 1);
    follower.stop();
    let bytes = std::fs::read(&backup).unwrap();
    assert!(bytes.starts_with(b"age-encryption.org/v1\n"));
    assert!(
        !bytes.windows(17).any(|w| w == b"before the backup"),
        "the backup is encrypted"
    );
    let mode = std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (code, _) = cli(
        north,
        &["backup", "--out", backup_path, "--passphrase-file", &secret],
    );
    assert_eq!(code, 2, "an existing file is replaced only with --force");
    // A short passphrase is a usage mistake.
    let short = dir.join("short");
    std::fs::write(&short, "too short\n").unwrap();
    let (code, _) = cli(
        north,
        &[
            "backup",
            "--out",
            dir.join("other.backup").to_str().unwrap(),
            "--passphrase-file",
            short.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 2);

    // The other side writes while north's machine is lost.
    ok(south, &["send", "crisis", "after the backup"]);
    std::fs::remove_dir_all(north).unwrap();

    let restored = dir.join("north-restored");
    let (code, _) = cli(
        &restored,
        &[
            "restore",
            backup_path,
            "--passphrase-file",
            short.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "wrong passphrase");
    assert!(!restored.join("device.db").exists(), "nothing left behind");
    let out = ok(
        &restored,
        &["restore", backup_path, "--passphrase-file", &secret],
    );
    assert_eq!(out.trim(), fingerprint.as_str().unwrap());
    let mode = std::fs::metadata(&restored).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let (code, _) = cli(
        &restored,
        &["restore", backup_path, "--passphrase-file", &secret],
    );
    assert_eq!(code, 2, "a home with a device is never overwritten");

    // The first send reads the relay to its end, then goes.
    ok(&restored, &["send", "crisis", "from the restored device"]);
    let log = log_text(&restored);
    for text in ["before the backup", "while following", "after the backup"] {
        assert!(log.contains(text), "{text}: {log}");
    }
    ok(south, &["sync"]);
    let log = log_text(south);
    assert!(log.contains("from the restored device"), "{log}");
    ok(&restored, &["sync"]);
    assert_eq!(alarms(south), Vec::<serde_json::Value>::new());
    assert_eq!(alarms(&restored), Vec::<serde_json::Value>::new());
    // And it keeps receiving.
    ok(south, &["send", "crisis", "still there?"]);
    ok(&restored, &["sync"]);
    assert!(log_text(&restored).contains("still there?"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_device_that_sent_after_its_backup_is_caught_before_it_forks_its_record() {
    let dir = data_dir("backup-stale");
    let relay = Relay::start(&dir.join("relay"));
    let homes = two_parties_in_crisis(&dir, &relay.url);
    let (north, south) = (&homes[0], &homes[1]);
    let secret = passphrase_file(&dir);
    let backup = dir.join("north.backup");
    let backup_path = backup.to_str().unwrap();
    ok(
        north,
        &["backup", "--out", backup_path, "--passphrase-file", &secret],
    );
    // The old device goes on after the backup.
    ok(north, &["send", "crisis", "sent after the backup"]);

    let restored = dir.join("north-restored");
    ok(
        &restored,
        &["restore", backup_path, "--passphrase-file", &secret],
    );
    let (code, _) = cli(&restored, &["send", "crisis", "from the stale copy"]);
    assert_eq!(code, 1, "refused: it would fork its own chain");
    let raised = alarms(&restored);
    assert!(
        raised.iter().any(|alarm| alarm["kind"] == "cloned"),
        "{raised:?}"
    );
    let (code, _) = cli(&restored, &["send", "crisis", "from the stale copy"]);
    assert_eq!(code, 1, "still refused");

    // The other side saw nothing wrong: north's message came once.
    ok(south, &["sync"]);
    assert!(log_text(south).contains("sent after the backup"));
    assert_eq!(alarms(south), Vec::<serde_json::Value>::new());

    // Clearing the alarm is the operator's decision to send anyway: what it then
    // sends was sealed with MLS keys the original already spent, so the other side
    // cannot open it and raises an alarm; nothing enters its record.
    cli(&restored, &["status", "--clear"]);
    assert_eq!(alarms(&restored), Vec::<serde_json::Value>::new());
    ok(&restored, &["send", "crisis", "from the stale copy"]);
    ok(south, &["sync"]);
    let raised = alarms(south);
    assert!(
        raised.iter().any(|alarm| alarm["kind"] == "altered"),
        "{raised:?}"
    );
    assert!(!log_text(south).contains("from the stale copy"));
    std::fs::remove_dir_all(&dir).unwrap();
}
