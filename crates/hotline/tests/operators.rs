//! What operators install beside the binary: shell completions, the manual, and the
//! systemd units in `dist/systemd`, each exercised by the tool that consumes it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::data_dir;

fn hotline(args: &[&str]) -> std::process::Output {
    Command::new(assert_cmd::cargo::cargo_bin("hotline"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// Whether `tool` runs here; under CI (`CI` set) a missing tool is a failure, since the
/// machine has it.
fn available(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|output| output.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is missing under CI"
        );
        eprintln!("skipped: {tool} is not installed");
    }
    found
}

#[test]
fn completions_load_in_bash_and_are_generated_for_zsh_and_fish() {
    let dir = data_dir("completions");
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("hotline.bash");
    std::fs::write(&script, stdout(&hotline(&["completions", "bash"]))).unwrap();
    if available("bash") {
        let loaded = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source '{}' && complete -p hotline && COMP_WORDS=(hotline cha) COMP_CWORD=1 \
                 && _hotline hotline cha hotline && printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                script.display()
            ))
            .output()
            .unwrap();
        let text = stdout(&loaded);
        assert!(text.contains("-F _hotline hotline"), "{text}");
        // Completing `hotline cha` offers `channel`.
        assert!(text.lines().any(|line| line == "channel"), "{text}");
    }
    let zsh = stdout(&hotline(&["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef hotline"), "{zsh}");
    let fish = stdout(&hotline(&["completions", "fish"]));
    assert!(fish.contains("complete -c hotline"), "{fish}");
    // A shell it does not know is a usage mistake.
    assert_eq!(hotline(&["completions", "tcsh"]).status.code(), Some(2));
}

/// The manual's pages, written by `hotline man --out`.
fn manual(dir: &Path) -> PathBuf {
    let man1 = dir.join("man").join("man1");
    let written = hotline(&["man", "--out", man1.to_str().unwrap()]);
    assert!(written.status.success());
    man1
}

/// Text as a terminal shows it: man's overstrikes (`c\x08c` bold, `_\x08c`
/// underlined) reduced to their character.
fn plain(text: &str) -> String {
    let mut out: Vec<char> = Vec::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if chars.peek() == Some(&'\x08') {
            chars.next();
            continue;
        }
        out.push(c);
    }
    out.into_iter().collect()
}

#[test]
fn the_manual_renders_with_every_command_and_the_exit_codes() {
    let dir = data_dir("manual");
    let man1 = manual(&dir);
    for page in [
        "hotline.1",
        "hotline-send.1",
        "hotline-relay-serve.1",
        "hotline-status.1",
    ] {
        assert!(man1.join(page).exists(), "no {page}");
    }
    let page = stdout(&hotline(&["man"]));
    assert!(page.contains(".TH hotline 1"), "{page}");
    // Every exit code in its own entry.
    for code in 0..=6 {
        assert!(
            page.contains(&format!(".TP\n{code}\n")),
            "exit code {code}: {page}"
        );
    }
    if !available("man") {
        return;
    }
    let rendered = Command::new("man")
        .arg("-l")
        .arg(man1.join("hotline.1"))
        .env("MANWIDTH", "100")
        .env("MAN_KEEP_FORMATTING", "0")
        .output()
        .unwrap();
    let text = plain(&stdout(&rendered));
    for expected in [
        "hotline",
        "SUBCOMMANDS",
        "EXAMPLES",
        "EXIT STATUS",
        "hotline-send(1)",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    let send = Command::new("man")
        .arg("-l")
        .arg(man1.join("hotline-send.1"))
        .env("MANWIDTH", "100")
        .output()
        .unwrap();
    assert!(plain(&stdout(&send)).contains("--precedence"));
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    if !available("systemd-analyze") {
        return;
    }
    let dir = data_dir("units");
    let man1 = manual(&dir);
    let units = dir.join("units");
    std::fs::create_dir_all(&units).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/systemd");
    let binary = assert_cmd::cargo::cargo_bin("hotline");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        // The binary where the units expect it is this build's; a template is checked
        // as one of its instances.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin/hotline", binary.to_str().unwrap());
        let name = name.replace("@.service", "@duty.service");
        std::fs::write(units.join(&name), text).unwrap();
        checked.push(units.join(name));
    }
    checked.sort();
    assert_eq!(
        checked
            .iter()
            .map(|path| path.file_name().unwrap().to_str().unwrap())
            .collect::<Vec<_>>(),
        ["hotline-follow@duty.service", "hotline-relay.service"]
    );
    let verified = Command::new("systemd-analyze")
        .arg("verify")
        .args(&checked)
        // `Documentation=man:hotline(1)` is checked against the generated manual.
        .env("MANPATH", man1.parent().unwrap())
        .output()
        .unwrap();
    assert!(
        verified.status.success() && verified.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
}

/// A `config --json` report (one object per setting) by key.
fn by_key(report: &str) -> std::collections::BTreeMap<String, serde_json::Value> {
    report
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            (value["key"].as_str().unwrap().to_owned(), value)
        })
        .collect()
}

