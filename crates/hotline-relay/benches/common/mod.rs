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
