//! Escalation: what happens when a party has not read a message of this device by its
//! deadline (its sender's `--deadline`, or its precedence's handling time).
//!
//! Once per message and party, the sending device seals a signed non-response statement
//! into the transcript (the message, the party, the deadline, and what the line showed
//! at that moment: whether a device of the party held the message, when the party was
//! last heard, each relay path's last answer) and offers the message again on every
//! relay of the channel. "They received it and did not read it" and "it never reached
//! them" are then different facts on the record, signed by the sender's device key.

use std::collections::BTreeSet;

use hotline_core::{Body, ChannelId, EnvelopeId, NonResponse, PathNote, Precedence};
use rusqlite::{OptionalExtension, params};

use crate::link::{DEFAULT_INTERVAL_MS, setting};
use crate::provider::Provider;
use crate::store::{
    OutboxItem, Store, StoreError, channel_relays, checkout, precedence_of, reseal, save_channel,
    seal,
};

/// Most overdue messages escalated per call (the oldest deadline first; the next call
/// takes the rest).
pub const MAX_ESCALATIONS: usize = 64;

/// One escalation made: `party` had not read `message` by its deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escalation {
    pub channel: String,
    pub message: EnvelopeId,
    pub party: String,
    pub precedence: Precedence,
    /// The signed non-response statement sealed into the transcript.
    pub statement: EnvelopeId,
    /// Whether a device of the party held the message at the deadline.
    pub delivered: bool,
}