/// `relay config` run with `args` and `env`: exit code, stdout, stderr.
fn relay_config(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = Command::new(assert_cmd::cargo::cargo_bin("hotline"))
        .args(["relay", "config"])
        .args(args)
        .envs(env.iter().copied())
        .env_remove("HOTLINE_RELAY_LISTEN")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn relay_settings_come_from_a_flag_the_environment_a_file_or_the_default() {
    let dir = data_dir("relay-settings");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("relay.toml");
    let data = dir.join("data");
    std::fs::write(
        &file,
        format!(
            "data = \"{}\"\nlisten = \"127.0.0.1:0\"\nretention = \"14d\"\nmax_message = 4096\nmax_storage = \"1GiB\"\n",
            data.display()
        ),
    )
    .unwrap();
    let (code, report, stderr) = relay_config(
        &[
            "--config",
            file.to_str().unwrap(),
            "--max-message",
            "512KiB",
            "--json",
        ],
        &[("HOTLINE_RELAY_RETENTION", "7d")],
    );
    assert_eq!(code, 0, "{stderr}");
    let settings = by_key(&report);
    let seen = |key: &str| {
        (
            settings[key]["value"].as_str().unwrap_or("-").to_owned(),
            settings[key]["source"].as_str().unwrap_or("-").to_owned(),
        )
    };
    assert_eq!(seen("max_message"), ("512KiB".into(), "flag".into()));
    assert_eq!(
        seen("retention"),
        ("7d".into(), "environment (HOTLINE_RELAY_RETENTION)".into())
    );
    assert_eq!(
        seen("max_storage"),
        ("1GiB".into(), format!("file ({})", file.display()))
    );
    assert_eq!(seen("quota_per_inbox"), ("16MiB".into(), "default".into()));
    assert_eq!(seen("postgres"), ("-".into(), "-".into()));

    // The relay runs from the file alone (its data and address there).
    let relay = common::Relay::spawn({
        let mut command = Command::new(assert_cmd::cargo::cargo_bin("hotline"));
        command
            .args(["relay", "serve", "--config"])
            .arg(&file)
            .env_remove("HOTLINE_RELAY_LISTEN")
            .stderr(std::process::Stdio::null());
        command
    });
    assert!(data.join("relay-key.der").exists());
    relay.stop();

    // Mistakes are usage errors (exit 2) that name what is wrong.
    let unknown = dir.join("unknown.toml");
    std::fs::write(&unknown, "listen = \"127.0.0.1:0\"\nmax_mesage = 1\n").unwrap();
    let (code, _, stderr) = relay_config(&["--config", unknown.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("\"max_mesage\""), "{stderr}");
    let (code, _, stderr) = relay_config(&["--retention", "forever"], &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("retention \"forever\" from the flag"),
        "{stderr}"
    );
    let (code, _, stderr) = relay_config(&["--max-message", "2MiB"], &[]);
    assert_eq!(code, 2, "{stderr}");
    // A burst below the largest batch would stall a device's backlog for good.
    let (code, _, stderr) = relay_config(&["--request-burst", "100"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("request_burst 100: at least 256"),
        "{stderr}"
    );
    let serve = Command::new(assert_cmd::cargo::cargo_bin("hotline"))
        .args(["relay", "serve", "--data"])
        .arg(&data)
        .env_remove("HOTLINE_RELAY_LISTEN")
        .env_remove("HOTLINE_RELAY_CONFIG")
        .output()
        .unwrap();
    assert_eq!(serve.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&serve.stderr).contains("HOTLINE_RELAY_LISTEN"),
        "{serve:?}"
    );
}

#[test]
fn device_settings_come_from_home_the_environment_a_file_or_the_default() {
    let dir = data_dir("device-settings");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.toml");
    let home = dir.join("from-file");
    std::fs::write(
        &file,
        format!(
            "home = \"{}\"\nround = 30\nundelivered_after = \"2m\"\n",
            home.display()
        ),
    )
    .unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let output = Command::new(assert_cmd::cargo::cargo_bin("hotline"))
            .args(args)
            .env("HOTLINE_CONFIG", &file)
            .env_remove("HOTLINE_HOME")
            .env_remove("HOTLINE_ROUND")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    // The home the file names is the one used.
    let (code, _, stderr) = run(&["init", "--party", "north"], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(home.join("hotline.db").exists() || home.read_dir().unwrap().next().is_some());
    let (code, report, stderr) = run(&["config", "show", "--json"], &[("HOTLINE_ROUND", "20")]);
    assert_eq!(code, 0, "{stderr}");
    let settings = by_key(&report);
    let file_source = format!("file ({})", file.display());
    assert_eq!(settings["home"]["source"], file_source.as_str());
    assert_eq!(settings["round"]["value"], "20");
    assert_eq!(settings["round"]["source"], "environment (HOTLINE_ROUND)");
    assert_eq!(settings["undelivered_after"]["value"], "2m");
    assert_eq!(
        settings["link_test_interval"]["value"],
        serde_json::Value::Null
    );
    // --home beats all of them.
    let other = dir.join("flag");
    let (_, report, _) = run(
        &[
            "--home",
            other.to_str().unwrap(),
            "config",
            "show",
            "--json",
        ],
        &[("HOTLINE_HOME", "/nowhere")],
    );
    assert!(report.contains("\"source\":\"flag\""), "{report}");
    // A value that does not parse, when used, and an unknown key, always: exit 2.
    let (code, _, stderr) = run(&["sync"], &[("HOTLINE_ROUND", "often")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("round \"often\""), "{stderr}");
    std::fs::write(&file, "hoem = \"/tmp\"\n").unwrap();
    let (code, _, stderr) = run(&["id"], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("\"hoem\""), "{stderr}");
}

#[test]
fn a_following_device_logs_each_event_with_its_time_and_never_the_text() {
    use std::io::BufRead;
    let dir = data_dir("follow-log");
    let relay = common::Relay::start(&dir.join("relay"));
    let homes = common::two_parties_in_crisis(&dir, &relay.url);
    let (north, south) = (&homes[0], &homes[1]);
    let mut follower = Command::new(assert_cmd::cargo::cargo_bin("hotline"))
        .env("HOTLINE_HOME", south)
        .env_remove("RUST_LOG")
        .args(["sync", "--follow", "--round", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(follower.stderr.take().unwrap());
    let (send, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
    common::ok(north, &["send", "crisis", "the words of the message"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut seen = Vec::new();
    let received = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no message in the log: {seen:#?}"));
        if line.contains("from north") {
            break line;
        }
        seen.push(line);
    };
    let _ = follower.kill();
    let _ = follower.wait();
    // `2026-11-30T16:40:01.123456Z  INFO message 1a2b… in crisis from north: 24 characters`
    assert!(received.starts_with("20"), "no timestamp: {received}");
    assert!(received.contains(" INFO "), "{received}");
    assert!(
        !received.contains("the words"),
        "message text in the log: {received}"
    );
    assert!(received.contains("24 characters"), "{received}");
    assert!(
        seen.iter().any(|line| line.contains("following the line")),
        "{seen:#?}"
    );
}
