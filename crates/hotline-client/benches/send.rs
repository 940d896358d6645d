//! Durable `send` throughput into the outbox, beside the machine's limits, in one run:
//!
//! 1. the fsync limit: 1 KiB appends to a file, each followed by `fdatasync`;
//! 2. SQLite's limit: one-row transactions in WAL mode with `synchronous=FULL`;
//! 3. hotline: `Store::send` of 1 KiB texts (MLS encryption, envelope, transcript,
//!    outbox row, commit), in blocks, to show how the cost grows with the transcript.
//!
//! `cargo bench -p hotline-client --bench send` (`HOTLINE_BENCH_SENDS` sets the count).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::time::{Duration, Instant};

use hotline_core::Body;

fn report(name: &str, samples: &mut [Duration]) {
    samples.sort();
    let total: Duration = samples.iter().sum();
    let rate = samples.len() as f64 / total.as_secs_f64();
    let p50 = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];
    println!(
        "{name:<44} {:>6} ops  {rate:>9.0} ops/s  p50 {:>8.1} µs  p99 {:>8.1} µs",
        samples.len(),
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
}

fn main() {
    let sends: usize = std::env::var("HOTLINE_BENCH_SENDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let dir = std::env::temp_dir().join(format!("hotline-bench-send-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let payload = vec![b'x'; 1024];

    // 1. fsync limit.
    let mut file = std::fs::File::create(dir.join("append.log")).unwrap();
    let mut samples = Vec::new();
    for _ in 0..2000 {
        let start = Instant::now();
        file.write_all(&payload).unwrap();
        file.sync_data().unwrap();
        samples.push(start.elapsed());
    }
    report("fsync limit: 1 KiB append + fdatasync", &mut samples);

    // 2. SQLite limit.
    let connection = rusqlite::Connection::open(dir.join("plain.db")).unwrap();
    connection
        .pragma_update(None, "journal_mode", "WAL")
        .unwrap();
    connection
        .pragma_update(None, "synchronous", "FULL")
        .unwrap();
    connection
        .execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, bytes BLOB)")
        .unwrap();
    let mut samples = Vec::new();
    for _ in 0..2000 {
        let start = Instant::now();
        connection
            .execute("INSERT INTO t (bytes) VALUES (?1)", [&payload])
            .unwrap();
        samples.push(start.elapsed());
    }
    report("SQLite limit: 1-row commit, WAL, sync=FULL", &mut samples);

    // 3. hotline send.
    let (north_home, south_home) = (dir.join("north"), dir.join("south"));
    let (mut north, _south) = hotline_client::testing::verified_pair(&north_home, &south_home);
    let text = String::from_utf8(payload).unwrap();
    let block = (sends / 4).max(1);
    for first in (0..sends).step_by(block) {
        let mut samples = Vec::new();
        for _ in first..(first + block).min(sends) {
            let start = Instant::now();
            north
                .send("crisis", Body::text(text.clone()), None)
                .unwrap();
            samples.push(start.elapsed());
        }
        report(
            &format!(
                "hotline send 1 KiB, transcript {}..{}",
                first,
                first + samples.len()
            ),
            &mut samples,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
