//! Every file the command line reads is read with a limit: endless or oversized input
//! (`/dev/zero`, a file far larger than its format allows) is refused at once with a
//! message naming the limit, and the device's home is left as it was.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use assert_cmd::Command;

/// Far longer than any of these refusals takes (well under a second), far shorter than
/// reading until memory runs out.
const PROMPTLY: Duration = Duration::from_secs(20);

/// Any 30 digits: the file is refused before its fingerprint is compared.
const ANY_FINGERPRINT: &str = "12345 67890 12345 67890 12345 67890";

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn hotline(home: &Path, args: &[&str]) -> Run {
    let output = Command::cargo_bin("hotline")
        .unwrap()
        .env("HOTLINE_HOME", home)
        .args(args)
        .timeout(PROMPTLY)
        .output()
        .unwrap();
    Run {
        // None: killed at the timeout (or by a signal).
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "hotline-input-limits-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// A fresh home with north's device in it.
fn north(dir: &Path) -> PathBuf {
    let home = dir.join("north");
    let run = hotline(&home, &["init", "--party", "north"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    home
}

/// Every file in the home, with its bytes.
fn snapshot(home: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(home).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            files.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
    files
}

/// Runs `args` against a fresh home and checks that it fails promptly with `code`,
/// saying `expected`, and that the home is byte for byte as it was, with no channel.
fn refused_and_nothing_changed(name: &str, args: &[&str], code: i32, expected: &str) {
    let dir = workdir(name);
    let home = north(&dir);
    let before = snapshot(&home);
    let run = hotline(&home, args);
    assert_eq!(
        run.code,
        Some(code),
        "hotline {args:?} (None: still running after {PROMPTLY:?}): {}",
        run.stderr
    );
    assert!(
        run.stderr.contains(expected),
        "hotline {args:?} said: {}",
        run.stderr
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert_eq!(snapshot(&home), before, "hotline {args:?} changed the home");
    let list = hotline(&home, &["channel", "list", "--json"]);
    assert_eq!(list.code, Some(0), "{}", list.stderr);
    assert_eq!(list.stdout, "", "a channel appeared");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn card_import_of_dev_zero_is_refused_at_the_card_limit() {
    refused_and_nothing_changed(
        "card",
        &[
            "card",
            "import",
            "/dev/zero",
            "--fingerprint",
            ANY_FINGERPRINT,
        ],
        1,
        "/dev/zero is larger than the 2 MiB a contact card may be",
    );
}

#[test]
fn channel_join_of_dev_zero_is_refused_at_the_invitation_limit() {
    refused_and_nothing_changed(
        "join",
        &["channel", "join", "/dev/zero"],
        1,
        "/dev/zero is larger than the 256 MiB an invitation may be",
    );
}

#[test]
fn bundle_import_of_dev_zero_is_refused_at_the_bundle_limit() {
    refused_and_nothing_changed(
        "bundle",
        &["bundle", "import", "/dev/zero"],
        1,
        "/dev/zero is larger than the 256 MiB a bundle may be",
    );
}

#[test]
fn a_directory_given_as_a_card_is_refused() {
    let dir = workdir("directory");
    refused_and_nothing_changed(
        "directory-card",
        &[
            "card",
            "import",
            dir.to_str().unwrap(),
            "--fingerprint",
            ANY_FINGERPRINT,
        ],
        1,
        "is a directory, not a contact card",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn verify_of_dev_zero_is_refused_by_its_first_bytes() {
    // Not an export: refused from its first 19 bytes (exit 5, like any file that is not
    // an export), not read on up to the 4 GiB limit.
    let dir = workdir("verify-zero");
    let run = hotline(&dir.join("nobody"), &["verify", "/dev/zero"]);
    assert_eq!(run.code, Some(5), "{}", run.stderr);
    assert!(
        run.stderr.contains("does NOT verify")
            && run.stderr.contains("not a hotline transcript export"),
        "{}",
        run.stderr
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn verify_of_an_export_over_4_gib_is_refused_from_its_length() {
    let dir = workdir("verify-huge");
    let path = dir.join("huge.hotline");
    // Starts as an export does; sparse, so the 4 GiB take no disk space.
    std::fs::write(&path, b"HOTLINE-TRANSCRIPT\n\x01").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len((4 << 30) + 1)
        .unwrap();
    let run = hotline(&dir.join("nobody"), &["verify", path.to_str().unwrap()]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("(4294967297 bytes) is larger than the 4 GiB a transcript export may be"),
        "{}",
        run.stderr
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
