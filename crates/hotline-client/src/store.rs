//! The device store: one SQLite database, one transaction per operation.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use hotline_core::card::{CardError, CardIn};
use hotline_core::channel::channel_of_message;
use hotline_core::export::ExportError;
use hotline_core::{
    Body, Channel, ChannelError, ChannelId, ChannelSnapshot, DeviceIdentity, DeviceInfo, DeviceKey,
    Envelope, EnvelopeId, Event, Export, Fingerprint, MembershipNote, Outgoing, create_card,
};
use openmls_sqlite_storage::SqliteStorageProvider;
use openmls_traits::OpenMlsProvider;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::bundle::Entry;
use crate::home::{Home, HomeError};
use crate::provider::{JsonCodec, Provider};
use crate::transcript_store::SqliteTranscript;

/// The `processed` table's channel for Welcomes already taken.
const WELCOMES: [u8; 32] = [0; 32];

/// Schema version of hotline's own tables; migrations run forward from `user_version`.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;
/// Prepared statements kept per connection.
pub(crate) const STATEMENT_CACHE: usize = 256;
/// One-time key packages on a new card.
pub const KEY_PACKAGES_PER_CARD: usize = 16;

const MIGRATIONS: &[&str] = &[
    // Version 1.
    "CREATE TABLE device (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        identity BLOB NOT NULL,
        card BLOB NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE contacts (
        key BLOB PRIMARY KEY,
        party TEXT NOT NULL,
        device TEXT NOT NULL,
        card BLOB NOT NULL,
        imported_ms INTEGER NOT NULL
    );
    CREATE TABLE channels (
        id BLOB PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        snapshot TEXT NOT NULL
    );
    CREATE TABLE envelopes (
        channel BLOB NOT NULL REFERENCES channels(id),
        id BLOB NOT NULL,
        lamport INTEGER NOT NULL,
        bytes BLOB NOT NULL,
        PRIMARY KEY (channel, id)
    ) WITHOUT ROWID;
    CREATE TABLE processed (
        channel BLOB NOT NULL,
        hash BLOB NOT NULL,
        PRIMARY KEY (channel, hash)
    ) WITHOUT ROWID;
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        channel BLOB,
        kind INTEGER NOT NULL,
        recipients BLOB,
        bytes BLOB NOT NULL,
        envelope BLOB,
        created_ms INTEGER NOT NULL,
        exported INTEGER NOT NULL DEFAULT 0
    );",
    // Version 2: relays.
    "CREATE TABLE channel_relays (
        channel BLOB NOT NULL REFERENCES channels(id),
        url TEXT NOT NULL,
        registered_version INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (channel, url)
    );
    CREATE TABLE cursors (
        relay TEXT NOT NULL,
        log TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (relay, log)
    );
    CREATE TABLE outbox_posted (
        seq INTEGER NOT NULL REFERENCES outbox(seq),
        relay TEXT NOT NULL,
        PRIMARY KEY (seq, relay)
    );",
    // Version 3: rows every target holds are settled, and no longer scanned by the push.
    "ALTER TABLE outbox ADD COLUMN settled INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX outbox_unsettled ON outbox (settled, seq);",
    // Version 4: link tests, relay health, alarms (see `line`).
    crate::line::SCHEMA,
    // Version 5: stored alarms can be cleared by the operator (evidence kept); an outbox
    // row can name its own relays (a relay change goes to the old and the new ones).
    "ALTER TABLE alarms ADD COLUMN cleared_ms INTEGER;
    ALTER TABLE outbox ADD COLUMN only_relays TEXT;
    ALTER TABLE outbox ADD COLUMN offered_ms INTEGER;",
    // Version 6: copies of messages held for their commit, by relay, to place in their
    // sender's chain once opened (see `line::on_received`).
    "CREATE TABLE unplaced (
        hash BLOB NOT NULL,
        relay TEXT NOT NULL,
        PRIMARY KEY (hash, relay)
    ) WITHOUT ROWID;",
    // Version 7: when a relay joined a channel (its paths are judged from then on).
    "ALTER TABLE channel_relays ADD COLUMN added_ms INTEGER;",
    // Version 8: the transcript in the database (see `transcript_store`); the channels
    // of earlier versions are rebuilt from their envelopes once, at the next open.
    crate::transcript_store::SCHEMA,
    // Version 9: how many outbox rows wait, kept by triggers, so that `status` does not
    // count a long outbox at every call.
    "CREATE TABLE outbox_waiting (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        rows INTEGER NOT NULL
    );
    INSERT INTO outbox_waiting (id, rows)
        SELECT 1, COUNT(*) FROM outbox WHERE settled = 0 AND exported = 0;
    CREATE TRIGGER outbox_waits AFTER INSERT ON outbox
        WHEN NEW.settled = 0 AND NEW.exported = 0
        BEGIN UPDATE outbox_waiting SET rows = rows + 1; END;
    CREATE TRIGGER outbox_left AFTER UPDATE OF settled, exported ON outbox
        WHEN OLD.settled = 0 AND OLD.exported = 0 AND (NEW.settled != 0 OR NEW.exported != 0)
        BEGIN UPDATE outbox_waiting SET rows = rows - 1; END;
    CREATE TRIGGER outbox_back AFTER UPDATE OF settled, exported ON outbox
        WHEN (OLD.settled != 0 OR OLD.exported != 0) AND NEW.settled = 0 AND NEW.exported = 0
        BEGIN UPDATE outbox_waiting SET rows = rows + 1; END;
    CREATE TRIGGER outbox_gone AFTER DELETE ON outbox
        WHEN OLD.settled = 0 AND OLD.exported = 0
        BEGIN UPDATE outbox_waiting SET rows = rows - 1; END;",
];

