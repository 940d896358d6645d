//! The sync engine: push the outbox to every relay, pick up invitations, pull every
//! channel from every relay, each message processed and its cursor advanced in one
//! transaction.
//!
//! ```text
//!   register membership (committer) ─► post outbox rows (per relay, marked when durable)
//!   ─► inbox: join from invitations ─► pull channels after cursor ─► receive + cursor (1 txn)
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use hotline_core::channel::{channel_of_message, epoch_of_message};
use hotline_core::{ChannelError, ChannelId, DeviceIdentity, Event};
use hotline_proto::capability::Capability;
use hotline_proto::client::{ClientError, RelayClient};
use hotline_proto::custody;
use hotline_proto::stream::StreamClient;
use hotline_proto::{Log, Membership, Stored};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::Store;
use crate::bundle;
use crate::clock::Clock;
use crate::line::LineEvent;
use crate::link::OutgoingFrame;
use crate::stock::{Claimed, STOCK_BATCH, STOCK_LOW};
use crate::store::OutboxItem;
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
    /// Undelivered messages offered to the relays again.
    pub reoffered: usize,
    /// Link-test frames opened (probes and answers: never in a transcript).
    pub link_tests: usize,
    /// What arrived, for scripts: messages, deliveries, reads.
    pub events: Vec<LineEvent>,
    /// Alarms raised in this round: (kind, relay, detail).
    pub alarms: Vec<(String, String, String)>,
    /// Relays whose rotated key this device verified and follows from now on.
    pub rotated: Vec<String>,
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
    /// While following: one task per relay posts its link-test frames.
    posters: Option<Posters>,
    /// While following: one stream connection per relay, over which channels' messages
    /// are pushed (see [`StreamSlot`]).
    streams: HashMap<String, Arc<StreamSlot>>,
    /// Relays that asked to be left alone (429 with `Retry-After`), until when: nothing
    /// is pushed to them before.
    quiet: HashMap<String, tokio::time::Instant>,
}

/// A relay's stream connection while following, opened on first use and again after
/// it ended. A relay that cannot be reached over the stream protocol (down, or one
/// that speaks only the one-shot routes) is read with long polls instead, and tried
/// again after [`STREAM_RETRY`].
struct StreamSlot {
    url: String,
    identity: Arc<DeviceIdentity>,
    state: tokio::sync::Mutex<(Option<StreamClient>, Option<tokio::time::Instant>)>,
}

/// How long a relay whose stream could not be opened is read with long polls.
const STREAM_RETRY: Duration = Duration::from_secs(10);

impl StreamSlot {
    /// The open stream, opening it if needed; `None` to fall back to a long poll.
    async fn client(&self) -> Option<StreamClient> {
        let mut state = self.state.lock().await;
        if let Some(client) = &state.0
            && !client.is_closed()
        {
            return Some(client.clone());
        }
        if state
            .1
            .is_some_and(|failed| failed.elapsed() < STREAM_RETRY)
        {
            return None;
        }
        match StreamClient::connect(&self.url, &self.identity).await {
            Ok(client) => {
                *state = (Some(client.clone()), None);
                Some(client)
            }
            Err(_) => {
                *state = (None, Some(tokio::time::Instant::now()));
                None
            }
        }
    }
}

struct Posters {
    identity: Arc<DeviceIdentity>,
    senders: HashMap<String, mpsc::Sender<OutgoingFrame>>,
}

/// Frames waiting for one relay's poster; more are dropped (a link test that failed).
const FRAME_QUEUE: usize = 16;
/// How long one frame may take to post.
const FRAME_POST_TIMEOUT: Duration = Duration::from_secs(5);

impl Relays {
    /// The stream slot of `watch`'s relay, for a channel's messages while following.
    fn stream_for(&mut self, watch: &Watch) -> Option<Arc<StreamSlot>> {
        match watch {
            Watch::Channel { url, .. } => self.stream_to(url),
            _ => None,
        }
    }

    /// The stream slot of the relay at `url`, while following (channel messages are
    /// then appended over it).
    fn stream_to(&mut self, url: &str) -> Option<Arc<StreamSlot>> {
        let posters = self.posters.as_ref()?;
        let identity = Arc::clone(&posters.identity);
        Some(Arc::clone(
            self.streams.entry(url.to_owned()).or_insert_with(|| {
                Arc::new(StreamSlot {
                    url: url.to_owned(),
                    identity,
                    state: tokio::sync::Mutex::new((None, None)),
                })
            }),
        ))
    }

    /// Remembers how long the relay at `url` asked to be left alone, if it did.
    fn heed(&mut self, url: &str, error: &ClientError) {
        if let Some(after) = error.retry_after() {
            self.quiet
                .insert(url.to_owned(), tokio::time::Instant::now() + after);
        }
    }

    /// The relays still asking to be left alone, with how much longer.
    fn quiet(&mut self) -> Vec<(String, Duration)> {
        let now = tokio::time::Instant::now();
        self.quiet.retain(|_, until| *until > now);
        self.quiet
            .iter()
            .map(|(url, until)| (url.clone(), until.duration_since(now)))
            .collect()
    }

    fn get(&mut self, url: &str) -> Result<RelayClient, String> {
        self.clients
            .entry(url.to_owned())
            .or_insert_with(|| RelayClient::new(url).map_err(|e| e.to_string()))
            .clone()
    }

    /// Drops what is open to `url` (its relay's key changed): the next use opens anew.
    fn forget(&mut self, url: &str) {
        self.clients.remove(url);
        self.streams.remove(url);
        if let Some(posters) = self.posters.as_mut() {
            posters.senders.remove(url);
        }
    }
}

/// A relay that presents a key its address does not pin may have rotated it: its
/// statements (each signed by the key before it, from the pinned one) are read and
/// followed, and the relay is used with its new key from then on. One that cannot show
/// such statements keeps failing, with why (5 s at most each).
async fn follow_rotations(
    store: &mut Store,
    relays: &mut Relays,
    report: &mut SyncReport,
) -> Result<(), StoreError> {
    let stranded: Vec<String> = report
        .relays
        .iter()
        .filter(|(_, error)| {
            error
                .as_deref()
                .is_some_and(|e| e.contains(hotline_proto::tls::PIN_MISMATCH))
        })
        .map(|(url, _)| url.clone())
        .collect();
    for url in stranded {
        let probe = hotline_proto::client::follow_rotation(&url);
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(followed)) => {
                store.follow_rotation(&followed)?;
                relays.forget(&url);
                report.rotated.push(url);
            }
            Ok(Err(error)) => {
                report.relays.insert(url, Some(error.to_string()));
            }
            Err(_) => {}
        }
    }
    Ok(())
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
    Session::new(store)?.sync(store).await
}

