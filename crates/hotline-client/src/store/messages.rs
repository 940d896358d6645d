//! Messages: sending, read receipts, the log, roots and exports.

use super::*;

impl Store {
    /// Seals and queues a message; returns only after the transaction committed. A
    /// message without a deadline gets its precedence's handling time: the channel's
    /// (set by its committer), else [`Precedence::read_within_ms`].
    pub fn send(
        &mut self,
        channel: &str,
        body: Body,
        deadline_ms: Option<u64>,
    ) -> Result<EnvelopeId, StoreError> {
        let deadline_ms = match (body.message(), deadline_ms) {
            (Some(message), None) => {
                let times = handling_times(&self.connection, &self.channel_id(channel)?)?;
                let level = Precedence::ALL
                    .iter()
                    .position(|level| *level == message.precedence)
                    .unwrap_or(3);
                Some(now_ms().saturating_add(times[level]))
            }
            (_, given) => given,
        };
        self.transact(|connection, identity, cache| {
            let provider = Provider::new(connection);
            let channel_id = channel_id_by_name(connection, channel)?;
            let mut loaded = checkout(cache, connection, &provider, &channel_id)?;
            let id = seal(
                connection,
                &provider,
                identity,
                &mut loaded,
                body,
                deadline_ms,
            )?;
            save_channel(connection, &mut loaded, false)?;
            cache.channels.insert(channel_id, loaded);
            Ok(id)
        })
    }

    /// Marks a message read: sends a read receipt.
    pub fn ack(&mut self, channel: &str, message: &str) -> Result<EnvelopeId, StoreError> {
        let id = self.resolve_message(channel, message)?;
        self.send(channel, Body::ReadReceipt(vec![id]), None)
    }