/// Most envelopes offered again per round (see [`Store::reoffer_due`]).
pub const MAX_REOFFER: usize = 64;

/// Why a store operation failed. Nothing was committed.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    #[error(
        "the database was written by a newer hotline (schema {found}, this build knows {SCHEMA_VERSION}); upgrade hotline"
    )]
    SchemaTooNew { found: i64 },
    #[error("openmls storage migration failed: {0}")]
    Migration(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Card(#[from] CardError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Transcript(#[from] hotline_core::merkle::StorageError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("no channel named {0:?}; see: hotline channel list")]
    UnknownChannel(String),
    #[error("a channel named {0:?} exists already")]
    ChannelExists(String),
    #[error(
        "no verified contact of party {0:?}; import their card first: hotline card import FILE --fingerprint DIGITS"
    )]
    UnknownParty(String),
    #[error("{0}")]
    BadRelays(String),
    #[error("this invitation was taken already (it came through another relay)")]
    DuplicateWelcome,
    #[error("party {0:?} has no device in this channel; see: hotline channel list")]
    NotInChannel(String),
    #[error("no message {0} in this channel")]
    UnknownMessage(String),
    #[error("invalid name: {0}")]
    Name(#[from] hotline_core::identity::NameError),
}

impl StoreError {
    /// Whether the error is a refusal of trust (exit code 4).
    pub fn is_trust_refusal(&self) -> bool {
        matches!(
            self,
            StoreError::Card(CardError::FingerprintMismatch { .. })
                | StoreError::Channel(ChannelError::TrustRefused { .. })
        )
    }
}

/// One line of `hotline log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub id: EnvelopeId,
    pub from: String,
    pub time_ms: u64,
    pub text: String,
    pub deadline_ms: Option<u64>,
    pub delivered_to: BTreeSet<String>,
    pub read_by: BTreeSet<String>,
}

/// A channel's relays and membership, for the sync engine.
#[derive(Debug, Clone)]
pub struct RelayPlan {
    pub channel: ChannelId,
    pub members: Vec<[u8; 32]>,
    pub committer: bool,
    pub epoch: u64,
    /// Relay addresses with the membership version each holds.
    pub relays: Vec<(String, u64)>,
}

/// One outgoing message and the relays that already hold it.
#[derive(Debug, Clone)]
pub struct OutboxItem {
    pub seq: u64,
    pub channel: Option<ChannelId>,
    pub welcome: bool,
    /// This device's commit: merged when the first relay holds it.
    pub commit: bool,
    /// Relays this row goes to instead of the channel's (a relay change).
    pub only_relays: Option<Vec<String>>,
    pub recipients: Vec<DeviceKey>,
    pub bytes: Vec<u8>,
    pub posted: Vec<String>,
}

/// A channel as `hotline channel list` shows it.
#[derive(Debug, Clone)]
pub struct ChannelSummary {
    pub id: ChannelId,
    pub name: String,
    pub members: Vec<DeviceInfo>,
    pub epoch: u64,
    /// The epoch this device joined at (0 for the creator): older messages are not for it.
    pub horizon: u64,
    pub envelopes: usize,
    pub committer: bool,
}

