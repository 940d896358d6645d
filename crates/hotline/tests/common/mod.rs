//! What the real-process tests share: a relay process on loopback, and a fresh data
//! directory.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `hotline relay serve` process, killed when dropped.
pub struct Relay {
    pub child: Child,
    pub url: String,
}

impl Relay {
    pub fn start(data: &Path) -> Relay {
        Self::start_on(data, "127.0.0.1:0")
    }

    pub fn start_on(data: &Path, listen: &str) -> Relay {
        Self::start_with(data, listen, &[])
    }

    pub fn start_with(data: &Path, listen: &str, options: &[&str]) -> Relay {
        let mut command = Command::new(assert_cmd::cargo::cargo_bin("hotline"));
        command
            .args(["relay", "serve", "--data"])
            .arg(data)
            .args(["--listen", listen])
            .args(options)
            .stderr(Stdio::null());
        Self::spawn(command)
    }

    /// Starts `command` (a relay, perhaps behind a shell that sets limits), waits for
    /// the address it prints.
    pub fn spawn(mut command: Command) -> Relay {
        let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("https://127.0.0.1:"),
            "relay printed {line:?}"
        );
        Relay {
            child,
            url: line.trim().to_owned(),
        }
    }

    /// The address it listens on, to start it again there.
    pub fn address(&self) -> String {
        self.url
            .trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap()
            .to_owned()
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// A fresh directory for one test's data.
pub fn data_dir(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("hotline-relay-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

pub fn cli(home: &Path, args: &[&str]) -> (i32, String) {
    let output = Command::new(assert_cmd::cargo::cargo_bin("hotline"))
        .env("HOTLINE_HOME", home)
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

pub fn ok(home: &Path, args: &[&str]) -> String {
    let (code, stdout) = cli(home, args);
    assert_eq!(code, 0, "hotline {args:?}");
    stdout
}

pub fn field(text: &str, name: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(text.lines().next().unwrap()).unwrap()[name].clone()
}

/// New homes under `dir`, one per party, each receiving invitations on `relay`, that
/// imported every other party's card with the fingerprint read out of band.
pub fn verified_homes(dir: &Path, parties: &[&str], relay: &str) -> Vec<std::path::PathBuf> {
    let homes: Vec<std::path::PathBuf> = parties.iter().map(|party| dir.join(party)).collect();
    for (party, home) in parties.iter().zip(&homes) {
        ok(home, &["init", "--party", party, "--relay", relay]);
        let card = dir.join(format!("{party}.card"));
        ok(home, &["card", "export", "--out", card.to_str().unwrap()]);
    }
    for home in &homes {
        for (other, other_home) in parties.iter().zip(&homes) {
            if other_home == home {
                continue;
            }
            let fingerprint = field(&ok(other_home, &["id", "--json"]), "fingerprint");
            let card = dir.join(format!("{other}.card"));
            ok(
                home,
                &[
                    "card",
                    "import",
                    card.to_str().unwrap(),
                    "--fingerprint",
                    fingerprint.as_str().unwrap(),
                ],
            );
        }
    }
    homes
}

/// North, south and the mediator, verified, in channel `crisis` on `relay` that north
/// created; the two others joined.
pub fn three_parties_in_crisis(dir: &Path, relay: &str) -> Vec<std::path::PathBuf> {
    let homes = verified_homes(dir, &["north", "south", "mediator"], relay);
    ok(
        &homes[0],
        &[
            "channel", "create", "crisis", "--with", "south", "--with", "mediator", "--relay",
            relay,
        ],
    );
    for home in &homes[1..] {
        ok(home, &["sync"]);
    }
    homes
}

/// North and south, verified, in channel `crisis` on `relay`, both synced once.
pub fn two_parties_in_crisis(dir: &Path, relay: &str) -> Vec<std::path::PathBuf> {
    let homes = verified_homes(dir, &["north", "south"], relay);
    ok(
        &homes[0],
        &[
            "channel", "create", "crisis", "--with", "south", "--relay", relay,
        ],
    );
    for home in &homes {
        ok(home, &["sync"]);
    }
    homes
}

/// `hotline sync --follow --json` running in a home, its report lines read as they come.
pub struct Follower {
    pub child: Child,
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Follower {
    pub fn start(home: &Path) -> Follower {
        Self::start_with(home, &["--round", "1"])
    }

    pub fn start_with(home: &Path, options: &[&str]) -> Follower {
        let mut child = Command::new(assert_cmd::cargo::cargo_bin("hotline"))
            .env("HOTLINE_HOME", home)
            .args(["sync", "--follow", "--json"])
            .args(options)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Follower { child, lines }
    }

    /// Waits (up to 30 s) for an event of this kind; returns it.
    pub fn expect_event(&mut self, kind: &str) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("sync --follow printed no {kind} event within 30 s"));
            let event: serde_json::Value = serde_json::from_str(&line).unwrap();
            if event["event"] == kind {
                return event;
            }
        }
    }

    /// Waits (up to 30 s) for a message of another party.
    pub fn expect_received(&mut self) {
        self.expect_event("message");
    }

    pub fn stop(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap().code()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}
