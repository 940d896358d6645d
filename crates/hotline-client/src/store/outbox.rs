//! The outbox: what waits for relays or a bundle, and what is offered again.

use super::*;

/// Most of a sender's undelivered envelopes read per channel (oldest first) by
/// re-offering and by `status`: their cost stays bounded while a party is cut off for
/// long.
pub const MAX_UNDELIVERED_SCAN: usize = 10_000;

impl Store {
    /// Every outbox entry not exported yet, marking them exported.
    pub fn export_outbox(&mut self) -> Result<Vec<Entry>, StoreError> {
        self.transact(|connection, _, _| {
            let mut statement = connection.prepare_cached(
                "SELECT kind, recipients, bytes FROM outbox WHERE exported = 0 ORDER BY seq",
            )?;
            let rows: Vec<(i64, Option<Vec<u8>>, Vec<u8>)> = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<Result<_, _>>()?;
            crate::store::cached::execute(
                connection,
                "UPDATE outbox SET exported = 1 WHERE exported = 0",
                [],
            )?;
            rows.into_iter()
                .map(|(kind, recipients, bytes)| match kind {
                    2 => {
                        let to = recipients
                            .unwrap_or_default()
                            .chunks_exact(32)
                            .map(|k| {
                                let mut key = [0u8; 32];
                                key.copy_from_slice(k);
                                DeviceKey(key)
                            })
                            .collect();
                        Ok(Entry::Welcome { to, bytes })
                    }
                    _ => Ok(Entry::Message(bytes)),
                })
                .collect()
        })
    }

