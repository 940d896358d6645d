//! The `hotline` binary, run as a user runs it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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
                Body::text(format!("line {n}")),
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
    assert_eq!(summary["messages_sent"], 6);
    // Every message reaches both other parties.
    assert_eq!(summary["messages_delivered"], 12);
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
    // South's FLASH is alarmed at north until read, and read before the routine
    // message sent just before it.
    assert_eq!(summary["flash_alarmed"], true);
    assert_eq!(summary["flash_read_first"], true);
    // An agreed text signed by all three parties, proven by the export.
    assert_eq!(summary["agreed_text_accepted"], true);
    assert_eq!(summary["agreed_text_proven"], true);
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

/// Two homes with a channel between them (no relay: bundles), north's home returned.
fn home_with_a_channel(dir: &std::path::Path) -> std::path::PathBuf {
    let (north, south) = (dir.join("north"), dir.join("south"));
    let _ = std::fs::remove_dir_all(&north);
    let _ = std::fs::remove_dir_all(&south);
    let run = |home: &std::path::Path, args: &[&str]| -> String {
        let output = hotline()
            .env("HOTLINE_HOME", home)
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "hotline {args:?}: {output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    run(&north, &["init", "--party", "north"]);
    run(&south, &["init", "--party", "south"]);
    let card = dir.join("south.card");
    run(&south, &["card", "export", "--out", card.to_str().unwrap()]);
    let id: serde_json::Value = serde_json::from_str(&run(&south, &["id", "--json"])).unwrap();
    run(
        &north,
        &[
            "card",
            "import",
            card.to_str().unwrap(),
            "--fingerprint",
            id["fingerprint"].as_str().unwrap(),
        ],
    );
    run(&north, &["channel", "create", "crisis", "--with", "south"]);
    north
}

#[test]
fn the_console_refuses_to_run_without_a_terminal() {
    let home = home_with_a_channel(&tempdir());
    let output = hotline()
        .env("HOTLINE_HOME", &home)
        .arg("console")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("needs a terminal"), "{stderr}");
    assert!(stderr.contains("status --json"), "{stderr}");
}

/// Runs the console in a pseudo-terminal (util-linux `script`), types `keys` (each
/// after a pause), and returns what it wrote to the terminal once it has ended.
fn console_session(home: &std::path::Path, env: &[(&str, &str)], keys: &[&[u8]]) -> Vec<u8> {
    use std::io::Write;
    let binary = assert_cmd::cargo::cargo_bin("hotline");
    let typescript = home.with_extension("typescript");
    let mut child = std::process::Command::new("script")
        .args(["-q", "-e", "-f", "-c"])
        .arg(format!("{} console --channel crisis", binary.display()))
        .arg(&typescript)
        .env("HOTLINE_HOME", home)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("util-linux script runs the console in a pseudo-terminal");
    let mut input = child.stdin.take().unwrap();
    for key in keys {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        input.write_all(key).unwrap();
        input.flush().unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the console did not end on its last key");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success(), "{status:?}");
    std::fs::read(&typescript).unwrap()
}

fn log_json(home: &std::path::Path) -> Vec<serde_json::Value> {
    let log = hotline()
        .env("HOTLINE_HOME", home)
        .args(["log", "crisis", "--json"])
        .output()
        .unwrap();
    String::from_utf8(log.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// A line typed and Enter stores the message; Ctrl-D ends the console and gives the
/// terminal back.
#[test]
fn the_console_sends_what_is_typed() {
    let home = home_with_a_channel(&tempdir());
    let log_file = home.with_extension("console.log");
    let _ = std::fs::remove_file(&log_file);
    let screen = console_session(
        &home,
        &[("HOTLINE_LOG_FILE", log_file.to_str().unwrap())],
        &[b"typed in the console\r", b"\x04"],
    );
    let log = log_json(&home);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["text"], "typed in the console");
    // Its background work went to the log file, with times, without the text.
    let written = std::fs::read_to_string(&log_file).unwrap();
    assert!(
        written.contains("the console receives for this device"),
        "{written}"
    );
    assert!(written.contains("sent from the console"), "{written}");
    assert!(!written.contains("typed in the console"), "{written}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // ratatui writes only the cells that change, so words arrive apart.
    let screen = String::from_utf8_lossy(&screen);
    assert!(
        screen.contains("receiving") && screen.contains("here"),
        "{screen}"
    );
}

/// With a follower holding the receive lock, the console still runs: it says who
/// receives, sends what is typed, and (NO_COLOR) writes no colour to the terminal.
#[test]
fn the_console_runs_beside_the_follower_without_colour() {
    use std::io::Write;
    let home = home_with_a_channel(&tempdir());
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(home.join("receive.lock"))
        .unwrap();
    lock.try_lock().expect("nothing else holds the lock");
    write!(&lock, "pid 4242").unwrap();
    let screen = console_session(
        &home,
        &[("NO_COLOR", "1")],
        &[b"sent beside the follower\r", b"\x1b"],
    );
    let log = log_json(&home);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["text"], "sent beside the follower");
    let text = String::from_utf8_lossy(&screen);
    assert!(
        text.contains("follower") && text.contains("(pid") && text.contains("4242)"),
        "{text}"
    );
    for colour in ["\x1b[38;", "\x1b[48;"] {
        assert!(!text.contains(colour), "NO_COLOR, yet {colour:?} in {text}");
    }
    drop(lock);
}

/// Every usage mistake exits 2 with a message on stderr and changes nothing, whether
/// clap or the command itself finds it.
#[test]
fn usage_mistakes_exit_2() {
    let dir = tempdir().join("usage");
    let home = home_with_a_channel(&dir);
    let existing = dir.join("existing");
    std::fs::write(&existing, "keep me").unwrap();
    let existing = existing.to_str().unwrap();
    let mistakes: &[&[&str]] = &[
        &["send"],
        &["send", "crisis", "text", "--deadline", "10x"],
        &["send", "crisis", "text", "--precedence", "urgent"],
        &["log", "crisis", "--last", "abc"],
        &["status", "--undelivered-after", "zz"],
        &["sync", "--link-test-interval", "5q"],
        &["card", "import", existing, "--fingerprint", "12345"],
        &[
            "channel",
            "create",
            "x",
            "--with",
            "south",
            "--relay",
            "not a url",
        ],
        &["channel", "handling-times", "crisis", "--flash", "soon"],
        &["verify", existing, "--expect", "north"],
        &["export", "crisis", "--out", existing],
        &["backup", "--out", existing],
        &["completions", "tcsh"],
        &["no-such-command"],
    ];
    for args in mistakes {
        let output = hotline()
            .env("HOTLINE_HOME", &home)
            .env_remove("HOTLINE_PASSPHRASE")
            .args(*args)
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(2),
            "hotline {args:?}: {output:?}"
        );
        assert!(!output.stderr.is_empty(), "hotline {args:?} says why");
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("existing")).unwrap(),
        "keep me"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
