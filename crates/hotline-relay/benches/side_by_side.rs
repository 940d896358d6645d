//! Durable ingest side by side, in one run, at 1, 16 and 64 concurrent senders with
//! 1 KiB messages, each sender with one message in flight (as redis-benchmark's
//! clients): the disk's group-commit limit, Redis `XADD` with `appendfsync always`
//! (plain and over TLS, a redis-server of its own started by this bench), and
//! hotline's relay over the stream protocol (authenticated once per connection) and
//! over the one-shot HTTP route (one signed request per message). Every figure is
//! durable before it is answered (fsync; Redis fsyncs its append-only file before
//! replying with `appendfsync always`).
//!
//! `cargo bench -p hotline-relay --bench side_by_side` (`HOTLINE_BENCH_MESSAGES`
//! messages per run, default 4000). Redis is skipped, saying so, when `redis-server`
//! or `redis-benchmark` is not on the PATH.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotline_core::DeviceIdentity;
use hotline_proto::stream::StreamClient;
use hotline_relay::client::RelayClient;
use hotline_relay::server::{self, Limits};
use hotline_relay::storage::SqliteStorage;

/// A redis-server of this bench's own: append-only file fsynced on every write, on a
/// plain port and a TLS port. Stopped when dropped.
struct Redis {
    child: Child,
    port: u16,
    tls_port: u16,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_redis(dir: &std::path::Path) -> Option<Redis> {
    let found = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !found("redis-server") || !found("redis-benchmark") {
        println!("(redis-server or redis-benchmark not found: the Redis baseline is skipped)");
        return None;
    }
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.join("redis-cert.pem"), dir.join("redis-key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let (port, tls_port) = (free_port(), free_port());
    let data = dir.join("redis");
    std::fs::create_dir_all(&data).unwrap();
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--tls-port", &tls_port.to_string()])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-ca-cert-file")
        .arg(&cert)
        .args(["--tls-auth-clients", "no"])
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let redis = Redis {
        child,
        port,
        tls_port,
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(redis);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("(redis-server did not start: the Redis baseline is skipped)");
    None
}

/// `XADD` of a 1 KiB field by `clients` redis-benchmark clients: requests/s, p50 and
/// p99 in ms.
fn redis_xadd(redis: &Redis, tls: bool, clients: usize, total: usize) -> Option<(f64, f64, f64)> {
    let value = "x".repeat(1024);
    let mut command = Command::new("redis-benchmark");
    command.args(["-h", "127.0.0.1", "--csv"]);
    if tls {
        command.args(["-p", &redis.tls_port.to_string(), "--tls", "--insecure"]);
    } else {
        command.args(["-p", &redis.port.to_string()]);
    }
    command
        .args(["-c", &clients.to_string(), "-n", &total.to_string()])
        .args(["XADD", "hotline-bench", "*", "f", &value]);
    let output = command.output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let line = text.lines().find(|l| l.starts_with("\"XADD"))?;
    let fields: Vec<f64> = line
        .split("\",\"")
        .skip(1)
        .map(|f| f.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    Some((*fields.first()?, *fields.get(3)?, *fields.get(5)?))
}

/// One relay, one channel with `senders` member devices; returns the relay, its
/// address, the devices and the channel.
async fn relay_with_channel(
    data: &std::path::Path,
    senders: usize,
) -> (server::Running, String, Vec<Arc<DeviceIdentity>>, [u8; 32]) {
    std::fs::create_dir_all(data).unwrap();
    let limits = Limits {
        rate_per_second: 1e9,
        rate_burst: 1e9,
        sender_bytes_per_second: 1e12,
        sender_burst_bytes: 1e12,
        ..Limits::default()
    };
    let storage = SqliteStorage::open(&data.join("relay.db"), limits.quotas()).unwrap();
    let (running, url) = server::serve_from(data, "127.0.0.1:0".parse().unwrap(), storage, limits)
        .await
        .unwrap();
    let (identities, channel) = common::senders_on_channel(&url, senders).await;
    (running, url, identities, channel)
}

/// Messages/s, p50 and p99 in ms, of `senders` devices sending `total` messages
/// between them, one in flight each: over the stream protocol (`stream`) or one signed
/// HTTPS request per message.
async fn hotline(
    data: &std::path::Path,
    senders: usize,
    total: usize,
    stream: bool,
) -> (f64, f64, f64) {
    let (running, url, identities, channel) = relay_with_channel(data, senders).await;
    let per_sender = total / senders;
    // Connections first (authenticated once each), then the clock.
    let mut streams = Vec::new();
    for identity in &identities {
        streams.push(if stream {
            Some(StreamClient::connect(&url, identity).await.unwrap())
        } else {
            None
        });
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (n, (identity, stream)) in identities.into_iter().zip(streams).enumerate() {
        let http = RelayClient::new(&url).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_sender);
            for m in 0..per_sender {
                let sent = Instant::now();
                match &stream {
                    Some(stream) => {
                        stream
                            .append(&channel, common::payload(n, m))
                            .await
                            .unwrap();
                    }
                    None => {
                        http.post(&identity, &channel, common::payload(n, m))
                            .await
                            .unwrap();
                    }
                }
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
    let (p50, p99) = (
        ms(latencies[latencies.len() / 2]),
        ms(latencies[latencies.len() * 99 / 100]),
    );
    running.shutdown().await;
    (rate, p50, p99)
}

fn main() {
    let (total, dir, runtime) = common::setup("sbs", 4000);
    let redis = start_redis(&dir);

    println!(
        "1 KiB messages, durable before the answer, one in flight per sender; msg/s (p50 / p99 ms)"
    );
    println!();
    println!(
        "| senders | disk group-commit limit | Redis XADD, fsync always | Redis XADD, fsync always, TLS | hotline stream (TLS) | hotline one-shot HTTPS | stream ÷ Redis TLS |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for senders in [1usize, 16, 64] {
        let total = total.max(senders * 20);
        let limit = common::group_commit_limit(&dir, senders, total);
        let cell = |figure: Option<(f64, f64, f64)>| match figure {
            Some((rate, p50, p99)) => format!("{rate:.0} ({p50:.2} / {p99:.2})"),
            None => "-".to_owned(),
        };
        let plain = redis
            .as_ref()
            .and_then(|r| redis_xadd(r, false, senders, total));
        let over_tls = redis
            .as_ref()
            .and_then(|r| redis_xadd(r, true, senders, total));
        let stream = runtime.block_on(hotline(
            &dir.join(format!("stream-{senders}")),
            senders,
            total,
            true,
        ));
        let oneshot = runtime.block_on(hotline(
            &dir.join(format!("oneshot-{senders}")),
            senders,
            total,
            false,
        ));
        let ratio = over_tls.map_or("-".to_owned(), |(redis, ..)| {
            format!("{:.2}×", stream.0 / redis)
        });
        println!(
            "| {senders} | {limit:.0} | {} | {} | {} | {} | {ratio} |",
            cell(plain),
            cell(over_tls),
            cell(Some(stream)),
            cell(Some(oneshot)),
        );
    }
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}
