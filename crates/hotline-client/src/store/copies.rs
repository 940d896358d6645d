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
            crate::store::cached::execute(
                connection,
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
    crate::store::cached::execute(
        connection,
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
pub(crate) fn check_order(
    connection: &Connection,
    relay: &str,
    hash: &[u8; 32],
) -> Result<(), StoreError> {
    let copy: Option<(Vec<u8>, Vec<u8>, i64)> = connection
        .prepare_cached("SELECT channel, sender, seq FROM copies WHERE hash = ?1")?
        .query_row([&hash[..]], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    let Some((channel, sender, seq)) = copy else {
        return Ok(());
    };
    let last: Option<i64> = connection
        .prepare_cached(
            "SELECT seq FROM relay_heads WHERE relay = ?1 AND channel = ?2 AND sender = ?3",
        )?
        .query_row(params![relay, &channel, &sender], |row| row.get(0))
        .optional()?;
    let sender_hex = hex::encode(&sender[..8]);
    // The relay's receipts for these bytes: its signed word on where it stored them.
    let evidence = || -> Result<Vec<u8>, StoreError> {
        let receipts: Vec<Vec<u8>> = connection
            .prepare_cached("SELECT receipt FROM custody WHERE relay = ?1 AND hash = ?2")?
            .query_map(params![relay, &hash[..]], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(evidence_of(hash, &receipts))
    };
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
        crate::store::cached::execute(
            connection,
            "INSERT OR IGNORE INTO alarms (kind, relay, party, message, detail, evidence, since_ms)
             VALUES (?1, ?2, NULL, ?3, ?4, ?5, ?6)",
            params![
                kind,
                relay,
                hex::encode(hash),
                detail,
                evidence()?,
                now_ms() as i64
            ],
        )?;
    }
    crate::store::cached::execute(
        connection,
        "INSERT INTO relay_heads (relay, channel, sender, seq) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (relay, channel, sender) DO UPDATE SET seq = MAX(seq, ?4)",
        params![relay, &channel, &sender, seq],
    )?;
    Ok(())
}

/// The SHA-256 of bytes received, as the link-test bookkeeping keys copies.
/// Keeps a relay's custody receipt for the copy with `hash` (posted or received
/// through it), for the link-test retention window.
pub(crate) fn keep_receipt(
    connection: &Connection,
    relay: &str,
    hash: &[u8; 32],
    receipt: &[u8],
) -> Result<(), StoreError> {
    connection
        .prepare_cached(
            "INSERT OR IGNORE INTO custody (relay, hash, receipt, kept_ms) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![relay, &hash[..], receipt, now_ms() as i64])?;
    Ok(())
}

/// A hostile-relay alarm's evidence: the message's hash, then the relay's receipts for
/// it (`u32` length and bytes each), as [`cited_receipts`] reads it.
pub(crate) fn evidence_of(hash: &[u8; 32], receipts: &[Vec<u8>]) -> Vec<u8> {
    let mut evidence = hash.to_vec();
    for receipt in receipts {
        evidence.extend_from_slice(&(receipt.len() as u32).to_be_bytes());
        evidence.extend_from_slice(receipt);
    }
    evidence
}

/// The custody receipts an alarm's evidence holds: a `receipt` alarm's evidence is the
/// false receipt itself; a `dropped` or `replayed` one's is the message's hash, then
/// the relay's receipts for it (`u32` length and bytes each). Evidence of another form
/// (alarms raised before relays signed receipts) cites none.
pub(crate) fn cited_receipts(kind: &str, evidence: &[u8]) -> Vec<Vec<u8>> {
    match kind {
        "receipt" => vec![evidence.to_vec()],
        "dropped" | "replayed" => {
            let mut receipts = Vec::new();
            let mut rest = evidence.get(32..).unwrap_or_default();
            while let Some((len, tail)) = rest.split_first_chunk::<4>() {
                let len = u32::from_be_bytes(*len) as usize;
                let Some(receipt) = tail.get(..len) else {
                    return Vec::new();
                };
                receipts.push(receipt.to_vec());
                rest = &tail[len..];
            }
            receipts
        }
        _ => Vec::new(),
    }
}

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
/// Whether `channel`'s transcript processed the bytes with `hash` (a copy already in).
pub(crate) fn is_processed(
    connection: &Connection,
    channel: &ChannelId,
    hash: &[u8; 32],
) -> Result<bool, StoreError> {
    Ok(connection
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM processed WHERE channel = ?1 AND hash = ?2)")?
        .query_row(params![&channel.0[..], &hash[..]], |row| row.get(0))?)
}

pub(crate) fn is_known_frame(connection: &Connection, hash: &[u8; 32]) -> Result<bool, StoreError> {
    Ok(connection
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM frames WHERE hash = ?1)")?
        .query_row([&hash[..]], |row| row.get(0))?)
}
