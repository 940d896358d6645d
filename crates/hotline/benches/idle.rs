//! Memory per idle member connection: a relay process (`hotline relay serve`, SQLite)
//! holds N authenticated stream connections (each of its own device) that send
//! nothing but pings; its resident memory is read before and after, and a member's
//! appends are timed while they are held.
//!
//! `cargo bench -p hotline --bench idle` (`HOTLINE_BENCH_IDLE` connections, default
//! 10000; the bench raises its own open-file limit, and the relay its own, to the hard
//! limit).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hotline_core::DeviceIdentity;
use hotline_proto::stream::StreamClient;
use hotline_relay::client::RelayClient;
use hotline_relay::storage::Membership;
use hotline_relay::tls;
use rand::SeedableRng;

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

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
    let mut relay = Command::new(env!("CARGO_BIN_EXE_hotline"))
        .args([
            "relay",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "warn",
        ])
        .arg("--data")
        .arg(&data)
        .args(["--max-connections", &(count + 64).to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let url = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(relay.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        line.trim().to_owned()
    };
    let pid = relay.id();
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
        let before = rss_kib(pid);

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
        let after = rss_kib(pid);

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
    let _ = relay.kill();
    let _ = relay.wait();
    let _ = std::fs::remove_dir_all(&data);
}