/// Registers memberships and pushes the outbox only: what `send` does at once.
pub async fn push_once(store: &mut Store) -> Result<SyncReport, StoreError> {
    Session::new(store)?.push(store).await
}

/// A device's clients of its relays, kept between rounds so that their TLS connections
/// are reused.
pub struct Session {
    identity: Arc<DeviceIdentity>,
    relays: Relays,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("device", &self.identity.key())
            .field("relays", &self.relays.clients.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Session {
    pub fn new(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            identity: Arc::new(identity_of(store)?),
            relays: Relays {
                clients: HashMap::new(),
                posters: None,
                streams: HashMap::new(),
                quiet: HashMap::new(),
            },
        })
    }

    /// One round: push, then pull everything.
    pub async fn sync(&mut self, store: &mut Store) -> Result<SyncReport, StoreError> {
        sync_with(store, &self.identity, &mut self.relays).await
    }

    /// Registers memberships and pushes the outbox.
    pub async fn push(&mut self, store: &mut Store) -> Result<SyncReport, StoreError> {
        let mut report = SyncReport::default();
        push_with(store, &self.identity, &mut self.relays, &mut report).await?;
        Ok(report)
    }
}

fn identity_of(store: &Store) -> Result<DeviceIdentity, StoreError> {
    DeviceIdentity::from_secret_bytes(&store.identity().to_secret_bytes())
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

async fn sync_with(
    store: &mut Store,
    identity: &DeviceIdentity,
    relays: &mut Relays,
) -> Result<SyncReport, StoreError> {
    let mut report = SyncReport::default();
    push_with(store, identity, relays, &mut report).await?;
    reoffer(store, identity, relays, &mut report).await?;
    escalate(store, identity, relays, &mut report).await?;
    // 3. Invitations in this device's inboxes; 4. every channel (joined ones included)
    // from every relay, in order, after its cursor.
    let inboxes: Vec<Watch> = store
        .own_relays()?
        .into_iter()
        .map(|url| Watch::Inbox { url })
        .collect();
    for watch in inboxes {
        pull(store, identity, relays, &watch, &mut report).await?;
    }
    for watch in channel_watches(store)? {
        pull(store, identity, relays, &watch, &mut report).await?;
    }
    // Receipts for what arrived, and the link tests that are due (after the pulls, so
    // that a record sealed now counts the answers they brought), go out at once.
    store.send_receipts()?;
    store.send_due_probes()?;
    store.cosign_due(store.now())?;
    push_with(store, identity, relays, &mut report).await?;
    follow_rotations(store, relays, &mut report).await?;
    if !report.rotated.is_empty() {
        // Relays followed to their new key: this round's work with them, again.
        for url in &report.rotated {
            report.relays.remove(url);
        }
        push_with(store, identity, relays, &mut report).await?;
        for watch in watches(store)? {
            if report.rotated.iter().any(|url| url == watch.url()) {
                pull(store, identity, relays, &watch, &mut report).await?;
            }
        }
    }
    note_health(store, &report)?;
    restock(store, identity, relays).await?;
    Ok(report)
}

/// Keeps fresh one-time key packages on this device's inbox relays (see `stock`): each
/// relay due for a check is asked its stock, and given [`STOCK_BATCH`] fresh packages
/// when it holds fewer than [`STOCK_LOW`]. A relay that fails is asked again at the next
/// check (5 s at most each: a hung relay does not hold up the round); inviters then
/// fall back to the card.
async fn restock(
    store: &mut Store,
    identity: &DeviceIdentity,
    relays: &mut Relays,
) -> Result<(), StoreError> {
    for url in store.stock_due()? {
        let Ok(client) = relays.get(&url) else {
            continue;
        };
        let limit = Duration::from_secs(5);
        let stock = match tokio::time::timeout(limit, client.key_package_stock(identity)).await {
            Ok(Ok(stock)) if stock >= STOCK_LOW => stock,
            Ok(Ok(stock)) => {
                let packages = store.fresh_key_packages(STOCK_BATCH)?;
                match tokio::time::timeout(limit, client.stock_key_packages(identity, &packages))
                    .await
                {
                    Ok(Ok(stock)) => stock,
                    _ => stock,
                }
            }
            _ => 0,
        };
        store.note_stock(&url, stock)?;
    }
    store.forget_old_key_packages()?;
    Ok(())
}

/// Claims one fresh key package of each device of `parties` from its inbox relays (the
/// first relay that has one; 3 s at most each), for [`Store::create_channel_with`].
/// Devices without one are left out: their card's packages serve.
pub async fn claim_key_packages(
    store: &mut Store,
    parties: &[String],
) -> Result<Claimed, StoreError> {
    let identity = identity_of(store)?;
    let mut claimed = Claimed::new();
    for (device, urls, capability) in store.invitees(parties)? {
        for url in urls {
            let Ok(client) = RelayClient::new(&url) else {
                continue;
            };
            let claim = client.claim_key_package(&identity, &device, &capability);
            if let Ok(Ok(Some(bytes))) = tokio::time::timeout(Duration::from_secs(3), claim).await {
                claimed.insert(device, bytes);
                break;
            }
        }
    }
    Ok(claimed)
}

/// Offers again, to every relay of its channel, each message of this device that some
/// party has still not received after the undelivered threshold: a relay that lost it
/// gets it back (one that holds it answers "duplicate" and changes nothing).
async fn reoffer(
    store: &mut Store,
    identity: &DeviceIdentity,
    relays: &mut Relays,
    report: &mut SyncReport,
) -> Result<(), StoreError> {
    let after = store.undelivered_after()?;
    let now = store.now();
    let due = store.reoffer_due(now, after)?;
    offer_again(store, identity, relays, report, due).await
}

/// Escalates this device's messages that a party had not read by their deadline
/// ([`Store::escalate_due`]): each message is offered again on every relay, and the
/// signed non-response statements wait in the outbox for the next push.
async fn escalate(
    store: &mut Store,
    identity: &DeviceIdentity,
    relays: &mut Relays,
    report: &mut SyncReport,
) -> Result<usize, StoreError> {
    let (made, due) = store.escalate_due(store.now())?;
    let count = made.len();
    report
        .events
        .extend(made.into_iter().map(LineEvent::Escalated));
    offer_again(store, identity, relays, report, due).await?;
    Ok(count)
}

/// Posts messages sealed again to every relay of their channel.
async fn offer_again(
    store: &mut Store,
    identity: &DeviceIdentity,
    relays: &mut Relays,
    report: &mut SyncReport,
    due: Vec<OutboxItem>,
) -> Result<(), StoreError> {
    let mut failed: HashSet<String> = HashSet::new();
    for item in due {
        let Some(channel) = item.channel else {
            continue;
        };
        for url in store.channel_relays(&channel)? {
            if failed.contains(&url) {
                continue;
            }
            let Ok(client) = relays.get(&url) else {
                continue;
            };
            let posted = client.post(identity, &channel.0, item.bytes.clone()).await;
            if note(report, &url, posted.map(|_| ())) {
                report.reoffered += 1;
            } else {
                failed.insert(url);
            }
        }
    }
    Ok(())
}

/// Records, per relay, whether it answered in this round.
fn note_health(store: &mut Store, report: &SyncReport) -> Result<(), StoreError> {
    for (url, error) in &report.relays {
        store.note_relay(url, error.as_deref())?;
    }
    Ok(())
}

/// Pulls one log to its end and acknowledges what was committed.
async fn pull(
    store: &mut Store,
    identity: &DeviceIdentity,
    relays: &mut Relays,
    watch: &Watch,
    report: &mut SyncReport,
) -> Result<(), StoreError> {
    let Ok(client) = relays.get(watch.url()) else {
        return Ok(());
    };
    let start = store.cursor(watch.url(), &watch.log())?;
    let reached_end = loop {
        let after = store.cursor(watch.url(), &watch.log())?;
        match watch.fetch(&client, identity, after, Duration::ZERO).await {
            Ok(messages) if messages.is_empty() => break true,
            Ok(messages) => {
                apply(store, watch, messages, report)?;
                if store.cursor(watch.url(), &watch.log())? == after {
                    // Nothing passed the cursor (a relay serving what it served before):
                    // asking again would only get the same.
                    break true;
                }
            }
            Err(error) => {
                note(report, watch.url(), Err(error));
                break false;
            }
        }
    };
    if let (true, Watch::Channel { url, channel }) = (reached_end, watch) {
        store.caught_up(channel, url)?;
    }
    acknowledge(store, watch, &client, identity, start, report).await
}

/// One log on one relay that this device reads: a channel, or its own inbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Watch {
    Inbox { url: String },
    Channel { url: String, channel: ChannelId },
}

