//! What one command costs as a channel's history grows.
//!
//! Grows one channel of a fresh device to each size (the fast path: `Store::send` in one
//! process, every envelope sealed, chained and stored as `hotline send` does), then times
//! the real command path: fresh `hotline` processes for `send`, `status`, `log --last 50`,
//! `channel list`, `export` and `verify`, each run several times, and 50 signed
//! checkpoints sealed one after another in an open store (after one untimed); prints p50 / p99 of the wall time and the peak
//! RSS (from `/usr/bin/time`, when present) per command and size.
//!
//! ```sh
//! cargo bench -p hotline --bench history                       # 1k, 10k, 100k
//! HOTLINE_HISTORY_SIZES=1000,1000000 cargo bench -p hotline --bench history
//! HOTLINE_HISTORY_RUNS=9 cargo bench -p hotline --bench history
//! HOTLINE_HISTORY_KEEP=1 cargo bench -p hotline --bench history  # keeps the home, to profile
//! ```
//!
//! Figures go to BENCHMARKS.md with the command that produced them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hotline_client::store::Store;
use hotline_core::Body;

const CHANNEL: &str = "history";

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let sizes: Vec<u64> = std::env::var("HOTLINE_HISTORY_SIZES")
        .unwrap_or_else(|_| "1000,10000,100000".into())
        .split(',')
        .filter_map(|size| size.trim().parse().ok())
        .collect();
    let runs: usize = std::env::var("HOTLINE_HISTORY_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(5)
        .max(1);
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_hotline"));
    let time = Path::new("/usr/bin/time").exists();
    let scratch = std::env::temp_dir().join(format!("hotline-history-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    let home = scratch.join("home");
    let mut store = Store::init(&home, "north", "desk", &[]).expect("init");
    store
        .create_channel(CHANNEL, &[], &[])
        .expect("create channel");
    drop(store);

    println!(
        "{:>9}  {:<13} {:>9} {:>9} {:>9}",
        "envelopes", "command", "p50 ms", "p99 ms", "peak RSS"
    );
    let mut grown = 0u64;
    for size in sizes {
        let started = Instant::now();
        let mut store = Store::open(&home).expect("open");
        while grown < size {
            store
                .send(CHANNEL, Body::text(format!("message {grown}")), None)
                .expect("send");
            grown += 1;
        }
        drop(store);
        eprintln!(
            "grew the channel to {grown} envelopes in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let export = scratch.join("export.hotline");
        let home_arg = home.to_str().expect("utf-8 path").to_owned();
        let export_arg = export.to_str().expect("utf-8 path").to_owned();
        let commands: Vec<(&str, Vec<String>)> = vec![
            (
                "send",
                args(&["--home", &home_arg, "send", CHANNEL, "one more"]),
            ),
            ("status", args(&["--home", &home_arg, "status", "--json"])),
            (
                "log --last 50",
                args(&["--home", &home_arg, "log", CHANNEL, "--last", "50"]),
            ),
            (
                "channel list",
                args(&["--home", &home_arg, "channel", "list"]),
            ),
            (
                "export",
                args(&["--home", &home_arg, "export", CHANNEL, "--out", &export_arg]),
            ),
            ("verify", args(&["verify", &export_arg])),
        ];
        for (name, arguments) in &commands {
            let mut times = Vec::with_capacity(runs);
            let mut peak_kb = 0u64;
            for _ in 0..runs {
                if *name == "export" {
                    let _ = std::fs::remove_file(&export);
                }
                let (elapsed, rss) = run(&binary, arguments, time);
                times.push(elapsed);
                peak_kb = peak_kb.max(rss.unwrap_or(0));
            }
            if *name == "send" {
                grown += runs as u64;
            }
            report(size, name, times, time.then_some(peak_kb));
        }
        let times = checkpoints(&home, CHECKPOINTS);
        grown += CHECKPOINTS as u64 + 1;
        report(size, "checkpoint", times, None);
    }
    if std::env::var_os("HOTLINE_HISTORY_KEEP").is_some() {
        eprintln!("kept the grown home: {}", home.display());
    } else {
        let _ = std::fs::remove_dir_all(&scratch);
    }
}

/// Prints one row: p50 and p99 of `times`, and the peak RSS in KiB if measured.
fn report(size: u64, name: &str, mut times: Vec<Duration>, peak_kb: Option<u64>) {
    times.sort();
    let percentile = |p: f64| {
        let index = ((times.len() as f64 - 1.0) * p).round() as usize;
        times[index].as_secs_f64() * 1e3
    };
    let rss = peak_kb.map_or_else(
        || "in process".to_owned(),
        |kb| format!("{:.1} MB", kb as f64 / 1024.0),
    );
    println!(
        "{size:>9}  {name:<13} {:>9.1} {:>9.1} {rss:>9}",
        percentile(0.5),
        percentile(0.99)
    );
}

/// Checkpoints timed per size: a running follower seals them one after another, so
/// the figure is the steady cost, after one untimed checkpoint that warms the process
/// (statement cache, the Merkle log's right edge, the tail's keys).
const CHECKPOINTS: usize = 50;

/// Seals `count` checkpoints in a store opened once (what a follower does every tenth
/// link test), after one untimed: the root over everything held, signed.
fn checkpoints(home: &Path, count: usize) -> Vec<Duration> {
    let mut store = Store::open(home).expect("open");
    let checkpoint = || Body::Checkpoint {
        root: [0; 32],
        size: 0,
        horizon: 0,
    };
    store
        .send(CHANNEL, checkpoint(), None)
        .expect("warm-up checkpoint");
    (0..count)
        .map(|_| {
            let started = Instant::now();
            store.send(CHANNEL, checkpoint(), None).expect("checkpoint");
            started.elapsed()
        })
        .collect()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|arg| (*arg).to_owned()).collect()
}

/// Runs one fresh process; returns its wall time and, through `/usr/bin/time`, its peak
/// resident set in KiB.
fn run(binary: &Path, arguments: &[String], time: bool) -> (Duration, Option<u64>) {
    let mut command = if time {
        let mut command = Command::new("/usr/bin/time");
        command.arg("-f").arg("%M").arg(binary);
        command
    } else {
        Command::new(binary)
    };
    command.args(arguments);
    let started = Instant::now();
    let output = command.output().expect("run hotline");
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // `status` exits 3 here (no relay), which is its answer, not a failure of the run.
    let code = output.status.code().unwrap_or(-1);
    assert!(
        code == 0 || (arguments.iter().any(|a| a == "status") && code == 3),
        "{arguments:?} failed ({code}): {stderr}"
    );
    let rss = time
        .then(|| {
            stderr
                .lines()
                .last()
                .and_then(|line| line.trim().parse().ok())
        })
        .flatten();
    (elapsed, rss)
}
