//! Link tests: end-to-end probes on every relay path, answered on the same path, kept
//! out of the transcript; and the signed availability records that stand for them in
//! the permanent record.
//!
//! A probe is an ephemeral frame ([`hotline_core::frame`]) sealed once **per relay**
//! and posted to that relay only; a member answers it with a frame of its own, posted
//! back through the relay it came by. The probe's name is the SHA-256 of its ciphertext,
//! which both ends know. The prober learns, per relay and per party, that the path
//! works both ways and how long the round trip took (probe sealed → answer opened).
//!
//! ```text
//!   A: probe P1 ──► R1 only, P2 ──► R2 only, P3 ──► R3 only
//!   B: P1 came via R1: answer(P1) ──► R1 only; same for P2, P3
//!   A: answer(P1) opened: path R1 to B works, rtt = now − sent(P1); a dead R3 answers nothing
//! ```
//!
//! Frames also carry what their sender holds, so "delivered" keeps flowing on a quiet
//! line. Neither probes nor answers enter the transcript: each device keeps them in its
//! own database for a retention window (7 days by default) as evidence, and once per
//! record period (an hour by default) seals a signed `Body::Availability` per channel:
//! per relay and party, probes sent and answered, round trips, and every outage (a run
//! of unanswered probes). The permanent record grows by that one envelope, and one
//! checkpoint, per device per period, whatever the interval.

use hotline_core::{
    Availability, Body, Channel, ChannelId, DeviceIdentity, Event, PathRecord,
    envelope::{MAX_OUTAGES, MAX_PATHS},
};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use crate::payload::{LinkTest, RECEIPT, relay_tag};
use crate::provider::Provider;
use crate::store::{StoreError, channel_relays, remember_frame, seal};

/// Default time between link tests.
pub const DEFAULT_INTERVAL_MS: u64 = 60_000;
/// Default period of the availability records.
pub const DEFAULT_RECORD_PERIOD_MS: u64 = 3_600_000;
/// Default time raw probes and answers are kept.
pub const DEFAULT_RETENTION_MS: u64 = 7 * 24 * 3_600_000;

pub(crate) fn setting(connection: &Connection, key: &str, default: u64) -> Result<u64, StoreError> {
    let value: Option<i64> = connection
        .prepare_cached("SELECT value FROM settings WHERE key = ?1")?
        .query_row([key], |row| row.get(0))
        .optional()?;
    Ok(value.map_or(default, |v| v as u64))
}

/// The settings link tests run by.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub interval_ms: u64,
    pub record_period_ms: u64,
    pub retention_ms: u64,
}

impl Settings {
    pub fn read(connection: &Connection) -> Result<Self, StoreError> {
        Ok(Self {
            interval_ms: setting(connection, "link_test_interval_ms", DEFAULT_INTERVAL_MS)?,
            record_period_ms: setting(connection, "record_period_ms", DEFAULT_RECORD_PERIOD_MS)?,
            retention_ms: setting(connection, "link_test_retention_ms", DEFAULT_RETENTION_MS)?,
        })
    }

    /// How long after a probe its answer is waited for before a record counts it
    /// unanswered: three intervals, at least 3 s, at most half a period.
    fn grace_ms(&self) -> u64 {
        self.interval_ms
            .saturating_mul(3)
            .max(3_000)
            .min(self.record_period_ms / 2)
    }
}

/// Seals `payload` in one frame of `channel` for `relays`, queued for the sync engine.
/// `None` when the channel cannot seal now (removed, or a proposal waits).
fn queue_frame(
    connection: &Connection,
    provider: &Provider<'_>,
    identity: &DeviceIdentity,
    channel: &mut Channel,
    relays: &[&str],
    payload: &[u8],
    now: u64,
) -> Result<Option<[u8; 32]>, StoreError> {
    let bytes = match channel.send_ephemeral(provider, identity, payload, now) {
        Ok(bytes) => bytes,
        Err(_) => return Ok(None),
    };
    let hash: [u8; 32] = Sha256::digest(&bytes).into();
    remember_frame(connection, &hash, now)?;
    for relay in relays {
        connection
            .prepare_cached(
                "INSERT INTO frames_out (channel, relay, bytes, created_ms)
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![&channel.id().0[..], relay, &bytes, now as i64])?;
    }
    Ok(Some(hash))
}

