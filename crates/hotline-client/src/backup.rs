//! Backups: the whole device (identity, contacts, channels with their MLS state,
//! outbox, transcripts, settings) in one file encrypted with a passphrase (age, scrypt),
//! and its restore into a new home.
//!
//! ```text
//!   age( "hotline-backup 1\n" ‖ header (JSON, one line) ‖ SQLite database )
//! ```
//!
//! The database is copied with SQLite's online backup in one step: a consistent
//! snapshot even while a follower writes (WAL readers never block it). The plaintext
//! copy lives only in the device's private home, for the time it takes to encrypt it.
//!
//! **A restored device continues from the backup's state.** Messages other parties
//! sent after the backup come again from the relays (while they keep them). Messages
//! this device sent after it cannot be read back (MLS never opens a device's own
//! messages), and sealing from the older state would spend the same MLS keys again and
//! fork this device's chain. So every restored channel holds its sealing
//! ([`hotline_core::Hold`]) until each of its relays was read to the end; a message
//! sealed as this device's that it did not send, met on the way, keeps the hold and
//! raises a `cloned` alarm (see ARCHITECTURE.md, "Backups").

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use age::secrecy::SecretString;
use hotline_core::{ChannelId, DeviceIdentity, Hold};
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::home::{DATABASE, HomeError};
use crate::provider::Provider;
use crate::store::{
    Cache, SCHEMA_VERSION, Store, StoreError, channel_relays, checkout, save_channel,
};

/// The first line inside the encryption.
const MAGIC: &[u8] = b"hotline-backup 1\n";
/// Longest header line.
const MAX_HEADER: u64 = 4096;
/// The plaintext snapshot, inside the home while it is encrypted.
const SNAPSHOT: &str = "backup.snapshot";
/// How often a busy snapshot is tried again (50 ms apart).
const MAX_STEP_TRIES: u32 = 600;
/// The database being restored, renamed to [`DATABASE`] once checked.
const RESTORING: &str = "device.db.restoring";

/// What a backup holds, as its header says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupInfo {
    pub party: String,
    pub device: String,
    /// The device's fingerprint, as `hotline id` shows it.
    pub fingerprint: String,
    pub created_ms: u64,
    /// The database's schema version (older ones are migrated on restore).
    pub schema: i64,
    pub channels: u64,
    /// Bytes of the database inside.
    pub bytes: u64,
}

