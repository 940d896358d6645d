//! What the relay's benches share: the disk's group-commit limit, and their setting.

use std::io::Write;
use std::time::Instant;

/// 1 KiB records appended `batch` at a time, one fdatasync per batch: records/s.
pub fn group_commit_limit(dir: &std::path::Path, batch: usize, records: usize) -> f64 {
    let mut file = std::fs::File::create(dir.join(format!("group-{batch}.log"))).unwrap();
    let record = vec![b'x'; 1024];
    let start = Instant::now();
    for _ in 0..records / batch {
        for _ in 0..batch {
            file.write_all(&record).unwrap();
        }
        file.sync_data().unwrap();
    }
    (records / batch * batch) as f64 / start.elapsed().as_secs_f64()
}

/// Messages per run (`HOTLINE_BENCH_MESSAGES`, else `default`), a fresh scratch
/// directory named after `name`, and a runtime of two workers (the machine's cores).
pub fn setup(name: &str, default: usize) -> (usize, std::path::PathBuf, tokio::runtime::Runtime) {
    hotline_relay::tls::install_provider();
    let total = std::env::var("HOTLINE_BENCH_MESSAGES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(default);
    let dir = std::env::temp_dir().join(format!("hotline-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    (total, dir, runtime)
}

/// `senders` devices (the same for the same count), members of a fresh channel
/// registered on the relay at `url` by the first of them.
pub async fn senders_on_channel(
    url: &str,
    senders: usize,
) -> (Vec<std::sync::Arc<hotline_core::DeviceIdentity>>, [u8; 32]) {
    use rand::SeedableRng;
    let identities: Vec<std::sync::Arc<hotline_core::DeviceIdentity>> = (0..senders)
        .map(|n| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
            std::sync::Arc::new(
                hotline_core::DeviceIdentity::generate("party", "desk", &mut rng).unwrap(),
            )
        })
        .collect();
    let channel: [u8; 32] = rand::random();
    let membership = hotline_relay::storage::Membership {
        committer: identities[0].key().0,
        version: 1,
        members: identities.iter().map(|i| i.key().0).collect(),
    };
    hotline_relay::client::RelayClient::new(url)
        .unwrap()
        .register(&identities[0], &channel, &membership)
        .await
        .unwrap();
    (identities, channel)
}

/// Message `n` of sender `sender`: 1 KiB, distinct from every other.
pub fn payload(sender: usize, n: usize) -> Vec<u8> {
    let mut payload = vec![0u8; 1024];
    payload[..16]
        .copy_from_slice(&[(sender as u64).to_be_bytes(), (n as u64).to_be_bytes()].concat());
    payload
}
