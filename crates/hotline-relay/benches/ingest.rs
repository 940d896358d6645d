//! Relay durable ingest at 1 KiB with 1, 8 and 64 concurrent senders, beside the
//! disk's group-commit fsync limit measured in the same run.
//!
//! `cargo bench -p hotline-relay --bench ingest` (`HOTLINE_BENCH_MESSAGES` per sender
//! count, default 2000). With `HOTLINE_BENCH_POSTGRES=<connection string>`, the same
//! load also runs against the PostgreSQL backend (a schema of its own per run).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use hotline_relay::client::RelayClient;
use hotline_relay::postgres::PostgresStorage;
use hotline_relay::server::{self, Limits};
use hotline_relay::storage::{RelayStorage, SqliteStorage};

/// Messages per request in the batched runs.
const BATCH: usize = 32;

/// Runs a relay on `storage` and has `senders` devices post `total` messages of 1 KiB
/// between them, `batch` per request (1: one `post` each; more: `post_batch`); returns
/// messages/s and the request latency p50 and p99.
async fn measure<S: RelayStorage>(
    data: &std::path::Path,
    storage: S,
    limits: Limits,
    senders: usize,
    total: usize,
    batch: usize,
) -> (f64, Duration, Duration) {
    let (running, url) = server::serve_from(data, "127.0.0.1:0".parse().unwrap(), storage, limits)
        .await
        .unwrap();
    let (identities, channel) = common::senders_on_channel(&url, senders).await;
    let per_sender = total / senders;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (n, identity) in identities.into_iter().enumerate() {
        let client = RelayClient::new(&url).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_sender);
            let payload = |m: usize| common::payload(n, m);
            let mut sent_count = 0;
            for first in (0..per_sender).step_by(batch) {
                let messages: Vec<Vec<u8>> = (first..(first + batch).min(per_sender))
                    .map(payload)
                    .collect();
                let sent = Instant::now();
                if batch == 1 {
                    client
                        .post(&identity, &channel, messages[0].clone())
                        .await
                        .unwrap();
                } else {
                    for answer in client
                        .post_batch(&identity, &channel, &messages)
                        .await
                        .unwrap()
                    {
                        answer.unwrap();
                    }
                }
                latencies.push(sent.elapsed());
                sent_count += messages.len();
            }
            (sent_count, latencies)
        }));
    }
    let mut latencies: Vec<Duration> = Vec::new();
    let mut messages = 0;
    for task in tasks {
        let (sent, taken) = task.await.unwrap();
        messages += sent;
        latencies.extend(taken);
    }
    let rate = messages as f64 / start.elapsed().as_secs_f64();
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    running.shutdown().await;
    (rate, p50, p99)
}

fn main() {
    let (total, dir, runtime) = common::setup("ingest", 2000);

    let postgres = std::env::var("HOTLINE_BENCH_POSTGRES").ok();
    for senders in [1usize, 8, 64] {
        let limit = common::group_commit_limit(&dir, senders, total.max(senders));
        let limits = Limits {
            rate_per_second: 1e9,
            rate_burst: 1e9,
            ..Limits::default()
        };
        let data = dir.join(format!("relay-{senders}"));
        std::fs::create_dir_all(&data).unwrap();
        let storage = SqliteStorage::open(&data.join("relay.db"), limits.quotas()).unwrap();
        let (rate, p50, p99) =
            runtime.block_on(measure(&data, storage, limits.clone(), senders, total, 1));
        println!(
            "{senders:>3} senders: relay {rate:>8.0} msg/s (p50 {:>6.2} ms, p99 {:>6.2} ms) | group-commit limit at batch {senders}: {limit:>8.0} rec/s | {:.0} % of it",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            100.0 * rate / limit
        );
        // The same senders posting BATCH messages per signed request (`post_batch`), as
        // the sync engine's push does with a backlog; beside the limit at the batch
        // size the writer then sees.
        let data = dir.join(format!("relay-batch-{senders}"));
        std::fs::create_dir_all(&data).unwrap();
        let storage = SqliteStorage::open(&data.join("relay.db"), limits.quotas()).unwrap();
        let batched_total = total.max(senders * BATCH * 4);
        let (rate, p50, p99) = runtime.block_on(measure(
            &data,
            storage,
            limits.clone(),
            senders,
            batched_total,
            BATCH,
        ));
        let batch_limit = common::group_commit_limit(
            &dir,
            (senders * BATCH).min(4096),
            batched_total.max(senders * BATCH),
        );
        println!(
            "{senders:>3} senders, {BATCH} per request: relay {rate:>8.0} msg/s (request p50 {:>6.2} ms, p99 {:>6.2} ms) | group-commit limit at batch {}: {batch_limit:>8.0} rec/s | {:.0} % of it | {:.0} % of the limit at batch {senders}",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            (senders * BATCH).min(4096),
            100.0 * rate / batch_limit,
            100.0 * rate / limit
        );
        if let Some(url) = &postgres {
            let schema = format!("hotline_bench_{}_{senders}", std::process::id());
            let storage = runtime
                .block_on(PostgresStorage::connect(url, &schema, limits.quotas(), 16))
                .unwrap();
            let data = dir.join(format!("relay-pg-{senders}"));
            let (rate, p50, p99) =
                runtime.block_on(measure(&data, storage, limits, senders, total, 1));
            let _ = std::process::Command::new("psql")
                .args([
                    url.as_str(),
                    "-qc",
                    &format!("DROP SCHEMA {schema} CASCADE"),
                ])
                .output();
            println!(
                "{senders:>3} senders: relay on PostgreSQL {rate:>8.0} msg/s (p50 {:>6.2} ms, p99 {:>6.2} ms)",
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
