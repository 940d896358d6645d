//! Connections that have not authenticated yet, and their own small budget.
//!
//! Every accepted connection is *pending* until a request on it authenticates. Pending
//! connections have a budget of their own, in total and per source address: when a new
//! connection would exceed it, the oldest pending connection (of that source, else of
//! all) is closed. So strangers who open connections and never authenticate (idle,
//! trickling a TLS handshake, request headers or a body) hold at most that budget, never
//! the members' slots; and a member's new connection, which authenticates with its first
//! request within milliseconds, is the oldest pending one only briefly.
//!
//! ```text
//!   accept ─► admit (pending; may close the oldest pending) ─► TLS, request
//!                                    │
//!     a request authenticates ───────┴─► leaves the pending set (a member's slot)
//! ```
//!
//! A request learns which connection it came on through a task-local ([`CONNECTION`]):
//! each connection is served inside its own scope, and the handlers run inside it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

tokio::task_local! {
    /// The connection the current request came on.
    pub static CONNECTION: Arc<Ticket>;
}

/// The source address of the current request's connection (none outside one).
pub fn peer() -> Option<IpAddr> {
    CONNECTION.try_with(|ticket| ticket.source).ok()
}

/// Marks the connection of the current request authenticated (no-op outside one).
pub fn note_authenticated() {
    let _ = CONNECTION.try_with(|ticket| ticket.authenticated());
}

/// The pending connections, oldest first, and the budget.
#[derive(Debug)]
pub struct Admission {
    inner: Mutex<Pending>,
    total: usize,
    per_source: usize,
    evicted: AtomicU64,
}

#[derive(Debug, Default)]
struct Pending {
    next: u64,
    /// By admission order: the source and how to close it.
    connections: BTreeMap<u64, (IpAddr, Arc<Notify>)>,
    by_source: HashMap<IpAddr, usize>,
}

impl Pending {
    fn remove(&mut self, id: u64) -> Option<Arc<Notify>> {
        let (source, close) = self.connections.remove(&id)?;
        if let Some(count) = self.by_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                self.by_source.remove(&source);
            }
        }
        Some(close)
    }
}

/// One accepted connection's place in the pending set; leaving it (authenticated, or
/// dropped with the connection) frees the place.
#[derive(Debug)]
pub struct Ticket {
    id: u64,
    source: IpAddr,
    close: Arc<Notify>,
    admission: Arc<Admission>,
}

impl Admission {
    /// A budget of `total` pending connections, at most `per_source` from one address.
    pub fn new(total: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Pending::default()),
            total: total.max(1),
            per_source: per_source.max(1),
            evicted: AtomicU64::new(0),
        })
    }

    /// Admits a connection from `source` as pending, closing the oldest pending one of
    /// the same source if that source is over its share, else the oldest of all if the
    /// total is over.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Ticket {
        let close = Arc::new(Notify::new());
        let mut pending = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let id = pending.next;
        pending.next += 1;
        pending.connections.insert(id, (source, Arc::clone(&close)));
        let from_source = {
            let count = pending.by_source.entry(source).or_default();
            *count += 1;
            *count
        };
        let oldest = if from_source > self.per_source {
            pending
                .connections
                .iter()
                .find(|(_, (from, _))| *from == source)
                .map(|(id, _)| *id)
        } else if pending.connections.len() > self.total {
            pending.connections.keys().next().copied()
        } else {
            None
        };
        if let Some(oldest) = oldest.and_then(|oldest| pending.remove(oldest)) {
            // Stores a permit if its connection is not waiting yet: it closes on its
            // next look.
            oldest.notify_one();
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        Ticket {
            id,
            source,
            close,
            admission: Arc::clone(self),
        }
    }

    /// How many connections are pending now.
    pub fn pending(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .connections
            .len()
    }

    /// How many pending connections were closed to make room, since start.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    fn leave(&self, id: u64) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

impl Ticket {
    /// A request on this connection authenticated: it is a member's now.
    pub fn authenticated(&self) {
        self.admission.leave(self.id);
    }

    /// Resolves when this connection was closed to make room for newer ones.
    pub async fn evicted(&self) {
        self.close.notified().await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.leave(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[tokio::test]
    async fn the_oldest_pending_connection_makes_room_and_authenticated_ones_never_do() {
        let admission = Admission::new(4, 2);
        let member = admission.admit(ip(1));
        member.authenticated();
        // A stranger's third connection closes its first, not anyone else's.
        let stranger: Vec<Ticket> = (0..3).map(|_| admission.admit(ip(2))).collect();
        stranger[0].evicted().await;
        assert_eq!(admission.pending(), 2);
        // Over the total: the oldest pending of all goes (the stranger's second).
        let others: Vec<Ticket> = (3..6).map(|n| admission.admit(ip(n))).collect();
        stranger[1].evicted().await;
        assert_eq!(admission.pending(), 4);
        assert_eq!(admission.evicted(), 2);
        // The member's connection was never pending again, so never closed.
        let closed = tokio::time::timeout(std::time::Duration::from_millis(50), member.evicted());
        assert!(closed.await.is_err());
        drop(others);
        drop(stranger);
        assert_eq!(admission.pending(), 0);
    }
}
