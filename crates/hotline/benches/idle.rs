//! Memory per idle member connection: a relay process (`hotline relay serve`, SQLite)
//! holds N authenticated stream connections (each of its own device) that send
//! nothing but pings; its resident memory is read before and after, and a member's
//! appends are timed while they are held.
//!
//! `cargo bench -p hotline --bench idle` (`HOTLINE_BENCH_IDLE` connections, default
//! 10000; the bench raises its own open-file limit, and the relay its own, to the hard
//! limit).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use hotline_core::DeviceIdentity;
use hotline_proto::stream::StreamClient;
use hotline_relay::client::RelayClient;
use hotline_relay::storage::Membership;
use hotline_relay::tls;
use rand::SeedableRng;

fn main() {
    tls::install_provider();
    let count: usize = std::env::var("HOTLINE_BENCH_IDLE")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let data = std::env::temp_dir().join(format!("hotline-bench-idle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let connections = (count + 64).to_string();
    let relay = common::spawn_relay(&data, &["--max-connections", &connections]);
    let url = relay.url.clone();
    let pid = relay.child.id();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let member = DeviceIdentity::generate(
            "north",
            "desk",
            &mut rand::rngs::StdRng::seed_from_u64(1),
        )
        .unwrap();
        let channel = [7u8; 32];
        RelayClient::new(&url)
            .unwrap()
            .register(
                &member,
                &channel,
                &Membership {
                    committer: member.key().0,
                    version: 1,
                    members: vec![member.key().0],
                },
            )
            .await
            .unwrap();
        let sender = StreamClient::connect(&url, &member).await.unwrap();
        sender.append(&channel, vec![0; 1024]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = common::rss_kib(pid);

        let started = Instant::now();
        let mut held = Vec::with_capacity(count);
        let mut failed = 0;
        for n in 0..count {
            let device = DeviceIdentity::generate(
                "idle",
                "desk",
                &mut rand::rngs::StdRng::seed_from_u64(1000 + n as u64),
            )
            .unwrap();
            match StreamClient::connect(&url, &device).await {
                Ok(client) => held.push(client),
                Err(_) => failed += 1,
            }
        }
        let opening = started.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = common::rss_kib(pid);

        // A member's appends while they are held.
        let mut latencies = Vec::new();
        for n in 0..200u32 {
            let sent = Instant::now();
            sender
                .append(&channel, n.to_be_bytes().repeat(256))
                .await
                .unwrap();
            latencies.push(sent.elapsed());
        }
        latencies.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let per = (after.saturating_sub(before)) as f64 / held.len().max(1) as f64;
        println!(
            "{} idle stream connections held ({failed} refused), opened in {:.1} s; relay RSS {before} KiB before, {after} KiB after: {per:.1} KiB per connection; a member's append meanwhile p50 {:.2} ms, p99 {:.2} ms",
            held.len(),
            opening.as_secs_f64(),
            ms(latencies[latencies.len() / 2]),
            ms(latencies[latencies.len() * 99 / 100]),
        );
        drop(held);
    });
    drop(relay);
    let _ = std::fs::remove_dir_all(&data);
}
