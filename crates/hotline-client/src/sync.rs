//! The sync engine: push the outbox to every relay, pick up invitations, pull every
//! channel from every relay, each message processed and its cursor advanced in one
//! transaction.
//!
//! ```text
//!   register membership (committer) ─► post outbox rows (per relay, marked when durable)
//!   ─► inbox: join from invitations ─► pull channels after cursor ─► receive + cursor (1 txn)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use hotline_core::{ChannelError, DeviceIdentity, Event};
use hotline_relay::client::{ClientError, RelayClient};
use hotline_relay::storage::Membership;

use crate::Store;
use crate::bundle;
use crate::store::{Cursor, StoreError};

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Messages (and invitations) a relay newly stored durably.
    pub pushed: usize,
    /// Messages that entered a transcript or changed the channel.
    pub received: usize,
    /// Channels joined from invitations.
    pub joined: Vec<String>,
    /// Per relay: `None` if reachable and content, else the last error.
    pub relays: BTreeMap<String, Option<String>>,
    /// Messages or invitations refused, with why.
    pub refused: Vec<String>,
}

impl SyncReport {
    /// Whether at least one relay answered (or there is none to ask).
    pub fn any_relay_reachable(&self) -> bool {
        self.relays.is_empty()
            || self
                .relays
                .values()
                .any(|e| e.as_ref().is_none_or(|e| !e.contains("unreachable")))
    }
}

struct Relays {
    clients: HashMap<String, Result<RelayClient, String>>,
}

impl Relays {
    fn get(&mut self, url: &str) -> Result<RelayClient, String> {
        self.clients
            .entry(url.to_owned())
            .or_insert_with(|| RelayClient::new(url).map_err(|e| e.to_string()))
            .clone()
    }
}

fn note(report: &mut SyncReport, url: &str, result: Result<(), ClientError>) -> bool {
    let entry = report.relays.entry(url.to_owned()).or_insert(None);
    match result {
        Ok(()) => true,
        Err(error) => {
            *entry = Some(error.to_string());
            false
        }
    }
}

/// Runs one round of sync. Network trouble is reported per relay, not returned.
pub async fn sync_once(store: &mut Store) -> Result<SyncReport, StoreError> {
    let identity = DeviceIdentity::from_secret_bytes(&store.identity().to_secret_bytes())
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let mut relays = Relays {
        clients: HashMap::new(),
    };
    let mut report = SyncReport::default();
    push_with(store, &identity, &mut relays, &mut report).await?;
    // 3. Invitations in this device's inboxes.
    for url in store.own_relays()? {
        let Ok(client) = relays.get(&url) else {
            continue;
        };
        loop {
            let after = store.cursor(&url, "inbox")?;
            let fetched = client.fetch_inbox(&identity, after, Duration::ZERO).await;
            let messages = match fetched {
                Ok(messages) => messages,
                Err(error) => {
                    note(&mut report, &url, Err(error));
                    break;
                }
            };
            if messages.is_empty() {
                break;
            }
            for (seq, bytes) in messages {
                let cursor = Cursor {
                    relay: &url,
                    log: "inbox",
                    seq,
                };
                let joined = match bundle::decode_invitation(&bytes) {
                    Ok((channel_relays, welcome)) => {
                        store.join_at(&welcome, &channel_relays, Some(cursor))
                    }
                    Err(error) => Err(StoreError::Corrupt(format!("invitation: {error}"))),
                };
                match joined {
                    Ok((_, name)) => report.joined.push(name),
                    Err(StoreError::Database(error)) => return Err(StoreError::Database(error)),
                    Err(error) => {
                        report
                            .refused
                            .push(format!("invitation {seq} from {url}: {error}"));
                        store.skip_to(cursor)?;
                    }
                }
            }
        }
    }

    // 4. Pull every channel from every relay, in order, after its cursor.
    for plan in store.relay_plan()? {
        let log = plan.channel.to_string();
        for (url, _) in &plan.relays {
            let Ok(client) = relays.get(url) else {
                continue;
            };
            let start = store.cursor(url, &log)?;
            loop {
                let after = store.cursor(url, &log)?;
                let messages = match client
                    .fetch(&identity, &plan.channel.0, after, Duration::ZERO)
                    .await
                {
                    Ok(messages) => messages,
                    Err(error) => {
                        note(&mut report, url, Err(error));
                        break;
                    }
                };
                if messages.is_empty() {
                    break;
                }
                for (seq, bytes) in messages {
                    let cursor = Cursor {
                        relay: url,
                        log: &log,
                        seq,
                    };
                    match store.receive_at(&bytes, Some(cursor)) {
                        // The cursor moved with the (empty) transaction.
                        Ok(events) if events == [Event::Duplicate] => {}
                        Ok(_) => report.received += 1,
                        Err(StoreError::Database(error)) => {
                            return Err(StoreError::Database(error));
                        }
                        // Before this device joined, or refused: reported, and passed.
                        Err(StoreError::Channel(
                            ChannelError::Mls(_) | ChannelError::NotAMember,
                        )) => store.skip_to(cursor)?,
                        Err(error) => {
                            report
                                .refused
                                .push(format!("message {seq} from {url}: {error}"));
                            store.skip_to(cursor)?;
                        }
                    }
                }
            }
            // The relay may delete what every member committed.
            let reached = store.cursor(url, &log)?;
            if reached > start {
                let acked = client.ack(&identity, &plan.channel.0, reached).await;
                note(&mut report, url, acked);
            }
        }
    }
    Ok(report)
}