impl Watch {
    fn url(&self) -> &str {
        match self {
            Watch::Inbox { url } | Watch::Channel { url, .. } => url,
        }
    }

    /// The cursor's name in the store.
    fn log(&self) -> String {
        match self {
            Watch::Inbox { .. } => "inbox".to_owned(),
            Watch::Channel { channel, .. } => channel.to_string(),
        }
    }

    async fn fetch(
        &self,
        client: &RelayClient,
        identity: &DeviceIdentity,
        after: u64,
        wait: Duration,
    ) -> Result<Vec<Stored>, ClientError> {
        match self {
            Watch::Inbox { .. } => client.fetch_inbox(identity, after, wait).await,
            Watch::Channel { channel, .. } => client.fetch(identity, &channel.0, after, wait).await,
        }
    }
}

/// Every log this device reads: its inboxes first (a Welcome before its channel).
fn watches(store: &mut Store) -> Result<Vec<Watch>, StoreError> {
    let mut watches: Vec<Watch> = store
        .own_relays()?
        .into_iter()
        .map(|url| Watch::Inbox { url })
        .collect();
    watches.extend(channel_watches(store)?);
    Ok(watches)
}

fn channel_watches(store: &mut Store) -> Result<Vec<Watch>, StoreError> {
    let mut watches = Vec::new();
    for plan in store.relay_plan()? {
        for (url, _) in plan.relays {
            watches.push(Watch::Channel {
                url,
                channel: plan.channel,
            });
        }
    }
    Ok(watches)
}

