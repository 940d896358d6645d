//! Where the device's time comes from.
//!
//! Every store operation reads its clock once, when its transaction begins, and uses
//! that instant throughout (what it seals, queues, records and judges). The clock is
//! the system's, or one a test sets and advances ([`ManualClock`]), so that tests of
//! periods, deadlines and thresholds never sleep.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of the current time, in milliseconds since the Unix epoch.
pub trait Clock: std::fmt::Debug {
    fn now_ms(&self) -> u64;
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock {
    ms: AtomicU64,
}

impl ManualClock {
    pub fn at(ms: u64) -> Self {
        Self {
            ms: AtomicU64::new(ms),
        }
    }

    pub fn advance(&self, by: Duration) {
        self.ms.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn set(&self, ms: u64) {
        self.ms.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.ms.load(Ordering::SeqCst)
    }
}

thread_local! {
    /// The instant of the store operation running on this thread, if any.
    static OPERATION: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Runs `operation` with `now` as the instant [`now_ms`] gives (restored afterwards, so
/// that operations may nest).
pub(crate) fn during<T>(now: u64, operation: impl FnOnce() -> T) -> T {
    /// Puts the outer instant back however the operation ends (a panic included).
    struct Restore(Option<u64>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OPERATION.with(|cell| cell.set(self.0));
        }
    }
    let _restore = Restore(OPERATION.with(|cell| cell.replace(Some(now))));
    operation()
}

/// The instant of the store operation in progress (its clock, read once when its
/// transaction began); the system's clock outside one.
pub(crate) fn now_ms() -> u64 {
    OPERATION
        .with(Cell::get)
        .unwrap_or_else(|| SystemClock.now_ms())
}
