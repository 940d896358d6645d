//! End-to-end latency on loopback: from `send` returning at one device to the message
//! committed in the other device's store, through 1 and through 3 relays (pinned TLS,
//! embedded SQLite, fsync on every commit on every side).
//!
//! Both devices run the sync engine's `follow` (as `hotline sync --follow` and the
//! console do) on their own threads; the recipient receives over its stream
//! connections. The sender's message reaches the relays three ways, timed one after
//! the other in one run: handed to the sender's own follower, which appends it over the
//! stream connections it holds (the console, where the follower and the sender are one
//! process); handed to that follower over the home's socket, the sender waiting for its
//! answer (`hotline send` beside `hotline sync --follow`); and pushed by the sender
//! itself over the one-shot HTTPS route on a kept connection (as `hotline send` does
//! when no follower runs). One message at a time: this measures the path, not a queue.
//!
//! `cargo bench -p hotline --bench latency` (`HOTLINE_BENCH_MESSAGES`, default 200).
//!
//! First, in the same run, the physical floor: two synced writes one after the other
//! (the relay's commit, then the recipient's), as the disk does them.
//!
//! `HOTLINE_BENCH_RELAYS=1` runs only the one-relay case (default `1,3`).
//!
//! `HOTLINE_BENCH_HISTORY=N` first gives the channel N messages of history (sent by
//! north and carried to south by bundle, the fast path; they are not pushed through
//! the relays; south seals a checkpoint every 10,000, as a following device seals its
//! hourly record), so that one received message in a running follower is timed with a
//! long history behind it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use hotline_client::Store;
use hotline_client::handoff;
use hotline_client::line::LineEvent;
use hotline_client::sync::{FollowConfig, Session, Wake, follow, sync_once};
use hotline_core::{Body, EnvelopeId};
use hotline_relay::server::{self, Limits};
use hotline_relay::storage::SqliteStorage;
use hotline_relay::tls;

