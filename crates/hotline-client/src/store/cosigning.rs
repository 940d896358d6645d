//! Cosigned roots on a device ([`hotline_core::cosign`]): this device cosigns its
//! settled root every record period (an hour by default), before an export and on
//! demand; it checks every other device's cosignature against its own settled prefix,
//! cosigns the same root when it agrees (so that every party's signature gathers on
//! one root) and raises a `cosigned-root` alarm, with the envelope as evidence, when it
//! does not: that device was shown, or tells, another history.
//!
//! Roots are per horizon (the epoch a device's transcript starts at). A device checks
//! and cosigns the roots of later horizons too (the envelopes of epoch ≥ that horizon
//! in its settled prefix, read forward once; a cosignature of a size already read past
//! is checked by reading from the start again), and cosigns at the latest horizon
//! whose root it has found its own, so that founders and members who joined later meet
//! on one root. A cosignature whose signature does not hold, or whose horizon is beyond
//! the channel's epoch, is alarmed and never looked into.
//! A device cannot check a root of an earlier horizon than its own (it lacks those
//! envelopes).

use hotline_core::Cosignature;
use hotline_core::cosign::HorizonCursor;

use super::*;

/// Most received cosignatures checked per call.
const MAX_CHECKED: usize = 256;

/// What this device can say of a root over `size` envelopes from `horizon` on.
enum RootFor {
    Root([u8; 32]),
    /// Not settled that far yet.
    Later,
    /// Never: an earlier horizon than this device's.
    Never,
}

impl Store {
    /// Cosigns this device's settled root of `channel` now (at the latest horizon seen
    /// cosigned), unless it cosigned that root already; the cosignature's envelope id
    /// and what it says.
    pub fn cosign(
        &mut self,
        channel: &str,
    ) -> Result<Option<(EnvelopeId, Cosignature)>, StoreError> {
        self.transact(|connection, identity, cache| {
            let provider = Provider::new(connection);
            let channel_id = channel_id_by_name(connection, channel)?;
            let mut loaded = checkout(cache, connection, &provider, &channel_id)?;
            let sealed = cosign_latest(connection, &provider, identity, &mut loaded)?;
            save_channel(connection, &mut loaded, false)?;
            cache.channels.insert(channel_id, loaded);
            Ok(sealed)
        })
    }

    /// This device's settled root of `channel`: (root, size).
    pub fn settled_root(&mut self, channel: &str) -> Result<([u8; 32], u64), StoreError> {
        let provider = Provider::new(&self.connection);
        let loaded = load_channel(&self.connection, &provider, channel)?;
        let size = loaded.transcript().settled_len();
        Ok(loaded.transcript().settled_root(size)?)
    }

    /// Checks the cosignatures received (alarming on a different root, cosigning the
    /// same root when it is this device's too), and cosigns each channel's settled root
    /// once a record period has passed since the last. Returns how many cosignatures
    /// this device sealed; the sync engine posts them.
    pub fn cosign_due(&mut self, now_ms: u64) -> Result<usize, StoreError> {
        let summaries = self.channels()?;
        self.transact(|connection, identity, cache| {
            let period = crate::link::setting(
                connection,
                "record_period_ms",
                crate::link::DEFAULT_RECORD_PERIOD_MS,
            )?;
            let provider = Provider::new(connection);
            let mut sealed = 0;
            for summary in &summaries {
                let mut channel = checkout(cache, connection, &provider, &summary.id)?;
                if channel.has_pending_commit() || channel.has_pending_proposals() {
                    cache.channels.insert(summary.id, channel);
                    continue;
                }
                let mut agreed: Option<(u64, u64)> = None;
                let steps: Vec<Vec<u8>> = connection
                    .prepare_cached("SELECT step FROM cosigns WHERE channel = ?1 LIMIT ?2")?
                    .query_map(params![&summary.id.0[..], MAX_CHECKED as i64], |row| {
                        row.get(0)
                    })?
                    .collect::<Result<_, _>>()?;
                for step in steps {
                    let Ok(id) = <[u8; 32]>::try_from(step.as_slice()).map(EnvelopeId) else {
                        continue;
                    };
                    let checked = match channel.transcript().get(&id)? {
                        Some(envelope) if envelope.sender != identity.key() => {
                            check(connection, &channel, &envelope, &id, now_ms)?
                        }
                        _ => Checked::Done(None),
                    };
                    match checked {
                        Checked::Later => continue,
                        Checked::Done(same) => {
                            agreed = agreed.max(same);
                            connection
                                .prepare_cached(
                                    "DELETE FROM cosigns WHERE channel = ?1 AND step = ?2",
                                )?
                                .execute(params![&summary.id.0[..], &id.0[..]])?;
                        }
                    }
                }
                let last: Option<i64> = connection
                    .prepare_cached("SELECT at_ms FROM cosigned WHERE channel = ?1")?
                    .query_row([&summary.id.0[..]], |row| row.get(0))
                    .optional()?;
                // Another device's root this device shares: cosign it too. Else, once
                // a period: this device's own.
                let made = match agreed {
                    Some((horizon, size)) => {
                        cosign_at(connection, &provider, identity, &mut channel, horizon, size)?
                    }
                    None if last.is_none_or(|at| now_ms >= (at as u64).saturating_add(period)) => {
                        cosign_latest(connection, &provider, identity, &mut channel)?
                    }
                    None => None,
                };
                if made.is_some() {
                    sealed += 1;
                    save_channel(connection, &mut channel, false)?;
                }
                cache.channels.insert(summary.id, channel);
            }
            Ok(sealed)
        })
    }
}

