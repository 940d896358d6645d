//! Loading and saving channels inside a transaction, sealing and queueing.

use super::*;

pub(crate) fn channel_row(
    connection: &Connection,
    name: &str,
) -> Result<Option<(Vec<u8>, String)>, StoreError> {
    Ok(crate::store::cached::query_row(
        connection,
        "SELECT id, snapshot FROM channels WHERE name = ?1 OR lower(hex(id)) = lower(?1)",
        [name],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )
    .optional()?)
}

pub(crate) fn channel_id_by_name(
    connection: &Connection,
    name: &str,
) -> Result<ChannelId, StoreError> {
    let (id, _) = channel_row(connection, name)?
        .ok_or_else(|| StoreError::UnknownChannel(name.to_owned()))?;
    let id: [u8; 32] = id.try_into().map_err(|_| corrupt("channel id"))?;
    Ok(ChannelId(id))
}

/// The channel from the cache, or restored from the database.
pub(crate) fn checkout(
    cache: &mut Cache,
    connection: &Rc<Connection>,
    provider: &Provider<'_>,
    id: &ChannelId,
) -> Result<Channel, StoreError> {
    match cache.channels.remove(id) {
        Some(channel) => Ok(channel),
        None => load_channel_by_id(connection, provider, id),
    }
}

pub(crate) fn load_channel(
    connection: &Rc<Connection>,
    provider: &Provider<'_>,
    name: &str,
) -> Result<Channel, StoreError> {
    let (id, snapshot) = channel_row(connection, name)?
        .ok_or_else(|| StoreError::UnknownChannel(name.to_owned()))?;
    restore(connection, provider, &id, &snapshot)
}

pub(crate) fn load_channel_by_id(
    connection: &Rc<Connection>,
    provider: &Provider<'_>,
    id: &ChannelId,
) -> Result<Channel, StoreError> {
    let snapshot: String = crate::store::cached::query_row(
        connection,
        "SELECT snapshot FROM channels WHERE id = ?1",
        [&id.0[..]],
        |row| row.get(0),
    )
    .optional()?
    .ok_or_else(|| StoreError::UnknownChannel(id.to_string()))?;
    restore(connection, provider, &id.0, &snapshot)
}

