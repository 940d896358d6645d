//! Link tests and availability records between two devices in one process, on a clock
//! the test moves: probes per relay path, answers through the same path, one relay
//! dropping everything for a known window, and the signed record that says so.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use hotline_client::Store;
use hotline_client::clock::ManualClock;
use hotline_client::store::Cursor;
use hotline_core::Export;

const R1: &str =
    "https://127.0.0.1:1/#sha256=1111111111111111111111111111111111111111111111111111111111111111";
const R2: &str =
    "https://127.0.0.1:2/#sha256=2222222222222222222222222222222222222222222222222222222222222222";
const T0: u64 = 1_800_000_000_000;

fn home(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "hotline-link-{}-{name}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Hands every frame `from` queued to `to`, as if through its relay, unless that relay
/// is `down`. `seq` numbers the messages of each simulated relay log.
fn carry(from: &mut Store, to: &mut Store, down: Option<&str>, seq: &mut u64) -> usize {
    let mut carried = 0;
    for frame in from.take_frames().unwrap() {
        if Some(frame.relay.as_str()) == down {
            continue;
        }
        *seq += 1;
        let cursor = Cursor {
            relay: &frame.relay,
            log: "crisis",
            seq: *seq,
            receipt: None,
        };
        to.receive_at(&frame.bytes, Some(cursor)).unwrap();
        carried += 1;
    }
    carried
}

/// North and south in "crisis" on relays R1 and R2 (never contacted: frames are carried
/// by hand), both on one manual clock at `T0`.
fn on_two_relays(name: &str) -> (Store, Store, Arc<ManualClock>) {
    let (north_home, south_home) = (
        home(&format!("{name}-north")),
        home(&format!("{name}-south")),
    );
    let (mut north, mut south) = hotline_client::testing::verified_pair(&north_home, &south_home);
    let clock = Arc::new(ManualClock::at(T0));
    for store in [&mut north, &mut south] {
        store.set_clock(clock.clone());
    }
    north
        .change_relays("crisis", &[R1.to_owned(), R2.to_owned()])
        .unwrap();
    south.import_bundle(north.export_outbox().unwrap()).unwrap();
    (north, south, clock)
}

#[test]
fn a_relay_silent_for_a_known_window_shows_in_the_signed_availability_record() {
    let (mut north, mut south, clock) = on_two_relays("silent");
    for store in [&mut north, &mut south] {
        store.set_link_test_interval(1_000).unwrap();
        store.set_record_period(60_000).unwrap();
    }
    assert_eq!(
        south
            .channel_relays(&south.channel_id("crisis").unwrap())
            .unwrap(),
        [R1, R2]
    );
    let before = north.transcript_root("crisis").unwrap().1;

    // 80 seconds of link tests every second; R2 carries nothing from 20 s to 30 s.
    let (mut to_south, mut to_north) = (0, 0);
    let mut frames = 0;
    for second in 1..=80u64 {
        clock.advance(Duration::from_secs(1));
        let down = (20..30).contains(&second).then_some(R2);
        north.send_due_probes().unwrap();
        south.send_due_probes().unwrap();
        frames += carry(&mut north, &mut south, down, &mut to_south);
        frames += carry(&mut south, &mut north, down, &mut to_north);
        frames += carry(&mut north, &mut south, down, &mut to_south);
    }
    assert!(frames > 400, "{frames} frames");
    // Link tests never entered a transcript: besides the relay change, each device's
    // first checkpoint, and per record period its record and a checkpoint.
    south.import_bundle(north.export_outbox().unwrap()).unwrap();
    north.import_bundle(south.export_outbox().unwrap()).unwrap();
    let after = north.transcript_root("crisis").unwrap().1;
    assert_eq!(after - before, 2 * (1 + 2), "{before} → {after}");
    assert_eq!(
        north.transcript_root("crisis").unwrap(),
        south.transcript_root("crisis").unwrap()
    );

    // What north's signed record says, read back from a verified export.
    let report = Export::verify(&north.export("crisis").unwrap()).unwrap();
    let path = |relay: &str| {
        report
            .availability
            .iter()
            .find(|((device, r, party), _)| {
                *device == north.identity().key() && r == relay && party == "south"
            })
            .map(|(_, summary)| summary.clone())
            .unwrap_or_else(|| panic!("no record of {relay}: {:?}", report.availability))
    };
    let (r1, r2) = (path(R1), path(R2));
    assert_eq!(r1.records, 1);
    // The period: the first probes' instant to three intervals before the sealing.
    assert_eq!(r1.from_ms, T0 + 1_000);
    assert!(r1.to_ms >= r1.from_ms + 60_000 && r1.to_ms <= T0 + 80_000);
    assert_eq!(r1.sent, r1.answered, "{r1:?}");
    assert_eq!(r1.outages_total, 0);
    assert_eq!(r2.sent, r1.sent);
    assert_eq!(r2.answered, r2.sent - 10, "{r2:?}");
    assert_eq!(r2.outages_total, 1);
    assert_eq!(r2.longest, [(T0 + 20_000, T0 + 30_000)], "{r2:?}");
    // South's own record of the reverse direction says the same of R2.
    let south_r2 = report
        .availability
        .iter()
        .find(|((device, r, _), _)| *device == south.identity().key() && r == R2)
        .map(|(_, summary)| summary.clone())
        .unwrap();
    assert_eq!(south_r2.longest, [(T0 + 20_000, T0 + 30_000)]);
}

/// A member probing far faster than any interval allows (here every millisecond) gets
/// at most one answer per relay each 50 ms: no more frames, and no more rows kept, than
/// an honest prober's.
#[test]
fn a_member_flooding_probes_gets_no_more_answers_than_an_honest_one() {
    let (mut north, mut south, clock) = on_two_relays("flood");
    south.set_link_test_interval(1).unwrap();
    let mut seq = 0;
    let mut answers = 0;
    for _ in 0..200 {
        clock.advance(Duration::from_millis(1));
        south.send_due_probes().unwrap();
        carry(&mut south, &mut north, None, &mut seq);
        answers += north.take_frames().unwrap().len();
    }
    // 200 ms of probes: at most 4 answers per relay (one each 50 ms, the first included),
    // 200 probes per relay sent.
    assert!(answers <= 2 * 5, "{answers} answers");
    assert!(answers >= 2 * 3, "{answers} answers");
}
