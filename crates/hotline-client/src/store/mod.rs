//! The device store: one SQLite database, one transaction per operation.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hotline_core::card::{CardError, CardIn};
use hotline_core::export::ExportError;
use hotline_core::{
    Body, Channel, ChannelError, ChannelId, ChannelSnapshot, DeviceIdentity, DeviceInfo, DeviceKey,
    Envelope, EnvelopeId, Event, Export, Fingerprint, MembershipNote, Outgoing, Precedence,
    create_card,
};
use openmls_sqlite_storage::SqliteStorageProvider;
use openmls_traits::OpenMlsProvider;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::bundle::Entry;
use crate::clock::{Clock, SystemClock};
use crate::home::{Home, HomeError};
use crate::provider::{JsonCodec, Provider};
use crate::transcript_store::SqliteTranscript;

mod agreements;
mod channels;
mod codebook;
mod contacts;
mod copies;
mod cosigning;
mod messages;
mod outbox;
mod persist;
mod relays;
mod schema;

pub use agreements::{AgreementState, AgreementStatus, Signed};
pub use codebook::{
    CODE_BOOK_LANGUAGE, Catalogue, CodeEntry, Field, FieldKind, preferred_language, render_coded,
};
pub(crate) use copies::*;
pub(crate) use cosigning::cosign_latest;
pub(crate) use messages::text_of;
pub use outbox::MAX_UNDELIVERED_SCAN;
pub(crate) use outbox::{precedence_of, reseal};
pub(crate) use persist::*;
pub use relays::relay_label;
pub(crate) use relays::*;
pub use schema::SCHEMA_VERSION;
pub(crate) use schema::{STATEMENT_CACHE, open_connection};

/// The `processed` table's channel for Welcomes already taken.
const WELCOMES: [u8; 32] = [0; 32];

/// One-time key packages on a new card.
pub const KEY_PACKAGES_PER_CARD: usize = 16;

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
    #[error("no channel named {0:?}")]
    UnknownChannel(String),
    #[error("a channel named {0:?} exists already")]
    ChannelExists(String),
    #[error("no verified contact of party {0:?}")]
    UnknownParty(String),
    #[error("{0}")]
    BadRelays(String),
    #[error("this invitation was taken already (it came through another relay)")]
    DuplicateWelcome,
    #[error("party {0:?} has no device in this channel")]
    NotInChannel(String),
    #[error("no message {0} in this channel")]
    UnknownMessage(String),
    #[error("no agreed text {0} in this channel")]
    UnknownAgreement(String),
    #[error("{0}")]
    Agreement(String),
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
    pub precedence: Precedence,
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
    /// A message's precedence (routine for everything else).
    pub precedence: Precedence,
}

/// A device this device invited to a channel.
#[derive(Debug, Clone)]
pub struct Invited {
    pub device: DeviceKey,
    pub party: String,
    pub invited_ms: u64,
}

/// A channel as `channel list` shows it.
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
    /// The settled prefix: how many envelopes are final, and their root (the same on
    /// every member that settled as far; it never changes once given).
    pub settled: u64,
    pub settled_root: [u8; 32],
    /// Devices this device invited that have not joined yet, as far as it can see (the
    /// transcript holds nothing of theirs).
    pub not_joined: Vec<Invited>,
}

/// How often [`Store::checkpoint_beside`]'s thread checkpoints what was committed.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// SQLite's default: a commit that takes the WAL past this many pages checkpoints.
const WAL_AUTOCHECKPOINT: i64 = 1000;

/// The checkpoint thread of [`Store::checkpoint_beside`]; stopped and joined on drop.
#[derive(Debug)]
pub struct Checkpoints {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Every [`CHECKPOINT_EVERY`] until told to stop: a passive checkpoint (it never waits
/// for, nor holds up, a writer or a reader) when something was committed since the last
/// one. A checkpoint that fails is tried again at the next tick.
fn checkpoint_loop(connection: &Connection, stopped: &std::sync::mpsc::Receiver<()>) {
    let mut seen: Option<i64> = None;
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        stopped.recv_timeout(CHECKPOINT_EVERY)
    {
        let version = connection
            .query_row("PRAGMA data_version", [], |row| row.get::<_, i64>(0))
            .ok();
        if version.is_some() && version == seen {
            continue;
        }
        let done = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            row.get::<_, i64>(0)
        });
        // Busy (0 means it ran): looked at again next time, whatever the version.
        seen = if matches!(done, Ok(0)) { version } else { None };
    }
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
    /// Read once per operation (see [`crate::clock`]).
    clock: Arc<dyn Clock>,
    /// How the connection commits now (SQLite's `synchronous`).
    durability: Durability,
    /// Whether a commit since the last synced one did not wait for the disk.
    unsynced: bool,
}

