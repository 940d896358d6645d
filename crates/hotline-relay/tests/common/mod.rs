//! What the relay's tests share: devices, an in-process relay on loopback with real
//! TLS, and a card holder's inbox capability.
#![allow(dead_code)]

use hotline_core::DeviceIdentity;
use hotline_proto::custody::message_hash;
use hotline_relay::capability::Capability;
use hotline_relay::server::{self, Limits};
use hotline_relay::storage::{Log, Receipt, SqliteStorage, Stored};
use hotline_relay::tls;
use rand::SeedableRng;

/// A device of `party`, the same for the same seed.
pub fn identity(party: &str, seed: u64) -> DeviceIdentity {
    DeviceIdentity::generate(party, "desk", &mut rand::rngs::StdRng::seed_from_u64(seed)).unwrap()
}

/// A relay (SQLite, in a fresh directory named after `name`) with `limits`: the running
/// relay and its address.
pub async fn relay(name: &str, limits: Limits) -> (server::Running, String) {
    tls::install_provider();
    let dir =
        std::env::temp_dir().join(format!("hotline-relay-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let storage = SqliteStorage::open(&dir.join("relay.db"), limits.quotas()).unwrap();
    server::serve_from(&dir, "127.0.0.1:0".parse().unwrap(), storage, limits)
        .await
        .unwrap()
}

/// The capability a holder of `owner`'s card presents to its inbox.
pub fn card_capability(owner: &DeviceIdentity) -> Capability {
    Capability::new(hotline_core::card::inbox_capability(owner))
}

/// Messages as (sequence number, bytes), each checked first: its receipt verifies with
/// the relay's pin alone, for this log, number and bytes.
pub fn checked(url: &str, log: &Log, stored: Vec<Stored>) -> Vec<(u64, Vec<u8>)> {
    let (_, pin) = tls::parse_url(url).unwrap();
    stored
        .into_iter()
        .map(|stored| {
            let receipt = stored.receipt.expect("every message has a receipt");
            Receipt::decode(&receipt)
                .unwrap()
                .verify_for(&pin, log, stored.seq, &message_hash(&stored.bytes))
                .unwrap();
            (stored.seq, stored.bytes)
        })
        .collect()
}
