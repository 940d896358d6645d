//! What the benches that run relay processes share.
#![allow(dead_code)]

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

/// A `hotline relay serve` process, killed when dropped.
pub struct RelayProcess {
    pub child: Child,
    pub url: String,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `hotline relay serve --listen 127.0.0.1:0 --data DATA ARGS…` and waits for
/// the address it prints.
pub fn spawn_relay(data: &std::path::Path, args: &[&str]) -> RelayProcess {
    std::fs::create_dir_all(data).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hotline"))
        .args([
            "relay",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "warn",
        ])
        .arg("--data")
        .arg(data)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    RelayProcess {
        child,
        url: line.trim().to_owned(),
    }
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
