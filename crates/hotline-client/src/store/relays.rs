//! Relays: cursors, registrations, a channel's relay list and its changes.

use super::*;

impl Store {
    /// Every relay key rotation this device followed, made known to its TLS clients
    /// (an address pinning an old key accepts the keys its rotations lead to).
    pub(crate) fn load_rotations(&self) -> Result<(), StoreError> {
        let mut statement = self
            .connection
            .prepare_cached("SELECT from_pin, to_pin FROM relay_rotations")?;
        let rows = statement.query_map([], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?))
        })?;
        for row in rows {
            let (from, to) = row?;
            if let (Ok(from), Ok(to)) = (from.try_into(), to.try_into()) {
                hotline_proto::tls::follow(from, to);
            }
        }
        Ok(())
    }

    /// Keeps a relay key rotation this device verified (each step from the pin it held
    /// to the key the relay presents, and the statements that prove them) and follows
    /// it from now on.
    pub fn follow_rotation(
        &mut self,
        followed: &hotline_proto::client::Followed,
    ) -> Result<(), StoreError> {
        let now = self.now();
        self.transact(|connection, _, _| {
            for (from, to) in &followed.steps {
                crate::store::cached::execute(
                    connection,
                    "INSERT INTO relay_rotations (from_pin, to_pin, chain, learned_ms)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (from_pin) DO UPDATE SET to_pin = ?2, chain = ?3, learned_ms = ?4",
                    params![&from[..], &to[..], &followed.chain, now as i64],
                )?;
            }
            Ok(())
        })?;
        for (from, to) in &followed.steps {
            hotline_proto::tls::follow(*from, *to);
        }
        Ok(())
    }

    /// Where a relay's log was read up to.
    pub fn cursor(&self, relay: &str, log: &str) -> Result<u64, StoreError> {
        Ok(self
            .connection
            .prepare_cached("SELECT seq FROM cursors WHERE relay = ?1 AND log = ?2")?
            .query_row(params![relay, log], |row| row.get::<_, i64>(0))
            .optional()?
            .unwrap_or(0) as u64)
    }

    /// Moves a cursor past messages that could not be processed (and were reported).
    pub fn skip_to(&mut self, cursor: Cursor<'_>) -> Result<(), StoreError> {
        self.transact(|connection, _, _| advance(connection, cursor))
    }

    /// The membership version a relay holds for a channel at `epoch`: versions start at
    /// 1 for epoch 0, so a relay has none until registered.
    pub fn membership_version(epoch: u64) -> u64 {
        epoch + 1
    }

    /// Whether some relay of a channel may lack the membership this device must
    /// register there: [`Store::relay_plan`] is then worth its cost (every channel
    /// loaded), which a push would otherwise pay for nothing.
    pub fn registrations_due(&mut self) -> Result<bool, StoreError> {
        Ok(self
            .connection
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM channel_relays r JOIN channels c ON c.id = r.channel
                            WHERE c.registers IS NULL OR r.registered_version < c.registers)",
            )?
            .query_row([], |row| row.get(0))?)
    }

    /// Every relay of every channel.
    pub fn channel_relay_urls(&mut self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .connection
            .prepare_cached("SELECT DISTINCT url FROM channel_relays ORDER BY url")?
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?)
    }

    /// What the sync engine needs to know of each channel.
    pub fn relay_plan(&mut self) -> Result<Vec<RelayPlan>, StoreError> {
        let mut plans = Vec::new();
        for channel in self.channels()? {
            let relays: Vec<(String, u64)> = self
                .connection
                .prepare_cached("SELECT url, registered_version FROM channel_relays WHERE channel = ?1 ORDER BY url")?
                .query_map([&channel.id.0[..]], |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)))?
                .collect::<Result<_, _>>()?;
            plans.push(RelayPlan {
                channel: channel.id,
                members: channel.members.iter().map(|m| m.key.0).collect(),
                committer: channel.committer,
                epoch: channel.epoch,
                relays,
            });
        }
        Ok(plans)
    }

    /// Records that a relay holds the membership of this version.
    pub fn mark_registered(
        &mut self,
        channel: &ChannelId,
        relay: &str,
        version: u64,
    ) -> Result<(), StoreError> {
        self.transact(|connection, _, _| {
            crate::store::cached::execute(
                connection,
                "UPDATE channel_relays SET registered_version = ?3 WHERE channel = ?1 AND url = ?2",
                params![&channel.0[..], relay, version as i64],
            )?;
            Ok(())
        })
    }

    /// Changes the channel's relays (committer only): a signed note for the record that
    /// every member follows, sent through the old relays and the new ones. Keep at least
    /// one relay across a change, or messages in flight may be stranded on a relay
    /// nobody reads any more.
    pub fn change_relays(&mut self, channel: &str, relays: &[String]) -> Result<(), StoreError> {
        if relays.is_empty() || relays.len() > hotline_core::envelope::MAX_RELAYS {
            return Err(StoreError::BadRelays(format!(
                "a channel needs between 1 and {} relays",
                hotline_core::envelope::MAX_RELAYS
            )));
        }
        self.transact(|connection, identity, cache| {
            let provider = Provider::new(connection);
            let channel_id = channel_id_by_name(connection, channel)?;
            let mut loaded = checkout(cache, connection, &provider, &channel_id)?;
            if !loaded.is_committer() {
                return Err(StoreError::Channel(ChannelError::NotCommitter));
            }
            let old = channel_relays(connection, &channel_id)?;
            let note = Body::Membership(MembershipNote::RelaysChanged {
                relays: relays.to_vec(),
            });
            seal(connection, &provider, identity, &mut loaded, note, None)?;
            let mut targets = old.clone();
            targets.extend(relays.iter().filter(|r| !old.contains(r)).cloned());
            crate::store::cached::execute(
                connection,
                "UPDATE outbox SET only_relays = ?1 WHERE seq = ?2",
                params![
                    serde_json::to_string(&targets).map_err(corrupt)?,
                    connection.last_insert_rowid()
                ],
            )?;
            replace_relays(connection, &channel_id, relays)?;
            save_channel(connection, &mut loaded, false)?;
            cache.channels.insert(channel_id, loaded);
            Ok(())
        })
    }

    /// Sets the channel's handling times (committer only): how long the other parties
    /// have to read a message of each precedence (FLASH first) when its sender gives no
    /// deadline. A note for the record that every member follows.
    pub fn set_handling_times(
        &mut self,
        channel: &str,
        read_within_ms: [u64; 4],
    ) -> Result<(), StoreError> {
        if read_within_ms.contains(&0) {
            return Err(StoreError::Agreement(
                "a handling time is at least 1 ms".into(),
            ));
        }
        self.transact(|connection, identity, cache| {
            let provider = Provider::new(connection);
            let channel_id = channel_id_by_name(connection, channel)?;
            let mut loaded = checkout(cache, connection, &provider, &channel_id)?;
            if !loaded.is_committer() {
                return Err(StoreError::Channel(ChannelError::NotCommitter));
            }
            let note = Body::Membership(MembershipNote::HandlingTimes { read_within_ms });
            seal(connection, &provider, identity, &mut loaded, note, None)?;
            set_handling_times(connection, &channel_id, &read_within_ms)?;
            save_channel(connection, &mut loaded, false)?;
            cache.channels.insert(channel_id, loaded);
            Ok(())
        })
    }

    /// The channel's handling times, FLASH first: its committer's, else the defaults.
    pub fn handling_times(&mut self, channel: &str) -> Result<[u64; 4], StoreError> {
        let channel_id = self.channel_id(channel)?;
        handling_times(&self.connection, &channel_id)
    }

    /// Names a relay on this device (shown by `status`, the console and alarms instead of
    /// its address; never sent). A name is 1 to 32 letters, digits, `.`, `-` or `_`, and
    /// names one relay.
    pub fn name_relay(&mut self, url: &str, name: &str) -> Result<(), StoreError> {
        let valid = (1..=32).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !valid {
            return Err(StoreError::BadRelays(format!(
                "relay name {name:?}: use 1 to 32 letters, digits, '.', '-' or '_'"
            )));
        }
        self.transact(|connection, _, _| {
            let taken: Option<String> = crate::store::cached::query_row(
                connection,
                "SELECT url FROM relay_names WHERE name = ?1 AND url != ?2",
                params![name, url],
                |row| row.get(0),
            )
            .optional()?;
            if let Some(other) = taken {
                return Err(StoreError::BadRelays(format!(
                    "relay name {name:?} already names {other}"
                )));
            }
            crate::store::cached::execute(
                connection,
                "INSERT INTO relay_names (url, name) VALUES (?1, ?2)
                 ON CONFLICT (url) DO UPDATE SET name = ?2",
                params![url, name],
            )?;
            Ok(())
        })
    }

    /// The name of each named relay, by address.
    pub fn relay_names(&self) -> Result<BTreeMap<String, String>, StoreError> {
        Ok(self
            .connection
            .prepare_cached("SELECT url, name FROM relay_names")?
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?)
    }

    /// The relays of a channel.
    pub fn channel_relays(&self, channel: &ChannelId) -> Result<Vec<String>, StoreError> {
        channel_relays(&self.connection, channel)
    }
}

