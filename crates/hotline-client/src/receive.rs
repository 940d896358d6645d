//! Receiving: one message processed, with everything it changes, in one transaction
//! with its relay cursor (the core's events; the copy placed for the per-relay order
//! check; link-test frames answered or recorded; parties heard; receipts owed), and
//! bundles imported.

use hotline_core::channel::channel_of_message;
use hotline_core::{ChannelError, ChannelId, Event};

use crate::bundle::Entry;
use crate::provider::Provider;
use crate::store::{
    Cursor, Store, StoreError, advance, channel_relays, check_order, checkout, copy_hash,
    failpoint, follow_relay_changes, is_known_frame, is_processed, keep_receipt, now_ms,
    place_copies, relay_of, remember_frame, save_channel, stage_commit,
};

impl Store {
    /// Processes one message from a bundle in one transaction.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Vec<Event>, StoreError> {
        self.receive_at(bytes, None)
    }

    /// Processes one message and advances the relay cursor it came from, in one
    /// transaction: a crash never skips a message or processes it twice.
    pub fn receive_at(
        &mut self,
        bytes: &[u8],
        cursor: Option<Cursor<'_>>,
    ) -> Result<Vec<Event>, StoreError> {
        let channel_id = channel_of_message(bytes)?;
        if let Some(events) = self.receive_processed(&channel_id, bytes, cursor)? {
            return Ok(events);
        }
        self.transact(|connection, identity, cache| {
            if let Some(cursor) = cursor {
                advance(connection, cursor)?;
            }
            // A link-test frame this device sent or opened: a relay's echo, or a replay.
            let hash = copy_hash(bytes);
            if let Some(Cursor {
                relay,
                receipt: Some(receipt),
                ..
            }) = cursor
            {
                keep_receipt(connection, relay, &hash, receipt)?;
            }
            if is_known_frame(connection, &hash)? {
                return Ok(vec![Event::Duplicate]);
            }
            let provider = Provider::new(connection);
            let mut channel = checkout(cache, connection, &provider, &channel_id)?;
            failpoint("receive-loaded")?;
            let events = channel.receive(&provider, bytes)?;
            failpoint("receive-processed")?;
            let relay = relay_of(&cursor);
            place_copies(connection, &channel, &events, &hash, relay)?;
            if events == [Event::Duplicate] {
                // Nothing else changed: keep the channel.
                cache.channels.insert(channel_id, channel);
                return Ok(events);
            }
            let now = now_ms();
            // Frames (and malformed ones) are opened without being marked processed in the
            // transcript: remember each one opened now, these bytes or ones held for their
            // epoch, so that its copy through another relay is a duplicate, not an MLS
            // failure blamed on that relay.
            let mut opened: Vec<[u8; 32]> = events
                .iter()
                .filter_map(|event| match event {
                    Event::Unbuffered { hash, .. } => Some(*hash),
                    _ => None,
                })
                .collect();
            if !channel.holds_buffered(&hash) {
                opened.push(hash);
            }
            for opened in &opened {
                if !channel.transcript().is_processed(opened)? {
                    remember_frame(connection, opened, now)?;
                }
            }
            crate::link::on_frames(
                connection,
                &provider,
                identity,
                &mut channel,
                &events,
                &hash,
                relay,
                now,
            )?;
            crate::line::note_arrivals(connection, &channel, &identity.key(), &events, now)?;
            if channel.is_committer()
                && channel.hold().is_none()
                && channel.has_pending_proposals()
                && !channel.has_pending_commit()
                && let Some(commit) = channel.commit_proposals(&provider, identity)?
            {
                let merge_now = channel_relays(connection, &channel_id)?.is_empty();
                stage_commit(
                    connection,
                    &provider,
                    identity,
                    &mut channel,
                    commit,
                    merge_now,
                )?;
            }
            follow_relay_changes(connection, &channel, &events)?;
            failpoint("receive-before-save")?;
            save_channel(connection, &mut channel, false)?;
            failpoint("receive-saved")?;
            cache.channels.insert(channel_id, channel);
            Ok(events)
        })
    }

    /// A copy of bytes the channel already processed (this device's own message coming
    /// back from a relay, the same message through one more relay): the cursor moves
    /// and the copy is placed in its sender's order at that relay, as
    /// [`Store::receive_at`] would, without loading the channel, and without waiting for
    /// the disk (lost in a power failure, the copy is only read again). `None` when the
    /// bytes are new here.
    fn receive_processed(
        &mut self,
        channel: &ChannelId,
        bytes: &[u8],
        cursor: Option<Cursor<'_>>,
    ) -> Result<Option<Vec<Event>>, StoreError> {
        let hash = copy_hash(bytes);
        // Read first: a new message takes no transaction more.
        if !is_processed(self.connection(), channel, &hash)? {
            return Ok(None);
        }
        self.transact_deferred(|connection, _, _| {
            if !is_processed(connection, channel, &hash)? {
                return Ok(None);
            }
            if let Some(cursor) = cursor {
                advance(connection, cursor)?;
                if let Some(receipt) = cursor.receipt {
                    keep_receipt(connection, cursor.relay, &hash, receipt)?;
                }
                check_order(connection, cursor.relay, &hash)?;
            }
            Ok(Some(vec![Event::Duplicate]))
        })
    }

    /// Imports a bundle: joins from Welcomes addressed to this device, receives the
    /// rest. Returns how many messages were new.
    pub fn import_bundle(&mut self, entries: Vec<Entry>) -> Result<usize, StoreError> {
        let me = self.identity().key();
        let mut new = 0;
        for entry in entries {
            match entry {
                Entry::Welcome { to, bytes } if to.contains(&me) => match self.join(&bytes) {
                    Ok(_) => new += 1,
                    Err(StoreError::ChannelExists(_) | StoreError::DuplicateWelcome) => {}
                    Err(error) => return Err(error),
                },
                Entry::Welcome { .. } => {}
                Entry::Message(bytes) => {
                    let channel = channel_of_message(&bytes)?;
                    if !self.has_channel(&channel)? {
                        continue;
                    }
                    match self.receive(&bytes) {
                        Ok(events) if events != [Event::Duplicate] => new += 1,
                        Ok(_) => {}
                        // Messages of an epoch this device cannot read (before it joined,
                        // after it left) are not an error of the bundle.
                        Err(StoreError::Channel(
                            ChannelError::Mls(_) | ChannelError::NotAMember,
                        )) => {}
                        Err(error) => return Err(error),
                    }
                }
            }
        }
        Ok(new)
    }
}