fn main() {
    tls::install_provider();
    let messages: usize = std::env::var("HOTLINE_BENCH_MESSAGES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(200);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let relay_counts: Vec<usize> = std::env::var("HOTLINE_BENCH_RELAYS")
        .unwrap_or_else(|_| "1,3".into())
        .split(',')
        .filter_map(|count| count.trim().parse().ok())
        .collect();
    // The floor under every figure below, measured in the same run: a message is on
    // disk twice in turn before it counts (at the relay, then at the recipient).
    let (floor_p50, floor_p99) = two_syncs_in_turn(&std::env::temp_dir(), messages.max(200));
    println!(
        "physical floor: two 16 KiB WAL writes, each synced (fdatasync), one after the other: \
         p50 {floor_p50:.2} ms, p99 {floor_p99:.2} ms"
    );
    for relay_count in relay_counts {
        let dir = std::env::temp_dir().join(format!(
            "hotline-bench-latency-{}-{relay_count}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut urls = Vec::new();
        let mut running = Vec::new();
        for n in 0..relay_count {
            let data = dir.join(format!("relay-{n}"));
            std::fs::create_dir_all(&data).unwrap();
            let storage = SqliteStorage::open(&data.join("relay.db"), 1u64 << 30).unwrap();
            let (relay, url) = runtime
                .block_on(server::serve_from(
                    &data,
                    "127.0.0.1:0".parse().unwrap(),
                    storage,
                    // Messages go one right after another here, about 250 a second
                    // from one sender, and every request (long polls, acknowledgements,
                    // receipts) is charged to its device's bucket: above the default 200
                    // a second, the limiter would be what is measured.
                    Limits {
                        rate_per_second: 100_000.0,
                        rate_burst: 100_000.0,
                        ..Limits::default()
                    },
                ))
                .unwrap();
            urls.push(url);
            running.push(relay);
        }
        let mut north = Store::init(&dir.join("north"), "north", "desk", &urls).unwrap();
        let mut south = Store::init(&dir.join("south"), "south", "desk", &urls).unwrap();
        north
            .import_card(&south.card().unwrap(), &south.identity().fingerprint())
            .unwrap();
        south
            .import_card(&north.card().unwrap(), &north.identity().fingerprint())
            .unwrap();
        north
            .create_channel("crisis", &["south".into()], &urls)
            .unwrap();
        runtime.block_on(sync_once(&mut north)).unwrap();
        runtime.block_on(sync_once(&mut south)).unwrap();
        assert_eq!(south.channels().unwrap().len(), 1);
        let history: usize = std::env::var("HOTLINE_BENCH_HISTORY")
            .ok()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if history > 0 {
            let started = Instant::now();
            let mut grown = 0;
            while grown < history {
                let chunk = (history - grown).min(1000);
                for index in grown..grown + chunk {
                    north
                        .send("crisis", Body::text(format!("history {index}")), None)
                        .unwrap();
                }
                south.import_bundle(north.export_outbox().unwrap()).unwrap();
                grown += chunk;
                // South writes now and then, as a following device seals its hourly
                // availability record and checkpoint: the settled prefix moves on.
                if grown % 10_000 == 0 {
                    south
                        .send(
                            "crisis",
                            Body::Checkpoint {
                                root: [0; 32],
                                size: 0,
                                horizon: 0,
                            },
                            None,
                        )
                        .unwrap();
                    north.import_bundle(south.export_outbox().unwrap()).unwrap();
                }
            }
            // Carried by bundle: the relays are not to be given them again.
            for store in [&north, &south] {
                rusqlite::Connection::open(store.home().database())
                    .unwrap()
                    .execute("UPDATE outbox SET settled = 1 WHERE settled = 0", [])
                    .unwrap();
            }
            eprintln!(
                "{history} messages of history in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }

        // The recipient follows on its own thread and reports each commit's instant.
        drop(south);
        // From here on, the peak RSS is the measured phase's (Linux: writing 5 to
        // clear_refs resets the process's peak).
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let (committed, arrivals) = std::sync::mpsc::channel::<(Instant, usize)>();
        let south_home = dir.join("south");
        let follower =
            follow_on_thread("south", south_home, Wake::default(), false, move |report| {
                if report.received == 0 {
                    return ControlFlow::Continue(());
                }
                match committed.send((Instant::now(), report.received)) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()),
                }
            });
        // The sender follows too (its own handle on its home), and reports each message
        // of its own shown delivered (the recipient's receipt frame), and each push it
        // made when woken.
        let (delivered, deliveries) = std::sync::mpsc::channel::<(Instant, EnvelopeId)>();
        let (pushed, pushes_done) = std::sync::mpsc::channel::<Instant>();
        let north_home = dir.join("north");
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = std::sync::Arc::clone(&done);
        let wake = Wake::default();
        let sender_follower = follow_on_thread(
            "north",
            north_home.clone(),
            wake.clone(),
            true,
            move |report| {
                // Its full rounds (every 10 s) report too: it stops at the next one.
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return ControlFlow::Break(());
                }
                if report.pushed > 0 && pushed.send(Instant::now()).is_err() {
                    return ControlFlow::Break(());
                }
                for event in &report.events {
                    if let LineEvent::Delivered { message, .. } = event
                        && delivered.send((Instant::now(), *message)).is_err()
                    {
                        return ControlFlow::Break(());
                    }
                }
                ControlFlow::Continue(())
            },
        );
        // Let the followers start their long-polls.
        std::thread::sleep(Duration::from_millis(500));

        let mut session = Session::new(&north).unwrap();
        let text = "x".repeat(1024);
        for how in [How::Follower, How::HandedOff, How::OneShot] {
            let mut latencies: Vec<Duration> = Vec::with_capacity(messages);
            let mut pushes: Vec<Duration> = Vec::with_capacity(messages);
            let mut seen_delivered: Vec<Duration> = Vec::with_capacity(messages);
            for _ in 0..messages {
                let id = north
                    .send("crisis", Body::text(text.clone()), None)
                    .unwrap();
                let sent = Instant::now();
                match how {
                    How::Follower => wake.ring(),
                    How::HandedOff => {
                        let handoff::Handed::Pushed(pushed) =
                            handoff::hand_off(&north_home, Duration::from_secs(30))
                        else {
                            panic!("the follower did not answer");
                        };
                        assert!(pushed.values().all(Option::is_none), "{pushed:?}");
                        pushes.push(sent.elapsed());
                    }
                    How::OneShot => {
                        runtime.block_on(session.push(&mut north)).unwrap();
                        pushes.push(sent.elapsed());
                    }
                }
                // An arrival from before this message (the channel's setup, caught up
                // late) is not this message's.
                let at = loop {
                    let (at, received) = arrivals
                        .recv_timeout(Duration::from_secs(30))
                        .expect("the message did not arrive");
                    if let Some(latency) = at.checked_duration_since(sent) {
                        assert_eq!(received, 1);
                        break latency;
                    }
                };
                latencies.push(at);
                loop {
                    let (at, message) = deliveries
                        .recv_timeout(Duration::from_secs(30))
                        .expect("the sender never showed the message delivered");
                    if message == id {
                        seen_delivered.push(at - sent);
                        break;
                    }
                }
                if how == How::Follower {
                    let at = pushes_done
                        .recv_timeout(Duration::from_secs(30))
                        .expect("the follower never pushed");
                    pushes.push(at.saturating_duration_since(sent));
                }
                // Pushes of receipts and acknowledgements in between are not counted.
                while pushes_done.try_recv().is_ok() {}
            }
            latencies.sort();
            pushes.sort();
            seen_delivered.sort();
            let label = how.label();
            let percentiles = |times: &[Duration]| {
                format!(
                    "p50 {:.2} ms, p99 {:.2} ms",
                    times[messages / 2].as_secs_f64() * 1e3,
                    times[messages * 99 / 100].as_secs_f64() * 1e3
                )
            };
            println!(
                "{relay_count} relay(s), {label}: send returned → committed at the recipient, 1 KiB, {messages} messages: {}",
                percentiles(&latencies)
            );
            println!(
                "{relay_count} relay(s), {label}: send returned → the sender (following) shows it delivered: {}",
                percentiles(&seen_delivered)
            );
            println!(
                "{relay_count} relay(s), {label}: of which the push (every relay durably holds it): {}",
                percentiles(&pushes)
            );
        }
        // One more message wakes both followers, which then see their receivers gone.
        drop(arrivals);
        drop(deliveries);
        drop(pushes_done);
        north.send("crisis", Body::text("end"), None).unwrap();
        runtime.block_on(session.push(&mut north)).unwrap();
        follower.join().unwrap();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        wake.ring();
        sender_follower.join().unwrap();
        // The whole process (sender, relays and follower together) at its peak while
        // messages were timed: an upper bound of what the follower alone holds.
        if let Some(peak) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find(|line| line.starts_with("VmHWM:"))
                    .map(|line| line.trim_start_matches("VmHWM:").trim().to_owned())
            })
        {
            println!(
                "{relay_count} relay(s): peak RSS of sender, relay(s) and follower together while timed: {peak}"
            );
        }
        for relay in running {
            runtime.block_on(relay.shutdown());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `rounds` times, a 16 KiB write synced in one file, then one in another (the relay's
/// commit, then the recipient's), over preallocated space as SQLite's WAL reuses its
/// file: p50 and p99 of a round, in ms.
fn two_syncs_in_turn(dir: &std::path::Path, rounds: usize) -> (f64, f64) {
    use std::os::unix::fs::FileExt;
    let page = vec![b'x'; 16 * 1024];
    let files: Vec<(std::path::PathBuf, std::fs::File)> = (0..2)
        .map(|n| {
            let path = dir.join(format!("hotline-bench-floor-{}-{n}", std::process::id()));
            let file = std::fs::File::create(&path).unwrap();
            file.set_len((page.len() * rounds) as u64).unwrap();
            file.sync_all().unwrap();
            (path, file)
        })
        .collect();
    let mut times: Vec<f64> = (0..rounds)
        .map(|round| {
            let start = Instant::now();
            for (_, file) in &files {
                file.write_all_at(&page, (round * page.len()) as u64)
                    .unwrap();
                file.sync_data().unwrap();
            }
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    for (path, _) in files {
        let _ = std::fs::remove_file(path);
    }
    times.sort_by(f64::total_cmp);
    (times[rounds / 2], times[rounds * 99 / 100])
}

/// Follows the device at `home` on a thread of its own named `name` (its own handle on
/// the home; the name tells the followers apart in a profile), until `on_report` says
/// `Break`; with `listening`, it takes hand-offs on the home's socket as `hotline sync
/// --follow` does.
fn follow_on_thread(
    name: &str,
    home: std::path::PathBuf,
    wake: Wake,
    listening: bool,
    mut on_report: impl FnMut(&hotline_client::sync::SyncReport) -> ControlFlow<()> + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let thread = std::thread::Builder::new().name(name.to_owned());
    let spawned = thread.spawn(move || {
        let mut store = Store::open(&home).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime
            .block_on(async {
                let _listening = listening.then(|| handoff::listen(&home, wake.clone()).unwrap());
                follow(
                    &mut store,
                    &FollowConfig {
                        wake,
                        ..FollowConfig::default()
                    },
                    |report| on_report(report),
                )
                .await
            })
            .unwrap();
    });
    spawned.unwrap()
}

/// How the sender's message reaches the relays.
#[derive(Clone, Copy, PartialEq, Eq)]
enum How {
    /// Handed to the sender's own running follower, which appends it over the stream
    /// connection it holds to each relay (the console).
    Follower,
    /// Handed to the running follower over the home's socket, then waited for until
    /// the follower answers that the relays hold it (`hotline send` beside `hotline
    /// sync --follow`).
    HandedOff,
    /// Pushed by the sender itself over the one-shot HTTPS route, one signed request
    /// per relay on a kept connection (`hotline send` without a follower).
    OneShot,
}

impl How {
    fn label(self) -> &'static str {
        match self {
            How::Follower => "over the follower's stream",
            How::HandedOff => "handed to the follower over the home's socket",
            How::OneShot => "one-shot HTTPS",
        }
    }
}