pub(crate) fn advance(connection: &Connection, cursor: Cursor<'_>) -> Result<(), StoreError> {
    crate::store::cached::execute(
        connection,
        "INSERT INTO cursors (relay, log, seq) VALUES (?1, ?2, ?3)
         ON CONFLICT (relay, log) DO UPDATE SET seq = MAX(seq, ?3)",
        params![cursor.relay, cursor.log, cursor.seq as i64],
    )?;
    Ok(())
}

/// Makes `relays` the channel's relays, keeping what is known of the ones that stay.
pub(crate) fn replace_relays(
    connection: &Connection,
    channel: &ChannelId,
    relays: &[String],
) -> Result<(), StoreError> {
    for old in channel_relays(connection, channel)? {
        if !relays.contains(&old) {
            crate::store::cached::execute(
                connection,
                "DELETE FROM channel_relays WHERE channel = ?1 AND url = ?2",
                params![&channel.0[..], old],
            )?;
        }
    }
    set_relays(connection, channel, relays)
}

/// Follows relay changes that the channel's committer announced in `events`.
pub(crate) fn follow_relay_changes(
    connection: &Connection,
    channel: &Channel,
    events: &[Event],
) -> Result<(), StoreError> {
    for event in events {
        let Event::Accepted(ids) = event else {
            continue;
        };
        for id in ids {
            let Some(envelope) = channel.transcript().get(id)? else {
                continue;
            };
            if let Body::Membership(MembershipNote::RelaysChanged { relays }) = &envelope.body
                && envelope.sender == channel.committer()
                && !relays.is_empty()
                && relays.iter().all(|r| hotline_relay_url_ok(r))
            {
                replace_relays(connection, &channel.id(), relays)?;
            }
            if let Body::Membership(MembershipNote::HandlingTimes { read_within_ms }) =
                &envelope.body
                && envelope.sender == channel.committer()
            {
                set_handling_times(connection, &channel.id(), read_within_ms)?;
            }
        }
    }
    Ok(())
}