/// An open device store.
#[derive(Debug)]
pub struct Store {
    /// Shared with the transcripts of the loaded channels, which keep their envelopes
    /// in the same database (and transaction).
    connection: Rc<Connection>,
    home: Home,
    identity: DeviceIdentity,
    /// Channels loaded by earlier operations of this process, valid while no other
    /// connection committed (SQLite's `data_version` says so).
    cache: Cache,
}

/// Loaded channels, by id, and the `data_version` they were loaded at.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    pub(crate) channels: std::collections::HashMap<ChannelId, Channel>,
    data_version: Option<i64>,
}

fn open_connection(home: &Home) -> Result<Connection, StoreError> {
    let mut connection = Connection::open(home.database())?;
    // Every statement of an operation stays prepared (the default keeps 16, fewer than
    // a receive uses: they were parsed again and again).
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    connection.busy_timeout(Duration::from_secs(30))?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    migrate(&mut connection)?;
    Ok(connection)
}

fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew { found: version });
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    let transaction =
        connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Another process may have migrated while we waited for the lock.
    let version: i64 = transaction.pragma_query_value(None, "user_version", |row| row.get(0))?;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        transaction.execute_batch(migration)?;
        transaction.pragma_update(None, "user_version", index as i64 + 1)?;
    }
    transaction.commit()?;
    let mut storage = SqliteStorageProvider::<JsonCodec, &mut Connection>::new(connection);
    storage
        .run_migrations()
        .map_err(|e| StoreError::Migration(e.to_string()))?;
    Ok(())
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

impl Store {
    /// Creates a device: home, database, identity and contact card.
    pub fn init(
        path: &Path,
        party: &str,
        device: &str,
        relays: &[String],
    ) -> Result<Self, StoreError> {
        hotline_core::identity::check_name("party", party)?;
        hotline_core::identity::check_name("device", device)?;
        let home = Home::create(path)?;
        let connection = Rc::new(open_connection(&home)?);
        let identity = DeviceIdentity::generate(party, device, &mut rand::rngs::OsRng)?;
        let mut store = Self {
            connection,
            home,
            identity,
            cache: Cache::default(),
        };
        store.transact(|connection, identity, _| {
            let provider = Provider::new(connection);
            let card = create_card(identity, &provider, KEY_PACKAGES_PER_CARD, relays)?;
            connection.execute(
                "INSERT INTO device (id, identity, card, created_ms) VALUES (1, ?1, ?2, ?3)",
                params![&identity.to_secret_bytes()[..], card, now_ms() as i64],
            )?;
            Ok(())
        })?;
        Ok(store)
    }

