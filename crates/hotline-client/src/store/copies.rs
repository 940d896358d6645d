//! Where each copy of a message came from: the per-relay order check, and the frames
//! (ephemeral, outside the transcript) this device already saw.
//!
//! Every copy received is placed in its sender's chain through a hash → (sender, seq)
//! map (`copies`); a relay that skips some of a sender's envelopes dropped them, one
//! that serves one again or after a later one replays or reorders (ARCHITECTURE.md,
//! "Hostile relays").

use hotline_core::{Channel, ChannelId, DeviceKey, Event};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::{Cursor, StoreError, now_ms};

/// Places the copy that `bytes` (SHA-256 `hash`) carried through `relay`, and the
/// messages held for their commit that it opened, in their senders' chains for the
/// per-relay order check.
pub(crate) fn place_copies(
    connection: &Connection,
    channel: &Channel,
    events: &[Event],
    hash: &[u8; 32],
    relay: Option<&str>,
) -> Result<(), StoreError> {
    // The envelope these very bytes carried, if any.
    let carried = channel.carried(events);
    // A resend comes when its sender decides, out of its chain's order: not placed.
    let resent = events.contains(&Event::Resent);
    if let Some((_, sender, seq)) = &carried
        && !resent
    {
        record_copy(connection, &channel.id(), hash, sender, *seq)?;
    }
    if let Some(relay) = relay
        && !resent
    {
        if channel.holds_buffered(hash) {
            // Not opened yet (its commit has not come): placed when it is.
            connection.execute(
                "INSERT OR IGNORE INTO unplaced (hash, relay) VALUES (?1, ?2)",
                params![&hash[..], relay],
            )?;
        } else {
            check_order(connection, relay, hash)?;
        }
    }
    // Messages held for their commit and opened now, through the relays they came by.
    for event in events {
        let Event::Unbuffered {
            hash: opened,
            envelope,
        } = event
        else {
            continue;
        };
        if let Some((_, sender, seq)) = envelope {
            record_copy(connection, &channel.id(), opened, sender, *seq)?;
        }
        let relays: Vec<String> = connection
            .prepare_cached("DELETE FROM unplaced WHERE hash = ?1 RETURNING relay")?
            .query_map([&opened[..]], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        for relay in relays {
            check_order(connection, &relay, opened)?;
        }
    }
    Ok(())
}

/// Remembers which sender and sequence number the bytes with `hash` carry, so that
/// copies through other relays (dropped as duplicates before any processing) can be
/// placed in their sender's chain.
pub(crate) fn record_copy(
    connection: &Connection,
    channel: &ChannelId,
    hash: &[u8; 32],
    sender: &DeviceKey,
    seq: u64,
) -> Result<(), StoreError> {
    connection.execute(
        "INSERT OR IGNORE INTO copies (hash, channel, sender, seq) VALUES (?1, ?2, ?3, ?4)",
        params![&hash[..], &channel.0[..], &sender.0[..], seq as i64],
    )?;
    Ok(())
}

/// Each relay must hand over each sender's envelopes in the order of their chain (the
/// sync engine posts to each relay in order). A relay that skips some (while another
/// relay had them, or they arrive later) dropped them; one that hands an envelope over
/// again, or an older one after a newer, replays or reorders. Both raise an alarm that
/// names the relay and keeps the bytes.
fn check_order(connection: &Connection, relay: &str, hash: &[u8; 32]) -> Result<(), StoreError> {
    let copy: Option<(Vec<u8>, Vec<u8>, i64)> = connection
        .query_row(
            "SELECT channel, sender, seq FROM copies WHERE hash = ?1",
            [&hash[..]],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .optional()?;
    let Some((channel, sender, seq)) = copy else {
        return Ok(());
    };
    let last: Option<i64> = connection
        .query_row(
            "SELECT seq FROM relay_heads WHERE relay = ?1 AND channel = ?2 AND sender = ?3",
            params![relay, &channel, &sender],
            |row| row.get(0),
        )
        .optional()?;
    let sender_hex = hex::encode(&sender[..8]);
    let found = match last {
        Some(last) if seq > last + 1 => Some((
            "dropped",
            format!(
                "skipped messages {}..={} of sender {sender_hex}… (served {seq} after {last})",
                last + 1,
                seq - 1
            ),
        )),
        Some(last) if seq <= last => Some((
            "replayed",
            format!("served message {seq} of sender {sender_hex}… again or late, after {last}"),
        )),
        _ => None,
    };
    if let Some((kind, detail)) = found {
        connection.execute(
            "INSERT OR IGNORE INTO alarms (kind, relay, party, message, detail, evidence, since_ms)
             VALUES (?1, ?2, NULL, ?3, ?4, ?5, ?6)",
            params![
                kind,
                relay,
                hex::encode(hash),
                detail,
                &hash[..],
                now_ms() as i64
            ],
        )?;
    }
    connection.execute(
        "INSERT INTO relay_heads (relay, channel, sender, seq) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (relay, channel, sender) DO UPDATE SET seq = MAX(seq, ?4)",
        params![relay, &channel, &sender, seq],
    )?;
    Ok(())
}

/// The SHA-256 of bytes received, as the link-test bookkeeping keys copies.
pub(crate) fn copy_hash(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The relay a cursor names, if any.
pub(crate) fn relay_of<'a>(cursor: &Option<Cursor<'a>>) -> Option<&'a str> {
    cursor.as_ref().map(|cursor| cursor.relay)
}

/// Remembers the hash of a frame this device sent or opened (until the retention
/// window of link tests ends).
pub(crate) fn remember_frame(
    connection: &Connection,
    hash: &[u8; 32],
    now: u64,
) -> Result<(), StoreError> {
    connection
        .prepare_cached("INSERT OR IGNORE INTO frames (hash, at_ms) VALUES (?1, ?2)")?
        .execute(params![&hash[..], now as i64])?;
    Ok(())
}

/// Whether `hash` names a frame this device sent or opened (within the retention
/// window): a relay serving it (again) gets it treated as a duplicate.
pub(crate) fn is_known_frame(connection: &Connection, hash: &[u8; 32]) -> Result<bool, StoreError> {
    Ok(connection
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM frames WHERE hash = ?1)")?
        .query_row([&hash[..]], |row| row.get(0))?)
}