    /// Number of outbox entries not yet handed on.
    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        Ok(crate::store::cached::query_row(
            &self.connection,
            "SELECT COUNT(*) FROM outbox WHERE exported = 0",
            [],
            |row| row.get::<_, i64>(0),
        )? as u64)
    }

    /// Outbox rows that some relay does not hold yet, with the relays that hold each,
    /// in the order to post them: the order they were made, except that a message
    /// goes before the messages of lower precedence queued before it (never before a
    /// commit or Welcome queued before it: members could not open it yet).
    pub fn outbox(&self) -> Result<Vec<OutboxItem>, StoreError> {
        /// seq, channel, kind, recipients, bytes, only_relays, precedence.
        type Row = (
            i64,
            Option<Vec<u8>>,
            i64,
            Option<Vec<u8>>,
            Vec<u8>,
            Option<String>,
            i64,
        );
        let rows: Vec<Row> = self
            .connection
            .prepare_cached(
                "SELECT seq, channel, kind, recipients, bytes, only_relays, precedence
                 FROM outbox WHERE settled = 0 ORDER BY seq",
            )?
            .query_map([], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                    row.get(5)?,
                    row.get(6)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        let mut items = Vec::with_capacity(rows.len());
        for (seq, channel, kind, recipients, bytes, only_relays, precedence) in rows {
            let only_relays = match only_relays {
                Some(json) => Some(serde_json::from_str(&json).map_err(corrupt)?),
                None => None,
            };
            let posted: Vec<String> = self
                .connection
                .prepare_cached("SELECT relay FROM outbox_posted WHERE seq = ?1")?
                .query_map([seq], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            let channel = channel.and_then(|c| c.try_into().ok()).map(ChannelId);
            let recipients = recipients
                .unwrap_or_default()
                .chunks_exact(32)
                .filter_map(|k| k.try_into().ok().map(DeviceKey))
                .collect();
            items.push(OutboxItem {
                seq: seq as u64,
                channel,
                welcome: kind == 2,
                commit: kind == 3,
                only_relays,
                recipients,
                bytes,
                posted,
                precedence: precedence_of(precedence),
            });
        }
        // Stable: within each run of messages between commits and Welcomes, the most
        // urgent first, each level in the order made.
        for run in items.split_mut(|item| item.welcome || item.commit) {
            run.sort_by_key(|item| std::cmp::Reverse(item.precedence));
        }
        Ok(items)
    }

    /// Records that a relay durably holds an outbox row; `settled` when every target
    /// now holds it.
    ///
    /// `custody`: the relay's receipt for the message (its hash, the encoded receipt,
    /// already checked), kept with the mark.
    pub fn mark_posted(
        &mut self,
        seq: u64,
        relay: &str,
        settled: bool,
        custody: Option<(&[u8; 32], &[u8])>,
    ) -> Result<(), StoreError> {
        // Lost in a power failure, the message is only pushed again: the relay answers
        // that it holds it, with its receipt.
        self.transact_deferred(|connection, _, _| {
            crate::store::cached::execute(
                connection,
                "INSERT OR IGNORE INTO outbox_posted (seq, relay) VALUES (?1, ?2)",
                params![seq as i64, relay],
            )?;
            if let Some((hash, receipt)) = custody {
                keep_receipt(connection, relay, hash, receipt)?;
            }
            if settled {
                crate::store::cached::execute(
                    connection,
                    "UPDATE outbox SET settled = 1 WHERE seq = ?1",
                    [seq as i64],
                )?;
            }
            Ok(())
        })
    }

    /// This device's envelopes that some party evidently missed: that party sent
    /// something more than `after_ms` later and still does not acknowledge them (a
    /// relay lost them, or the party could no longer open them). A party that is merely
    /// silent is no evidence: the relays hold what they accepted. Each is sealed again
    /// in the current epoch ([`Channel::resend`]: a member more than five epochs behind
    /// cannot open the original, and relays delete what every member read, so the same
    /// bytes would be stored again and look replayed) and offered to every relay. An
    /// envelope is offered again after `after_ms`, then after half its age each time
    /// (5 min, 10, 20, 40, …), at most [`MAX_REOFFER`] per call, oldest first (a party
    /// missing one waits for it before any later one of this sender). Marks what it
    /// returns offered now; the outbox row keeps the newest bytes.
    pub fn reoffer_due(
        &mut self,
        now_ms: u64,
        after_ms: u64,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        let summaries = self.channels()?;
        let me = self.identity.key();
        let own_party = self.identity.info().party.clone();
        self.transact(|connection, identity, cache| {
            let provider = Provider::new(connection);
            let mut due = Vec::new();
            for summary in &summaries {
                let mut channel = checkout(cache, connection, &provider, &summary.id)?;
                // When each other party last sealed something, and how far it holds
                // this device's chain.
                let mut last_sealed: BTreeMap<&str, u64> = BTreeMap::new();
                let mut held: BTreeMap<&str, u64> = BTreeMap::new();
                for member in summary.members.iter().filter(|m| m.party != own_party) {
                    let time = match channel.transcript().head_of(&member.key) {
                        Some((_, id, _)) => channel
                            .transcript()
                            .get(&id)?
                            .map_or(0, |envelope| envelope.claimed_time_ms),
                        None => 0,
                    };
                    let entry = last_sealed.entry(member.party.as_str()).or_default();
                    *entry = (*entry).max(time);
                    let seen = channel.transcript().seen_by(&member.key, &me);
                    let entry = held.entry(member.party.as_str()).or_default();
                    *entry = (*entry).max(seen);
                }
                let from = held.values().map(|seq| seq + 1).min().unwrap_or(u64::MAX);
                let missed: Vec<EnvelopeId> = channel
                    .transcript()
                    .chain_from(&me, from, MAX_UNDELIVERED_SCAN)?
                    .into_iter()
                    .filter(|(_, envelope)| {
                        last_sealed.iter().any(|(party, last)| {
                            *last > envelope.claimed_time_ms.saturating_add(after_ms)
                                && held.get(party).is_none_or(|seq| *seq < envelope.seq)
                        })
                    })
                    .map(|(id, _)| id)
                    .collect();
                let mut resealed = false;
                for id in missed {
                    if due.len() >= MAX_REOFFER {
                        break;
                    }
                    let row: Option<i64> = crate::store::cached::query_row(
                        connection,
                        "SELECT seq FROM outbox
                             WHERE envelope = ?1 AND kind = 1 AND settled = 1
                               AND COALESCE(offered_ms, created_ms)
                                   + MAX(?2, (?3 - created_ms) / 2) <= ?3",
                        params![&id.0[..], after_ms as i64, now_ms as i64],
                        |row| row.get(0),
                    )
                    .optional()?;
                    let Some(seq) = row else {
                        continue;
                    };
                    // A commit or proposal waits: a later round seals it.
                    let Some(item) = reseal(
                        connection,
                        &provider,
                        identity,
                        &mut channel,
                        seq,
                        &id,
                        now_ms,
                    )?
                    else {
                        break;
                    };
                    resealed = true;
                    due.push(item);
                }
                if resealed {
                    save_channel(connection, &mut channel, false)?;
                }
                cache.channels.insert(summary.id, channel);
            }
            Ok(due)
        })
    }

    /// How many outbox rows carry envelope `id` (exactly one for every sent message).
    pub fn outbox_rows_for(&self, id: &EnvelopeId) -> Result<u64, StoreError> {
        Ok(crate::store::cached::query_row(
            &self.connection,
            "SELECT COUNT(*) FROM outbox WHERE envelope = ?1",
            [&id.0[..]],
            |row| row.get::<_, i64>(0),
        )? as u64)
    }
}

/// Seals this device's envelope `id` (outbox row `seq`) again in the current epoch
/// ([`Channel::resend`]) and keeps the new bytes in its row, offered at `now_ms`: the
/// item to post to every relay of the channel. `None` while a commit or proposal waits.
pub(crate) fn reseal(
    connection: &Connection,
    provider: &Provider<'_>,
    identity: &DeviceIdentity,
    channel: &mut Channel,
    seq: i64,
    id: &EnvelopeId,
    now_ms: u64,
) -> Result<Option<OutboxItem>, StoreError> {
    let bytes = match channel.resend(provider, identity, id) {
        Ok(bytes) => bytes,
        Err(
            ChannelError::AwaitingCommit
            | ChannelError::CommitPending
            | ChannelError::CatchingUp
            | ChannelError::SentElsewhere,
        ) => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    crate::store::cached::execute(
        connection,
        "UPDATE outbox SET bytes = ?2, offered_ms = ?3 WHERE seq = ?1",
        params![seq, &bytes, now_ms as i64],
    )?;
    Ok(Some(OutboxItem {
        seq: seq as u64,
        channel: Some(channel.id()),
        welcome: false,
        commit: false,
        only_relays: None,
        recipients: Vec::new(),
        bytes,
        posted: Vec::new(),
        precedence: Precedence::Routine,
    }))
}

/// A stored precedence (anything unknown reads as routine).
pub(crate) fn precedence_of(stored: i64) -> Precedence {
    match stored {
        3 => Precedence::Flash,
        2 => Precedence::Immediate,
        1 => Precedence::Priority,
        _ => Precedence::Routine,
    }
}