/// What checking one received cosignature came to.
enum Checked {
    /// Not settled here yet: check again later.
    Later,
    /// Checked, or never checkable here; `(horizon, size)` when its root is this
    /// device's too.
    Done(Option<(u64, u64)>),
}

fn check(
    connection: &Connection,
    channel: &Channel,
    envelope: &Envelope,
    id: &EnvelopeId,
    now_ms: u64,
) -> Result<Checked, StoreError> {
    let Body::Cosignature(cosignature) = &envelope.body else {
        return Ok(Checked::Done(None));
    };
    let party = channel
        .transcript()
        .party_of(&envelope.sender)
        .unwrap_or("?")
        .to_owned();
    let alarm = |detail: String| -> Result<Checked, StoreError> {
        crate::store::cached::execute(
            connection,
            "INSERT OR IGNORE INTO alarms (kind, relay, party, message, detail, evidence, since_ms)
             VALUES ('cosigned-root', NULL, ?1, ?2, ?3, ?4, ?5)",
            params![party, id.to_hex(), detail, envelope.encode(), now_ms as i64],
        )?;
        Ok(Checked::Done(None))
    };
    // A signature that does not hold, or a horizon no member can have yet (beyond
    // the channel's epoch), is never looked into: it cannot steer this device.
    if !cosignature.holds(&channel.id(), &envelope.sender) {
        return alarm(format!(
            "{party} sent a cosignature whose signature does not hold"
        ));
    }
    if cosignature.horizon > channel.epoch() {
        return alarm(format!(
            "{party} cosigned a root from epoch {}, beyond the channel's epoch {}",
            cosignature.horizon,
            channel.epoch()
        ));
    }
    let root = match root_for(connection, channel, cosignature.horizon, cosignature.size)? {
        RootFor::Later => return Ok(Checked::Later),
        RootFor::Never => return Ok(Checked::Done(None)),
        RootFor::Root(root) => root,
    };
    if root == cosignature.root {
        if cosignature.horizon > channel.transcript().horizon() {
            // A later horizon whose root this device shares: cosign there from now on.
            connection
                .prepare_cached(
                    "INSERT OR IGNORE INTO cosign_horizons (channel, horizon) VALUES (?1, ?2)",
                )?
                .execute(params![&channel.id().0[..], cosignature.horizon as i64])?;
        }
        return Ok(Checked::Done(Some((cosignature.horizon, cosignature.size))));
    }
    alarm(format!(
        "{party} cosigned another root of the first {} settled envelopes from epoch {} \
         ({}, here {}): it was shown, or tells, another history",
        cosignature.size,
        cosignature.horizon,
        &hex::encode(cosignature.root)[..16],
        &hex::encode(root)[..16]
    ))
}

