//! Channels: creating, joining, receiving into them, membership changes.

use super::*;
use crate::stock::Claimed;

impl Store {
    /// Creates a channel with every verified device of `parties`. Until relays exist,
    /// the commit is accepted locally; the Welcome goes to the outbox.
    pub fn create_channel(
        &mut self,
        name: &str,
        parties: &[String],
        relays: &[String],
    ) -> Result<ChannelId, StoreError> {
        self.create_channel_with(name, parties, relays, &Claimed::new())
    }

    /// [`Store::create_channel`], adding each device with the key package `claimed`
    /// from its relays when that one checks out (valid, of that device, one-time), else
    /// with its card's next one-time package, else its last-resort one.
    pub fn create_channel_with(
        &mut self,
        name: &str,
        parties: &[String],
        relays: &[String],
        claimed: &Claimed,
    ) -> Result<ChannelId, StoreError> {
        self.transact(|connection, identity, cache| {
            if channel_row(connection, name)?.is_some() {
                return Err(StoreError::ChannelExists(name.to_owned()));
            }
            let provider = Provider::new(connection);
            let mut contacts = Vec::new();
            for party in parties {
                let mut statement = connection.prepare_cached(
                    "SELECT card, key, key_packages_used FROM contacts WHERE party = ?1",
                )?;
                let cards: Vec<(Vec<u8>, Vec<u8>, i64)> = statement
                    .query_map([party], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                    .collect::<Result<_, _>>()?;
                if cards.is_empty() {
                    return Err(StoreError::UnknownParty(party.clone()));
                }
                for (card, key, used) in cards {
                    let card = CardIn::decode(&card)?;
                    let fingerprint = card.claimed().fingerprint();
                    // The fingerprint was checked at import; this re-checks the signature
                    // and the key packages of the stored card.
                    let mut contact = card.verify(&fingerprint, provider.crypto())?;
                    let fresh = claimed.get(&contact.info.key).and_then(|bytes| {
                        hotline_core::card::check_key_package(
                            &contact.info,
                            bytes,
                            false,
                            provider.crypto(),
                        )
                        .ok()
                    });
                    if let Some(fresh) = fresh {
                        contact.key_packages = vec![fresh];
                    } else {
                        // A one-time key package opens one Welcome only: skip those given
                        // to earlier channels (then the last-resort one serves every
                        // channel).
                        let left = contact
                            .key_packages
                            .len()
                            .saturating_sub(used.max(0) as usize);
                        contact.key_packages.truncate(left);
                        crate::store::cached::execute(
                            connection,
                            "UPDATE contacts SET key_packages_used = key_packages_used + 1
                             WHERE key = ?1 AND ?2 > 0",
                            params![&key, left as i64],
                        )?;
                    }
                    contacts.push(contact);
                }
            }
            let mut channel = Channel::create_with(&provider, identity, name, |id| {
                SqliteTranscript::boxed(Rc::clone(connection), id.0)
            })?;
            channel.remember_contacts(contacts.iter().map(|c| c.info.clone()));
            let invited: Vec<DeviceInfo> = contacts.iter().map(|c| c.info.clone()).collect();
            if !contacts.is_empty() {
                let commit = channel.add(&provider, identity, contacts)?;
                let merge_now = relays.is_empty();
                stage_commit(
                    connection,
                    &provider,
                    identity,
                    &mut channel,
                    commit,
                    merge_now,
                )?;
            }
            save_channel(connection, &mut channel, true)?;
            let id = channel.id();
            let now = now_ms() as i64;
            for info in &invited {
                crate::store::cached::execute(
                    connection,
                    "INSERT OR REPLACE INTO invited (channel, device, party, invited_ms)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![&id.0[..], &info.key.0[..], &info.party, now],
                )?;
            }
            set_relays(connection, &id, relays)?;
            cache.channels.insert(id, channel);
            Ok(id)
        })
    }

    /// Joins a channel from a Welcome, checking every member against verified contacts.
    pub fn join(&mut self, welcome: &[u8]) -> Result<(ChannelId, String), StoreError> {
        self.join_at(welcome, &[], None)
    }

    /// Joins from a Welcome, records the channel's relays, and advances `cursor` in the
    /// same transaction.
    pub fn join_at(
        &mut self,
        welcome: &[u8],
        relays: &[String],
        cursor: Option<Cursor<'_>>,
    ) -> Result<(ChannelId, String), StoreError> {
        let contacts = self.contacts()?;
        // The same Welcome arrives through every relay of the invitee's card.
        let hash: [u8; 32] = Sha256::digest(welcome).into();
        self.transact(|connection, identity, cache| {
            if let Some(cursor) = cursor {
                advance(connection, cursor)?;
            }
            let seen = crate::store::cached::execute(
                connection,
                "INSERT OR IGNORE INTO processed (channel, hash) VALUES (?1, ?2)",
                params![&WELCOMES[..], &hash[..]],
            )?;
            if seen == 0 {
                return Err(StoreError::DuplicateWelcome);
            }
            let provider = Provider::new(connection);
            let mut channel = Channel::join_with(&provider, identity, welcome, &contacts, |id| {
                SqliteTranscript::boxed(Rc::clone(connection), id.0)
            })?;
            if channel_row(connection, channel.name())?.is_some() {
                return Err(StoreError::ChannelExists(channel.name().to_owned()));
            }
            save_channel(connection, &mut channel, true)?;
            set_relays(connection, &channel.id(), relays)?;
            let joined = (channel.id(), channel.name().to_owned());
            cache.channels.insert(joined.0, channel);
            Ok(joined)
        })
    }

    /// The name of a channel on this device.
    pub(crate) fn channel_name(&self, id: &ChannelId) -> Result<String, StoreError> {
        Ok(crate::store::cached::query_row(
            &self.connection,
            "SELECT name FROM channels WHERE id = ?1",
            [&id.0[..]],
            |row| row.get(0),
        )?)
    }

    pub(crate) fn has_channel(&self, id: &ChannelId) -> Result<bool, StoreError> {
        Ok(self
            .connection
            .query_row("SELECT 1 FROM channels WHERE id = ?1", [&id.0[..]], |_| {
                Ok(())
            })
            .optional()?
            .is_some())
    }

    /// Channels this device is in.
    pub fn channels(&mut self) -> Result<Vec<ChannelSummary>, StoreError> {
        // Through the cache: a channel loaded once is not restored (with its whole
        // transcript) again while no other process wrote.
        self.transact(|connection, _, cache| {
            let ids: Vec<Vec<u8>> = connection
                .prepare_cached("SELECT id FROM channels ORDER BY name")?
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            let provider = Provider::new(connection);
            let mut summaries = Vec::with_capacity(ids.len());
            for id in ids {
                let id = ChannelId(
                    id.try_into()
                        .map_err(|_| StoreError::Corrupt("channel id is not 32 bytes".into()))?,
                );
                let channel = checkout(cache, connection, &provider, &id)?;
                let settled = channel.transcript().settled_len();
                // Invited devices of which the transcript holds nothing yet.
                let heads = channel.transcript().heads();
                let mut statement = connection.prepare_cached(
                    "SELECT device, party, invited_ms FROM invited WHERE channel = ?1",
                )?;
                let not_joined = statement
                    .query_map([&id.0[..]], |row| {
                        Ok((
                            row.get::<_, Vec<u8>>(0)?,
                            row.get(1)?,
                            row.get::<_, i64>(2)?,
                        ))
                    })?
                    .collect::<Result<Vec<(Vec<u8>, String, i64)>, _>>()?
                    .into_iter()
                    .filter_map(|(device, party, invited_ms)| {
                        let key = DeviceKey(device.try_into().ok()?);
                        let member = channel.members().iter().any(|m| m.key == key);
                        (member && !heads.contains_key(&key)).then_some(Invited {
                            device: key,
                            party,
                            invited_ms: invited_ms.max(0) as u64,
                        })
                    })
                    .collect();
                let (settled_root, _) = channel.transcript().settled_root(settled)?;
                summaries.push(ChannelSummary {
                    id: channel.id(),
                    name: channel.name().to_owned(),
                    members: channel.members(),
                    epoch: channel.epoch(),
                    horizon: channel.transcript().horizon(),
                    envelopes: channel.transcript().len(),
                    committer: channel.is_committer(),
                    settled,
                    settled_root,
                    not_joined,
                });
                cache.channels.insert(id, channel);
            }
            Ok(summaries)
        })
    }

    /// Removes every device of `party` from the channel (committer only). With relays,
    /// the removal takes effect when a relay accepted the commit.
    pub fn remove_party(
        &mut self,
        channel: &str,
        party: &str,
    ) -> Result<Vec<DeviceKey>, StoreError> {
        self.transact(|connection, identity, cache| {
            let provider = Provider::new(connection);
            let channel_id = channel_id_by_name(connection, channel)?;
            let mut loaded = checkout(cache, connection, &provider, &channel_id)?;
            let devices: Vec<DeviceKey> = loaded
                .members()
                .into_iter()
                .filter(|member| member.party == party)
                .map(|member| member.key)
                .collect();
            if devices.is_empty() {
                return Err(StoreError::NotInChannel(party.to_owned()));
            }
            let commit = loaded.remove(&provider, identity, &devices)?;
            let merge_now = channel_relays(connection, &channel_id)?.is_empty();
            stage_commit(
                connection,
                &provider,
                identity,
                &mut loaded,
                commit,
                merge_now,
            )?;
            save_channel(connection, &mut loaded, false)?;
            cache.channels.insert(channel_id, loaded);
            Ok(devices)
        })
    }

    /// Refreshes this device's keys in the channel: the committer commits at once, any
    /// other device proposes it for the committer to commit. Returns whether it was a
    /// commit.
    pub fn update_keys(&mut self, channel: &str) -> Result<bool, StoreError> {
        self.transact(|connection, identity, cache| {
            let provider = Provider::new(connection);
            let channel_id = channel_id_by_name(connection, channel)?;
            let mut loaded = checkout(cache, connection, &provider, &channel_id)?;
            let committer = loaded.is_committer();
            let outgoing = loaded.update_keys(&provider, identity)?;
            if committer {
                let merge_now = channel_relays(connection, &channel_id)?.is_empty();
                stage_commit(
                    connection,
                    &provider,
                    identity,
                    &mut loaded,
                    outgoing,
                    merge_now,
                )?;
            } else {
                queue(connection, Some(channel_id), outgoing, None)?;
            }
            save_channel(connection, &mut loaded, false)?;
            cache.channels.insert(channel_id, loaded);
            Ok(committer)
        })
    }

    /// A relay durably accepted this device's pending commit of `channel`: merge it and
    /// queue what it releases (the Welcome, membership notes), in one transaction.
    /// Returns whether a commit was merged.
    pub fn commit_relayed(&mut self, channel_id: &ChannelId) -> Result<bool, StoreError> {
        self.transact(|connection, identity, cache| {
            let provider = Provider::new(connection);
            let mut channel = checkout(cache, connection, &provider, channel_id)?;
            if !channel.has_pending_commit() {
                cache.channels.insert(*channel_id, channel);
                return Ok(false);
            }
            for out in channel.commit_accepted(&provider, identity, now_ms())? {
                queue_released(connection, &channel, out)?;
            }
            save_channel(connection, &mut channel, false)?;
            cache.channels.insert(*channel_id, channel);
            Ok(true)
        })
    }

    /// The id of a channel named `name` (or given by its hex id).
    pub fn channel_id(&self, name: &str) -> Result<ChannelId, StoreError> {
        channel_id_by_name(&self.connection, name)
    }
}