    /// Opens an existing device.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let home = Home::open(path)?;
        let connection = open_connection(&home)?;
        let secret: Vec<u8> = connection
            .query_row("SELECT identity FROM device WHERE id = 1", [], |row| {
                row.get(0)
            })
            .optional()?
            .ok_or_else(|| HomeError::Missing {
                path: path.to_owned(),
            })?;
        let identity = DeviceIdentity::from_secret_bytes(&secret).map_err(corrupt)?;
        let mut store = Self {
            connection: Rc::new(connection),
            home,
            identity,
            cache: Cache::default(),
        };
        store.rebuild_transcripts()?;
        Ok(store)
    }

    /// Rebuilds, once, the transcripts of channels stored by a version that kept only
    /// their envelopes: each in one transaction, its roots unchanged.
    fn rebuild_transcripts(&mut self) -> Result<(), StoreError> {
        // Read first: an open that has nothing to rebuild takes no write lock.
        let pending = self
            .connection
            .query_row("SELECT 1 FROM rebuild LIMIT 1", [], |_| Ok(()))
            .optional()?;
        if pending.is_none() {
            return Ok(());
        }
        loop {
            let done = self.transact(|connection, _, cache| {
                let Some(id) = connection
                    .query_row("SELECT channel FROM rebuild LIMIT 1", [], |row| {
                        row.get::<_, Vec<u8>>(0)
                    })
                    .optional()?
                else {
                    return Ok(true);
                };
                connection.execute("DELETE FROM rebuild WHERE channel = ?1", [&id])?;
                let id = ChannelId(id.try_into().map_err(|_| corrupt("channel id"))?);
                let provider = Provider::new(connection);
                let mut channel = load_channel_by_id(connection, &provider, &id)?;
                save_channel(connection, &mut channel, false)?;
                cache.channels.clear();
                Ok(false)
            })?;
            if done {
                return Ok(());
            }
        }
    }

    pub fn home(&self) -> &Home {
        &self.home
    }

    pub fn identity(&self) -> &DeviceIdentity {
        &self.identity
    }

    /// Runs `operation` in one immediate transaction; commits on success only. Cached
    /// channels are dropped when another process committed since, and on any error
    /// (their in-memory MLS state may be ahead of the rolled-back storage).
    pub(crate) fn transact<T>(
        &mut self,
        operation: impl FnOnce(&Rc<Connection>, &DeviceIdentity, &mut Cache) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.connection.execute_batch("BEGIN IMMEDIATE")?;
        let version = self
            .connection
            .pragma_query_value(None, "data_version", |row| row.get::<_, i64>(0));
        match version {
            Ok(version) if self.cache.data_version == Some(version) => {}
            Ok(version) => {
                self.cache.channels.clear();
                self.cache.data_version = Some(version);
            }
            Err(error) => {
                let _ = self.connection.execute_batch("ROLLBACK");
                return Err(error.into());
            }
        }
        let result = operation(&self.connection, &self.identity, &mut self.cache)
            .and_then(|value| failpoint("before-commit").map(|()| value))
            .and_then(|value| {
                self.connection
                    .execute_batch("COMMIT")
                    .map(|()| value)
                    .map_err(Into::into)
            });
        if result.is_err() {
            // Rolling back can only fail if no transaction is open any more.
            let _ = self.connection.execute_batch("ROLLBACK");
            self.cache.channels.clear();
        }
        result
    }

    /// This device's contact card.
    pub fn card(&self) -> Result<Vec<u8>, StoreError> {
        Ok(self
            .connection
            .query_row("SELECT card FROM device WHERE id = 1", [], |row| row.get(0))?)
    }

    /// Imports a card after checking it against the fingerprint read out of band.
    pub fn import_card(
        &mut self,
        card: &[u8],
        fingerprint: &Fingerprint,
    ) -> Result<DeviceInfo, StoreError> {
        let contact =
            CardIn::decode(card)?.verify(fingerprint, Provider::new(&self.connection).crypto())?;
        let info = contact.info.clone();
        self.transact(|connection, _, _| {
            connection.execute(
                "INSERT INTO contacts (key, party, device, card, imported_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (key) DO UPDATE SET party = ?2, device = ?3, card = ?4, imported_ms = ?5",
                params![&info.key.0[..], info.party, info.device, card, now_ms() as i64],
            )?;
            Ok(())
        })?;
        Ok(info)
    }

    /// Verified contacts.
    pub fn contacts(&self) -> Result<Vec<DeviceInfo>, StoreError> {
        let mut statement = self
            .connection
            .prepare("SELECT key, party, device FROM contacts ORDER BY party, device")?;
        let rows = statement.query_map([], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get(1)?, row.get(2)?))
        })?;
        rows.map(|row| {
            let (key, party, device) = row?;
            let key: [u8; 32] = key.try_into().map_err(|_| corrupt("contact key"))?;
            Ok(DeviceInfo {
                party,
                device,
                key: DeviceKey(key),
            })
        })
        .collect()
    }

    /// Creates a channel with every verified device of `parties`. Until relays exist,
    /// the commit is accepted locally; the Welcome goes to the outbox.
    pub fn create_channel(
        &mut self,
        name: &str,
        parties: &[String],
        relays: &[String],
    ) -> Result<ChannelId, StoreError> {
        self.transact(|connection, identity, cache| {
            if channel_row(connection, name)?.is_some() {
                return Err(StoreError::ChannelExists(name.to_owned()));
            }
            let provider = Provider::new(connection);
            let mut contacts = Vec::new();
            for party in parties {
                let mut statement =
                    connection.prepare("SELECT card, key FROM contacts WHERE party = ?1")?;
                let cards: Vec<(Vec<u8>, Vec<u8>)> = statement
                    .query_map([party], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                if cards.is_empty() {
                    return Err(StoreError::UnknownParty(party.clone()));
                }
                for (card, _) in cards {
                    let card = CardIn::decode(&card)?;
                    let fingerprint = card.claimed().fingerprint();
                    // The fingerprint was checked at import; this re-checks the signature
                    // and the key packages of the stored card.
                    contacts.push(card.verify(&fingerprint, provider.crypto())?);
                }
            }
            let mut channel = Channel::create_with(&provider, identity, name, |id| {
                SqliteTranscript::boxed(Rc::clone(connection), id.0)
            })?;
            channel.remember_contacts(contacts.iter().map(|c| c.info.clone()));
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
            let seen = connection.execute(
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
        self.transact(|connection, identity, cache| {
            if let Some(cursor) = cursor {
                advance(connection, cursor)?;
            }
            let provider = Provider::new(connection);
            let mut channel = checkout(cache, connection, &provider, &channel_id)?;
            failpoint("receive-loaded")?;
            let events = channel.receive(&provider, bytes)?;
            failpoint("receive-processed")?;
            let answered = crate::line::on_received(
                connection,
                &provider,
                identity,
                &mut channel,
                &events,
                &crate::line::copy_hash(bytes),
                crate::line::relay_of(&cursor),
            )?;
            if events == [Event::Duplicate] {
                // Nothing else changed: keep the channel.
                if answered {
                    save_channel(connection, &mut channel, false)?;
                }
                cache.channels.insert(channel_id, channel);
                return Ok(events);
            }
            if channel.is_committer()
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

    /// Imports a bundle: joins from Welcomes addressed to this device, receives the
    /// rest. Returns how many messages were new.
    pub fn import_bundle(&mut self, entries: Vec<Entry>) -> Result<usize, StoreError> {
        let me = self.identity.key();
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

    fn has_channel(&self, id: &ChannelId) -> Result<bool, StoreError> {
        Ok(self
            .connection
            .query_row("SELECT 1 FROM channels WHERE id = ?1", [&id.0[..]], |_| {
                Ok(())
            })
            .optional()?
            .is_some())
    }

    /// Every outbox entry not exported yet, marking them exported.
    pub fn export_outbox(&mut self) -> Result<Vec<Entry>, StoreError> {
        self.transact(|connection, _, _| {
            let mut statement = connection.prepare(
                "SELECT kind, recipients, bytes FROM outbox WHERE exported = 0 ORDER BY seq",
            )?;
            let rows: Vec<(i64, Option<Vec<u8>>, Vec<u8>)> = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<Result<_, _>>()?;
            connection.execute("UPDATE outbox SET exported = 1 WHERE exported = 0", [])?;
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
        Ok(self.connection.query_row(
            "SELECT COUNT(*) FROM outbox WHERE exported = 0",
            [],
            |row| row.get::<_, i64>(0),
        )? as u64)
    }

    /// Seals and queues a message; returns only after the transaction committed.
    pub fn send(
        &mut self,
        channel: &str,
        body: Body,
        deadline_ms: Option<u64>,
    ) -> Result<EnvelopeId, StoreError> {
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

    fn resolve_message(&mut self, channel: &str, message: &str) -> Result<EnvelopeId, StoreError> {
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
        let mut statement = self.connection.prepare(
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
                matches!(envelope.body, Body::Text(_))
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
                let text = match envelope.body {
                    Body::Text(text) => text,
                    Body::LinkTest(bytes) if link_tests => {
                        crate::line::describe_link_test(&bytes, &relays)
                    }
                    _ => continue,
                };
                let from = loaded
                    .transcript()
                    .party_of(&envelope.sender)
                    .unwrap_or("?")
                    .to_owned();
                let mut delivered_to = loaded.delivered_to(&id)?;
                delivered_to.remove(&from);
                entries.push(LogEntry {
                    id,
                    from,
                    time_ms: envelope.claimed_time_ms,
                    text,
                    deadline_ms: envelope.deadline_ms,
                    delivered_to,
                    read_by: loaded.read_by(&id)?,
                });
            }
        }
        entries.reverse();
        Ok(entries)
    }

    /// The transcript root of a channel: (RFC 6962 hash, number of envelopes).
    pub fn transcript_root(&mut self, channel: &str) -> Result<([u8; 32], u64), StoreError> {
        let provider = Provider::new(&self.connection);
        Ok(load_channel(&self.connection, &provider, channel)?
            .transcript()
            .root()?)
    }

    /// Channels this device is in.
    pub fn channels(&mut self) -> Result<Vec<ChannelSummary>, StoreError> {
        // Through the cache: a channel loaded once is not restored (with its whole
        // transcript) again while no other process wrote.
        self.transact(|connection, _, cache| {
            let ids: Vec<Vec<u8>> = connection
                .prepare("SELECT id FROM channels ORDER BY name")?
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
                summaries.push(ChannelSummary {
                    id: channel.id(),
                    name: channel.name().to_owned(),
                    members: channel.members(),
                    epoch: channel.epoch(),
                    horizon: channel.transcript().horizon(),
                    envelopes: channel.transcript().len(),
                    committer: channel.is_committer(),
                });
                cache.channels.insert(id, channel);
            }
            Ok(summaries)
        })
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

    /// Where a relay's log was read up to.
    pub fn cursor(&self, relay: &str, log: &str) -> Result<u64, StoreError> {
        Ok(self
            .connection
            .query_row(
                "SELECT seq FROM cursors WHERE relay = ?1 AND log = ?2",
                params![relay, log],
                |row| row.get::<_, i64>(0),
            )
            .optional()?
            .unwrap_or(0) as u64)
    }

    /// Moves a cursor past messages that could not be processed (and were reported).
    pub fn skip_to(&mut self, cursor: Cursor<'_>) -> Result<(), StoreError> {
        self.transact(|connection, _, _| advance(connection, cursor))
    }

    /// What the sync engine needs to know of each channel.
    pub fn relay_plan(&mut self) -> Result<Vec<RelayPlan>, StoreError> {
        let mut plans = Vec::new();
        for channel in self.channels()? {
            let relays: Vec<(String, u64)> = self
                .connection
                .prepare("SELECT url, registered_version FROM channel_relays WHERE channel = ?1 ORDER BY url")?
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
            connection.execute(
                "UPDATE channel_relays SET registered_version = ?3 WHERE channel = ?1 AND url = ?2",
                params![&channel.0[..], relay, version as i64],
            )?;
            Ok(())
        })
    }

    /// Outbox rows that some relay does not hold yet, with the relays that hold each.
    pub fn outbox(&self) -> Result<Vec<OutboxItem>, StoreError> {
        /// seq, channel, kind, recipients, bytes, only_relays.
        type Row = (
            i64,
            Option<Vec<u8>>,
            i64,
            Option<Vec<u8>>,
            Vec<u8>,
            Option<String>,
        );
        let rows: Vec<Row> = self
            .connection
            .prepare("SELECT seq, channel, kind, recipients, bytes, only_relays FROM outbox WHERE settled = 0 ORDER BY seq")?
            .query_map([], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                    row.get(5)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        let mut items = Vec::with_capacity(rows.len());
        for (seq, channel, kind, recipients, bytes, only_relays) in rows {
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
            });
        }
        Ok(items)
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
            connection.execute(
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

    /// Records that a relay durably holds an outbox row; `settled` when every target
    /// now holds it.
    pub fn mark_posted(&mut self, seq: u64, relay: &str, settled: bool) -> Result<(), StoreError> {
        self.transact(|connection, _, _| {
            connection.execute(
                "INSERT OR IGNORE INTO outbox_posted (seq, relay) VALUES (?1, ?2)",
                params![seq as i64, relay],
            )?;
            if settled {
                connection.execute("UPDATE outbox SET settled = 1 WHERE seq = ?1", [seq as i64])?;
            }
            Ok(())
        })
    }

    /// Relays named on a contact's card (where it receives invitations).
    pub fn contact_relays(&self, device: &DeviceKey) -> Result<Vec<String>, StoreError> {
        let card: Option<Vec<u8>> = self
            .connection
            .query_row(
                "SELECT card FROM contacts WHERE key = ?1",
                [&device.0[..]],
                |row| row.get(0),
            )
            .optional()?;
        match card {
            Some(card) => Ok(CardIn::decode(&card)?.relays().to_vec()),
            None => Ok(Vec::new()),
        }
    }

    /// Relays on this device's own card.
    pub fn own_relays(&self) -> Result<Vec<String>, StoreError> {
        Ok(CardIn::decode(&self.card()?)?.relays().to_vec())
    }

    /// The id of a channel named `name` (or given by its hex id).
    pub fn channel_id(&self, name: &str) -> Result<ChannelId, StoreError> {
        channel_id_by_name(&self.connection, name)
    }

    /// The relays of a channel.
    pub fn channel_relays(&self, channel: &ChannelId) -> Result<Vec<String>, StoreError> {
        channel_relays(&self.connection, channel)
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
                    .chain_from(&me, from, crate::line::MAX_UNDELIVERED_SCAN)?
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
                    let row: Option<i64> = connection
                        .query_row(
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
                    let bytes = match channel.resend(&provider, identity, &id) {
                        Ok(bytes) => bytes,
                        // A commit or proposal waits: a later round seals it.
                        Err(ChannelError::AwaitingCommit | ChannelError::CommitPending) => break,
                        Err(error) => return Err(error.into()),
                    };
                    resealed = true;
                    connection.execute(
                        "UPDATE outbox SET bytes = ?2, offered_ms = ?3 WHERE seq = ?1",
                        params![seq, &bytes, now_ms as i64],
                    )?;
                    due.push(OutboxItem {
                        seq: seq as u64,
                        channel: Some(summary.id),
                        welcome: false,
                        commit: false,
                        only_relays: None,
                        recipients: Vec::new(),
                        bytes,
                        posted: Vec::new(),
                    });
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
        Ok(self.connection.query_row(
            "SELECT COUNT(*) FROM outbox WHERE envelope = ?1",
            [&id.0[..]],
            |row| row.get::<_, i64>(0),
        )? as u64)
    }

    /// Checks the database's own integrity (SQLite `integrity_check`).
    pub fn integrity_check(&self) -> Result<(), StoreError> {
        let result: String = self
            .connection
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))?;
        if result == "ok" {
            Ok(())
        } else {
            Err(corrupt(result))
        }
    }
}

fn channel_row(
    connection: &Connection,
    name: &str,
) -> Result<Option<(Vec<u8>, String)>, StoreError> {
    Ok(connection
        .query_row(
            "SELECT id, snapshot FROM channels WHERE name = ?1 OR lower(hex(id)) = lower(?1)",
            [name],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?)
}

#[cfg(test)]
thread_local! {
    /// The failpoint armed by a unit test of this thread, if any.
    static FAILPOINT: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// A step of a transaction where tests inject a failure (a crash that is reported
/// rather than fatal); in other builds it does nothing.
fn failpoint(name: &'static str) -> Result<(), StoreError> {
    #[cfg(test)]
    if FAILPOINT.with(|armed| armed.get()) == Some(name) {
        return Err(StoreError::Corrupt(format!("failpoint {name}")));
    }
    let _ = name;
    Ok(())
}

/// A position in a relay's log, advanced with what was read from it.
#[derive(Debug, Clone, Copy)]
pub struct Cursor<'a> {
    pub relay: &'a str,
    pub log: &'a str,
    pub seq: u64,
}

fn advance(connection: &Connection, cursor: Cursor<'_>) -> Result<(), StoreError> {
    connection.execute(
        "INSERT INTO cursors (relay, log, seq) VALUES (?1, ?2, ?3)
         ON CONFLICT (relay, log) DO UPDATE SET seq = MAX(seq, ?3)",
        params![cursor.relay, cursor.log, cursor.seq as i64],
    )?;
    Ok(())
}

/// Makes `relays` the channel's relays, keeping what is known of the ones that stay.
fn replace_relays(
    connection: &Connection,
    channel: &ChannelId,
    relays: &[String],
) -> Result<(), StoreError> {
    for old in channel_relays(connection, channel)? {
        if !relays.contains(&old) {
            connection.execute(
                "DELETE FROM channel_relays WHERE channel = ?1 AND url = ?2",
                params![&channel.0[..], old],
            )?;
        }
    }
    set_relays(connection, channel, relays)
}

/// Follows relay changes that the channel's committer announced in `events`.
fn follow_relay_changes(
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
        }
    }
    Ok(())
}

/// Whether an announced relay address has the form `https://HOST:PORT/#sha256=HEX`.
fn hotline_relay_url_ok(url: &str) -> bool {
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
        .prepare("SELECT url FROM channel_relays WHERE channel = ?1 ORDER BY url")?
        .query_map([&channel.0[..]], |row| row.get(0))?
        .collect::<Result<_, _>>()?)
}

fn set_relays(
    connection: &Connection,
    channel: &ChannelId,
    relays: &[String],
) -> Result<(), StoreError> {
    for relay in relays {
        connection.execute(
            "INSERT OR IGNORE INTO channel_relays (channel, url, added_ms) VALUES (?1, ?2, ?3)",
            params![&channel.0[..], relay, now_ms() as i64],
        )?;
    }
    Ok(())
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

fn load_channel(
    connection: &Rc<Connection>,
    provider: &Provider<'_>,
    name: &str,
) -> Result<Channel, StoreError> {
    let (id, snapshot) = channel_row(connection, name)?
        .ok_or_else(|| StoreError::UnknownChannel(name.to_owned()))?;
    restore(connection, provider, &id, &snapshot)
}

fn load_channel_by_id(
    connection: &Rc<Connection>,
    provider: &Provider<'_>,
    id: &ChannelId,
) -> Result<Channel, StoreError> {
    let snapshot: String = connection
        .query_row(
            "SELECT snapshot FROM channels WHERE id = ?1",
            [&id.0[..]],
            |row| row.get(0),
        )
        .optional()?
        .ok_or_else(|| StoreError::UnknownChannel(id.to_string()))?;
    restore(connection, provider, &id.0, &snapshot)
}

fn restore(
    connection: &Rc<Connection>,
    provider: &Provider<'_>,
    id: &[u8],
    snapshot: &str,
) -> Result<Channel, StoreError> {
    let snapshot: ChannelSnapshot = serde_json::from_str(snapshot).map_err(corrupt)?;
    // The envelopes that wait for a parent (all of them, for a channel stored by an
    // earlier version: its transcript is rebuilt from them).
    let envelopes: Vec<Vec<u8>> = connection
        .prepare("SELECT bytes FROM envelopes WHERE channel = ?1")?
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
    if new {
        connection.execute(
            "INSERT INTO channels (id, name, snapshot) VALUES (?1, ?2, ?3)",
            params![&id.0[..], channel.name(), snapshot],
        )?;
    } else {
        connection.execute(
            "UPDATE channels SET snapshot = ?2 WHERE id = ?1",
            params![&id.0[..], snapshot],
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
    let (id, bytes) = channel.send(provider, identity, body, now_ms(), deadline_ms)?;
    // Its echo through each relay is placed in this device's own chain.
    if let Some(envelope) = channel.transcript().get(&id)? {
        let hash = crate::line::copy_hash(&bytes);
        crate::line::record_copy(
            connection,
            &channel.id(),
            &hash,
            &envelope.sender,
            envelope.seq,
        )?;
    }
    let outgoing = Outgoing::Message {
        id: Some(id),
        bytes,
    };
    queue(connection, Some(channel.id()), outgoing, Some(id))?;
    Ok(id)
}

/// Queues a commit. A channel with relays merges it when the first relay durably
/// accepted it ([`Store::commit_relayed`]), so that no member ever follows a commit the
/// others cannot get; a channel without relays (bundles) merges it at once.
fn stage_commit(
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
fn queue_released(
    connection: &Connection,
    channel: &Channel,
    out: Outgoing,
) -> Result<(), StoreError> {
    if let Outgoing::Message {
        id: Some(id),
        bytes,
    } = &out
        && let Some(envelope) = channel.transcript().get(id)?
    {
        let hash = crate::line::copy_hash(bytes);
        crate::line::record_copy(
            connection,
            &channel.id(),
            &hash,
            &envelope.sender,
            envelope.seq,
        )?;
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
    connection.execute(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::verified_pair;

    fn temp_home(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("hotline-failpoints-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// A failure at any step of the receive transaction leaves nothing behind: the
    /// transcript, the processed hashes and the MLS state are as before, so the very
    /// same message is then received normally (a half-applied MLS state would refuse it
    /// as a reused secret or an old generation).
    #[test]
    fn a_failure_at_any_step_of_receive_changes_nothing() {
        let (mut north, mut south) = verified_pair(&temp_home("north"), &temp_home("south"));
        let steps = [
            "receive-loaded",
            "receive-processed",
            "receive-before-save",
            "receive-saved",
            "before-commit",
        ];
        for step in steps {
            north
                .send("crisis", Body::Text(format!("through {step}")), None)
                .unwrap();
            let bytes = match north.export_outbox().unwrap().pop() {
                Some(Entry::Message(bytes)) => bytes,
                other => panic!("expected a message, got {other:?}"),
            };
            let before = south.log("crisis").unwrap().len();
            FAILPOINT.with(|armed| armed.set(Some(step)));
            let error = south.receive(&bytes).unwrap_err();
            assert!(error.to_string().contains(step), "{error}");
            FAILPOINT.with(|armed| armed.set(None));
            assert_eq!(
                south.log("crisis").unwrap().len(),
                before,
                "{step} left a message behind"
            );
            let events = south.receive(&bytes).unwrap();
            assert!(
                matches!(events.as_slice(), [Event::Accepted(_)]),
                "after {step}: {events:?}"
            );
            assert_eq!(south.log("crisis").unwrap().len(), before + 1);
        }
        south.integrity_check().unwrap();
    }
}