/// Processes fetched messages in order, each in one transaction with its cursor.
/// Messages at or behind the stored cursor (a stale long-poll) are passed over.
fn apply(
    store: &mut Store,
    watch: &Watch,
    messages: Vec<Stored>,
    report: &mut SyncReport,
) -> Result<(), StoreError> {
    let url = watch.url();
    let log = watch.log();
    let behind = store.cursor(url, &log)?;
    let pin = hotline_proto::tls::parse_url(url).map(|(_, pin)| pin).ok();
    for Stored {
        seq,
        bytes,
        receipt,
    } in messages
    {
        if seq <= behind {
            continue;
        }
        let cursor = Cursor {
            relay: url,
            log: &log,
            seq,
            receipt: None,
        };
        match watch {
            Watch::Inbox { .. } => {
                let invitation = bundle::decode_invitation(&bytes);
                let joined = match &invitation {
                    Ok(invitation) => {
                        store.join_at(&invitation.welcome, &invitation.relays, Some(cursor))
                    }
                    Err(error) => Err(StoreError::Corrupt(format!("invitation: {error}"))),
                };
                match joined {
                    Ok((_, name)) => report.joined.push(name),
                    // The same invitation through another relay.
                    Err(StoreError::DuplicateWelcome) => store.skip_to(cursor)?,
                    Err(StoreError::Database(error)) => return Err(StoreError::Database(error)),
                    Err(error) => {
                        // An invitation this device cannot accept (its key package spent,
                        // a member it never verified): the inviter believes it joined.
                        // Say who invited it to what, if the invitation says so.
                        let from = invitation.ok().and_then(|i| i.from);
                        let verified = match &from {
                            Some(inviter) => store
                                .contacts()?
                                .iter()
                                .any(|c| c.key == inviter.key && c.party == inviter.party),
                            None => false,
                        };
                        let detail = match &from {
                            Some(inviter) => format!(
                                "invitation {seq} from {}/{}{} to channel {:?} refused: {error}",
                                inviter.party,
                                inviter.device,
                                if verified {
                                    ""
                                } else {
                                    " (not a verified contact)"
                                },
                                inviter.channel
                            ),
                            None => format!("invitation {seq} refused: {error}"),
                        };
                        store.raise_alarm("invitation", url, None, &detail, &bytes)?;
                        report
                            .alarms
                            .push(("invitation".into(), url.into(), detail.clone()));
                        report.refused.push(format!("{url}: {detail}"));
                        store.skip_to(cursor)?;
                    }
                }
            }
            Watch::Channel { channel, .. } => {
                // A message of another channel (or no channel message at all) in this
                // channel's log: the relay mixed logs up or replays from elsewhere.
                if channel_of_message(&bytes).ok() != Some(*channel) {
                    let detail = format!(
                        "message {seq} of the log of channel {channel} is not of that channel"
                    );
                    store.raise_alarm("foreign", url, None, &detail, &bytes)?;
                    report
                        .alarms
                        .push(("foreign".into(), url.into(), detail.clone()));
                    report.refused.push(format!("{url}: {detail}"));
                    store.skip_to(cursor)?;
                    continue;
                }
                // The relay's receipt, when it gives one, must prove that it stored
                // these bytes in this log at this number. One that does not is kept as
                // evidence against the relay (bytes other than it signed are also
                // `altered`: MLS says so below); the copy is processed all the same.
                let mut kept = None;
                if let (Some(receipt), Some(pin)) = (&receipt, &pin) {
                    let log = Log::Channel(channel.0);
                    let hash = custody::message_hash(&bytes);
                    match custody::check(pin, &log, seq, &hash, receipt) {
                        Ok(()) => kept = Some(receipt.as_slice()),
                        Err(custody::ReceiptError::OtherBytes) => {}
                        Err(error) => {
                            let detail = format!("message {seq}: its receipt is false: {error}");
                            store.raise_alarm("receipt", url, None, &detail, receipt)?;
                            report
                                .alarms
                                .push(("receipt".into(), url.into(), detail.clone()));
                        }
                    }
                }
                let cursor = Cursor {
                    receipt: kept,
                    ..cursor
                };
                match store.receive_at(&bytes, Some(cursor)) {
                    // The cursor moved with the (empty) transaction.
                    Ok(events) if events == [Event::Duplicate] => {}
                    Ok(events) => {
                        if matches!(events.first(), Some(Event::Ephemeral { .. })) {
                            report.link_tests += 1;
                        } else {
                            report.received += 1;
                        }
                        report.events.extend(store.line_events(channel, &events)?);
                        for event in &events {
                            let found = match event {
                                Event::Forgery { .. } | Event::BadEnvelope { .. } => "altered",
                                Event::Fork { .. } => "fork",
                                Event::CheckpointMismatch { .. } => "checkpoint",
                                Event::SentElsewhere { .. } => "cloned",
                                _ => continue,
                            };
                            let detail = match event {
                                Event::SentElsewhere { epoch } => format!(
                                    "message {seq} (epoch {epoch}) is sealed as this device's, \
                                     but this device did not send it: another copy of this \
                                     device sends (a home restored from an older backup, or \
                                     a copy of it), or a member forged the sender"
                                ),
                                _ => format!("message {seq}: {event:?}"),
                            };
                            store.raise_alarm(found, url, None, &detail, &bytes)?;
                            report.alarms.push((found.into(), url.into(), detail));
                        }
                    }
                    Err(StoreError::Database(error)) => return Err(StoreError::Database(error)),
                    Err(StoreError::Channel(ChannelError::NotAMember)) => store.skip_to(cursor)?,
                    Err(StoreError::Channel(ChannelError::Mls(error))) => {
                        // From before this device joined: not for it, passed. Of the
                        // current epoch or later and unreadable: altered on the way (MLS
                        // authenticates every byte). Of an older epoch since joining: too
                        // late for MLS (five past epochs, 1,000 generations), lost.
                        let (epoch, horizon) = plan_epochs(store, channel)?;
                        let claimed = epoch_of_message(&bytes).unwrap_or(0);
                        let found = if claimed < horizon {
                            None
                        } else if claimed >= epoch {
                            Some((
                                "altered",
                                format!("message {seq} cannot be opened: {error}"),
                            ))
                        } else {
                            Some((
                                "lost",
                                format!(
                                    "message {seq} of epoch {claimed} came too late to open (now epoch {epoch}): {error}"
                                ),
                            ))
                        };
                        if let Some((kind, detail)) = found {
                            store.raise_alarm(kind, url, None, &detail, &bytes)?;
                            report
                                .alarms
                                .push((kind.into(), url.into(), detail.clone()));
                            report.refused.push(format!("{url}: {detail}"));
                        }
                        store.skip_to(cursor)?;
                    }
                    Err(error) => {
                        report
                            .refused
                            .push(format!("message {seq} from {url}: {error}"));
                        store.skip_to(cursor)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// The epoch this device's copy of `channel` is at, and the epoch it joined at.
fn plan_epochs(store: &mut Store, channel: &ChannelId) -> Result<(u64, u64), StoreError> {
    Ok(store
        .channels()?
        .iter()
        .find(|summary| summary.id == *channel)
        .map_or((0, 0), |summary| (summary.epoch, summary.horizon)))
}

/// Tells the relay what this device committed past `start`, so that it may delete what
/// every member committed.
async fn acknowledge(
    store: &mut Store,
    watch: &Watch,
    client: &RelayClient,
    identity: &DeviceIdentity,
    start: u64,
    report: &mut SyncReport,
) -> Result<(), StoreError> {
    // Only what is on disk.
    store.sync()?;
    if let Some(reached) = ack_due(store, watch, start)? {
        note(
            report,
            watch.url(),
            send_ack(watch, client, identity, reached).await,
        );
    }
    Ok(())
}

/// How far `watch` was committed, if further than `start`: what to acknowledge.
fn ack_due(store: &Store, watch: &Watch, start: u64) -> Result<Option<u64>, StoreError> {
    let reached = store.cursor(watch.url(), &watch.log())?;
    Ok((reached > start).then_some(reached))
}

/// Tells the relay `watch` was committed up to `reached`.
async fn send_ack(
    watch: &Watch,
    client: &RelayClient,
    identity: &DeviceIdentity,
    reached: u64,
) -> Result<(), ClientError> {
    match watch {
        Watch::Inbox { .. } => client.ack_inbox(identity, reached).await,
        Watch::Channel { channel, .. } => client.ack(identity, &channel.0, reached).await,
    }
}

/// Acknowledgements a follower has in flight at most; beyond, it waits for one.
const ACKS_IN_FLIGHT: usize = 64;

/// How `follow` paces itself.
#[derive(Debug, Clone)]
pub struct FollowConfig {
    /// How long one long-poll waits at the relay for something new.
    pub wait: Duration,
    /// How often the outbox is pushed again and every log pulled in full.
    pub round: Duration,
    /// The longest pause after a relay failed (backoff doubles up to it, with jitter).
    pub max_backoff: Duration,
    /// Rung by whoever stored something to send (the console, a `send` beside the
    /// follower): the outbox goes out at once, over the streams the follower holds.
    pub wake: Wake,
}

/// What one push did at each relay of the device's channels: `None` where the relay
/// took everything (or had nothing to take), else why not.
pub type Pushed = BTreeMap<String, Option<String>>;

/// A handle that makes a running [`follow`] push its outbox now. Cheap to clone; rings
/// while nothing waits are kept (several become one push).
#[derive(Debug, Clone, Default)]
pub struct Wake {
    rung: Arc<tokio::sync::Notify>,
    /// Who asked, with [`Wake::ring_for_answer`], to hear how the push went.
    asking: Arc<std::sync::Mutex<Vec<tokio::sync::oneshot::Sender<Pushed>>>>,
}

impl Wake {
    /// Asks the follower to push now (from any thread, async or not).
    pub fn ring(&self) {
        self.rung.notify_one();
    }

    /// Asks the follower to push now, and to say how it went: the answer comes after
    /// a push that began after this call (so it carried whatever was stored before).
    /// The receiver fails if the follower stops first.
    pub fn ring_for_answer(&self) -> tokio::sync::oneshot::Receiver<Pushed> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.asking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(answer);
        self.ring();
        answered
    }

    async fn rung(&self) {
        self.rung.notified().await;
    }

    /// Those who asked so far: answered after the push that begins now.
    pub(crate) fn take_asking(&self) -> Vec<tokio::sync::oneshot::Sender<Pushed>> {
        std::mem::take(
            &mut *self
                .asking
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

impl Default for FollowConfig {
    fn default() -> Self {
        Self {
            wait: Duration::from_secs(25),
            round: Duration::from_secs(10),
            max_backoff: Duration::from_secs(30),
            wake: Wake::default(),
        }
    }
}

/// The pause before retrying after `failures` failures in a row: 250 ms doubling up to
/// `max`, each drawn at random between half and all of it, so that many devices
/// cut off together do not come back together.
pub fn backoff(failures: u32, max: Duration) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let full = Duration::from_millis(250)
        .saturating_mul(1u32 << failures.min(16).saturating_sub(1))
        .min(max);
    full.mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..=1.0))
}

type Poll = (Watch, Result<Vec<Stored>, ClientError>);

/// Follows every log on every relay: one long-poll per log, each batch processed the
/// moment it arrives, the outbox pushed and everything pulled every `round`. Calls
/// `on_report` after every full round and after every batch that changed something;
/// returns when it says `Break`, or with a local storage error. Network failures are
/// retried, per log, with backoff and jitter; each log resumes from its cursor.
///
/// While it follows, the database's checkpoints run beside it
/// ([`Store::checkpoint_beside`]), not in the commits of what arrives.
pub async fn follow(
    store: &mut Store,
    config: &FollowConfig,
    on_report: impl FnMut(&SyncReport) -> ControlFlow<()>,
) -> Result<(), StoreError> {
    let checkpoints = store.checkpoint_beside()?;
    let followed = follow_loop(store, config, on_report).await;
    drop(checkpoints);
    store.checkpoint_inline()?;
    followed
}

async fn follow_loop(
    store: &mut Store,
    config: &FollowConfig,
    mut on_report: impl FnMut(&SyncReport) -> ControlFlow<()>,
) -> Result<(), StoreError> {
    let Session {
        identity,
        mut relays,
    } = Session::new(store)?;
    relays.posters = Some(Posters {
        identity: Arc::clone(&identity),
        senders: HashMap::new(),
    });
    let mut polls: JoinSet<Poll> = JoinSet::new();
    // Acknowledgements go out beside the loop: a relay's answer (its commit) never
    // holds up the next push or the next message.
    let mut acks: JoinSet<(Watch, Result<(), ClientError>)> = JoinSet::new();
    let mut active: HashSet<Watch> = HashSet::new();
    let mut failures: HashMap<Watch, u32> = HashMap::new();
    // Logs committed past what was acknowledged, not yet on disk: from where.
    let mut unacked: HashMap<Watch, u64> = HashMap::new();
    let mut next_round = tokio::time::Instant::now();
    // Link tests go out on their own timer, at the configured interval, not only with
    // the full rounds: a path's state and round trip are then the path's own.
    let mut next_probe = tokio::time::Instant::now() + probe_interval(store)?;
    loop {
        if tokio::time::Instant::now() >= next_round {
            let report = sync_with(store, &identity, &mut relays).await?;
            store.sync()?;
            for (watch, from) in std::mem::take(&mut unacked) {
                if let Some(reached) = ack_due(store, &watch, from)? {
                    spawn_ack(&mut acks, &mut relays, &identity, watch, reached).await;
                }
            }
            next_round = tokio::time::Instant::now() + config.round;
            if on_report(&report).is_break() {
                return Ok(());
            }
            for watch in watches(store)? {
                if active.contains(&watch) {
                    continue;
                }
                let Ok(client) = relays.get(watch.url()) else {
                    continue;
                };
                let after = store.cursor(watch.url(), &watch.log())?;
                active.insert(watch.clone());
                let stream = relays.stream_for(&watch);
                spawn_poll(
                    &mut polls,
                    watch,
                    client,
                    stream,
                    &identity,
                    after,
                    config.wait,
                    Duration::ZERO,
                );
            }
        }
        let joined = tokio::select! {
            joined = polls.join_next(), if !polls.is_empty() => joined,
            Some(acked) = acks.join_next(), if !acks.is_empty() => {
                if let Ok((watch, Err(error))) = acked {
                    let mut report = SyncReport::default();
                    note(&mut report, watch.url(), Err(error));
                    if on_report(&report).is_break() {
                        return Ok(());
                    }
                }
                continue;
            }
            () = tokio::time::sleep_until(next_round) => continue,
            () = config.wake.rung() => {
                let asking = config.wake.take_asking();
                let mut report = SyncReport::default();
                push_with(store, &identity, &mut relays, &mut report).await?;
                for answer in asking {
                    // One who stopped waiting is no matter.
                    let _ = answer.send(report.relays.clone());
                }
                if (report.pushed > 0 || report.relays.values().any(Option::is_some))
                    && on_report(&report).is_break()
                {
                    return Ok(());
                }
                continue;
            }
            () = tokio::time::sleep_until(next_probe) => {
                next_probe = tokio::time::Instant::now() + probe_interval(store)?;
                let mut report = SyncReport::default();
                let escalated = escalate(store, &identity, &mut relays, &mut report).await?;
                let cosigned = store.cosign_due(store.now())?;
                if store.send_due_probes()? + escalated + cosigned > 0 {
                    push_with(store, &identity, &mut relays, &mut report).await?;
                    if (escalated > 0 || report.relays.values().any(Option::is_some))
                        && on_report(&report).is_break()
                    {
                        return Ok(());
                    }
                }
                continue;
            }
        };
        let Some(Ok((watch, fetched))) = joined else {
            // A poll task panicked (it cannot; it only awaits the client): start over.
            active.clear();
            next_round = tokio::time::Instant::now();
            continue;
        };
        let mut report = SyncReport::default();
        let client = relays.get(watch.url()).map_err(StoreError::Corrupt)?;
        let start = store.cursor(watch.url(), &watch.log())?;
        // How long the relay asked to be left alone, if it did (429 with Retry-After).
        let mut asked = Duration::ZERO;
        match fetched {
            Ok(messages) => {
                failures.remove(&watch);
                apply(store, &watch, messages, &mut report)?;
            }
            Err(error) => {
                asked = error.retry_after().unwrap_or_default();
                relays.heed(watch.url(), &error);
                note(&mut report, watch.url(), Err(error));
                *failures.entry(watch.clone()).or_default() += 1;
            }
        }
        // Wait again at once; then tell the relay what was committed.
        let after = store.cursor(watch.url(), &watch.log())?;
        // Never longer than a link-test interval (or a second): a relay that comes back
        // is read, and its paths shown up, within about an interval.
        let cap = probe_interval(store)?.max(Duration::from_secs(1));
        let delay = backoff(
            failures.get(&watch).copied().unwrap_or(0),
            config.max_backoff.min(cap),
        )
        .max(asked);
        spawn_poll(
            &mut polls,
            watch.clone(),
            client.clone(),
            relays.stream_for(&watch),
            &identity,
            after,
            config.wait,
            delay,
        );
        if report.received == 0 && report.link_tests > 0 {
            // Answers to link tests go out at once, on their paths.
            post_frames(store, &identity, &mut relays, &mut report).await?;
        }
        let changed = report.received > 0
            || !report.events.is_empty()
            || !report.joined.is_empty()
            || !report.refused.is_empty()
            || report.relays.values().any(Option::is_some);
        // What arrived is reported (shown, logged) the moment it is committed ...
        if changed && on_report(&report).is_break() {
            return Ok(());
        }
        if report.received > 0 {
            // ... then its receipts, and commits of proposals, go out at once.
            let mut sent = SyncReport::default();
            store.send_receipts()?;
            push_with(store, &identity, &mut relays, &mut sent).await?;
            let changed = !sent.events.is_empty()
                || !sent.alarms.is_empty()
                || !sent.refused.is_empty()
                || sent.relays.values().any(Option::is_some);
            if changed && on_report(&sent).is_break() {
                return Ok(());
            }
        }
        if !report.joined.is_empty() {
            // A new channel to watch: pick it up now.
            next_round = tokio::time::Instant::now();
        }
        // What was committed is acknowledged once it is on disk: after a commit that
        // did not wait for it (a copy already processed), at the next one that did, or
        // at the next round.
        let from = unacked
            .remove(&watch)
            .map_or(start, |from: u64| from.min(start));
        if store.is_synced() {
            unacked.insert(watch, from);
            for (watch, from) in unacked.drain() {
                if let Some(reached) = ack_due(store, &watch, from)? {
                    spawn_ack(&mut acks, &mut relays, &identity, watch, reached).await;
                }
            }
        } else {
            unacked.insert(watch, from);
        }
    }
}

/// Tells `watch`'s relay, in a task of `acks`, that it was committed up to `reached`
/// (waiting first while [`ACKS_IN_FLIGHT`] are).
async fn spawn_ack(
    acks: &mut JoinSet<(Watch, Result<(), ClientError>)>,
    relays: &mut Relays,
    identity: &Arc<DeviceIdentity>,
    watch: Watch,
    reached: u64,
) {
    while acks.len() >= ACKS_IN_FLIGHT {
        acks.join_next().await;
    }
    let Ok(client) = relays.get(watch.url()) else {
        return;
    };
    let identity = Arc::clone(identity);
    let stream = relays.stream_for(&watch);
    acks.spawn(async move {
        // Over the relay's stream when it is open (no request, no signature).
        let open = match &stream {
            Some(slot) => slot.client().await,
            None => None,
        };
        let acked = match (&watch, open) {
            (Watch::Channel { channel, .. }, Some(stream)) => {
                stream.ack(&channel.0, reached).await.map(|_| ())
            }
            _ => send_ack(&watch, &client, &identity, reached).await,
        };
        (watch, acked)
    });
}

/// The link-test interval, never below 100 ms.
fn probe_interval(store: &mut Store) -> Result<Duration, StoreError> {
    Ok(Duration::from_millis(store.link_test_interval()?.max(100)))
}

/// Reads `watch` after `after` in a task of `polls`, after `delay`: a channel's messages
/// as its relay's stream pushes them when there is one (`stream`), else by a long poll.
#[allow(clippy::too_many_arguments)]
fn spawn_poll(
    polls: &mut JoinSet<Poll>,
    watch: Watch,
    client: RelayClient,
    stream: Option<Arc<StreamSlot>>,
    identity: &Arc<DeviceIdentity>,
    after: u64,
    wait: Duration,
    delay: Duration,
) {
    let identity = Arc::clone(identity);
    polls.spawn(async move {
        tokio::time::sleep(delay).await;
        let pushed = match (&watch, stream) {
            (Watch::Channel { channel, .. }, Some(slot)) => match slot.client().await {
                Some(stream) => Some(stream.next_after(&channel.0, after, wait).await),
                None => None,
            },
            _ => None,
        };
        let fetched = match pushed {
            Some(fetched) => fetched,
            None => watch.fetch(&client, &identity, after, wait).await,
        };
        (watch, fetched)
    });
}

/// Posts the link-test frames waiting, each to its own relay, once: one that cannot be
/// posted is a link test that failed. While following, each relay's frames go to its
/// own poster task, so that a slow or hung relay delays only its own path; otherwise
/// they are posted here, in turn (a failure is noted in the report).
async fn post_frames(
    store: &mut Store,
    identity: &DeviceIdentity,
    relays: &mut Relays,
    report: &mut SyncReport,
) -> Result<(), StoreError> {
    let frames = store.take_frames()?;
    let stale = probe_interval(store)?.max(Duration::from_secs(1));
    if relays.posters.is_some() {
        for frame in frames {
            let Ok(client) = relays.get(&frame.relay) else {
                continue;
            };
            let stream = relays.stream_to(&frame.relay);
            let Some(posters) = relays.posters.as_mut() else {
                break;
            };
            let identity = Arc::clone(&posters.identity);
            let sender = posters
                .senders
                .entry(frame.relay.clone())
                .or_insert_with(|| spawn_poster(client, stream, identity, stale));
            // Full: the relay is slow or hung, and this link test fails.
            let _ = sender.try_send(frame);
        }
        return Ok(());
    }
    let mut failed: HashSet<String> = HashSet::new();
    for frame in frames {
        if failed.contains(&frame.relay) {
            continue;
        }
        let Ok(client) = relays.get(&frame.relay) else {
            continue;
        };
        let posted = client.post(identity, &frame.channel.0, frame.bytes).await;
        if !note(report, &frame.relay, posted.map(|_| ())) {
            failed.insert(frame.relay);
        }
    }
    Ok(())
}

/// A task that posts one relay's frames in order, each within [`FRAME_POST_TIMEOUT`]:
/// over the relay's stream when it is open (no request, no signature), else over the
/// one-shot route. A frame's custody is nobody's evidence (a link test proves itself by
/// its answer coming back), so the relay's receipt for it is not checked. The task
/// ends with the follow loop (when the sender is dropped).
fn spawn_poster(
    client: RelayClient,
    stream: Option<Arc<StreamSlot>>,
    identity: Arc<DeviceIdentity>,
    stale: Duration,
) -> mpsc::Sender<OutgoingFrame> {
    let (sender, mut frames) = mpsc::channel::<OutgoingFrame>(FRAME_QUEUE);
    tokio::spawn(async move {
        while let Some(frame) = frames.recv().await {
            // Left waiting behind a hung post: a link test that failed.
            let age = crate::clock::SystemClock
                .now_ms()
                .saturating_sub(frame.created_ms);
            if age > stale.as_millis() as u64 {
                continue;
            }
            let post = async {
                let open = match &stream {
                    Some(slot) => slot.client().await,
                    None => None,
                };
                match open {
                    Some(stream) => stream.append_unchecked(&frame.channel.0, frame.bytes).await,
                    None => {
                        client
                            .post_unchecked(&identity, &frame.channel.0, frame.bytes)
                            .await
                    }
                }
            };
            let _ = tokio::time::timeout(FRAME_POST_TIMEOUT, post).await;
        }
    });
    sender
}

async fn push_with(
    store: &mut Store,
    identity: &DeviceIdentity,
    relays: &mut Relays,
    report: &mut SyncReport,
) -> Result<(), StoreError> {
    // A commit merged in one pass releases a new membership and a Welcome for the next.
    for _ in 0..4 {
        if !push_pass(store, identity, relays, report).await? {
            break;
        }
    }
    // After the memberships: a relay takes frames from members only.
    post_frames(store, identity, relays, report).await
}

/// Registers memberships and posts the outbox; returns whether a commit was merged.
async fn push_pass(
    store: &mut Store,
    identity: &DeviceIdentity,
    relays: &mut Relays,
    report: &mut SyncReport,
) -> Result<bool, StoreError> {
    let mut merged = false;
    let mut failed: HashSet<String> = HashSet::new();
    for (url, left) in relays.quiet() {
        let detail = format!(
            "relay {url} asked this device to slow down: nothing is pushed to it for {} s more",
            left.as_secs().max(1)
        );
        report.relays.insert(url.clone(), Some(detail));
        failed.insert(url);
    }
    // 1. The committer registers each channel's membership where it is out of date
    // (found without loading a channel when nothing is).
    for url in store.channel_relay_urls()? {
        report.relays.entry(url).or_insert(None);
    }
    let plans = if store.registrations_due()? {
        store.relay_plan()?
    } else {
        Vec::new()
    };
    for plan in plans {
        for (url, registered) in &plan.relays {
            let version = Store::membership_version(plan.epoch);
            if !plan.committer || *registered >= version {
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
                version,
                members: plan.members.clone(),
            };
            match client
                .register(identity, &plan.channel.0, &membership)
                .await
            {
                Ok(()) | Err(ClientError::Refused { status: 409, .. }) => {
                    store.mark_registered(&plan.channel, url, version)?
                }
                // A relay that will not serve this channel (its operator names the
                // committers it serves): nothing goes through it until that changes,
                // which the duty officer must hear of, once.
                Err(ClientError::Refused {
                    status: 403,
                    ref detail,
                    ..
                }) => {
                    let detail = format!(
                        "the relay refuses to register channel {}, so it carries nothing of \
                         it: {detail}",
                        plan.channel
                    );
                    let channel = format!("channel {}", plan.channel);
                    store.raise_alarm_about("refused", url, &channel, &detail)?;
                    report
                        .alarms
                        .push(("refused".into(), url.clone(), detail.clone()));
                    report.relays.insert(url.clone(), Some(detail));
                }
                Err(error) => {
                    note(report, url, Err(error));
                }
            }
        }
    }

    // 2. Push every outbox row to every relay that does not hold it yet: messages to
    // the channel's relays, Welcomes (as invitations) to each recipient's inbox relays.
    // Consecutive plain messages of one channel go in batches, one request per relay.
    let outbox = store.outbox()?;
    let mut next = 0;
    while let Some(item) = outbox.get(next) {
        let run = plain_run(&outbox[next..]);
        if run >= 2 {
            push_run(
                store,
                identity,
                relays,
                report,
                &mut failed,
                &outbox[next..next + run],
            )
            .await?;
            next += run;
            continue;
        }
        next += 1;
        let mut targets: Vec<(String, String, Log)> = Vec::new();
        let mut capabilities: HashMap<[u8; 32], Capability> = HashMap::new();
        let mut body = item.bytes.clone();
        if let Some(channel) = item.channel {
            let channel_relays = store.channel_relays(&channel)?;
            if item.welcome {
                let name = store.channel_name(&channel)?;
                body = bundle::encode_invitation(identity, &name, &channel_relays, &item.bytes);
                for recipient in &item.recipients {
                    if let Some((urls, capability)) = store.contact_inbox(recipient)? {
                        for url in urls {
                            let mark = format!("inbox:{recipient}@{url}");
                            if let Some(capability) = &capability {
                                capabilities.insert(recipient.0, capability.clone());
                            }
                            targets.push((mark, url, Log::Inbox(recipient.0)));
                        }
                    }
                }
            } else {
                for url in item.only_relays.clone().unwrap_or(channel_relays) {
                    targets.push((url.clone(), url, Log::Channel(channel.0)));
                }
            }
        }
        let mut missing = targets
            .iter()
            .filter(|(mark, ..)| !item.posted.contains(mark))
            .count();
        // Every relay at once: a slow one delays nothing. A relay that failed in this
        // pass gets nothing more in it, so each relay receives the outbox in order.
        let mut posts = Vec::new();
        for (mark, url, log) in targets {
            if item.posted.contains(&mark) || failed.contains(&url) {
                continue;
            }
            let client = match relays.get(&url) {
                Ok(client) => client,
                Err(error) => {
                    report.relays.insert(url.clone(), Some(error));
                    failed.insert(url);
                    continue;
                }
            };
            let body = body.clone();
            let capability = match &log {
                Log::Inbox(device) => capabilities.get(device).cloned(),
                _ => None,
            };
            let stream = match &log {
                Log::Channel(_) => relays.stream_to(&url),
                _ => None,
            };
            posts.push(async move {
                let posted = match (log, capability) {
                    (Log::Inbox(device), Some(capability)) => client
                        .post_inbox(identity, &device, &capability, body)
                        .await
                        .map(|_| None),
                    (Log::Inbox(_), None) => Err(ClientError::Refused {
                        relay: client.base().to_owned(),
                        status: 0,
                        code: "not-sent".into(),
                        detail: "the invitee's card predates inbox capabilities; \
                                 ask for its card again (hotline card export) and import it"
                            .into(),
                        retry_after: None,
                    }),
                    // While following, over the relay's stream (no request, no
                    // signature per message); otherwise, or when it cannot be
                    // opened, the one-shot route.
                    (Log::Channel(channel), _) => {
                        let open = match &stream {
                            Some(slot) => slot.client().await,
                            None => None,
                        };
                        match open {
                            Some(stream) => stream.append(&channel, body).await,
                            None => client.post(identity, &channel, body).await,
                        }
                        .map(|appended| appended.receipt)
                    }
                    // The outbox holds channel messages and invitations only.
                    (Log::KeyPackages(_), _) => Err(ClientError::Refused {
                        relay: client.base().to_owned(),
                        status: 0,
                        code: "not-sent".into(),
                        detail: "key packages are stocked, not posted".into(),
                        retry_after: None,
                    }),
                };
                (mark, url, posted)
            });
        }
        let hash = custody::message_hash(&item.bytes);
        for (mark, url, posted) in futures_util::future::join_all(posts).await {
            let receipt = match posted {
                Ok(receipt) => receipt,
                Err(error) => {
                    relays.heed(&url, &error);
                    note(report, &url, Err(error));
                    failed.insert(url);
                    continue;
                }
            };
            note(report, &url, Ok(()));
            missing -= 1;
            let custody = receipt.as_deref().map(|receipt| (&hash, receipt));
            store.mark_posted(item.seq, &mark, missing == 0, custody)?;
            report.pushed += 1;
            if item.commit
                && let Some(channel) = item.channel
            {
                merged |= store.commit_relayed(&channel)?;
            }
        }
    }
    Ok(merged)
}

/// Most messages in one batch post, and most bytes.
const BATCH_MESSAGES: usize = 64;
const BATCH_BYTES: usize = 512 * 1024;

/// How many outbox rows from the first are plain messages of one channel (no Welcome,
/// no commit, no relays of their own) that fit in one batch.
fn plain_run(items: &[OutboxItem]) -> usize {
    let plain = |item: &OutboxItem| {
        item.channel.is_some() && !item.welcome && !item.commit && item.only_relays.is_none()
    };
    let Some(first) = items.first().filter(|item| plain(item)) else {
        return 0;
    };
    let mut bytes = 0;
    items
        .iter()
        .take(BATCH_MESSAGES)
        .take_while(|item| {
            bytes += item.bytes.len();
            plain(item) && item.channel == first.channel && bytes <= BATCH_BYTES
        })
        .count()
}

/// Posts a run of plain messages of one channel to each of its relays in one request
/// per relay (`post_batch`), all relays at once; a relay without the batch endpoint
/// (404) gets them one by one. Marks each message posted where the relay stored it.
async fn push_run(
    store: &mut Store,
    identity: &DeviceIdentity,
    relays: &mut Relays,
    report: &mut SyncReport,
    failed: &mut HashSet<String>,
    run: &[OutboxItem],
) -> Result<(), StoreError> {
    let Some(channel) = run.first().and_then(|item| item.channel) else {
        return Ok(());
    };
    let urls = store.channel_relays(&channel)?;
    let mut missing: Vec<usize> = run
        .iter()
        .map(|item| urls.iter().filter(|url| !item.posted.contains(url)).count())
        .collect();
    let mut posts = Vec::new();
    for url in urls {
        let wanted: Vec<usize> = (0..run.len())
            .filter(|index| !run[*index].posted.contains(&url))
            .collect();
        if wanted.is_empty() || failed.contains(&url) {
            continue;
        }
        let client = match relays.get(&url) {
            Ok(client) => client,
            Err(error) => {
                report.relays.insert(url.clone(), Some(error));
                failed.insert(url);
                continue;
            }
        };
        let messages: Vec<Vec<u8>> = wanted.iter().map(|i| run[*i].bytes.clone()).collect();
        posts.push(async move {
            let answers = match client.post_batch(identity, &channel.0, &messages).await {
                Err(ClientError::Refused { status: 404, .. }) => {
                    let mut answers = Vec::with_capacity(messages.len());
                    for message in messages {
                        let answer = client.post(identity, &channel.0, message).await;
                        let stop = answer.is_err();
                        answers.push(answer);
                        if stop {
                            break;
                        }
                    }
                    Ok(answers)
                }
                other => other,
            };
            (url, wanted, answers)
        });
    }
    for (url, wanted, answers) in futures_util::future::join_all(posts).await {
        let answers = match answers {
            Ok(answers) => answers,
            Err(error) => {
                relays.heed(&url, &error);
                note(report, &url, Err(error));
                failed.insert(url);
                continue;
            }
        };
        for (index, answer) in wanted.into_iter().zip(answers) {
            let appended = match answer {
                Ok(appended) => appended,
                Err(error) => {
                    relays.heed(&url, &error);
                    note(report, &url, Err(error));
                    // The rest would reach this relay out of order: next pass.
                    failed.insert(url);
                    break;
                }
            };
            note(report, &url, Ok(()));
            missing[index] -= 1;
            let hash = custody::message_hash(&run[index].bytes);
            let custody = appended.receipt.as_deref().map(|receipt| (&hash, receipt));
            store.mark_posted(run[index].seq, &url, missing[index] == 0, custody)?;
            report.pushed += 1;
        }
    }
    Ok(())
}
