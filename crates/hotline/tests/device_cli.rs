//! Every device command through the real binary, with two homes exchanging files,
//! and every error path with its exit code.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use serde_json::Value;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn hotline(home: &Path, args: &[&str]) -> Run {
    let output = Command::cargo_bin("hotline")
        .unwrap()
        .env("HOTLINE_HOME", home)
        .args(args)
        .output()
        .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn ok(home: &Path, args: &[&str]) -> String {
    let run = hotline(home, args);
    assert_eq!(run.code, 0, "hotline {args:?} failed: {}", run.stderr);
    run.stdout
}

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap()
}

fn workdir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("hotline-device-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Two devices that verified each other, with a channel "crisis" joined by both.
fn two_devices(dir: &Path) -> (PathBuf, PathBuf) {
    let (north, south) = (dir.join("north"), dir.join("south"));
    let north_id = json(&ok(
        &north,
        &["init", "--party", "north", "--device", "desk", "--json"],
    ));
    let south_id = json(&ok(&south, &["init", "--party", "south", "--json"]));
    assert_eq!(
        json(&ok(&north, &["id", "--json"]))["fingerprint"],
        north_id["fingerprint"]
    );
    // North's card travels as armoured text (as in a mail), south's as binary.
    let card = json(&ok(
        &north,
        &[
            "card",
            "export",
            "--armor",
            "--out",
            s(&dir.join("north.card")),
            "--json",
        ],
    ));
    assert_eq!(card["fingerprint"], north_id["fingerprint"]);
    assert_eq!(card["armored"], true);
    let text = std::fs::read_to_string(dir.join("north.card")).unwrap();
    assert!(
        text.starts_with("-----BEGIN HOTLINE CARD-----\nParty: north\n"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("-----END HOTLINE CARD-----"));
    assert!(text.lines().all(|line| line.len() <= 64), "{text}");
    // What it claims, before importing it.
    let shown = json(&ok(
        &south,
        &["card", "show", s(&dir.join("north.card")), "--json"],
    ));
    assert_eq!(shown["party"], "north");
    assert_eq!(shown["fingerprint"], north_id["fingerprint"]);
    assert_eq!(shown["verified"], false);
    assert_eq!(shown["inbox_capability"], true);
    ok(
        &south,
        &["card", "export", "--out", s(&dir.join("south.card"))],
    );
    let imported = json(&ok(
        &north,
        &[
            "card",
            "import",
            s(&dir.join("south.card")),
            "--fingerprint",
            south_id["fingerprint"].as_str().unwrap(),
            "--json",
        ],
    ));
    assert_eq!(imported["verified"], true);
    ok(
        &south,
        &[
            "card",
            "import",
            s(&dir.join("north.card")),
            "--fingerprint",
            north_id["fingerprint"].as_str().unwrap(),
        ],
    );
    ok(&north, &["channel", "create", "crisis", "--with", "south"]);
    ok(
        &north,
        &["bundle", "export", "--out", s(&dir.join("invitation"))],
    );
    let joined = json(&ok(
        &south,
        &["channel", "join", s(&dir.join("invitation")), "--json"],
    ));
    assert_eq!(joined["channel"], "crisis");
    let mut parties: Vec<&str> = joined["parties"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    parties.sort_unstable();
    assert_eq!(parties, ["north", "south"]);
    (north, south)
}

#[test]
fn the_whole_story_between_two_homes() {
    let dir = workdir("story");
    let (north, south) = two_devices(&dir);
    let sent = json(&ok(
        &north,
        &[
            "send",
            "crisis",
            "The exercise ends at 18:00 UTC",
            "--deadline",
            "10m",
            "--json",
        ],
    ));
    let id = sent["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 64);
    ok(&north, &["bundle", "export", "--out", s(&dir.join("b1"))]);
    assert_eq!(
        json(&ok(
            &south,
            &["bundle", "import", s(&dir.join("b1")), "--json"]
        ))["new"],
        1
    );
    // Importing the same bundle again changes nothing.
    assert_eq!(
        json(&ok(
            &south,
            &["bundle", "import", s(&dir.join("b1")), "--json"]
        ))["new"],
        0
    );
    let log: Vec<Value> = ok(&south, &["log", "crisis", "--json"])
        .lines()
        .map(json)
        .collect();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["from"], "north");
    assert_eq!(log[0]["text"], "The exercise ends at 18:00 UTC");
    let acked = json(&ok(&south, &["ack", "crisis", &id[..12], "--json"]));
    assert_eq!(acked["channel"], "crisis");
    assert_eq!(acked["receipt"].as_str().map(str::len), Some(64));
    ok(&south, &["bundle", "export", "--out", s(&dir.join("b2"))]);
    ok(&north, &["bundle", "import", s(&dir.join("b2"))]);
    let log: Vec<Value> = ok(&north, &["log", "crisis", "--json"])
        .lines()
        .map(json)
        .collect();
    assert_eq!(log[0]["id"], id);
    assert_eq!(log[0]["delivered_to"], serde_json::json!(["south"]));
    assert_eq!(log[0]["read_by"], serde_json::json!(["south"]));
    assert!(ok(&north, &["log", "crisis"]).contains("read: south"));
    let list = json(
        ok(&north, &["channel", "list", "--json"])
            .lines()
            .next()
            .unwrap(),
    );
    assert_eq!(list["name"], "crisis");
    assert_eq!(list["parties"], serde_json::json!(["north", "south"]));

    let export = dir.join("crisis.hotline");
    let written = json(&ok(
        &north,
        &["export", "crisis", "--out", s(&export), "--json"],
    ));
    assert_eq!(written["channel"], "crisis");
    assert_eq!(
        written["bytes"].as_u64(),
        Some(std::fs::metadata(&export).unwrap().len())
    );
    // Private (every message in clear), and never replaced without --force.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&export).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = hotline(&north, &["export", "crisis", "--out", s(&export)]);
    assert_eq!(again.code, 2, "{}", again.stderr);
    assert!(again.stderr.contains("--force"), "{}", again.stderr);
    ok(
        &north,
        &["export", "crisis", "--out", s(&export), "--force"],
    );
    let report = json(&ok(&north, &["verify", s(&export), "--json"]));
    assert_eq!(report["verified"], true);
    assert_eq!(report["messages"], 1);
    assert_eq!(report["read_receipts"], 1);
    // A tampered export: exit 5.
    let mut bytes = std::fs::read(&export).unwrap();
    let middle = bytes.len() / 3;
    bytes[middle] ^= 1;
    std::fs::write(&export, bytes).unwrap();
    assert_eq!(hotline(&north, &["verify", s(&export)]).code, 5);
}

#[test]
fn a_wrong_fingerprint_is_refused_with_exit_4() {
    let dir = workdir("trust");
    let (north, south) = (dir.join("north"), dir.join("south"));
    ok(&north, &["init", "--party", "north"]);
    let north_fp = json(&ok(&north, &["id", "--json"]))["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    ok(&south, &["init", "--party", "south"]);
    ok(
        &south,
        &["card", "export", "--out", s(&dir.join("south.card"))],
    );
    let run = hotline(
        &north,
        &[
            "card",
            "import",
            s(&dir.join("south.card")),
            "--fingerprint",
            &north_fp,
        ],
    );
    assert_eq!(run.code, 4);
    assert!(
        run.stderr.contains("fingerprint mismatch"),
        "{}",
        run.stderr
    );
    let run = hotline(
        &north,
        &[
            "card",
            "import",
            s(&dir.join("south.card")),
            "--fingerprint",
            "12345",
        ],
    );
    assert_eq!(
        run.code, 2,
        "a fingerprint that is not 30 digits is a usage mistake"
    );
    assert!(run.stderr.contains("30 digits"));
    // Nothing was imported: creating a channel with south fails.
    let run = hotline(&north, &["channel", "create", "crisis", "--with", "south"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("import their card first"),
        "{}",
        run.stderr
    );
}

#[test]
fn error_paths_say_what_to_do() {
    let dir = workdir("errors");
    let (north, _) = two_devices(&dir);
    let run = hotline(&north, &["send", "no-such-channel", "hi"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("hotline channel list"),
        "{}",
        run.stderr
    );
    let run = hotline(&north, &["send", "crisis", "hi", "--deadline", "soon"]);
    assert_eq!(run.code, 2, "a usage mistake");
    assert!(run.stderr.contains("invalid deadline"));
    assert_eq!(hotline(&north, &["send", "crisis", ""]).code, 1);
    assert_eq!(hotline(&north, &["ack", "crisis", "deadbeef00"]).code, 1);
    assert_eq!(hotline(&north, &["init", "--party", "north"]).code, 1);
    assert_eq!(hotline(&north, &["send"]).code, 2);
    assert_eq!(hotline(&north, &["frobnicate"]).code, 2);
    // A bundle that is not one, and one with nothing for this device.
    std::fs::write(dir.join("garbage"), b"not a bundle").unwrap();
    let run = hotline(&north, &["bundle", "import", s(&dir.join("garbage"))]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("not a hotline bundle"));
    let run = hotline(&north, &["channel", "join", s(&dir.join("invitation"))]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    // No device here.
    let run = hotline(&dir.join("nobody"), &["id"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("hotline init"));
    // A home others can read is refused, and the message says how to fix it.
    std::fs::set_permissions(&north, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = hotline(&north, &["id"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("chmod 700"), "{}", run.stderr);
    std::fs::set_permissions(&north, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(hotline(&north, &["id"]).code, 0);
}

#[test]
fn a_new_home_is_private() {
    let dir = workdir("private");
    let home = dir.join("device");
    ok(&home, &["init", "--party", "north"]);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&home), 0o700);
    assert_eq!(mode(&home.join("device.db")), 0o600);
}

/// Fails if `output` holds a character a terminal would act on, or that shows text in
/// another order than written (line breaks excepted).
fn assert_inert(what: &str, output: &str) {
    let live: Vec<char> = output
        .chars()
        .filter(|&c| {
            (c.is_control() && c != '\n')
                || matches!(c, '\u{61c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
                    | '\u{2060}'..='\u{2069}' | '\u{feff}')
        })
        .collect();
    assert!(
        live.is_empty(),
        "{what}: live characters {live:?} in {output}"
    );
}

/// A counterpart's message with every class of hostile text: escape sequences (clear
/// the screen, set the title), C1 controls, bell, DEL, carriage return, a forged log
/// line after a line break, bidi overrides and isolates, zero-width characters, line
/// separators. Every human-facing output of the receiving device shows it visibly
/// escaped, each line of it; every JSON output keeps its exact text, inert on a screen.
#[test]
fn hostile_text_is_inert_in_every_output() {
    let dir = workdir("inert");
    let (north, south) = two_devices(&dir);
    let hostile = "hello\u{1b}[2J\u{1b}]0;pwned\u{7}\u{9b}31m\u{7f}\r\n0123456789ab north      \
                   forged \u{202e}txet\u{202c} \u{2066}iso\u{2069}\u{200b}\u{feff}\u{2028}end";
    ok(&south, &["send", "crisis", hostile]);
    ok(
        &south,
        &["bundle", "export", "--out", s(&dir.join("to-north"))],
    );
    let imported = ok(&north, &["bundle", "import", s(&dir.join("to-north"))]);
    assert_inert("bundle import", &imported);
    let shown = ok(&north, &["log", "crisis"]);
    assert_inert("log", &shown);
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 2, "one message, both its lines: {shown}");
    assert!(
        lines[0].ends_with("hello␛[2J␛]0;pwned␇<U+009B>31m␡␍"),
        "{shown}"
    );
    // The second line is indented under the message: it cannot pass for a log line.
    assert!(
        lines[1].starts_with("             0123456789ab north      forged <U+202E>txet<U+202C>"),
        "{shown}"
    );
    assert!(lines[1].ends_with("<U+2066>iso<U+2069><U+200B><U+FEFF><U+2028>end"));
    let last = ok(&north, &["log", "crisis", "--last", "1"]);
    assert_eq!(last, shown);
    assert_inert("status", &hotline(&north, &["status"]).stdout);
    assert_inert("channel list", &ok(&north, &["channel", "list"]));
    ok(
        &north,
        &["export", "crisis", "--out", s(&dir.join("crisis.hotline"))],
    );
    let verified = ok(&north, &["verify", s(&dir.join("crisis.hotline"))]);
    assert_inert("verify", &verified);
    // JSON keeps the exact text, and is inert on a screen too (escapes, not bytes).
    let exact = ok(&north, &["log", "crisis", "--json"]);
    assert_inert("log --json", &exact);
    assert_eq!(json(&exact)["text"], hostile);
    assert!(
        exact.contains(r"\u001b[2J") && exact.contains(r"\u202e"),
        "{exact}"
    );
    for args in [
        &["status", "--json"][..],
        &["verify", s(&dir.join("crisis.hotline")), "--json"],
    ] {
        assert_inert(&args.join(" "), &hotline(&north, args).stdout);
    }
}

/// A relay address without a pin, or not HTTPS HOST:PORT, never goes into a card or a
/// channel: usage error (exit 2) saying what an address looks like.
#[test]
fn a_relay_address_without_a_valid_pin_is_refused() {
    let dir = workdir("relay-address");
    let pin = "ab".repeat(32);
    for bad in [
        "not a url".to_owned(),
        "https://127.0.0.1:8443".to_owned(),
        "https://127.0.0.1:8443/#sha256=abcd".to_owned(),
        format!("http://127.0.0.1:8443/#sha256={pin}"),
        format!("https://127.0.0.1/#sha256={pin}"),
    ] {
        let run = hotline(
            &dir.join("fresh"),
            &["init", "--party", "north", "--relay", &bad],
        );
        assert_eq!(run.code, 2, "{bad}: {}", run.stderr);
        assert!(
            run.stderr.contains("https://HOST:PORT/#sha256="),
            "{}",
            run.stderr
        );
        assert!(!dir.join("fresh").join("device.db").exists(), "{bad}");
    }
    let (north, _) = two_devices(&dir);
    let run = hotline(
        &north,
        &[
            "channel",
            "create",
            "other",
            "--with",
            "south",
            "--relay",
            "relay.example:443",
        ],
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    let run = hotline(
        &north,
        &["channel", "relays", "crisis", "--relay", "name=https://x:1"],
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    let good = format!("https://127.0.0.1:8443/#sha256={pin}");
    assert_eq!(
        hotline(&dir.join("ok"), &["init", "--party", "x", "--relay", &good]).code,
        0
    );
}

/// A message too long for the command line comes from standard input (`-`) or a file,
/// whole; one over what a message holds, or not UTF-8, is refused; no message at all is
/// a usage mistake.
#[test]
fn a_long_message_is_sent_from_standard_input_or_a_file() {
    let dir = workdir("long-message");
    let (north, south) = two_devices(&dir);
    let long: String = "line of a long agreed text\n".repeat(12_000);
    assert!(long.len() > 300_000);
    let sent = Command::cargo_bin("hotline")
        .unwrap()
        .env("HOTLINE_HOME", &north)
        .args(["send", "crisis", "-"])
        .write_stdin(long.clone())
        .output()
        .unwrap();
    assert!(sent.status.success(), "{sent:?}");
    let file = dir.join("text");
    std::fs::write(&file, "from a file ✓").unwrap();
    ok(&north, &["send", "crisis", "--file", s(&file)]);
    ok(
        &north,
        &["bundle", "export", "--out", s(&dir.join("to-south"))],
    );
    ok(&south, &["bundle", "import", s(&dir.join("to-south"))]);
    let texts: Vec<String> = ok(&south, &["log", "crisis", "--json"])
        .lines()
        .map(|line| json(line)["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(texts, [long, "from a file ✓".to_owned()]);
    std::fs::write(&file, vec![b'x'; (1 << 20) + 1]).unwrap();
    assert_eq!(
        hotline(&north, &["send", "crisis", "--file", s(&file)]).code,
        1
    );
    std::fs::write(&file, [0xff, 0xfe]).unwrap();
    let run = hotline(&north, &["send", "crisis", "--file", s(&file)]);
    assert!(run.stderr.contains("not UTF-8"), "{}", run.stderr);
    assert_eq!(hotline(&north, &["send", "crisis"]).code, 2);
}