/// Notes that `channel` received messages of other parties: its senders are told, by
/// one receipt for the whole arrival batch ([`send_receipts`]).
pub(crate) fn receipt_due(connection: &Connection, channel: &ChannelId) -> Result<(), StoreError> {
    connection
        .prepare_cached("INSERT OR IGNORE INTO receipts_due (channel) VALUES (?1)")?
        .execute([&channel.0[..]])?;
    Ok(())
}

/// The channels with receipts due, taken.
pub(crate) fn take_receipts_due(connection: &Connection) -> Result<Vec<ChannelId>, StoreError> {
    let ids: Vec<Vec<u8>> = connection
        .prepare_cached("DELETE FROM receipts_due RETURNING channel")?
        .query_map([], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(ids
        .into_iter()
        .filter_map(|id| <[u8; 32]>::try_from(id.as_slice()).ok().map(ChannelId))
        .collect())
}

/// Seals one delivery receipt of `channel` (a frame saying what this device holds) for
/// every relay of the channel. False when it cannot seal now or has no relay.
pub(crate) fn send_receipt(
    connection: &Connection,
    provider: &Provider<'_>,
    identity: &DeviceIdentity,
    channel: &mut Channel,
    now: u64,
) -> Result<bool, StoreError> {
    let relays = channel_relays(connection, &channel.id())?;
    if relays.is_empty() {
        return Ok(false);
    }
    let relays: Vec<&str> = relays.iter().map(String::as_str).collect();
    Ok(queue_frame(
        connection, provider, identity, channel, &relays, RECEIPT, now,
    )?
    .is_some())
}

/// Sends this channel's probes if its last ones are an interval old, one per relay;
/// seals its first checkpoint with its first probes and its availability record when
/// a period is over; forgets raw link tests past retention. Returns whether probes went
/// out. The caller saves the channel.
pub(crate) fn send_due(
    connection: &Connection,
    provider: &Provider<'_>,
    identity: &DeviceIdentity,
    channel: &mut Channel,
    settings: &Settings,
    now: u64,
) -> Result<bool, StoreError> {
    let id = channel.id();
    let state: Option<(i64, i64)> = connection
        .prepare_cached("SELECT record_since_ms, last_probe_ms FROM link_state WHERE channel = ?1")?
        .query_row([&id.0[..]], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    if let Some((_, last)) = state
        && now < last as u64 + settings.interval_ms
    {
        return Ok(false);
    }
    let relays = channel_relays(connection, &id)?;
    let mut sent = false;
    for relay in &relays {
        let nonce: [u8; 8] = rand::random();
        let payload = LinkTest::Probe { nonce }.encode();
        let Some(hash) = queue_frame(
            connection,
            provider,
            identity,
            channel,
            &[relay.as_str()],
            &payload,
            now,
        )?
        else {
            return Ok(false);
        };
        connection
            .prepare_cached(
                "INSERT OR IGNORE INTO probes (hash, channel, relay, sent_ms) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![&hash[..], &id.0[..], relay, now as i64])?;
        sent = true;
    }
    match state {
        None => {
            crate::store::cached::execute(
                connection,
                "INSERT INTO link_state (channel, record_since_ms, last_probe_ms) VALUES (?1, ?2, ?2)",
                params![&id.0[..], now as i64],
            )?;
            // The first probes come with a signed checkpoint: every member checks it
            // against its own root early (a `checkpoint` alarm when they differ).
            seal_or_wait(connection, provider, identity, channel, checkpoint())?;
        }
        Some((since, _)) => {
            crate::store::cached::execute(
                connection,
                "UPDATE link_state SET last_probe_ms = ?2 WHERE channel = ?1",
                params![&id.0[..], now as i64],
            )?;
            let since = since as u64;
            let to = now.saturating_sub(settings.grace_ms());
            if to >= since + settings.record_period_ms {
                let record =
                    availability(connection, channel, identity, &relays, settings, since, to)?;
                if seal_or_wait(
                    connection,
                    provider,
                    identity,
                    channel,
                    Body::Availability(record),
                )? {
                    seal_or_wait(connection, provider, identity, channel, checkpoint())?;
                    crate::store::cached::execute(
                        connection,
                        "UPDATE link_state SET record_since_ms = ?2 WHERE channel = ?1",
                        params![&id.0[..], to as i64],
                    )?;
                    // Never what the next record still has to count.
                    forget(
                        connection,
                        now.saturating_sub(settings.retention_ms).min(to),
                    )?;
                }
            }
        }
    }
    Ok(sent)
}

fn checkpoint() -> Body {
    Body::Checkpoint {
        root: [0; 32],
        size: 0,
        horizon: 0,
    }
}

/// Seals `body`; false when the channel cannot seal now (a commit or proposal waits):
/// a later round does it.
fn seal_or_wait(
    connection: &Connection,
    provider: &Provider<'_>,
    identity: &DeviceIdentity,
    channel: &mut Channel,
    body: Body,
) -> Result<bool, StoreError> {
    match seal(connection, provider, identity, channel, body, None) {
        Ok(_) => Ok(true),
        Err(StoreError::Channel(_)) => Ok(false),
        Err(error) => Err(error),
    }
}

/// Deletes raw link tests older than `before`.
fn forget(connection: &Connection, before: u64) -> Result<(), StoreError> {
    let before = before as i64;
    crate::store::cached::execute(
        connection,
        "DELETE FROM probes WHERE sent_ms < ?1",
        [before],
    )?;
    crate::store::cached::execute(connection, "DELETE FROM answers WHERE at_ms < ?1", [before])?;
    crate::store::cached::execute(connection, "DELETE FROM frames WHERE at_ms < ?1", [before])?;
    crate::store::cached::execute(
        connection,
        "DELETE FROM custody WHERE kept_ms < ?1",
        [before],
    )?;
    Ok(())
}

/// What this device's probes of `channel` sent in `[from, to)` showed, per relay and
/// other party. Reads the period's probes once per path (bounded by period / interval,
/// not by history).
fn availability(
    connection: &Connection,
    channel: &Channel,
    identity: &DeviceIdentity,
    relays: &[String],
    settings: &Settings,
    from: u64,
    to: u64,
) -> Result<Availability, StoreError> {
    let own_party = &identity.info().party;
    let mut parties: Vec<String> = channel
        .members()
        .into_iter()
        .filter(|member| member.party != *own_party)
        .map(|member| member.party)
        .collect();
    parties.sort();
    parties.dedup();
    let mut paths = Vec::new();
    for relay in relays {
        for party in &parties {
            if paths.len() >= MAX_PATHS {
                break;
            }
            paths.push(path_record(
                connection,
                &channel.id(),
                relay,
                party,
                from,
                to,
                settings.grace_ms(),
            )?);
        }
    }
    Ok(Availability {
        from_ms: from,
        to_ms: to,
        interval_ms: settings.interval_ms,
        paths,
    })
}

/// What this device's probes through `relay` showed of `party` over `[from, to)`. A
/// probe counts from the first one that party ever answered in this channel on (before
/// it, the party had not joined, or not opened its invitation); an answer counts if it
/// came within `grace` (later, the path was down for the time it took).
#[allow(clippy::too_many_arguments)]
fn path_record(
    connection: &Connection,
    channel: &ChannelId,
    relay: &str,
    party: &str,
    from: u64,
    to: u64,
    grace: u64,
) -> Result<PathRecord, StoreError> {
    let first_answered: Option<i64> = connection
        .prepare_cached(
            "SELECT p.sent_ms FROM answers a JOIN probes p ON p.hash = a.probe
             WHERE a.party = ?2 AND p.channel = ?1 ORDER BY a.at_ms LIMIT 1",
        )?
        .query_row(params![&channel.0[..], party], |row| row.get(0))
        .optional()?;
    let from = match first_answered {
        Some(first) => from.max(first as u64),
        // Never answered at all: every probe of the period is unanswered.
        None => from,
    };
    let mut statement = connection.prepare_cached(
        "SELECT p.sent_ms,
                (SELECT MIN(a.at_ms) FROM answers a WHERE a.probe = p.hash AND a.party = ?4)
         FROM probes p
         WHERE p.channel = ?1 AND p.relay = ?2 AND p.sent_ms >= ?3 AND p.sent_ms < ?5
         ORDER BY p.sent_ms",
    )?;
    let rows = statement.query_map(
        params![&channel.0[..], relay, from as i64, party, to as i64],
        |row| Ok((row.get::<_, i64>(0)? as u64, row.get::<_, Option<i64>>(1)?)),
    )?;
    let mut sent = 0u32;
    let mut rtts: Vec<u32> = Vec::new();
    let mut outages: Vec<(u64, u64)> = Vec::new();
    let mut open: Option<u64> = None;
    for row in rows {
        let (sent_ms, answered) = row?;
        sent = sent.saturating_add(1);
        match answered.filter(|at| (*at as u64).saturating_sub(sent_ms) <= grace) {
            Some(at) => {
                let rtt = (at as u64).saturating_sub(sent_ms);
                rtts.push(u32::try_from(rtt).unwrap_or(u32::MAX));
                if let Some(start) = open.take() {
                    outages.push((start, sent_ms));
                }
            }
            None => {
                open.get_or_insert(sent_ms);
            }
        }
    }
    if let Some(start) = open {
        outages.push((start, to));
    }
    rtts.sort_unstable();
    let outages_total = u32::try_from(outages.len()).unwrap_or(u32::MAX);
    // Keep the longest (ties: the earliest), listed in time order.
    outages.sort_by_key(|(start, end)| (std::cmp::Reverse(end - start), *start));
    outages.truncate(MAX_OUTAGES);
    outages.sort_unstable();
    Ok(PathRecord {
        relay: relay.to_owned(),
        party: party.to_owned(),
        sent,
        answered: u32::try_from(rtts.len()).unwrap_or(u32::MAX),
        rtt_min_ms: rtts.first().copied().unwrap_or(0),
        rtt_median_ms: rtts.get(rtts.len() / 2).copied().unwrap_or(0),
        outages_total,
        outages,
    })
}

/// Handles the ephemeral frames among `events`: answers a probe (only one these very
/// bytes carried, through the relay they came by), records answers to this device's
/// probes. `hash` is the SHA-256 of the bytes at hand. Returns the parties heard and
/// whether the channel changed (an answer was sealed).
#[allow(clippy::too_many_arguments)]
pub(crate) fn on_frames(
    connection: &Connection,
    provider: &Provider<'_>,
    identity: &DeviceIdentity,
    channel: &mut Channel,
    events: &[Event],
    hash: &[u8; 32],
    relay: Option<&str>,
    now: u64,
) -> Result<bool, StoreError> {
    let mut changed = false;
    for (index, event) in events.iter().enumerate() {
        let Event::Ephemeral {
            sender, payload, ..
        } = event
        else {
            continue;
        };
        // The frame these very bytes carried (not one held for its epoch until now).
        let at_hand = index == 0;
        let Some(party) = channel.transcript().party_of(sender).map(str::to_owned) else {
            continue;
        };
        connection
            .prepare_cached(
                "INSERT INTO heard (channel, party, last_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (channel, party) DO UPDATE SET last_ms = MAX(last_ms, ?3)",
            )?
            .execute(params![&channel.id().0[..], party, now as i64])?;
        match LinkTest::decode(payload) {
            // A probe held for its epoch is stale: the next one asks again.
            Some(LinkTest::Probe { .. }) if at_hand => {
                if let Some(relay) = relay
                    && answer_allowed(connection, &channel.id(), sender, relay, now)?
                {
                    let answer = LinkTest::Answer {
                        probe: *hash,
                        relay: relay_tag(relay),
                    }
                    .encode();
                    changed |= queue_frame(
                        connection,
                        provider,
                        identity,
                        channel,
                        &[relay],
                        &answer,
                        now,
                    )?
                    .is_some();
                }
            }
            // An answer counts for the path of its probe only if it came back through
            // that same relay, in the probe's channel (a path is tested both ways).
            Some(LinkTest::Answer { probe, relay: tag }) if at_hand => {
                let sent: Option<(String, i64)> = connection
                    .prepare_cached(
                        "SELECT relay, sent_ms FROM probes WHERE hash = ?1 AND channel = ?2",
                    )?
                    .query_row(params![&probe[..], &channel.id().0[..]], |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })
                    .optional()?;
                let Some((url, sent_ms)) = sent else { continue };
                if relay_tag(&url) != tag || relay != Some(url.as_str()) {
                    continue;
                }
                let fresh = connection
                    .prepare_cached(
                        "INSERT OR IGNORE INTO answers (probe, device, party, at_ms)
                         VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![&probe[..], &sender.0[..], party, now as i64])?;
                if fresh == 0 {
                    continue;
                }
                connection
                    .prepare_cached(
                        "INSERT INTO paths (channel, relay, party, last_ok_ms, rtt_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (channel, relay, party) DO UPDATE SET
                           last_ok_ms = ?4, rtt_ms = ?5 WHERE ?4 >= last_ok_ms",
                    )?
                    .execute(params![
                        &channel.id().0[..],
                        url,
                        party,
                        now as i64,
                        (now as i64 - sent_ms).max(0)
                    ])?;
            }
            _ => {}
        }
    }
    Ok(changed)
}

/// Probes of one member through one relay are answered at most once per this many
/// milliseconds (half the shortest link-test interval): a member flooding probes gets
/// no more answers, and this device keeps no more rows, than an honest one.
pub const MIN_ANSWER_GAP_MS: u64 = 50;

/// Whether a probe of `device` through `relay` may be answered now (and if so, notes it).
fn answer_allowed(
    connection: &Connection,
    channel: &ChannelId,
    device: &hotline_core::DeviceKey,
    relay: &str,
    now: u64,
) -> Result<bool, StoreError> {
    let last: Option<i64> = connection
        .prepare_cached(
            "SELECT at_ms FROM answer_floor WHERE channel = ?1 AND device = ?2 AND relay = ?3",
        )?
        .query_row(params![&channel.0[..], &device.0[..], relay], |row| {
            row.get(0)
        })
        .optional()?;
    if last.is_some_and(|last| now < (last.max(0) as u64).saturating_add(MIN_ANSWER_GAP_MS)) {
        return Ok(false);
    }
    connection
        .prepare_cached(
            "INSERT INTO answer_floor (channel, device, relay, at_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (channel, device, relay) DO UPDATE SET at_ms = ?4",
        )?
        .execute(params![&channel.0[..], &device.0[..], relay, now as i64])?;
    Ok(true)
}

/// A frame waiting for its relay.
#[derive(Debug, Clone)]
pub struct OutgoingFrame {
    pub id: i64,
    pub channel: ChannelId,
    pub relay: String,
    pub bytes: Vec<u8>,
    /// When it was sealed (ms since the Unix epoch): a frame left waiting too long is
    /// stale (an answer posted late would hide the outage that held it).
    pub created_ms: u64,
}

/// Takes the frames waiting to be posted (each is posted once: a frame that fails is
/// a link test that failed); drops those older than `stale_ms`.
pub(crate) fn take_frames(
    connection: &Connection,
    now: u64,
    stale_ms: u64,
) -> Result<Vec<OutgoingFrame>, StoreError> {
    crate::store::cached::execute(
        connection,
        "DELETE FROM frames_out WHERE created_ms < ?1",
        [now.saturating_sub(stale_ms) as i64],
    )?;
    let frames: Vec<OutgoingFrame> = connection
        .prepare_cached("DELETE FROM frames_out RETURNING id, channel, relay, bytes, created_ms")?
        .query_map([], |row| {
            let channel: Vec<u8> = row.get(1)?;
            Ok((
                row.get(0)?,
                channel,
                row.get(2)?,
                row.get(3)?,
                row.get::<_, i64>(4)?,
            ))
        })?
        .filter_map(|row| match row {
            Ok((id, channel, relay, bytes, created)) => <[u8; 32]>::try_from(channel.as_slice())
                .ok()
                .map(|channel| {
                    Ok(OutgoingFrame {
                        id,
                        channel: ChannelId(channel),
                        relay,
                        bytes,
                        created_ms: created.max(0) as u64,
                    })
                }),
            Err(error) => Some(Err(error)),
        })
        .collect::<Result<_, _>>()?;
    let mut frames = frames;
    frames.sort_by_key(|frame| frame.id);
    Ok(frames)
}
