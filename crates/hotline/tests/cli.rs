//! The `hotline` binary, run as a user runs it.

use assert_cmd::Command;
use hotline_core::{Body, Channel, DeviceIdentity, Export};
use openmls_rust_crypto::OpenMlsRustCrypto;
use rand::SeedableRng;

fn hotline() -> Command {
    Command::cargo_bin("hotline").unwrap()
}

/// An export of a one-device channel with a few messages and a final checkpoint.
fn export_file(dir: &std::path::Path) -> std::path::PathBuf {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let identity = DeviceIdentity::generate("north", "desk", &mut rng).unwrap();
    let provider = OpenMlsRustCrypto::default();
    let mut channel = Channel::create(&provider, &identity, "crisis").unwrap();
    for n in 0..3 {
        channel
            .send(
                &provider,
                &identity,
                Body::Text(format!("line {n}")),
                n,
                None,
            )
            .unwrap();
    }
    channel.checkpoint(&provider, &identity, 10).unwrap();
    let bytes = Export::write(channel.transcript(), channel.name(), &identity).unwrap();
    let path = dir.join("crisis.hotline");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn demo_json_reports_every_check() {
    let output = hotline().args(["demo", "--json"]).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["parties"].as_array().unwrap().len(), 3);
    assert_eq!(summary["messages_sent"], 4);
    // Every message reaches both other parties.
    assert_eq!(summary["messages_delivered"], 8);
    assert_eq!(summary["transcripts_identical"], true);
    assert_eq!(summary["transcript_verified"], true);
    // Three relays; one stopped mid-story, shown down and alarmed; two messages sent
    // meanwhile reached both other parties; it came back.
    let relays = summary["relays"].as_array().unwrap();
    assert_eq!(relays.len(), 3);
    assert!(relays.contains(&summary["relay_stopped"]));
    assert_eq!(summary["relay_shown_down"], true);
    assert_eq!(summary["relay_down_alarm"], true);
    assert_eq!(summary["delivered_while_relay_down"], 4);
    assert_eq!(summary["relay_recovered"], true);
}

#[test]
fn demo_narrates() {
    let output = hotline().arg("demo").output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("fingerprint"));
    assert!(text.contains("Every check held."));
}

#[test]
fn verify_accepts_an_intact_export() {
    let dir = tempdir();
    let path = export_file(&dir);
    let output = hotline()
        .args(["verify", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["verified"], true);
    assert_eq!(report["messages"], 3);
    assert_eq!(report["channel_name"], "crisis");
    let human = hotline().arg("verify").arg(&path).output().unwrap();
    assert!(
        String::from_utf8(human.stdout)
            .unwrap()
            .starts_with("VERIFIED")
    );
}

#[test]
fn verify_refuses_a_tampered_export_with_exit_5() {
    let dir = tempdir();
    let path = export_file(&dir);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let output = hotline()
        .args(["verify", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(5));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["verified"], false);
    assert!(
        String::from_utf8(output.stderr)
            .unwrap()
            .contains("does NOT verify")
    );
}

#[test]
fn verify_of_a_missing_file_is_an_error_with_exit_1() {
    let output = hotline()
        .args(["verify", "/nonexistent/transcript.hotline"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8(output.stderr)
            .unwrap()
            .contains("cannot read")
    );
}

#[test]
fn bad_arguments_exit_2() {
    assert_eq!(
        hotline()
            .arg("no-such-command")
            .output()
            .unwrap()
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        hotline().arg("verify").output().unwrap().status.code(),
        Some(2)
    );
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "hotline-cli-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