/// Why a backup or a restore failed. A failed restore leaves no device behind.
#[derive(Debug, Error)]
pub enum BackupError {
    #[error("cannot write the backup: {0}")]
    Write(#[source] io::Error),
    #[error("cannot read the backup: {0}")]
    Read(#[source] io::Error),
    #[error("not a hotline backup: {0}")]
    NotABackup(String),
    #[error("wrong passphrase (or a file encrypted with another one)")]
    Passphrase,
    #[error("the backup is damaged or cut short: {0}")]
    Damaged(String),
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for BackupError {
    fn from(error: rusqlite::Error) -> Self {
        BackupError::Store(StoreError::Database(error))
    }
}

impl Store {
    /// Writes the whole device to `out`, encrypted with `passphrase`.
    pub fn backup_to(
        &mut self,
        out: impl Write,
        passphrase: SecretString,
    ) -> Result<BackupInfo, BackupError> {
        let snapshot = self.home().path().join(SNAPSHOT);
        // Our own leftover from an interrupted backup, in our own private home.
        match fs::remove_file(&snapshot) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => {
                return Err(BackupError::Write(error));
            }
            _ => {}
        }
        let written = self.snapshot_into(&snapshot).and_then(|info| {
            let file = File::open(&snapshot).map_err(BackupError::Write)?;
            encrypt(file, &info, out, passphrase)?;
            Ok(info)
        });
        let _ = fs::remove_file(&snapshot);
        written
    }

    /// Copies the database into `path` (mode 0600) in one consistent step.
    fn snapshot_into(&mut self, path: &Path) -> Result<BackupInfo, BackupError> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(BackupError::Write)?;
        let mut copy = Connection::open(path)?;
        {
            let backup = Backup::new(self.connection(), &mut copy)?;
            // Every page in one step (-1): one read transaction, so one consistent
            // state. Busy or locked (a writer checkpointing): try again, boundedly.
            let mut tries = 0;
            loop {
                match backup.step(-1)? {
                    StepResult::Done => break,
                    _ if tries >= MAX_STEP_TRIES => {
                        return Err(BackupError::Write(io::Error::other(
                            "the database stayed busy; try again",
                        )));
                    }
                    _ => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
        let schema: i64 = copy.pragma_query_value(None, "user_version", |row| row.get(0))?;
        let channels: u64 =
            copy.query_row("SELECT COUNT(*) FROM channels", [], |row| row.get(0))?;
        drop(copy);
        let info = self.identity().info();
        Ok(BackupInfo {
            party: info.party.clone(),
            device: info.device.clone(),
            fingerprint: self.identity().fingerprint().to_string(),
            created_ms: self.now(),
            schema,
            channels,
            bytes: fs::metadata(path).map_err(BackupError::Write)?.len(),
        })
    }

    /// Holds sealing in every channel with relays until each of them was read to its
    /// end ([`Store::caught_up`]). Returns how many channels wait.
    pub(crate) fn begin_catch_up(&mut self) -> Result<usize, StoreError> {
        self.transact(|connection, _, cache| {
            let provider = Provider::new(connection);
            let mut held = 0;
            for id in channel_ids(connection)? {
                let relays = channel_relays(connection, &id)?;
                if relays.is_empty() {
                    // Bundles only: nothing to read first.
                    continue;
                }
                for relay in &relays {
                    connection.execute(
                        "INSERT OR IGNORE INTO catch_up (channel, relay) VALUES (?1, ?2)",
                        params![&id.0[..], relay],
                    )?;
                }
                let mut channel = checkout(cache, connection, &provider, &id)?;
                channel.hold_sealing();
                save_channel(connection, &mut channel, false)?;
                cache.channels.insert(id, channel);
                held += 1;
            }
            Ok(held)
        })
    }

    /// Notes that `relay`'s log of `channel` was read to its end. When it was the last
    /// relay a restored channel waited for, the channel seals again (unless it met
    /// messages sent elsewhere). Returns whether it was released now.
    pub(crate) fn caught_up(
        &mut self,
        channel: &ChannelId,
        relay: &str,
    ) -> Result<bool, StoreError> {
        let waiting: Option<i64> = self
            .connection()
            .prepare_cached("SELECT 1 FROM catch_up LIMIT 1")?
            .query_row([], |row| row.get(0))
            .optional()?;
        if waiting.is_none() {
            return Ok(false);
        }
        self.transact(|connection, _, cache| {
            let deleted = connection.execute(
                "DELETE FROM catch_up WHERE channel = ?1 AND relay = ?2",
                params![&channel.0[..], relay],
            )?;
            let left: i64 = connection.query_row(
                "SELECT COUNT(*) FROM catch_up WHERE channel = ?1",
                [&channel.0[..]],
                |row| row.get(0),
            )?;
            if deleted == 0 || left > 0 {
                return Ok(false);
            }
            let provider = Provider::new(connection);
            let mut loaded = checkout(cache, connection, &provider, channel)?;
            let released = loaded.hold() == Some(Hold::CatchingUp);
            if released {
                loaded.release();
                save_channel(connection, &mut loaded, false)?;
            }
            cache.channels.insert(*channel, loaded);
            Ok(released)
        })
    }

    /// How many restored channels still wait for some relay.
    pub fn channels_catching_up(&self) -> Result<u64, StoreError> {
        Ok(self.connection().query_row(
            "SELECT COUNT(DISTINCT channel) FROM catch_up",
            [],
            |row| row.get(0),
        )?)
    }

    /// The relays a restored channel still waits for, if it waits.
    pub fn catching_up(&self, channel: &ChannelId) -> Result<Vec<String>, StoreError> {
        Ok(self
            .connection()
            .prepare_cached("SELECT relay FROM catch_up WHERE channel = ?1 ORDER BY relay")?
            .query_map([&channel.0[..]], |row| row.get(0))?
            .collect::<Result<_, _>>()?)
    }
}

/// Lets every channel held for messages sent elsewhere seal again: the operator cleared
/// the `cloned` alarm, knowing that this device's next envelope forks its chain.
pub(crate) fn release_sent_elsewhere(
    connection: &Rc<Connection>,
    cache: &mut Cache,
) -> Result<(), StoreError> {
    let provider = Provider::new(connection);
    for id in channel_ids(connection)? {
        let mut channel = checkout(cache, connection, &provider, &id)?;
        if channel.hold() == Some(Hold::SentElsewhere) {
            channel.release();
            save_channel(connection, &mut channel, false)?;
        }
        cache.channels.insert(id, channel);
    }
    Ok(())
}

/// Every channel of this device.
fn channel_ids(connection: &Connection) -> Result<Vec<ChannelId>, StoreError> {
    let ids: Vec<Vec<u8>> = connection
        .prepare("SELECT id FROM channels")?
        .query_map([], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    ids.into_iter()
        .map(|id| {
            <[u8; 32]>::try_from(id.as_slice())
                .map(ChannelId)
                .map_err(|_| StoreError::Corrupt("a channel id is not 32 bytes".into()))
        })
        .collect()
}

fn encrypt(
    mut database: File,
    info: &BackupInfo,
    out: impl Write,
    passphrase: SecretString,
) -> Result<(), BackupError> {
    let encryptor = age::Encryptor::with_user_passphrase(passphrase);
    let mut writer = encryptor.wrap_output(out).map_err(BackupError::Write)?;
    let header = serde_json::to_vec(info)
        .map_err(|e| BackupError::Write(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    writer.write_all(MAGIC).map_err(BackupError::Write)?;
    writer.write_all(&header).map_err(BackupError::Write)?;
    writer.write_all(b"\n").map_err(BackupError::Write)?;
    io::copy(&mut database, &mut writer).map_err(BackupError::Write)?;
    writer
        .finish()
        .map_err(BackupError::Write)?
        .flush()
        .map_err(BackupError::Write)
}

/// Reads a backup's header without restoring it.
pub fn inspect(input: impl Read, passphrase: SecretString) -> Result<BackupInfo, BackupError> {
    let mut reader = decrypt(input, passphrase)?;
    read_header(&mut reader)
}

/// Restores the backup in `input` into a new home at `path` (refused if a device is
/// there). Every channel with relays then holds its sealing until it caught up.
pub fn restore(
    input: impl Read,
    passphrase: SecretString,
    path: &Path,
) -> Result<(BackupInfo, Store), BackupError> {
    if path.join(DATABASE).exists() {
        return Err(HomeError::Exists {
            path: path.to_owned(),
        }
        .into());
    }
    let mut reader = decrypt(input, passphrase)?;
    let info = read_header(&mut reader)?;
    let home_io = |source| HomeError::Io {
        path: path.to_owned(),
        source,
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(home_io)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(home_io)?;
    let restoring = path.join(RESTORING);
    let written = write_database(&mut reader, &restoring, &info)
        .and_then(|()| fs::rename(&restoring, path.join(DATABASE)).map_err(BackupError::Write))
        .and_then(|()| {
            File::open(path)
                .and_then(|dir| dir.sync_all())
                .map_err(BackupError::Write)
        });
    if let Err(error) = written {
        let _ = fs::remove_file(&restoring);
        return Err(error);
    }
    let mut store = Store::open(path)?;
    store.begin_catch_up()?;
    Ok((info, store))
}

fn decrypt(input: impl Read, passphrase: SecretString) -> Result<impl BufRead, BackupError> {
    let decryptor = age::Decryptor::new_buffered(BufReader::new(input))
        .map_err(|error| BackupError::NotABackup(format!("not an age file ({error})")))?;
    if !decryptor.is_scrypt() {
        return Err(BackupError::NotABackup(
            "an age file encrypted to keys, not to a passphrase".into(),
        ));
    }
    let identity = age::scrypt::Identity::new(passphrase);
    decryptor
        .decrypt(std::iter::once(&identity as &dyn age::Identity))
        .map(|stream| BufReader::with_capacity(1 << 16, stream))
        .map_err(|error| match error {
            age::DecryptError::DecryptionFailed | age::DecryptError::NoMatchingKeys => {
                BackupError::Passphrase
            }
            other => BackupError::Damaged(other.to_string()),
        })
}

fn read_header(reader: &mut impl BufRead) -> Result<BackupInfo, BackupError> {
    let mut magic = [0u8; MAGIC.len()];
    reader.read_exact(&mut magic).map_err(damaged)?;
    if magic != MAGIC {
        return Err(BackupError::NotABackup(
            "an age file that holds something else".into(),
        ));
    }
    let mut line = Vec::new();
    reader
        .by_ref()
        .take(MAX_HEADER)
        .read_until(b'\n', &mut line)
        .map_err(damaged)?;
    if line.pop() != Some(b'\n') {
        return Err(BackupError::Damaged("its header has no end".into()));
    }
    serde_json::from_slice(&line).map_err(|e| BackupError::Damaged(format!("its header: {e}")))
}

fn damaged(error: io::Error) -> BackupError {
    BackupError::Damaged(error.to_string())
}

/// Writes the database to `path` (mode 0600), synced, and checks it: SQLite's own
/// check, a device identity, the fingerprint the header names, a schema this build reads.
fn write_database(
    reader: &mut impl Read,
    path: &Path,
    info: &BackupInfo,
) -> Result<(), BackupError> {
    let _ = fs::remove_file(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(BackupError::Write)?;
    io::copy(reader, &mut file).map_err(damaged)?;
    file.sync_all().map_err(BackupError::Write)?;
    drop(file);
    let copy = Connection::open(path).map_err(|e| BackupError::Damaged(e.to_string()))?;
    let check: String = copy
        .query_row("PRAGMA quick_check", [], |row| row.get(0))
        .map_err(|e| BackupError::Damaged(e.to_string()))?;
    if check != "ok" {
        return Err(BackupError::Damaged(format!("SQLite finds: {check}")));
    }
    let schema: i64 = copy.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if schema > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew { found: schema }.into());
    }
    let secret: Vec<u8> = copy
        .query_row("SELECT identity FROM device WHERE id = 1", [], |row| {
            row.get(0)
        })
        .map_err(|e| BackupError::Damaged(format!("no device identity: {e}")))?;
    let identity = DeviceIdentity::from_secret_bytes(&secret)
        .map_err(|e| BackupError::Damaged(format!("its identity: {e}")))?;
    if identity.fingerprint().to_string() != info.fingerprint {
        return Err(BackupError::Damaged(
            "its database is not the device its header names".into(),
        ));
    }
    Ok(())
}