/// Registers memberships and pushes the outbox only: what `send` does at once.
pub async fn push_once(store: &mut Store) -> Result<SyncReport, StoreError> {
    let identity = DeviceIdentity::from_secret_bytes(&store.identity().to_secret_bytes())
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let mut relays = Relays {
        clients: HashMap::new(),
    };
    let mut report = SyncReport::default();
    push_with(store, &identity, &mut relays, &mut report).await?;
    Ok(report)
}

async fn push_with(
    store: &mut Store,
    identity: &DeviceIdentity,
    relays: &mut Relays,
    report: &mut SyncReport,
) -> Result<(), StoreError> {
    // 1. The committer registers each channel's membership where it is out of date.
    for plan in store.relay_plan()? {
        for (url, registered) in &plan.relays {
            report.relays.entry(url.clone()).or_insert(None);
            if !plan.committer || *registered >= plan.epoch {
                continue;
            }
            let client = match relays.get(url) {
                Ok(client) => client,
                Err(error) => {
                    report.relays.insert(url.clone(), Some(error));
                    continue;
                }
            };
            let membership = Membership {
                committer: identity.key().0,
                version: plan.epoch,
                members: plan.members.clone(),
            };
            match client
                .register(identity, &plan.channel.0, &membership)
                .await
            {
                Ok(()) | Err(ClientError::Refused { status: 409, .. }) => {
                    store.mark_registered(&plan.channel, url, plan.epoch)?
                }
                Err(error) => {
                    note(report, url, Err(error));
                }
            }
        }
    }

    // 2. Push every outbox row to every relay that does not hold it yet.
    for item in store.outbox()? {
        let targets: Vec<(String, String, Option<[u8; 32]>)> = if item.welcome {
            let channel_relays = match item.channel {
                Some(channel) => store.channel_relays(&channel)?,
                None => Vec::new(),
            };
            let mut targets = Vec::new();
            for recipient in &item.recipients {
                for url in store.contact_relays(recipient)? {
                    targets.push((format!("inbox:{recipient}@{url}"), url, Some(recipient.0)));
                }
            }
            let invitation = bundle::encode_invitation(&channel_relays, &item.bytes);
            for (mark, url, recipient) in targets {
                if item.posted.contains(&mark) {
                    continue;
                }
                let Some(recipient) = recipient else { continue };
                let client = match relays.get(&url) {
                    Ok(client) => client,
                    Err(error) => {
                        report.relays.insert(url, Some(error));
                        continue;
                    }
                };
                let posted = client
                    .post_inbox(identity, &recipient, invitation.clone())
                    .await;
                if note(report, &url, posted.map(|_| ())) {
                    store.mark_posted(item.seq, &mark)?;
                    report.pushed += 1;
                }
            }
            continue;
        } else {
            match item.channel {
                Some(channel) => store
                    .channel_relays(&channel)?
                    .into_iter()
                    .map(|url| (url.clone(), url, Some(channel.0)))
                    .collect(),
                None => Vec::new(),
            }
        };
        for (mark, url, channel) in targets {
            let Some(channel) = channel else { continue };
            if item.posted.contains(&mark) {
                continue;
            }
            let client = match relays.get(&url) {
                Ok(client) => client,
                Err(error) => {
                    report.relays.insert(url, Some(error));
                    continue;
                }
            };
            let posted = client.post(identity, &channel, item.bytes.clone()).await;
            if note(report, &url, posted.map(|_| ())) {
                store.mark_posted(item.seq, &mark)?;
                report.pushed += 1;
            }
        }
    }

    Ok(())
}
