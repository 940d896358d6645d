//! Relay processes on one PostgreSQL database: durable ingest of one relay process
//! beside two sharing the same schema, in one run. 64 senders (each a device with its
//! own stream connection, one 1 KiB message in flight), all members of one channel,
//! then spread over 8 channels; with two processes, half the senders use each. Every
//! append is committed in PostgreSQL before it is answered. Beside each rate, the CPU
//! each message cost the senders, the relay processes and PostgreSQL: on a machine
//! where all three share the cores, that says where a second process's capacity goes.
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

/// What one configuration measured.
struct Figures {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU per message, in µs: the senders (this process), the relay processes
    /// together, PostgreSQL (all its processes on this machine).
    cpu_us: [f64; 3],
}

/// CPU seconds used so far by this process, the relay processes, PostgreSQL.
fn cpu_now(relays: &[u32]) -> [f64; 3] {
    [
        common::cpu_seconds(std::process::id()),
        relays.iter().map(|pid| common::cpu_seconds(*pid)).sum(),
        common::cpu_seconds_of_all("postgres"),
    ]
}

/// `SENDERS` devices appending `total` messages between them, spread over the relay
/// processes `relays` (url, pid) in turn, sender `n` in channel `n % channels` (with
/// two processes, each channel's senders then reach one of them).
async fn ingest(relays: &[(String, u32)], channels: usize, total: usize) -> Figures {
    let urls: Vec<&String> = relays.iter().map(|(url, _)| url).collect();
    let pids: Vec<u32> = relays.iter().map(|(_, pid)| *pid).collect();
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
        RelayClient::new(urls[0])
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
            StreamClient::connect(urls[n % urls.len()], identity)
                .await
                .unwrap(),
        );
    }
    let per_sender = total / SENDERS;
    let cpu_before = cpu_now(&pids);
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
    let cpu_after = cpu_now(&pids);
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let per_message = |i: usize| (cpu_after[i] - cpu_before[i]) * 1e6 / latencies.len() as f64;
    Figures {
        rate,
        p50_ms: ms(latencies[latencies.len() / 2]),
        p99_ms: ms(latencies[latencies.len() * 99 / 100]),
        cpu_us: [per_message(0), per_message(1), per_message(2)],
    }
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
    println!(
        "| channels | relay processes | msg/s | p50 | p99 | CPU µs per message: senders / relays / PostgreSQL |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
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
            let endpoints: Vec<(String, u32)> = relays
                .iter()
                .map(|r| (r.url.clone(), r.child.id()))
                .collect();
            let figures = runtime.block_on(ingest(&endpoints, channels, total));
            drop(relays);
            psql(&url, &format!("DROP SCHEMA {schema} CASCADE"));
            rows.push((processes, figures));
        }
        for (processes, f) in &rows {
            let [senders, relays, postgres] = f.cpu_us;
            println!(
                "| {channels} | {processes} | {:.0} | {:.2} ms | {:.2} ms | {senders:.0} / {relays:.0} / {postgres:.0} |",
                f.rate, f.p50_ms, f.p99_ms
            );
        }
        println!(
            "| {channels} | two ÷ one | {:.2}× | | | |",
            rows[1].1.rate / rows[0].1.rate.max(f64::MIN_POSITIVE)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
