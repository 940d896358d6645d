//! One-time key packages kept on this device's inbox relays, so that any number of
//! channels can be opened with it.
//!
//! A card carries sixteen one-time key packages and a last-resort one. Each channel
//! another device opens with this one spends a one-time package (a Welcome opens with
//! one package only); once the card's are spent, every later channel falls back to the
//! last-resort package, reused. So each device also keeps a stock of fresh one-time
//! packages on each of its inbox relays (distinct per relay: two inviters claiming
//! through two relays never get the same one), restocked when fewer than
//! [`STOCK_LOW`] remain (checked at most every [`CHECK_EVERY_MS`] per relay), and an
//! inviter claims one there before it falls back to the card.
//!
//! A relay is untrusted: a package it hands out is checked like a card's (valid, of
//! that device, one-time) before it is used; a relay that withholds them only costs
//! the fallback. Relays expire what they hold after their retention (30 days by
//! default), which rotates the stock; this device forgets the private parts of the
//! packages it stocked [`FORGET_AFTER_MS`] after stocking them.

use std::collections::BTreeMap;

use hotline_core::DeviceKey;
use hotline_proto::capability::Capability;
use openmls::prelude::{DeserializeBytes as _, KeyPackageRef};
use openmls_traits::OpenMlsProvider;
use openmls_traits::storage::StorageProvider;
use rusqlite::params;

use crate::provider::Provider;
use crate::store::{Store, StoreError, now_ms};

/// Fewer packages than this on a relay: restock it.
pub const STOCK_LOW: u64 = 4;
/// How many fresh packages a restock adds.
pub const STOCK_BATCH: usize = 8;
/// How often a relay's stock is checked.
pub const CHECK_EVERY_MS: u64 = 10 * 60 * 1000;
/// After how long this device forgets the private part of a package it stocked (longer
/// than a relay keeps it).
pub const FORGET_AFTER_MS: u64 = 60 * 86_400_000;

impl Store {
    /// This device's inbox relays whose stock was not checked for [`CHECK_EVERY_MS`].
    pub(crate) fn stock_due(&mut self) -> Result<Vec<String>, StoreError> {
        let relays = self.own_relays()?;
        self.transact(|connection, _, _| {
            let now = now_ms();
            let mut due = Vec::new();
            for relay in relays {
                let checked: Option<i64> = crate::store::cached::query_row(
                    connection,
                    "SELECT checked_ms FROM key_package_stock WHERE relay = ?1",
                    [&relay],
                    |row| row.get(0),
                )
                .ok();
                if checked.is_none_or(|ms| now >= ms.max(0) as u64 + CHECK_EVERY_MS) {
                    due.push(relay);
                }
            }
            Ok(due)
        })
    }

    /// Records what a relay said its stock is.
    pub(crate) fn note_stock(&mut self, relay: &str, stock: u64) -> Result<(), StoreError> {
        self.transact(|connection, _, _| {
            crate::store::cached::execute(
                connection,
                "INSERT INTO key_package_stock (relay, checked_ms, stock) VALUES (?1, ?2, ?3)
                 ON CONFLICT (relay) DO UPDATE SET checked_ms = ?2, stock = ?3",
                params![relay, now_ms() as i64, stock as i64],
            )?;
            Ok(())
        })
    }

    /// `count` fresh one-time key packages of this device, their private parts stored
    /// (and remembered, to be forgotten after [`FORGET_AFTER_MS`]).
    pub fn fresh_key_packages(&mut self, count: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        self.transact(|connection, identity, _| {
            let provider = Provider::new(connection);
            let now = now_ms() as i64;
            let mut packages = Vec::with_capacity(count);
            for _ in 0..count {
                let (bytes, hash_ref) =
                    hotline_core::card::key_package(identity, &provider, false)?;
                crate::store::cached::execute(
                    connection,
                    "INSERT OR IGNORE INTO stocked_key_packages (hash_ref, created_ms)
                     VALUES (?1, ?2)",
                    params![hash_ref, now],
                )?;
                packages.push(bytes);
            }
            Ok(packages)
        })
    }

    /// Forgets the private parts of stocked packages older than [`FORGET_AFTER_MS`] (no
    /// relay hands them out anymore; one used meanwhile was deleted when it was).
    pub(crate) fn forget_old_key_packages(&mut self) -> Result<usize, StoreError> {
        self.transact(|connection, _, _| {
            let before = now_ms().saturating_sub(FORGET_AFTER_MS) as i64;
            let old: Vec<Vec<u8>> = connection
                .prepare_cached("SELECT hash_ref FROM stocked_key_packages WHERE created_ms < ?1")?
                .query_map([before], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            let provider = Provider::new(connection);
            for hash_ref in &old {
                let corrupt = |e: String| StoreError::Corrupt(format!("key package storage: {e}"));
                let hash_ref = KeyPackageRef::tls_deserialize_exact_bytes(hash_ref)
                    .map_err(|e| corrupt(e.to_string()))?;
                provider
                    .storage()
                    .delete_key_package(&hash_ref)
                    .map_err(|e| corrupt(e.to_string()))?;
            }
            crate::store::cached::execute(
                connection,
                "DELETE FROM stocked_key_packages WHERE created_ms < ?1",
                [before],
            )?;
            Ok(old.len())
        })
    }

    /// The devices of `parties` this device would invite, with their inbox relays and
    /// the capability to claim their key packages there.
    pub(crate) fn invitees(
        &self,
        parties: &[String],
    ) -> Result<Vec<(DeviceKey, Vec<String>, Capability)>, StoreError> {
        let mut invitees = Vec::new();
        for contact in self.contacts()? {
            if parties.contains(&contact.party)
                && let Some((relays, Some(capability))) = self.contact_inbox(&contact.key)?
            {
                invitees.push((contact.key, relays, capability));
            }
        }
        Ok(invitees)
    }
}

/// Key packages claimed from relays, per device, for [`Store::create_channel_with`].
pub type Claimed = BTreeMap<DeviceKey, Vec<u8>>;