pub(crate) fn restore(
    connection: &Rc<Connection>,
    provider: &Provider<'_>,
    id: &[u8],
    snapshot: &str,
) -> Result<Channel, StoreError> {
    let snapshot: ChannelSnapshot = serde_json::from_str(snapshot).map_err(corrupt)?;
    // The envelopes that wait for a parent (all of them, for a channel stored by an
    // earlier version: its transcript is rebuilt from them).
    let envelopes: Vec<Vec<u8>> = connection
        .prepare_cached("SELECT bytes FROM envelopes WHERE channel = ?1")?
        .query_map([id], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    let envelopes = envelopes
        .iter()
        .map(|bytes| {
            Envelope::decode(bytes)
                .map(|(envelope, _)| envelope)
                .map_err(corrupt)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let channel: [u8; 32] = id.try_into().map_err(|_| corrupt("channel id"))?;
    let store = SqliteTranscript::boxed(Rc::clone(connection), channel);
    Ok(Channel::restore(provider, snapshot, store, envelopes)?)
}

pub(crate) fn save_channel(
    connection: &Connection,
    channel: &mut Channel,
    new: bool,
) -> Result<(), StoreError> {
    let snapshot = serde_json::to_string(&channel.snapshot()).map_err(corrupt)?;
    let id = channel.id();
    let registers = if channel.is_committer() {
        Store::membership_version(channel.epoch()) as i64
    } else {
        0
    };
    if new {
        crate::store::cached::execute(
            connection,
            "INSERT INTO channels (id, name, snapshot, registers) VALUES (?1, ?2, ?3, ?4)",
            params![&id.0[..], channel.name(), snapshot, registers],
        )?;
    } else {
        crate::store::cached::execute(
            connection,
            "UPDATE channels SET snapshot = ?2, registers = ?3 WHERE id = ?1",
            params![&id.0[..], snapshot, registers],
        )?;
    }
    // Accepted envelopes are in the transcript's store already; the ones waiting for
    // a parent are kept here until it comes.
    let fresh = channel.take_fresh();
    let mut insert_envelope = connection.prepare_cached(
        "INSERT OR IGNORE INTO envelopes (channel, id, lamport, bytes) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (envelope_id, envelope) in &fresh.waiting {
        insert_envelope.execute(params![
            &id.0[..],
            &envelope_id.0[..],
            envelope.lamport as i64,
            envelope.encode()
        ])?;
    }
    Ok(())
}

/// Seals `body` in the channel and queues the ciphertext with its envelope id.
pub(crate) fn seal(
    connection: &Connection,
    provider: &Provider<'_>,
    identity: &DeviceIdentity,
    channel: &mut Channel,
    body: Body,
    deadline_ms: Option<u64>,
) -> Result<EnvelopeId, StoreError> {
    // A message sealed now would belong to the epoch before the pending commit: members
    // the commit adds could never read it, so the transcripts would differ for good.
    if channel.has_pending_commit() {
        return Err(StoreError::Channel(ChannelError::CommitPending));
    }
    let precedence = body.message().map(|m| m.precedence).unwrap_or_default();
    let (id, bytes) = channel.send(provider, identity, body, now_ms(), deadline_ms)?;
    // Its echo through each relay is placed in this device's own chain.
    record_own_copy(connection, channel, &id, &bytes)?;
    let outgoing = Outgoing::Message {
        id: Some(id),
        bytes,
    };
    queue(connection, Some(channel.id()), outgoing, Some(id))?;
    if precedence != Precedence::Routine {
        connection
            .prepare_cached("UPDATE outbox SET precedence = ?1 WHERE seq = last_insert_rowid()")?
            .execute([precedence as i64])?;
    }
    Ok(id)
}

/// Places this device's envelope `id`, sealed into `bytes`, in its own chain, so that
/// its echo through each relay passes the per-relay order check.
fn record_own_copy(
    connection: &Connection,
    channel: &Channel,
    id: &EnvelopeId,
    bytes: &[u8],
) -> Result<(), StoreError> {
    if let Some(envelope) = channel.transcript().get(id)? {
        record_copy(
            connection,
            &channel.id(),
            &copy_hash(bytes),
            &envelope.sender,
            envelope.seq,
        )?;
    }
    Ok(())
}

/// Queues a commit. A channel with relays merges it when the first relay durably
/// accepted it ([`Store::commit_relayed`]), so that no member ever follows a commit the
/// others cannot get; a channel without relays (bundles) merges it at once.
pub(crate) fn stage_commit(
    connection: &Connection,
    provider: &Provider<'_>,
    identity: &DeviceIdentity,
    channel: &mut Channel,
    commit: Outgoing,
    merge_now: bool,
) -> Result<(), StoreError> {
    queue(connection, Some(channel.id()), commit, None)?;
    if merge_now {
        for out in channel.commit_accepted(provider, identity, now_ms())? {
            queue_released(connection, channel, out)?;
        }
    }
    Ok(())
}

/// Queues what a merged commit released (the Welcome, membership notes), placing the
/// notes in this device's chain for the per-relay order check, as `seal` does.
pub(crate) fn queue_released(
    connection: &Connection,
    channel: &Channel,
    out: Outgoing,
) -> Result<(), StoreError> {
    if let Outgoing::Message {
        id: Some(id),
        bytes,
    } = &out
    {
        record_own_copy(connection, channel, id, bytes)?;
    }
    let envelope = match &out {
        Outgoing::Message { id, .. } => *id,
        _ => None,
    };
    queue(connection, Some(channel.id()), out, envelope)
}

pub(crate) fn queue(
    connection: &Connection,
    channel: Option<ChannelId>,
    outgoing: Outgoing,
    envelope: Option<EnvelopeId>,
) -> Result<(), StoreError> {
    let (kind, recipients, bytes) = match outgoing {
        Outgoing::Message { bytes, .. } => (1, None, bytes),
        Outgoing::Commit(bytes) => (3, None, bytes),
        Outgoing::Welcome { to, bytes } => (
            2,
            Some(to.iter().flat_map(|k| k.0).collect::<Vec<u8>>()),
            bytes,
        ),
    };
    crate::store::cached::execute(
        connection,
        "INSERT INTO outbox (channel, kind, recipients, bytes, envelope, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            channel.map(|c| c.0.to_vec()),
            kind,
            recipients,
            bytes,
            envelope.map(|e| e.0.to_vec()),
            now_ms() as i64
        ],
    )?;
    Ok(())
}