/// Whether a transaction's commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// On disk when the commit returns (`synchronous=FULL`: the WAL is synced).
    Synced,
    /// Committed atomically without waiting for the disk (`synchronous=NORMAL`), for
    /// what a power failure may only undo, never break: a relay's answer recorded (the
    /// message is pushed again, and the relay answers it is a duplicate), a copy
    /// already processed coming back. The next synced commit of any handle on the
    /// home syncs it too (one WAL, written in order). Nothing is acknowledged to a
    /// relay before it is synced ([`Store::is_synced`]).
    Deferred,
}

/// Loaded channels, by id, and the `data_version` they were loaded at.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    pub(crate) channels: std::collections::HashMap<ChannelId, Channel>,
    data_version: Option<i64>,
}

pub(crate) use crate::clock::now_ms;

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
            clock: Arc::new(SystemClock),
            durability: Durability::Synced,
            unsynced: false,
        };
        store.transact(|connection, identity, _| {
            let provider = Provider::new(connection);
            let card = create_card(identity, &provider, KEY_PACKAGES_PER_CARD, relays)?;
            crate::store::cached::execute(
                connection,
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
        let secret: Vec<u8> = crate::store::cached::query_row(
            &connection,
            "SELECT identity FROM device WHERE id = 1",
            [],
            |row| row.get(0),
        )
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
            clock: Arc::new(SystemClock),
            durability: Durability::Synced,
            unsynced: false,
        };
        store.rebuild_transcripts()?;
        store.reissue_card()?;
        store.load_rotations()?;
        Ok(store)
    }

    /// Reissues, once, a card made before inbox capabilities, with the same key
    /// packages and relays (its fingerprint is unchanged; holders of the old card
    /// cannot leave invitations until they import the new one).
    fn reissue_card(&mut self) -> Result<(), StoreError> {
        let Some(card) = hotline_core::card::reissue_card(&self.identity, &self.card()?)? else {
            return Ok(());
        };
        self.transact(|connection, _, _| {
            crate::store::cached::execute(
                connection,
                "UPDATE device SET card = ?1 WHERE id = 1",
                [&card],
            )?;
            Ok(())
        })
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
                let Some(id) = crate::store::cached::query_row(
                    connection,
                    "SELECT channel FROM rebuild LIMIT 1",
                    [],
                    |row| row.get::<_, Vec<u8>>(0),
                )
                .optional()?
                else {
                    return Ok(true);
                };
                crate::store::cached::execute(
                    connection,
                    "DELETE FROM rebuild WHERE channel = ?1",
                    [&id],
                )?;
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

    /// The database connection, for reads outside a transaction.
    pub(crate) fn connection(&self) -> &Connection {
        &self.connection
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
        self.transact_with(Durability::Synced, operation)
    }

    /// As [`Store::transact`], committed without waiting for the disk
    /// ([`Durability::Deferred`]).
    pub(crate) fn transact_deferred<T>(
        &mut self,
        operation: impl FnOnce(&Rc<Connection>, &DeviceIdentity, &mut Cache) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.transact_with(Durability::Deferred, operation)
    }

    /// One transaction, its commit `durability`, at the store clock's time.
    fn transact_with<T>(
        &mut self,
        durability: Durability,
        operation: impl FnOnce(&Rc<Connection>, &DeviceIdentity, &mut Cache) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let now = self.clock.now_ms();
        crate::clock::during(now, || self.transact_at(durability, operation))
    }

    /// Whether everything this handle committed is on disk (no commit since the last
    /// synced one was [`Durability::Deferred`]).
    pub fn is_synced(&self) -> bool {
        !self.unsynced
    }

    /// Makes everything this handle committed durable: one small synced commit, which
    /// syncs the WAL and so every commit before it. Nothing to do when synced already.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if !self.unsynced {
            return Ok(());
        }
        self.transact(|connection, _, _| {
            crate::store::cached::execute(
                connection,
                "INSERT INTO settings (key, value) VALUES ('synced_ms', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [now_ms() as i64],
            )?;
            Ok(())
        })
    }

    /// Moves the database's checkpoints (the WAL copied into the database file, which
    /// is then synced: 1 to 2 ms every thousand pages or so) off this handle's commits,
    /// onto a thread of their own that checkpoints what others committed every
    /// [`CHECKPOINT_EVERY`], while the returned guard lives. For a long-running
    /// follower, whose commits are the line's latency; [`Store::checkpoint_inline`]
    /// puts them back. Other handles (other processes) keep checkpointing as they
    /// commit.
    pub fn checkpoint_beside(&mut self) -> Result<Checkpoints, StoreError> {
        let connection = Connection::open(self.home.database())?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("checkpoints".into())
            .spawn(move || checkpoint_loop(&connection, &stopped))
            .map_err(|e| StoreError::Corrupt(format!("starting the checkpoint thread: {e}")))?;
        let checkpoints = Checkpoints {
            stop: Some(stop),
            thread: Some(thread),
        };
        self.connection
            .pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(checkpoints)
    }

    /// Checkpoints as SQLite does by default again: in the commit that takes the WAL
    /// past a thousand pages.
    pub fn checkpoint_inline(&mut self) -> Result<(), StoreError> {
        self.connection
            .pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT)?;
        Ok(())
    }

    /// Sets the clock this store reads (the system's by default).
    pub fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.clock = clock;
    }

    /// The store's clock, now.
    pub fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn transact_at<T>(
        &mut self,
        durability: Durability,
        operation: impl FnOnce(&Rc<Connection>, &DeviceIdentity, &mut Cache) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // Cached statements: these run around every transaction.
        let run = |connection: &Connection, sql: &str| -> Result<(), rusqlite::Error> {
            connection.prepare_cached(sql)?.execute([]).map(|_| ())
        };
        if durability != self.durability {
            let mode = match durability {
                Durability::Synced => "PRAGMA synchronous = FULL",
                Durability::Deferred => "PRAGMA synchronous = NORMAL",
            };
            match run(&self.connection, mode) {
                Ok(()) => self.durability = durability,
                // Never a commit meant to be synced on a connection that does not sync.
                Err(error) if durability == Durability::Synced => return Err(error.into()),
                // A deferred commit is then synced: slower, never less safe.
                Err(_) => {}
            }
        }
        run(&self.connection, "BEGIN IMMEDIATE")?;
        let changes_before = self.connection.total_changes();
        let version = self
            .connection
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut statement| statement.query_row([], |row| row.get::<_, i64>(0)));
        match version {
            Ok(version) if self.cache.data_version == Some(version) => {}
            Ok(version) => {
                self.cache.channels.clear();
                self.cache.data_version = Some(version);
            }
            Err(error) => {
                let _ = run(&self.connection, "ROLLBACK");
                return Err(error.into());
            }
        }
        let result = operation(&self.connection, &self.identity, &mut self.cache)
            .and_then(|value| failpoint("before-commit").map(|()| value))
            .and_then(|value| {
                run(&self.connection, "COMMIT")
                    .map(|()| value)
                    .map_err(Into::into)
            });
        match &result {
            // A commit that changed nothing wrote nothing, and synced nothing.
            Ok(_) if self.connection.total_changes() != changes_before => {
                self.unsynced = self.durability == Durability::Deferred;
            }
            Ok(_) => {}
            Err(_) => {
                // Rolling back can only fail if no transaction is open any more.
                let _ = run(&self.connection, "ROLLBACK");
                self.cache.channels.clear();
            }
        }
        result
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

