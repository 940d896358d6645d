//! Two processes on one home at once: 1,000 sends from two processes, nothing lost,
//! nothing doubled, one chain. And one receiver at a time.
//!
//! The workers are this test binary itself, re-executed with `HOTLINE_CONCURRENT_WORKER`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hotline_client::{HomeError, Store};
use hotline_core::{Body, EnvelopeId};

const WORKER: &str = "HOTLINE_CONCURRENT_WORKER";
const PER_PROCESS: usize = 500;

fn temp_home(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("hotline-concurrent-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn two_processes_send_a_thousand_messages_and_none_is_lost() {
    if let Ok(spec) = std::env::var(WORKER) {
        let (home, tag) = spec.split_once('|').unwrap();
        let mut store = Store::open(Path::new(home)).unwrap();
        for n in 0..PER_PROCESS {
            let id = store
                .send("crisis", Body::text(format!("{tag} {n}")), None)
                .unwrap();
            println!("{}", id.to_hex());
        }
        std::process::exit(0);
    }
    let (north_home, south_home) = (temp_home("north"), temp_home("south"));
    drop(hotline_client::testing::verified_pair(
        &north_home,
        &south_home,
    ));

    let children: Vec<_> = ["first", "second"]
        .iter()
        .map(|tag| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "two_processes_send_a_thousand_messages_and_none_is_lost",
                    "--nocapture",
                ])
                .env(WORKER, format!("{}|{tag}", north_home.display()))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut returned = BTreeSet::new();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        for line in String::from_utf8(output.stdout).unwrap().lines() {
            if let Some(id) = EnvelopeId::from_hex(line) {
                returned.insert(id);
            }
        }
    }
    assert_eq!(returned.len(), 2 * PER_PROCESS);
    let mut north = Store::open(&north_home).unwrap();
    north.integrity_check().unwrap();
    let log = north.log("crisis").unwrap();
    let logged: BTreeSet<_> = log.iter().map(|e| e.id).collect();
    assert_eq!(log.len(), 2 * PER_PROCESS);
    assert_eq!(logged, returned);
    for id in &returned {
        assert_eq!(north.outbox_rows_for(id).unwrap(), 1);
    }
    // Both processes extended one chain: the export verifies.
    hotline_core::Export::verify(&north.export("crisis").unwrap()).unwrap();
}

#[test]
fn only_one_process_receives_at_a_time() {
    let home = temp_home("lock");
    let store = Store::init(&home, "north", "desk", &[]).unwrap();
    let held = store.home().lock_receiving().unwrap();
    let other = Store::open(&home).unwrap();
    match other.home().lock_receiving() {
        Err(HomeError::Busy { holder }) => {
            assert_eq!(holder, format!("pid {}", std::process::id()))
        }
        other => panic!("expected Busy, got {other:?}"),
    }
    drop(held);
    other.home().lock_receiving().unwrap();
}