impl Store {
    /// Escalates this device's messages whose deadline passed by `now_ms` while some
    /// other party had not read them: one signed non-response statement per message and
    /// party, and the message sealed again to be offered on every relay (returned, to
    /// post). Each message is escalated once; the statements wait in the outbox.
    pub fn escalate_due(
        &mut self,
        now_ms: u64,
    ) -> Result<(Vec<Escalation>, Vec<OutboxItem>), StoreError> {
        let me = self.identity().key();
        let own_party = self.identity().info().party.clone();
        self.transact(|connection, identity, cache| {
            let interval = setting(connection, "link_test_interval_ms", DEFAULT_INTERVAL_MS)?;
            let window = interval.saturating_mul(3);
            let due: Vec<(Vec<u8>, Vec<u8>, i64, i64)> = connection
                .prepare_cached(
                    "SELECT channel, id, deadline_ms, precedence FROM deadlines
                     WHERE sender = ?1 AND escalated = 0 AND deadline_ms <= ?2
                     ORDER BY deadline_ms LIMIT ?3",
                )?
                .query_map(
                    params![&me.0[..], now_ms as i64, MAX_ESCALATIONS as i64],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
                )?
                .collect::<Result<_, _>>()?;
            let provider = Provider::new(connection);
            let mut escalations = Vec::new();
            let mut reoffer = Vec::new();
            for (channel_bytes, id_bytes, deadline, precedence) in due {
                let (Ok(channel_id), Ok(id)) = (
                    <[u8; 32]>::try_from(channel_bytes.as_slice()),
                    <[u8; 32]>::try_from(id_bytes.as_slice()),
                ) else {
                    continue;
                };
                let (channel_id, id) = (ChannelId(channel_id), EnvelopeId(id));
                let done = |connection: &rusqlite::Connection| {
                    connection
                        .prepare_cached(
                            "UPDATE deadlines SET escalated = 1 WHERE channel = ?1 AND id = ?2",
                        )?
                        .execute(params![&channel_id.0[..], &id.0[..]])
                };
                let mut channel = match checkout(cache, connection, &provider, &channel_id) {
                    Ok(channel) => channel,
                    Err(StoreError::UnknownChannel(_)) => {
                        done(connection)?;
                        continue;
                    }
                    Err(error) => return Err(error),
                };
                // A commit or proposal waits, or a restored channel catches up: nothing
                // can be sealed in this channel now.
                if channel.has_pending_commit()
                    || channel.has_pending_proposals()
                    || channel.hold().is_some()
                {
                    cache.channels.insert(channel_id, channel);
                    continue;
                }
                let Some(envelope) = channel.transcript().get(&id)? else {
                    done(connection)?;
                    cache.channels.insert(channel_id, channel);
                    continue;
                };
                let read = channel.read_by(&id)?;
                let unread: BTreeSet<String> = channel
                    .members()
                    .into_iter()
                    .map(|member| member.party)
                    .filter(|party| *party != own_party && !read.contains(party))
                    .collect();
                if unread.is_empty() {
                    // Read by everyone in time: nothing to escalate, nothing to offer.
                    done(connection)?;
                    cache.channels.insert(channel_id, channel);
                    continue;
                }
                let relays = channel_relays(connection, &channel_id)?;
                for party in unread {
                    let transcript = channel.transcript();
                    let delivered = transcript
                        .roster()
                        .values()
                        .filter(|info| info.party == party)
                        .any(|info| transcript.seen_by(&info.key, &me) >= envelope.seq);
                    let last_heard_ms: Option<i64> = connection
                        .prepare_cached(
                            "SELECT last_ms FROM heard WHERE channel = ?1 AND party = ?2",
                        )?
                        .query_row(params![&channel_id.0[..], &party], |row| row.get(0))
                        .optional()?;
                    let mut paths = Vec::with_capacity(relays.len());
                    for relay in &relays {
                        let last_answer_ms =
                            crate::line::last_ok_by_party(connection, relay, &party)?;
                        // Up: the party answered through it lately, and the relay's
                        // last request did not fail.
                        let failing: bool = connection
                            .prepare_cached(
                                "SELECT COUNT(*) > 0 FROM relay_health
                                 WHERE url = ?1 AND error IS NOT NULL",
                            )?
                            .query_row([relay], |row| row.get(0))?;
                        paths.push(PathNote {
                            relay: relay.clone(),
                            last_answer_ms,
                            up: !failing
                                && last_answer_ms
                                    .is_some_and(|ms| now_ms <= ms.saturating_add(window)),
                        });
                    }
                    let statement = NonResponse {
                        message: id,
                        party: party.clone(),
                        precedence: precedence_of(precedence),
                        deadline_ms: deadline as u64,
                        delivered,
                        last_heard_ms: last_heard_ms.map(|ms| ms as u64),
                        paths,
                    };
                    let sealed = seal(
                        connection,
                        &provider,
                        identity,
                        &mut channel,
                        Body::NonResponse(statement),
                        None,
                    )?;
                    connection
                        .prepare_cached(
                            "INSERT OR IGNORE INTO escalations
                               (channel, id, party, statement, delivered, at_ms)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        )?
                        .execute(params![
                            &channel_id.0[..],
                            &id.0[..],
                            &party,
                            &sealed.0[..],
                            delivered,
                            now_ms as i64
                        ])?;
                    escalations.push(Escalation {
                        channel: channel.name().to_owned(),
                        message: id,
                        party,
                        precedence: precedence_of(precedence),
                        statement: sealed,
                        delivered,
                    });
                }
                // Offered again on every path: sealed anew if every relay took it
                // already (a row still unsettled goes out with the outbox anyway).
                let settled: Option<i64> = connection
                    .prepare_cached(
                        "SELECT seq FROM outbox WHERE envelope = ?1 AND kind = 1 AND settled = 1",
                    )?
                    .query_row([&id.0[..]], |row| row.get(0))
                    .optional()?;
                if let Some(seq) = settled
                    && let Some(item) = reseal(
                        connection,
                        &provider,
                        identity,
                        &mut channel,
                        seq,
                        &id,
                        now_ms,
                    )?
                {
                    reoffer.push(item);
                }
                done(connection)?;
                save_channel(connection, &mut channel, false)?;
                cache.channels.insert(channel_id, channel);
            }
            Ok((escalations, reoffer))
        })
    }
}
