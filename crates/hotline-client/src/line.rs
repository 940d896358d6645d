//! The line's health: when each party was last heard, what each relay did wrong, and
//! the alarms `hotline status` shows. Link tests themselves (probes per relay path, the
//! availability records) are in [`crate::link`].

use std::collections::{BTreeMap, BTreeSet};

use hotline_core::{Body, Channel, ChannelId, DeviceKey, EnvelopeId, Event, Precedence};
use rusqlite::{Connection, OptionalExtension, params};

pub use crate::link::DEFAULT_INTERVAL_MS;
use crate::link::{Settings, setting};
pub use crate::payload::{LinkTest, relay_tag};
use crate::provider::Provider;
use crate::store::{
    Store, StoreError, channel_relays, checkout, cited_receipts, now_ms, save_channel,
};

/// Default age after which a message not yet delivered to every party raises an alarm.
pub const DEFAULT_UNDELIVERED_MS: u64 = 5 * 60_000;
pub use crate::store::MAX_UNDELIVERED_SCAN;

/// Called inside the receive transaction, after the core processed a message: notes
/// when each party was last heard and which channels owe their senders a receipt.
pub(crate) fn note_arrivals(
    connection: &Connection,
    channel: &Channel,
    me: &DeviceKey,
    events: &[Event],
    now: u64,
) -> Result<(), StoreError> {
    for event in events {
        let Event::Accepted(ids) = event else {
            continue;
        };
        for id in ids {
            let Some(envelope) = channel.transcript().get(id)? else {
                continue;
            };
            if envelope.sender == *me {
                continue;
            }
            if let Body::Message(_) = envelope.body {
                crate::link::receipt_due(connection, &channel.id())?;
            }
            let party = channel
                .transcript()
                .party_of(&envelope.sender)
                .unwrap_or("?")
                .to_owned();
            connection
                .prepare_cached(
                    "INSERT INTO heard (channel, party, last_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (channel, party) DO UPDATE SET last_ms = MAX(last_ms, ?3)",
                )?
                .execute(params![&channel.id().0[..], party, now as i64])?;
        }
    }
    Ok(())
}

/// Something a script following the line reacts to (`sync --follow --json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineEvent {
    /// A message of another party entered the transcript.
    Message {
        channel: String,
        id: EnvelopeId,
        from: String,
        text: String,
        precedence: Precedence,
        time_ms: u64,
        deadline_ms: Option<u64>,
    },
    /// A message of this device is now held by `to`.
    Delivered {
        channel: String,
        message: EnvelopeId,
        to: String,
    },
    /// `by` read a message of this device.
    Read {
        channel: String,
        message: EnvelopeId,
        by: String,
    },
    /// A party had not read a message of this device by its deadline: a signed
    /// non-response statement is on the record and the message is offered again.
    Escalated(crate::escalate::Escalation),
}

/// Most `delivered` events one arrival reports per party (the oldest first; the rest
/// are not reported, their delivery shows in `log`).
const MAX_DELIVERED_EVENTS: usize = 256;

/// Where one relay path stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    /// Every other party answered through it within three intervals.
    Up,
    /// Some did, or it answers link tests but refuses or fails requests.
    Degraded,
    /// No answer through it for three intervals.
    Down,
    /// Link tests started less than three intervals ago and none answered yet.
    Unknown,
}