    pub(crate) fn resolve_message(
        &mut self,
        channel: &str,
        message: &str,
    ) -> Result<EnvelopeId, StoreError> {
        let prefix = message.trim().to_ascii_lowercase();
        if prefix.len() < 8 || prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::UnknownMessage(message.to_owned()));
        }
        let channel_id = channel_id_by_name(&self.connection, channel)?;
        // Every id starting with the prefix lies between these two, by the index.
        let bound = |fill: char| {
            let padded: String = prefix
                .chars()
                .chain(std::iter::repeat(fill))
                .take(64)
                .collect();
            hex::decode(padded).unwrap_or_default()
        };
        let (low, high) = (bound('0'), bound('f'));
        let mut statement = self.connection.prepare_cached(
            "SELECT id, bytes FROM entries WHERE channel = ?1 AND id BETWEEN ?2 AND ?3 LIMIT 2",
        )?;
        let rows: Vec<(Vec<u8>, Vec<u8>)> = statement
            .query_map(params![&channel_id.0[..], low, high], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?
            .collect::<Result<_, _>>()?;
        let matches: Vec<EnvelopeId> = rows
            .into_iter()
            .filter_map(|(id, bytes)| {
                let (envelope, _) = Envelope::decode(&bytes).ok()?;
                matches!(envelope.body, Body::Message(_))
                    .then(|| id.try_into().ok().map(EnvelopeId))
                    .flatten()
            })
            .collect();
        match matches.as_slice() {
            [one] => Ok(*one),
            _ => Err(StoreError::UnknownMessage(message.to_owned())),
        }
    }

    /// The transcript's text messages with delivered and read state.
    pub fn log(&mut self, channel: &str) -> Result<Vec<LogEntry>, StoreError> {
        self.log_with(channel, false)
    }

    /// The messages of a channel, with the link tests among them if `link_tests`.
    pub fn log_with(
        &mut self,
        channel: &str,
        link_tests: bool,
    ) -> Result<Vec<LogEntry>, StoreError> {
        self.log_last(channel, link_tests, None)
    }

    /// The newest `last` messages of a channel (all with `None`), oldest first. Reads
    /// from the newest backwards, so its cost follows `last`, not the history.
    pub fn log_last(
        &mut self,
        channel: &str,
        link_tests: bool,
        last: Option<usize>,
    ) -> Result<Vec<LogEntry>, StoreError> {
        let books = self.code_books(channel)?;
        let provider = Provider::new(&self.connection);
        let loaded = load_channel(&self.connection, &provider, channel)?;
        let relays = channel_relays(&self.connection, &loaded.id())?;
        let wanted = last.unwrap_or(usize::MAX);
        let mut entries: Vec<LogEntry> = Vec::new();
        let mut before = None;
        while entries.len() < wanted {
            let page = loaded.transcript().page_before(before, 256)?;
            let Some((id, envelope)) = page.last() else {
                break;
            };
            before = Some((envelope.lamport, *id));
            for (id, envelope) in page {
                if entries.len() >= wanted {
                    break;
                }
                let (text, precedence) = match &envelope.body {
                    Body::Message(message) => (text_of(&books, message), message.precedence),
                    Body::LinkTest(bytes) if link_tests => (
                        crate::payload::describe_link_test(bytes, &relays),
                        Precedence::Routine,
                    ),
                    Body::Availability(record) if link_tests => (
                        crate::payload::describe_availability(record),
                        Precedence::Routine,
                    ),
                    Body::NonResponse(statement) => (
                        crate::payload::describe_non_response(statement),
                        Precedence::Routine,
                    ),
                    _ => continue,
                };
                entries.push(log_entry(&loaded, id, &envelope, text, precedence)?);
            }
        }
        entries.reverse();
        Ok(entries)
    }

    /// The other parties' messages that this party has not read, most urgent first
    /// (each precedence in the order sent), at most `limit`. Messages are tracked from
    /// their arrival until this party reads them when they have a deadline: every
    /// message since precedences (older ones only with `--deadline`).
    pub fn unread(&mut self, channel: &str, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        let own_party = self.identity.info().party.clone();
        let books = self.code_books(channel)?;
        let provider = Provider::new(&self.connection);
        let loaded = load_channel(&self.connection, &provider, channel)?;
        // Only other parties' messages: this party's own devices are left out in the
        // query, so its own messages waiting for readers never crowd the window.
        let own: Vec<Vec<u8>> = loaded
            .transcript()
            .roster()
            .values()
            .filter(|info| info.party == own_party)
            .map(|info| info.key.0.to_vec())
            .collect();
        let mut statement = self.connection.prepare_cached(
            "SELECT d.id FROM deadlines d JOIN entries e ON e.channel = d.channel AND e.id = d.id
             WHERE d.channel = ?1 AND lower(hex(d.sender)) NOT IN (SELECT value FROM json_each(?3))
             ORDER BY d.precedence DESC, e.lamport, e.id LIMIT ?2",
        )?;
        let own_json = serde_json::to_string(&own.iter().map(hex::encode).collect::<Vec<_>>())
            .map_err(corrupt)?;
        let ids: Vec<Vec<u8>> = statement
            .query_map(
                params![&loaded.id().0[..], MAX_UNDELIVERED_SCAN as i64, own_json],
                |row| row.get(0),
            )?
            .collect::<Result<_, _>>()?;
        let mut entries = Vec::new();
        for id in ids {
            if entries.len() >= limit {
                break;
            }
            let Ok(id) = <[u8; 32]>::try_from(id.as_slice()).map(EnvelopeId) else {
                continue;
            };
            let Some(envelope) = loaded.transcript().get(&id)? else {
                continue;
            };
            let from = loaded.transcript().party_of(&envelope.sender);
            if from.is_none_or(|from| from == own_party)
                || loaded.read_by(&id)?.contains(&own_party)
            {
                continue;
            }
            let Body::Message(message) = envelope.body.clone() else {
                continue;
            };
            entries.push(log_entry(
                &loaded,
                id,
                &envelope,
                text_of(&books, &message),
                message.precedence,
            )?);
        }
        Ok(entries)
    }

    /// Marks the most urgent unread message of another party read (see
    /// [`Store::unread`]): its id and the read receipt's, or `None` when nothing is
    /// unread.
    pub fn ack_next(
        &mut self,
        channel: &str,
    ) -> Result<Option<(EnvelopeId, EnvelopeId)>, StoreError> {
        let Some(id) = self.unread(channel, 1)?.first().map(|entry| entry.id) else {
            return Ok(None);
        };
        let receipt = self.send(channel, Body::ReadReceipt(vec![id]), None)?;
        Ok(Some((id, receipt)))
    }

    /// The transcript root of a channel: (RFC 6962 hash, number of envelopes).
    pub fn transcript_root(&mut self, channel: &str) -> Result<([u8; 32], u64), StoreError> {
        let provider = Provider::new(&self.connection);
        Ok(load_channel(&self.connection, &provider, channel)?
            .transcript()
            .root()?)
    }

    /// Sends a checkpoint, then writes the export of the transcript into memory.
    pub fn export(&mut self, channel: &str) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        self.export_to(channel, &mut out)?;
        Ok(out)
    }

    /// Sends a checkpoint, then streams the export of the transcript to `out`, a page
    /// of envelopes at a time (memory stays bounded whatever the channel's length).
    /// The checkpoint is committed only if the whole export was written.
    pub fn export_to(&mut self, channel: &str, out: &mut dyn Write) -> Result<(), StoreError> {
        self.transact(|connection, identity, cache| {
            let provider = Provider::new(connection);
            let channel_id = channel_id_by_name(connection, channel)?;
            let mut loaded = checkout(cache, connection, &provider, &channel_id)?;
            // This device's settled root goes on the record, cosigned, before export.
            cosign_latest(connection, &provider, identity, &mut loaded)?;
            let checkpoint = Body::Checkpoint {
                root: [0; 32],
                size: 0,
                horizon: 0,
            };
            seal(
                connection,
                &provider,
                identity,
                &mut loaded,
                checkpoint,
                None,
            )?;
            Export::write_to(loaded.transcript(), loaded.name(), identity, &mut |bytes| {
                out.write_all(bytes).map_err(|e| e.to_string())
            })?;
            out.flush().map_err(|e| ExportError::Write(e.to_string()))?;
            save_channel(connection, &mut loaded, false)?;
            cache.channels.insert(channel_id, loaded);
            Ok(())
        })
    }
}

/// One line of the log: a message (or the description of another body) with who holds
/// and who read it.
fn log_entry(
    channel: &Channel,
    id: EnvelopeId,
    envelope: &Envelope,
    text: String,
    precedence: Precedence,
) -> Result<LogEntry, StoreError> {
    let from = channel
        .transcript()
        .party_of(&envelope.sender)
        .unwrap_or("?")
        .to_owned();
    let mut delivered_to = channel.delivered_to(&id)?;
    delivered_to.remove(&from);
    Ok(LogEntry {
        id,
        from,
        time_ms: envelope.claimed_time_ms,
        text,
        precedence,
        deadline_ms: envelope.deadline_ms,
        delivered_to,
        read_by: channel.read_by(&id)?,
    })
}

/// How a message reads: its text, or its code book entry rendered.
pub(crate) fn text_of(
    books: &BTreeMap<[u8; 32], super::Catalogue>,
    message: &hotline_core::Message,
) -> String {
    match &message.code {
        Some(coded) => super::render_coded(books, coded),
        None => message.text.clone(),
    }
}