/// Whether an announced relay address has the form `https://HOST:PORT/#sha256=HEX`.
pub(crate) fn hotline_relay_url_ok(url: &str) -> bool {
    url.starts_with("https://")
        && url
            .rsplit_once("#sha256=")
            .is_some_and(|(_, pin)| pin.len() == 64 && pin.bytes().all(|b| b.is_ascii_hexdigit()))
}

pub(crate) fn channel_relays(
    connection: &Connection,
    channel: &ChannelId,
) -> Result<Vec<String>, StoreError> {
    Ok(connection
        .prepare_cached("SELECT url FROM channel_relays WHERE channel = ?1 ORDER BY url")?
        .query_map([&channel.0[..]], |row| row.get(0))?
        .collect::<Result<_, _>>()?)
}

pub(crate) fn set_relays(
    connection: &Connection,
    channel: &ChannelId,
    relays: &[String],
) -> Result<(), StoreError> {
    for relay in relays {
        crate::store::cached::execute(
            connection,
            "INSERT OR IGNORE INTO channel_relays (channel, url, added_ms) VALUES (?1, ?2, ?3)",
            params![&channel.0[..], relay, now_ms() as i64],
        )?;
    }
    Ok(())
}

/// How a relay is shown: its name on this device, else `host:port` from its address.
pub fn relay_label(names: &BTreeMap<String, String>, url: &str) -> String {
    if let Some(name) = names.get(url) {
        return name.clone();
    }
    url.trim_start_matches("https://")
        .split(['/', '#'])
        .next()
        .filter(|host| !host.is_empty())
        .unwrap_or(url)
        .to_owned()
}

fn set_handling_times(
    connection: &Connection,
    channel: &ChannelId,
    read_within_ms: &[u64; 4],
) -> Result<(), StoreError> {
    crate::store::cached::execute(
        connection,
        "INSERT INTO handling_times (channel, times) VALUES (?1, ?2)
         ON CONFLICT (channel) DO UPDATE SET times = ?2",
        params![
            &channel.0[..],
            serde_json::to_string(read_within_ms).map_err(corrupt)?
        ],
    )?;
    Ok(())
}

/// The channel's handling times, FLASH first: its committer's, else the defaults.
pub(crate) fn handling_times(
    connection: &Connection,
    channel: &ChannelId,
) -> Result<[u64; 4], StoreError> {
    let stored: Option<String> = connection
        .prepare_cached("SELECT times FROM handling_times WHERE channel = ?1")?
        .query_row([&channel.0[..]], |row| row.get(0))
        .optional()?;
    match stored {
        Some(json) => serde_json::from_str(&json).map_err(corrupt),
        None => Ok(hotline_core::Precedence::ALL.map(hotline_core::Precedence::read_within_ms)),
    }
}