impl PathState {
    pub fn as_str(self) -> &'static str {
        match self {
            PathState::Up => "up",
            PathState::Degraded => "degraded",
            PathState::Down => "down",
            PathState::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RelayStatus {
    pub url: String,
    /// Its name on this device, or `host:port`.
    pub name: String,
    pub state: PathState,
    pub rtt_ms: Option<u64>,
    /// The last answer through this relay.
    pub last_ok_ms: Option<u64>,
    /// The relay's last transport error, while it lasts.
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct PartyStatus {
    pub party: String,
    pub last_heard_ms: Option<u64>,
    /// Channels this device invited the party to that it has not joined yet.
    pub not_joined: Vec<String>,
}

/// Something the duty officer must look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alarm {
    /// Stored alarms (what a relay did wrong, with its evidence) have an id, to clear
    /// them by; live ones (a relay or path down, a deadline, undelivered messages) end
    /// when their cause does.
    pub id: Option<u64>,
    pub kind: String,
    pub relay: Option<String>,
    pub party: Option<String>,
    pub message: Option<String>,
    pub since_ms: u64,
    pub detail: String,
    /// The relay's custody receipts the alarm cites as evidence (encoded; each checkable
    /// by anyone with the relay's address, [`hotline_proto::custody::Receipt`]).
    pub receipts: Vec<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct Status {
    pub relays: Vec<RelayStatus>,
    pub parties: Vec<PartyStatus>,
    /// Outbox rows some relay does not hold yet.
    pub outbox: u64,
    /// This party's messages not yet delivered to every party.
    pub undelivered: u64,
    pub alarms: Vec<Alarm>,
    pub interval_ms: u64,
}

impl Status {
    /// The line is down when it has relays and none is up or degraded.
    pub fn line_down(&self) -> bool {
        !self.relays.is_empty()
            && self
                .relays
                .iter()
                .all(|relay| relay.state == PathState::Down)
    }
}

impl Store {
    /// Sets how often link tests go out (and so what "three intervals" means).
    pub fn set_link_test_interval(&mut self, interval_ms: u64) -> Result<(), StoreError> {
        self.set_setting("link_test_interval_ms", interval_ms)
    }

    /// How often link tests go out, in milliseconds.
    pub fn link_test_interval(&mut self) -> Result<u64, StoreError> {
        self.transact(|connection, _, _| {
            setting(connection, "link_test_interval_ms", DEFAULT_INTERVAL_MS)
        })
    }

    /// After how long an undelivered message raises an alarm (and is offered again).
    pub fn undelivered_after(&mut self) -> Result<u64, StoreError> {
        self.transact(|connection, _, _| {
            setting(connection, "undelivered_after_ms", DEFAULT_UNDELIVERED_MS)
        })
    }

    /// Sets after how long an undelivered message raises an alarm.
    pub fn set_undelivered_after(&mut self, ms: u64) -> Result<(), StoreError> {
        self.set_setting("undelivered_after_ms", ms)
    }

    fn set_setting(&mut self, key: &str, value: u64) -> Result<(), StoreError> {
        self.transact(|connection, _, _| {
            crate::store::cached::execute(
                connection,
                "INSERT INTO settings (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = ?2",
                params![key, value as i64],
            )?;
            Ok(())
        })
    }

    /// Sends link tests in every channel with relays whose last ones are an interval
    /// old (one per relay), and seals the availability records that are due. Returns
    /// in how many channels probes went out; the sync engine posts them
    /// ([`Store::take_frames`]).
    pub fn send_due_probes(&mut self) -> Result<usize, StoreError> {
        self.transact(|connection, identity, cache| {
            let now = now_ms();
            let settings = Settings::read(connection)?;
            let ids: Vec<Vec<u8>> = connection
                .prepare_cached("SELECT DISTINCT channel FROM channel_relays")?
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            let provider = Provider::new(connection);
            let mut sent = 0;
            for id in ids {
                let Ok(id) = <[u8; 32]>::try_from(id.as_slice()) else {
                    continue;
                };
                let id = ChannelId(id);
                let last: Option<i64> = connection
                    .prepare_cached("SELECT last_probe_ms FROM link_state WHERE channel = ?1")?
                    .query_row([&id.0[..]], |row| row.get(0))
                    .optional()?;
                if last.is_some_and(|last| now < last as u64 + settings.interval_ms) {
                    continue;
                }
                let mut channel = checkout(cache, connection, &provider, &id)?;
                if crate::link::send_due(
                    connection,
                    &provider,
                    identity,
                    &mut channel,
                    &settings,
                    now,
                )? {
                    sent += 1;
                }
                save_channel(connection, &mut channel, false)?;
                cache.channels.insert(id, channel);
            }
            Ok(sent)
        })
    }

    /// Seals one delivery receipt per channel that received messages of other parties
    /// since the last call (an ephemeral frame saying what this device holds, for every
    /// relay of the channel): their senders see them delivered without waiting for this
    /// device to write. Returns how many were sealed; the sync engine posts them.
    pub fn send_receipts(&mut self) -> Result<usize, StoreError> {
        self.transact(|connection, identity, cache| {
            let now = now_ms();
            let provider = Provider::new(connection);
            let mut sealed = 0;
            for id in crate::link::take_receipts_due(connection)? {
                let mut channel = match checkout(cache, connection, &provider, &id) {
                    Ok(channel) => channel,
                    // Removed meanwhile: nobody to tell.
                    Err(StoreError::UnknownChannel(_)) => continue,
                    Err(error) => return Err(error),
                };
                if crate::link::send_receipt(connection, &provider, identity, &mut channel, now)? {
                    sealed += 1;
                    save_channel(connection, &mut channel, false)?;
                } else if !channel_relays(connection, &id)?.is_empty() {
                    // Cannot seal now (a proposal waits for its commit): later.
                    crate::link::receipt_due(connection, &id)?;
                }
                cache.channels.insert(id, channel);
            }
            Ok(sealed)
        })
    }

    /// What the core's `events` for a message of `channel` mean to a script: messages of
    /// other parties, read receipts for this device's messages, and this device's
    /// messages newly delivered to a party (from the point each party was first seen
    /// by this call on).
    pub fn line_events(
        &mut self,
        channel: &ChannelId,
        events: &[Event],
    ) -> Result<Vec<LineEvent>, StoreError> {
        let me = self.identity().key();
        let own_party = self.identity().info().party.clone();
        // Code books, to render coded messages: only read when the channel has agreed
        // texts at all (the common case costs one indexed lookup per arrival).
        let agreed: bool = self
            .connection()
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM agreements WHERE channel = ?1)")?
            .query_row([&channel.0[..]], |row| row.get(0))?;
        let books = match self.channel_name(channel) {
            Ok(name) if agreed => self.code_books(&name)?,
            _ => Default::default(),
        };
        // What was reported is only remembered: lost in a power failure, a delivery is
        // reported again.
        self.transact_deferred(|connection, _, cache| {
            let provider = Provider::new(connection);
            let loaded = checkout(cache, connection, &provider, channel)?;
            let name = loaded.name().to_owned();
            let transcript = loaded.transcript();
            let mut out = Vec::new();
            for event in events {
                let Event::Accepted(ids) = event else {
                    continue;
                };
                for id in ids {
                    let Some(envelope) = transcript.get(id)? else {
                        continue;
                    };
                    let from = transcript.party_of(&envelope.sender).unwrap_or("?");
                    if from == own_party {
                        continue;
                    }
                    match &envelope.body {
                        Body::Message(message) => out.push(LineEvent::Message {
                            channel: name.clone(),
                            id: *id,
                            from: from.to_owned(),
                            text: crate::store::text_of(&books, message),
                            precedence: message.precedence,
                            time_ms: envelope.claimed_time_ms,
                            deadline_ms: envelope.deadline_ms,
                        }),
                        Body::ReadReceipt(read) => {
                            for message in read {
                                let mine = transcript
                                    .get(message)?
                                    .is_some_and(|read| read.sender == me);
                                if mine {
                                    out.push(LineEvent::Read {
                                        channel: name.clone(),
                                        message: *message,
                                        by: from.to_owned(),
                                    });
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            // Newly delivered: per other party, this device's chain from the last
            // reported point to what the party's devices now hold.
            let mut held: BTreeMap<String, u64> = BTreeMap::new();
            for info in transcript.roster().values() {
                if info.party != own_party {
                    let seq = transcript.seen_by(&info.key, &me);
                    let entry = held.entry(info.party.clone()).or_default();
                    *entry = (*entry).max(seq);
                }
            }
            for (party, seq) in held {
                let reported: Option<i64> = connection
                    .prepare_cached(
                        "SELECT seq FROM delivered_reported WHERE channel = ?1 AND party = ?2",
                    )?
                    .query_row(params![&channel.0[..], party], |row| row.get(0))
                    .optional()?;
                if reported.is_some_and(|reported| reported as u64 >= seq) {
                    continue;
                }
                if let Some(reported) = reported {
                    for (id, envelope) in
                        transcript.chain_from(&me, reported as u64 + 1, MAX_DELIVERED_EVENTS)?
                    {
                        if envelope.seq <= seq && matches!(envelope.body, Body::Message(_)) {
                            out.push(LineEvent::Delivered {
                                channel: name.clone(),
                                message: id,
                                to: party.clone(),
                            });
                        }
                    }
                }
                connection
                    .prepare_cached(
                        "INSERT INTO delivered_reported (channel, party, seq) VALUES (?1, ?2, ?3)
                         ON CONFLICT (channel, party) DO UPDATE SET seq = ?3",
                    )?
                    .execute(params![&channel.0[..], party, seq as i64])?;
            }
            cache.channels.insert(*channel, loaded);
            Ok(out)
        })
    }

    /// The link-test frames waiting for their relays, taken (each is posted once).
    pub fn take_frames(&mut self) -> Result<Vec<crate::link::OutgoingFrame>, StoreError> {
        // Taken frames lost in a power failure are only posted again (their copies are
        // known by their hashes).
        self.transact_deferred(|connection, _, _| {
            let now = now_ms();
            let interval = setting(connection, "link_test_interval_ms", DEFAULT_INTERVAL_MS)?;
            crate::link::take_frames(connection, now, interval.max(1_000))
        })
    }

    /// Sets how often availability records are sealed.
    pub fn set_record_period(&mut self, period_ms: u64) -> Result<(), StoreError> {
        self.set_setting("record_period_ms", period_ms)
    }

    /// Sets how long raw link tests are kept.
    pub fn set_link_test_retention(&mut self, retention_ms: u64) -> Result<(), StoreError> {
        self.set_setting("link_test_retention_ms", retention_ms)
    }

    /// Records how a relay answered at the transport level (`None`: it did).
    pub fn note_relay(&mut self, url: &str, error: Option<&str>) -> Result<(), StoreError> {
        let now = self.now() as i64;
        self.transact(|connection, _, _| {
            match error {
                None => crate::store::cached::execute(
                    connection,
                    "INSERT INTO relay_health (url, last_ok_ms, error, error_since_ms)
                     VALUES (?1, ?2, NULL, NULL)
                     ON CONFLICT (url) DO UPDATE SET last_ok_ms = ?2, error = NULL,
                       error_since_ms = NULL",
                    params![url, now],
                )?,
                Some(error) => crate::store::cached::execute(
                    connection,
                    "INSERT INTO relay_health (url, last_ok_ms, error, error_since_ms)
                     VALUES (?1, NULL, ?2, ?3)
                     ON CONFLICT (url) DO UPDATE SET error = ?2,
                       error_since_ms = COALESCE(error_since_ms, ?3)",
                    params![url, error, now],
                )?,
            };
            Ok(())
        })
    }

    /// Records misbehaviour of a relay, with the bytes that prove it. Raised once per
    /// kind, relay and message.
    pub fn raise_alarm(
        &mut self,
        kind: &str,
        relay: &str,
        message: Option<&str>,
        detail: &str,
        evidence: &[u8],
    ) -> Result<(), StoreError> {
        let now = self.now() as i64;
        self.transact(|connection, _, _| {
            crate::store::cached::execute(connection,
                "INSERT OR IGNORE INTO alarms (kind, relay, party, message, detail, evidence, since_ms)
                 VALUES (?1, ?2, NULL, ?3, ?4, ?5, ?6)",
                params![kind, relay, message, detail, evidence, now],
            )?;
            Ok(())
        })
    }

    /// Records, once per kind, relay and `about` (a channel, say), a relay's standing
    /// refusal: no evidence beyond its answer.
    pub fn raise_alarm_about(
        &mut self,
        kind: &str,
        relay: &str,
        about: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        let now = self.now() as i64;
        self.transact(|connection, _, _| {
            crate::store::cached::execute(connection,
                "INSERT OR IGNORE INTO alarms (kind, relay, party, message, detail, evidence, since_ms)
                 VALUES (?1, ?2, '', ?3, ?4, NULL, ?5)",
                params![kind, relay, about, detail, now],
            )?;
            Ok(())
        })
    }

    /// Clears the stored alarms (relay misbehaviour) once the operator has seen them;
    /// their evidence stays in the database. Returns how many were cleared. Alarms of
    /// the moment (relay down, deadline, undelivered) clear when their cause does.
    pub fn clear_alarms(&mut self) -> Result<usize, StoreError> {
        let now = self.now() as i64;
        self.transact(|connection, _, cache| {
            let kinds: Vec<String> = connection
                .prepare_cached(
                    "UPDATE alarms SET cleared_ms = ?1 WHERE cleared_ms IS NULL RETURNING kind",
                )?
                .query_map([now], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            if kinds.iter().any(|kind| kind == "cloned") {
                crate::backup::release_sent_elsewhere(connection, cache)?;
            }
            Ok(kinds.len())
        })
    }

    /// Clears the open stored alarm `id` (its evidence stays); false if there is none.
    pub fn clear_alarm(&mut self, id: u64) -> Result<bool, StoreError> {
        let now = self.now() as i64;
        self.transact(|connection, _, cache| {
            let kind: Option<String> = connection
                .prepare_cached(
                    "UPDATE alarms SET cleared_ms = ?1 WHERE id = ?2 AND cleared_ms IS NULL
                     RETURNING kind",
                )?
                .query_row(params![now, id as i64], |row| row.get(0))
                .optional()?;
            if kind.as_deref() == Some("cloned") {
                crate::backup::release_sent_elsewhere(connection, cache)?;
            }
            Ok(kind.is_some())
        })
    }

    /// The line at `now_ms`: relay paths, parties, backlog and alarms.
    pub fn status(&mut self, now_ms: u64) -> Result<Status, StoreError> {
        let summaries = self.channels()?;
        let own_party = self.identity().info().party.clone();
        self.transact(|connection, _, cache| {
            let interval = setting(connection, "link_test_interval_ms", DEFAULT_INTERVAL_MS)?;
            let undelivered_after =
                setting(connection, "undelivered_after_ms", DEFAULT_UNDELIVERED_MS)?;
            let window = interval.saturating_mul(3);
            let fresh = |ms: Option<u64>| ms.is_some_and(|ms| now_ms <= ms + window);
            let mut alarms = Vec::new();

            // Parties: everyone in a channel but this party.
            let mut parties: BTreeMap<String, Option<u64>> = BTreeMap::new();
            // Invitations not joined yet: shown with the party, alarmed when old.
            let mut not_joined: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for summary in &summaries {
                for invited in &summary.not_joined {
                    let channels = not_joined.entry(invited.party.clone()).or_default();
                    if !channels.contains(&summary.name) {
                        channels.push(summary.name.clone());
                    }
                    if now_ms >= invited.invited_ms.saturating_add(undelivered_after) {
                        alarms.push(Alarm {
                            id: None,
                            kind: "not-joined".into(),
                            relay: None,
                            party: Some(invited.party.clone()),
                            message: None,
                            since_ms: invited.invited_ms,
                            detail: format!(
                                "{} has not joined channel {} ({} seconds after the invitation): \
                                 its device refused it (its alarms say why) or has not synced",
                                invited.party,
                                summary.name,
                                now_ms.saturating_sub(invited.invited_ms) / 1000
                            ),
                            receipts: Vec::new(),
                        });
                    }
                }
            }
            // Relays, with the other parties expected to answer through each.
            let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            let mut first_probe: BTreeMap<String, u64> = BTreeMap::new();
            for summary in &summaries {
                let others: BTreeSet<String> = summary
                    .members
                    .iter()
                    .filter(|m| m.party != own_party)
                    .map(|m| m.party.clone())
                    .collect();
                for party in &others {
                    let heard: Option<i64> = crate::store::cached::query_row(connection,
                            "SELECT last_ms FROM heard WHERE channel = ?1 AND party = ?2",
                            params![&summary.id.0[..], party],
                            |row| row.get(0),
                        )
                        .optional()?;
                    let entry = parties.entry(party.clone()).or_default();
                    *entry = (*entry).max(heard.map(|h| h as u64));
                }
                for url in channel_relays(connection, &summary.id)? {
                    expected
                        .entry(url.clone())
                        .or_default()
                        .extend(others.iter().cloned());
                    // Paths through a relay are judged from the first probe sent after
                    // it joined the channel.
                    let probed: Option<i64> = connection
                        .prepare_cached(
                            "SELECT MIN(sent_ms) FROM probes
                             WHERE channel = ?1 AND relay = ?2 AND sent_ms >=
                               COALESCE((SELECT added_ms FROM channel_relays
                                         WHERE channel = ?1 AND url = ?2), 0)",
                        )?
                        .query_row(params![&summary.id.0[..], &url], |row| row.get(0))?;
                    if let Some(probed) = probed {
                        let first = first_probe.entry(url).or_insert(probed as u64);
                        *first = (*first).min(probed as u64);
                    }
                }
            }

            let names: BTreeMap<String, String> = connection
                .prepare_cached("SELECT url, name FROM relay_names")?
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let mut relays = Vec::new();
            for (url, others) in &expected {
                let mut answered = BTreeSet::new();
                let mut last_ok: Option<u64> = None;
                let mut rtt: Option<u64> = None;
                let mut statement = connection.prepare_cached(
                    "SELECT party, last_ok_ms, rtt_ms FROM paths WHERE relay = ?1
                     ORDER BY last_ok_ms",
                )?;
                let rows = statement.query_map([url], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, i64>(1)? as u64,
                        row.get::<_, i64>(2)? as u64,
                    ))
                })?;
                for row in rows {
                    let (party, ok, ms) = row?;
                    if fresh(Some(ok)) {
                        answered.insert(party);
                    }
                    last_ok = Some(ok);
                    rtt = Some(ms);
                }
                let (error, error_since): (Option<String>, Option<i64>) = crate::store::cached::query_row(connection,
                        "SELECT error, error_since_ms FROM relay_health WHERE url = ?1",
                        [url],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .optional()?
                    .unwrap_or((None, None));
                let probing_since = first_probe.get(url).copied();
                let state = if others.is_empty() {
                    // Nobody to answer: the transport is all there is to judge by.
                    if error.is_some() {
                        PathState::Down
                    } else {
                        PathState::Up
                    }
                } else if answered.len() == others.len() && error.is_none() {
                    PathState::Up
                } else if !answered.is_empty() {
                    PathState::Degraded
                } else if probing_since.is_none_or(|since| now_ms < since + window) {
                    PathState::Unknown
                } else {
                    PathState::Down
                };
                if state == PathState::Down {
                    let since = last_ok
                        .or(error_since.map(|e| e as u64))
                        .or(probing_since)
                        .unwrap_or(now_ms);
                    alarms.push(Alarm {
id: None,
                        kind: "relay-down".into(),
                        relay: Some(url.clone()),
                        party: None,
                        message: None,
                        since_ms: since,
                        detail: match &error {
                            Some(error) => format!("no link-test answer through it; {error}"),
                            None => "no link-test answer through it for three intervals".into(),
                        },
                        receipts: Vec::new(),
                    });
                }
                // A party that answers through other relays but not through this one,
                // although this relay answers requests: it withholds what passes between
                // this device and that party (to them, or to everyone: a split view).
                let long_enough = probing_since.is_some_and(|since| now_ms >= since + window);
                for party in others.iter().filter(|p| !answered.contains(*p)) {
                    let elsewhere: Option<i64> = crate::store::cached::query_row(connection,
                        "SELECT MAX(last_ok_ms) FROM paths WHERE party = ?1 AND relay != ?2",
                        params![party, url],
                        |row| row.get(0),
                    )?;
                    if long_enough && error.is_none() && fresh(elsewhere.map(|ms| ms as u64)) {
                        let last = last_ok_by_party(connection, url, party)?;
                        alarms.push(Alarm {
id: None,
                            kind: "path-down".into(),
                            relay: Some(url.clone()),
                            party: Some(party.clone()),
                            message: None,
                            since_ms: last.or(probing_since).unwrap_or(now_ms),
                            detail: format!(
                                "{party} answers link tests through other relays but not through this one, \
                                 which answers requests: it withholds what passes between you"
                            ),
                            receipts: Vec::new(),
                        });
                    }
                }
                relays.push(RelayStatus {
                    url: url.clone(),
                    name: crate::store::relay_label(&names, url),
                    state,
                    rtt_ms: rtt,
                    last_ok_ms: last_ok,
                    error,
                });
            }

            // Messages of this party: deadlines and delivery.
            let provider = Provider::new(connection);
            let mut undelivered = 0;
            for summary in &summaries {
                let channel = checkout(cache, connection, &provider, &summary.id)?;
                let others: BTreeSet<String> = summary
                    .members
                    .iter()
                    .filter(|m| m.party != own_party)
                    .map(|m| m.party.clone())
                    .collect();
                // Undelivered: each own-party device's chain from the first envelope
                // some other party lacks (what every party holds is never read again).
                let transcript = channel.transcript();
                let roster = transcript.roster();
                let delivered_up_to = |party: &str, sender: &DeviceKey| {
                    roster
                        .values()
                        .filter(|info| info.party == party)
                        .map(|info| transcript.seen_by(&info.key, sender))
                        .max()
                        .unwrap_or(0)
                };
                for sender in roster.values().filter(|info| info.party == own_party) {
                    let held: Vec<(&String, u64)> = others
                        .iter()
                        .map(|party| (party, delivered_up_to(party, &sender.key)))
                        .collect();
                    let Some(from) = held.iter().map(|(_, seq)| seq + 1).min() else {
                        continue;
                    };
                    for (id, envelope) in
                        transcript.chain_from(&sender.key, from, MAX_UNDELIVERED_SCAN)?
                    {
                        let Body::Message(_) = envelope.body else {
                            continue;
                        };
                        let missing: Vec<&String> = held
                            .iter()
                            .filter(|(_, seq)| *seq < envelope.seq)
                            .map(|(party, _)| *party)
                            .collect();
                        if missing.is_empty() {
                            continue;
                        }
                        undelivered += 1;
                        if now_ms >= envelope.claimed_time_ms + undelivered_after {
                            for party in &missing {
                                alarms.push(Alarm {
                                    id: None,
                                    kind: "undelivered".into(),
                                    relay: None,
                                    party: Some((*party).clone()),
                                    message: Some(id.to_hex()),
                                    since_ms: envelope.claimed_time_ms + undelivered_after,
                                    detail: format!("not delivered to {party} yet"),
                                    receipts: Vec::new(),
                                });
                            }
                        }
                    }
                }
                // Deadlines. This party's messages: alarmed once past their deadline
                // while another party has not read them (with the escalation made).
                // Other parties' messages: until this party reads them, a FLASH is
                // alarmed from its arrival, any other once past its deadline. A
                // message read by everyone concerned leaves the table.
                if others.is_empty() {
                    // Nobody but this party: every message is read by everyone concerned.
                    // One statement, not a row at a time (a channel of one party's
                    // devices would otherwise cost every `status` a batch of deletes).
                    crate::store::cached::execute(connection,
                        "DELETE FROM deadlines WHERE channel = ?1",
                        [&summary.id.0[..]],
                    )?;
                    cache.channels.insert(summary.id, channel);
                    continue;
                }
                let due: Vec<(Vec<u8>, Vec<u8>, i64, i64)> = connection
                    .prepare_cached(
                        "SELECT id, sender, deadline_ms, precedence FROM deadlines
                         WHERE channel = ?1 ORDER BY deadline_ms LIMIT ?2",
                    )?
                    .query_map(
                        params![&summary.id.0[..], MAX_UNDELIVERED_SCAN as i64],
                        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
                    )?
                    .collect::<Result<_, _>>()?;
                for (id_bytes, sender, deadline, precedence) in due {
                    let (Ok(id), Ok(sender)) = (
                        <[u8; 32]>::try_from(id_bytes.as_slice()),
                        <[u8; 32]>::try_from(sender.as_slice()),
                    ) else {
                        continue;
                    };
                    let id = EnvelopeId(id);
                    let deadline = deadline as u64;
                    let precedence = crate::store::precedence_of(precedence);
                    let read = channel.read_by(&id)?;
                    let sender_party = transcript.party_of(&DeviceKey(sender)).map(str::to_owned);
                    let unread: Vec<&String> = match &sender_party {
                        Some(party) if *party == own_party => {
                            others.iter().filter(|p| !read.contains(*p)).collect()
                        }
                        Some(_) if !read.contains(&own_party) => vec![&own_party],
                        _ => Vec::new(),
                    };
                    if unread.is_empty() {
                        crate::store::cached::execute(connection,
                            "DELETE FROM deadlines WHERE channel = ?1 AND id = ?2",
                            params![&summary.id.0[..], &id.0[..]],
                        )?;
                        continue;
                    }
                    let level = precedence.as_str().to_uppercase();
                    match sender_party {
                        Some(party) if party != own_party => {
                            let flash = precedence == Precedence::Flash;
                            if !flash && now_ms < deadline {
                                continue;
                            }
                            let arrived = transcript
                                .get(&id)?
                                .map_or(deadline, |envelope| envelope.claimed_time_ms);
                            alarms.push(Alarm {
                                id: None,
                                kind: if flash { "flash" } else { "unread" }.into(),
                                relay: None,
                                party: Some(party.clone()),
                                message: Some(id.to_hex()),
                                since_ms: if flash { arrived } else { deadline },
                                detail: if now_ms < deadline {
                                    format!("{level} message from {party}, unread: read it by its deadline")
                                } else {
                                    format!("{level} message from {party}, unread past its deadline")
                                },
                                receipts: Vec::new(),
                            });
                        }
                        _ if now_ms >= deadline => {
                            for party in unread {
                                let escalation: Option<(Vec<u8>, bool)> = connection
                                    .prepare_cached(
                                        "SELECT statement, delivered FROM escalations
                                         WHERE channel = ?1 AND id = ?2 AND party = ?3",
                                    )?
                                    .query_row(params![&summary.id.0[..], &id.0[..], party], |row| {
                                        Ok((row.get(0)?, row.get(1)?))
                                    })
                                    .optional()?;
                                let escalated = match escalation {
                                    Some((statement, delivered)) => format!(
                                        "; escalated: offered again, non-response statement {} ({})",
                                        &hex::encode(statement)[..12],
                                        if delivered { "delivered, not read" } else { "not delivered" }
                                    ),
                                    None => String::new(),
                                };
                                alarms.push(Alarm {
                                    id: None,
                                    kind: "deadline".into(),
                                    relay: None,
                                    party: Some(party.clone()),
                                    message: Some(id.to_hex()),
                                    since_ms: deadline,
                                    detail: format!(
                                        "{party} has not read this {level} message by its deadline{escalated}"
                                    ),
                                    receipts: Vec::new(),
                                });
                            }
                        }
                        _ => {}
                    }
                }
                cache.channels.insert(summary.id, channel);
            }

            // What relays did wrong, recorded as it was found.
            let mut statement = connection.prepare_cached(
                "SELECT kind, relay, party, message, detail, since_ms, id, evidence FROM alarms
                 WHERE cleared_ms IS NULL ORDER BY id",
            )?;
            let stored = statement.query_map([], |row| {
                Ok(Alarm {
                    id: Some(row.get::<_, i64>(6)? as u64),
                    kind: row.get(0)?,
                    relay: row.get(1)?,
                    party: row.get(2)?,
                    message: row.get(3)?,
                    detail: row.get(4)?,
                    since_ms: row.get::<_, i64>(5)? as u64,
                    receipts: cited_receipts(
                        &row.get::<_, String>(0)?,
                        &row.get::<_, Option<Vec<u8>>>(7)?.unwrap_or_default(),
                    ),
                })
            })?;
            for alarm in stored {
                alarms.push(alarm?);
            }

            let outbox: i64 =
                crate::store::cached::query_row(connection, "SELECT rows FROM outbox_waiting", [], |row| row.get(0))?;
            Ok(Status {
                relays,
                parties: parties
                    .into_iter()
                    .map(|(party, last_heard_ms)| PartyStatus {
                        not_joined: not_joined.remove(&party).unwrap_or_default(),
                        party,
                        last_heard_ms,
                    })
                    .collect(),
                outbox: outbox as u64,
                undelivered,
                alarms,
                interval_ms: interval,
            })
        })
    }
}

/// When `party` last answered a link test through `relay`.
pub(crate) fn last_ok_by_party(
    connection: &Connection,
    relay: &str,
    party: &str,
) -> Result<Option<u64>, StoreError> {
    let last: Option<i64> = crate::store::cached::query_row(
        connection,
        "SELECT MAX(last_ok_ms) FROM paths WHERE relay = ?1 AND party = ?2",
        params![relay, party],
        |row| row.get(0),
    )?;
    Ok(last.map(|ms| ms as u64))
}
