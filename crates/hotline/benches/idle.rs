//! Memory per idle member connection: a relay process (`hotline relay serve`, SQLite)
//! holds N authenticated stream connections (each of its own device) that send
//! nothing but pings; its resident memory is read before and after, and a member's
//! appends are timed while they are held.
//!
//! Then every idle device subscribes to a quiet channel (members in groups of
//! [`GROUP`], one channel per group, as followers of many lines hosted on one relay
//! wait), and the member's appends are timed again with the relay's CPU per append:
//! an append should wake its own channel's readers, not every waiting one.
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

/// Members per quiet channel in the second phase.
const GROUP: usize = 100;

/// Appends timed in each phase.
const APPENDS: u32 = 200;

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
        sender.append(&channel, vec![0xff; 1024]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = common::rss_kib(pid);

        let started = Instant::now();
        let mut held = Vec::with_capacity(count);
        let mut devices = Vec::with_capacity(count);
        let mut failed = 0;
        for n in 0..count {
            let device = DeviceIdentity::generate(
                "idle",
                "desk",
                &mut rand::rngs::StdRng::seed_from_u64(1000 + n as u64),
            )
            .unwrap();
            match StreamClient::connect(&url, &device).await {
                Ok(client) => {
                    held.push(client);
                    devices.push(device.key().0);
                }
                Err(_) => failed += 1,
            }
        }
        let opening = started.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = common::rss_kib(pid);

        // A member's appends while they are held.
        let (p50, p99, cpu) = appends(&sender, &channel, pid, 0).await;
        let per = (after.saturating_sub(before)) as f64 / held.len().max(1) as f64;
        println!(
            "{} idle stream connections held ({failed} refused), opened in {:.1} s; relay RSS {before} KiB before, {after} KiB after: {per:.1} KiB per connection; a member's append meanwhile p50 {p50:.2} ms, p99 {p99:.2} ms, relay CPU {cpu:.0} µs per append",
            held.len(),
            opening.as_secs_f64(),
        );

        // Each idle device follows a quiet channel of its group.
        let client = RelayClient::new(&url).unwrap();
        let mut feeds = Vec::with_capacity(held.len());
        for (group, members) in devices.chunks(GROUP).enumerate() {
            let mut quiet = [0u8; 32];
            quiet[..8].copy_from_slice(&(group as u64 + 1).to_be_bytes());
            client
                .register(
                    &member,
                    &quiet,
                    &Membership {
                        committer: member.key().0,
                        version: 1,
                        members: [&[member.key().0], members].concat(),
                    },
                )
                .await
                .unwrap();
            for idle in &held[group * GROUP..(group * GROUP + members.len())] {
                feeds.push(idle.subscribe(&quiet, 0).await.unwrap());
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        // A refused subscription closes its feed.
        let mut refused = 0;
        for feed in &mut feeds {
            if let Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) = feed.try_recv() {
                refused += 1;
            }
        }
        assert_eq!(refused, 0, "subscriptions refused");
        let subscribed = common::rss_kib(pid);
        let (p50, p99, cpu) = appends(&sender, &channel, pid, 1).await;
        println!(
            "the same {} connections each subscribed to a quiet channel ({} channels): relay RSS {subscribed} KiB; a member's append meanwhile p50 {p50:.2} ms, p99 {p99:.2} ms, relay CPU {cpu:.0} µs per append",
            feeds.len(),
            held.len().div_ceil(GROUP),
        );
        drop(feeds);
        drop(held);
    });
    drop(relay);
    let _ = std::fs::remove_dir_all(&data);
}

/// Times [`APPENDS`] appends of 1 KiB by `sender`, one after another, each new (they
/// differ from every other `phase`'s: a repeated append is only answered): p50 and
/// p99 in ms, and the relay process's CPU per append in µs.
async fn appends(
    sender: &StreamClient,
    channel: &[u8; 32],
    pid: u32,
    phase: u32,
) -> (f64, f64, f64) {
    let cpu = common::cpu_seconds(pid);
    let mut latencies = Vec::new();
    for n in 0..APPENDS {
        let sent = Instant::now();
        sender
            .append(
                channel,
                [phase, n].map(u32::to_be_bytes).concat().repeat(128),
            )
            .await
            .unwrap();
        latencies.push(sent.elapsed());
    }
    let cpu = (common::cpu_seconds(pid) - cpu) * 1e6 / f64::from(APPENDS);
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (
        ms(latencies[latencies.len() / 2]),
        ms(latencies[latencies.len() * 99 / 100]),
        cpu,
    )
}