/// This device's root over the first `size` settled envelopes from epoch `horizon` on.
fn root_for(
    connection: &Connection,
    channel: &Channel,
    horizon: u64,
    size: u64,
) -> Result<RootFor, StoreError> {
    let transcript = channel.transcript();
    let own = transcript.horizon();
    if horizon < own || size == 0 {
        return Ok(RootFor::Never);
    }
    if horizon == own {
        if size > transcript.settled_len() {
            return Ok(RootFor::Later);
        }
        return Ok(RootFor::Root(transcript.settled_root(size)?.0));
    }
    let channel_id = channel.id();
    let stored: Option<Vec<u8>> = connection
        .prepare_cached("SELECT cursor FROM cosign_cursors WHERE channel = ?1 AND horizon = ?2")?
        .query_row(params![&channel_id.0[..], horizon as i64], |row| row.get(0))
        .optional()?;
    let mut cursor = match stored {
        Some(bytes) => HorizonCursor::decode(&bytes)
            .ok_or_else(|| corrupt("a stored horizon cursor does not decode"))?,
        None => HorizonCursor::new(horizon),
    };
    if size < cursor.frontier.len() {
        // Behind what was read (a cosignature that came late): read from the start
        // again, once, without keeping it.
        let mut fresh = HorizonCursor::new(horizon);
        return Ok(fresh
            .root_at(transcript, size)?
            .map_or(RootFor::Never, RootFor::Root));
    }
    let root = cursor.root_at(transcript, size)?;
    connection
        .prepare_cached(
            "INSERT INTO cosign_cursors (channel, horizon, cursor) VALUES (?1, ?2, ?3)
             ON CONFLICT (channel, horizon) DO UPDATE SET cursor = ?3",
        )?
        .execute(params![&channel_id.0[..], horizon as i64, cursor.encode()])?;
    Ok(root.map_or(RootFor::Later, RootFor::Root))
}

/// Cosigns this device's settled root at the latest horizon it knows of (its own, or a
/// later one seen cosigned), as far as it is settled.
pub(crate) fn cosign_latest(
    connection: &Connection,
    provider: &Provider<'_>,
    identity: &DeviceIdentity,
    channel: &mut Channel,
) -> Result<Option<(EnvelopeId, Cosignature)>, StoreError> {
    let own = channel.transcript().horizon();
    let later: Option<i64> = connection
        .prepare_cached("SELECT MAX(horizon) FROM cosign_horizons WHERE channel = ?1")?
        .query_row([&channel.id().0[..]], |row| row.get(0))?;
    let horizon = later.map_or(own, |h| (h as u64).max(own));
    let size = if horizon == own {
        channel.transcript().settled_len()
    } else {
        // As far as the cursor can go: every settled envelope from that horizon on.
        let mut size = 0;
        let stored: Option<Vec<u8>> = connection
            .prepare_cached(
                "SELECT cursor FROM cosign_cursors WHERE channel = ?1 AND horizon = ?2",
            )?
            .query_row(params![&channel.id().0[..], horizon as i64], |row| {
                row.get(0)
            })
            .optional()?;
        if let Some(cursor) = stored.as_deref().and_then(HorizonCursor::decode) {
            let mut probe = cursor.clone();
            // Read to the end of the settled prefix: the size is what was found.
            let _ = probe.root_at(channel.transcript(), u64::MAX)?;
            size = probe.frontier.len();
        }
        size
    };
    cosign_at(connection, provider, identity, channel, horizon, size)
}

/// Seals this device's cosignature of its root over the first `size` settled envelopes
/// from epoch `horizon` on, unless `size` is 0, not settled, or not beyond the last
/// root this device cosigned.
pub(crate) fn cosign_at(
    connection: &Connection,
    provider: &Provider<'_>,
    identity: &DeviceIdentity,
    channel: &mut Channel,
    horizon: u64,
    size: u64,
) -> Result<Option<(EnvelopeId, Cosignature)>, StoreError> {
    let channel_id = channel.id();
    let last: Option<(i64, i64)> = connection
        .prepare_cached("SELECT horizon, size FROM cosigned WHERE channel = ?1")?
        .query_row([&channel_id.0[..]], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    if size == 0 || last.is_some_and(|(h, s)| (horizon, size) <= (h as u64, s as u64)) {
        return Ok(None);
    }
    let RootFor::Root(root) = root_for(connection, channel, horizon, size)? else {
        return Ok(None);
    };
    let cosignature = Cosignature::sign(identity, &channel_id, horizon, size, root);
    let id = seal(
        connection,
        provider,
        identity,
        channel,
        Body::Cosignature(cosignature.clone()),
        None,
    )?;
    connection
        .prepare_cached(
            "INSERT INTO cosigned (channel, horizon, size, at_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (channel) DO UPDATE SET horizon = ?2, size = ?3, at_ms = ?4",
        )?
        .execute(params![
            &channel_id.0[..],
            horizon as i64,
            size as i64,
            now_ms() as i64
        ])?;
    Ok(Some((id, cosignature)))
}