#[cfg(test)]
thread_local! {
    /// The failpoint armed by a unit test of this thread, if any.
    static FAILPOINT: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// A step of a transaction where tests inject a failure (a crash that is reported
/// rather than fatal); in other builds it does nothing.
pub(crate) fn failpoint(name: &'static str) -> Result<(), StoreError> {
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
    /// The relay's custody receipt for the message at `seq` (checked by the caller).
    pub receipt: Option<&'a [u8]>,
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
                .send("crisis", Body::text(format!("through {step}")), None)
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

    /// A copy of bytes already processed (the same message through another relay, a
    /// device's own message coming back) is taken without loading the channel and
    /// without waiting for the disk; its relay's cursor moves and the copy is placed
    /// in order all the same, and nothing counts as on disk until a synced commit.
    #[test]
    fn a_copy_already_processed_is_placed_without_waiting_for_the_disk() {
        let (mut north, mut south) =
            verified_pair(&temp_home("copy-north"), &temp_home("copy-south"));
        north.send("crisis", Body::text("once"), None).unwrap();
        let bytes = match north.export_outbox().unwrap().pop() {
            Some(Entry::Message(bytes)) => bytes,
            other => panic!("expected a message, got {other:?}"),
        };
        let through = |relay: &'static str, seq: u64| Cursor {
            relay,
            log: "crisis-log",
            seq,
            receipt: None,
        };
        let events = south.receive_at(&bytes, Some(through("r1", 1))).unwrap();
        assert!(
            matches!(events.as_slice(), [Event::Accepted(_)]),
            "{events:?}"
        );
        assert!(south.is_synced());

        let events = south.receive_at(&bytes, Some(through("r2", 1))).unwrap();
        assert_eq!(events, [Event::Duplicate]);
        assert_eq!(south.cursor("r2", "crisis-log").unwrap(), 1);
        assert!(!south.is_synced(), "a deferred commit counts as on disk");
        let stored_alarms = |store: &mut Store| {
            let now = store.now();
            store
                .status(now)
                .unwrap()
                .alarms
                .into_iter()
                .filter(|alarm| alarm.id.is_some())
                .map(|alarm| alarm.kind)
                .collect::<Vec<_>>()
        };
        assert_eq!(stored_alarms(&mut south), Vec::<String>::new());
        south.sync().unwrap();
        assert!(south.is_synced());

        // The first relay serves it again: placed, it is a replay.
        let events = south.receive_at(&bytes, Some(through("r1", 2))).unwrap();
        assert_eq!(events, [Event::Duplicate]);
        assert_eq!(south.cursor("r1", "crisis-log").unwrap(), 2);
        assert_eq!(stored_alarms(&mut south), ["replayed"]);
        // A synced commit that changes nothing leaves what is deferred deferred.
        assert!(!south.is_synced());
        south.link_test_interval().unwrap();
        assert!(!south.is_synced());
        // One that changes something syncs everything before it.
        north.send("crisis", Body::text("twice"), None).unwrap();
        south.import_bundle(north.export_outbox().unwrap()).unwrap();
        assert!(south.is_synced());
        south.integrity_check().unwrap();
    }

    /// While a follower's checkpoints run beside it, its own commits never checkpoint
    /// (its autocheckpoint is off), what it commits still reaches the database file
    /// within a few ticks, and the thread stops with its guard; then commits checkpoint
    /// as SQLite does by default again.
    #[test]
    fn checkpoints_run_beside_a_follower_and_stop_with_it() {
        let (mut north, _south) =
            verified_pair(&temp_home("beside-north"), &temp_home("beside-south"));
        let autocheckpoint = |store: &Store| -> i64 {
            store
                .connection()
                .pragma_query_value(None, "wal_autocheckpoint", |row| row.get(0))
                .unwrap()
        };
        let database = north.home().database().to_owned();
        let size = || std::fs::metadata(&database).unwrap().len();
        // Everything so far in the database file, and the WAL started again.
        north
            .connection()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        let before = size();
        let checkpoints = north.checkpoint_beside().unwrap();
        assert_eq!(autocheckpoint(&north), 0);
        for n in 0..100 {
            north
                .send(
                    "crisis",
                    Body::text(format!("{n} {}", "x".repeat(900))),
                    None,
                )
                .unwrap();
        }
        let deadline = std::time::Instant::now() + 20 * CHECKPOINT_EVERY;
        while size() <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "nothing reached the database file beside the follower"
            );
            std::thread::sleep(CHECKPOINT_EVERY / 5);
        }
        drop(checkpoints);
        north.checkpoint_inline().unwrap();
        assert_eq!(autocheckpoint(&north), WAL_AUTOCHECKPOINT);
    }
}

/// Statements through the connection's statement cache: `Connection::execute` and
/// `Connection::query_row` parse their SQL again on every call (a profile of a
/// following device found SQLite's parser in a tenth of its time).
pub(crate) mod cached {
    use rusqlite::{Connection, Params, Row};

    pub(crate) fn execute<P: Params>(
        connection: &Connection,
        sql: &str,
        params: P,
    ) -> rusqlite::Result<usize> {
        connection.prepare_cached(sql)?.execute(params)
    }

    pub(crate) fn query_row<T, P: Params>(
        connection: &Connection,
        sql: &str,
        params: P,
        row: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        connection.prepare_cached(sql)?.query_row(params, row)
    }
}
