//! Relay processes on one PostgreSQL database: durable ingest of one relay process
//! beside two sharing the same schema, in one run. 64 senders (each a device with its
//! own stream connection, one 1 KiB message in flight), all members of one channel,
//! then spread over 8 channels; with two processes, half the senders use each. Every append is committed in
//! PostgreSQL before it is answered.
//!
//! `cargo bench -p hotline --bench scale_out` (`HOTLINE_BENCH_POSTGRES`, default
//! `host=127.0.0.1 user=postgres dbname=test`; `HOTLINE_BENCH_MESSAGES` per run,
//! default 8000). Skipped, saying so, when PostgreSQL cannot be reached.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hotline_core::DeviceIdentity;
use hotline_proto::stream::StreamClient;
use hotline_relay::client::RelayClient;
use hotline_relay::storage::Membership;
use hotline_relay::tls;
use rand::SeedableRng;

const SENDERS: usize = 64;

/// Messages/s and p50 / p99 in ms of `SENDERS` devices appending `total` messages
/// between them, spread over `urls` in turn, sender `n` in channel `n % channels` (with
/// two processes, each channel's senders then reach one of them).
async fn ingest(urls: &[String], channels: usize, total: usize) -> (f64, f64, f64) {
    let identities: Vec<Arc<DeviceIdentity>> = (0..SENDERS)
        .map(|n| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
            Arc::new(DeviceIdentity::generate("party", "desk", &mut rng).unwrap())
        })
        .collect();
    let ids: Vec<[u8; 32]> = (0..channels).map(|_| rand::random()).collect();
    // The processes share the database: one registration serves all.
    for (c, channel) in ids.iter().enumerate() {
        let members: Vec<&Arc<DeviceIdentity>> =
            identities.iter().skip(c).step_by(channels).collect();
        RelayClient::new(&urls[0])
            .unwrap()
            .register(
                members[0],
                channel,
                &Membership {
                    committer: members[0].key().0,
                    version: 1,
                    members: members.iter().map(|i| i.key().0).collect(),
                },
            )
            .await
            .unwrap();
    }
    let mut streams = Vec::new();
    for (n, identity) in identities.iter().enumerate() {
        streams.push(
            StreamClient::connect(&urls[n % urls.len()], identity)
                .await
                .unwrap(),
        );
    }
    let per_sender = total / SENDERS;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (n, stream) in streams.into_iter().enumerate() {
        let channel = ids[n % channels];
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_sender);
            for m in 0..per_sender {
                let mut payload = vec![0u8; 1024];
                payload[..16].copy_from_slice(
                    &[(n as u64).to_be_bytes(), (m as u64).to_be_bytes()].concat(),
                );
                let sent = Instant::now();
                stream.append(&channel, payload).await.unwrap();
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut latencies: Vec<Duration> = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let rate = latencies.len() as f64 / start.elapsed().as_secs_f64();
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (
        rate,
        ms(latencies[latencies.len() / 2]),
        ms(latencies[latencies.len() * 99 / 100]),
    )
}

fn psql(url: &str, sql: &str) -> bool {
    std::process::Command::new("psql")
        .args([url, "-qc", sql])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn main() {
    tls::install_provider();
    let url = std::env::var("HOTLINE_BENCH_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let total: usize = std::env::var("HOTLINE_BENCH_MESSAGES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(8000);
    if !psql(&url, "SELECT 1") {
        println!("(PostgreSQL not reachable at {url:?}, or psql missing: skipped)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("hotline-bench-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("| channels | relay processes | msg/s | p50 | p99 |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for channels in [1usize, 8] {
        let mut rows = Vec::new();
        for processes in [1usize, 2] {
            let schema = format!(
                "hotline_scale_{}_{channels}_{processes}",
                std::process::id()
            );
            let relays: Vec<common::RelayProcess> = (0..processes)
                .map(|n| {
                    common::spawn_relay(
                        &dir.join(format!("{channels}-{processes}-{n}")),
                        &["--postgres", &url, "--postgres-schema", &schema],
                    )
                })
                .collect();
            let urls: Vec<String> = relays.iter().map(|r| r.url.clone()).collect();
            let figures = runtime.block_on(ingest(&urls, channels, total));
            drop(relays);
            psql(&url, &format!("DROP SCHEMA {schema} CASCADE"));
            rows.push((processes, figures));
        }
        for (processes, (rate, p50, p99)) in &rows {
            println!("| {channels} | {processes} | {rate:.0} | {p50:.2} ms | {p99:.2} ms |");
        }
        println!(
            "| {channels} | two ÷ one | {:.2}× | | |",
            rows[1].1.0 / rows[0].1.0.max(f64::MIN_POSITIVE)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
