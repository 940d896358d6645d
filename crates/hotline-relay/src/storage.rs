//! The relay's durable storage, behind a trait so that PostgreSQL can follow; the
//! embedded SQLite backend commits concurrent posts together (group commit).
//!
//! ```text
//!   request tasks ──(append)──► channel ──► writer thread: drain all waiting, one
//!        ▲                                  transaction, fsync (WAL, synchronous=FULL)
//!        └──────────── answer (seq, duplicate) after COMMIT ──────┘
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Instant;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::{oneshot, watch};

pub use hotline_proto::custody::{Leaf, Notary, Receipt};
pub use hotline_proto::{Log, Membership, Stored};

/// The answer to an append, given only once the message is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    pub duplicate: bool,
    /// The relay's encoded custody receipt ([`Receipt`]), signed with its commit batch
    /// (a duplicate gets the receipt of its first append). `None` from a storage that
    /// has no notary, or for a message stored before relays signed receipts.
    pub receipt: Option<Vec<u8>>,
}

/// The notary a storage seals its commit batches with, set once when the relay starts.
pub type NotarySlot = Arc<OnceLock<Arc<Notary>>>;

/// Seals the messages a commit batch stored (`leaves`, in order): one signature, one
/// encoded receipt per leaf. Without a notary, none.
pub(crate) fn seal_batch(
    notary: &NotarySlot,
    leaves: Vec<Leaf>,
) -> Result<Vec<Option<Vec<u8>>>, String> {
    match notary.get() {
        None => Ok(vec![None; leaves.len()]),
        Some(notary) => Ok(notary
            .seal(leaves, now_ms())
            .map_err(|e| e.to_string())?
            .iter()
            .map(|receipt| Some(receipt.encode()))
            .collect()),
    }
}

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("database: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("the log is over its quota of {0} bytes")]
    QuotaExceeded(u64),
    #[error("the storage writer stopped")]
    WriterGone,
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("sealing a commit batch: {0}")]
    Seal(String),
}

/// Per log (by its storage key), the readers waiting for its next append (the entry
/// made by the first, dropped when none waits): an append wakes its own log's readers
/// only, whatever other logs' readers wait.
#[derive(Debug, Default)]
pub struct Waiters(Mutex<HashMap<Vec<u8>, watch::Sender<u64>>>);

impl Waiters {
    /// Starts waiting for the next append to the log of `key`: what is appended after
    /// this call wakes the returned [`Waiting`], even before it is awaited.
    pub fn wait_on(&self, key: &[u8]) -> Waiting<'_> {
        let receiver = self.0.lock().ok().map(|mut logs| {
            logs.entry(key.to_vec())
                .or_insert_with(|| watch::channel(0).0)
                .subscribe()
        });
        Waiting {
            waiters: self,
            key: key.to_vec(),
            receiver,
        }
    }

    /// Wakes the readers waiting on the log of `key` (`count` messages more); whether
    /// any waits.
    pub fn wake(&self, key: &[u8], count: u64) -> bool {
        let Ok(mut logs) = self.0.lock() else {
            return false;
        };
        match logs.get(key) {
            Some(readers) if readers.receiver_count() > 0 => {
                readers.send_modify(|n| *n += count);
                true
            }
            Some(_) => {
                logs.remove(key);
                false
            }
            None => false,
        }
    }

    /// Wakes every waiting reader (appends to logs that were not named).
    pub fn wake_all(&self) {
        if let Ok(logs) = self.0.lock() {
            for readers in logs.values() {
                readers.send_modify(|n| *n += 1);
            }
        }
    }

    /// Logs with readers waiting.
    #[cfg(test)]
    fn logs(&self) -> usize {
        self.0.lock().map_or(0, |logs| logs.len())
    }
}

/// One reader waiting on one log; the log's entry goes with its last reader (returned,
/// or cancelled with its task).
#[derive(Debug)]
pub struct Waiting<'a> {
    waiters: &'a Waiters,
    key: Vec<u8>,
    receiver: Option<watch::Receiver<u64>>,
}

impl Waiting<'_> {
    /// Resolves at the log's next append (never, if the table was poisoned).
    pub async fn changed(&mut self) {
        if let Some(receiver) = self.receiver.as_mut()
            && receiver.changed().await.is_ok()
        {
            return;
        }
        std::future::pending().await
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        drop(self.receiver.take());
        if let Ok(mut logs) = self.waiters.0.lock()
            && logs
                .get(&self.key)
                .is_some_and(|readers| readers.receiver_count() == 0)
        {
            logs.remove(&self.key);
        }
    }
}

/// Bytes one log may hold: a channel's log or a key-package stock, and a device's
/// inbox (invitations only: far less).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    pub per_log: u64,
    pub per_inbox: u64,
}

impl Quotas {
    /// The quota of the log stored under `key` (see [`Log::storage_key`]).
    pub fn of_key(&self, key: &[u8]) -> u64 {
        match key.first() {
            Some(2) => self.per_inbox,
            _ => self.per_log,
        }
    }
}

impl From<u64> for Quotas {
    /// The same quota for every log.
    fn from(quota: u64) -> Self {
        Self {
            per_log: quota,
            per_inbox: quota,
        }
    }
}

/// What every relay backend provides. Appends are durable when they return.
pub trait RelayStorage: Send + Sync + 'static {
    /// Appends a message (idempotent by the hash of its bytes).
    fn append(
        &self,
        log: Log,
        bytes: Vec<u8>,
    ) -> impl Future<Output = Result<Appended, StorageError>> + Send;
    /// Appends several messages to one log, in order, each as [`append`] would; one
    /// answer per message. Backends may commit them together (fewer flushes); this
    /// default appends them one after the other.
    ///
    /// [`append`]: RelayStorage::append
    fn append_all(
        &self,
        log: Log,
        messages: Vec<Vec<u8>>,
    ) -> impl Future<Output = Vec<Result<Appended, StorageError>>> + Send {
        async move {
            let mut answers = Vec::with_capacity(messages.len());
            for bytes in messages {
                answers.push(self.append(log.clone(), bytes).await);
            }
            answers
        }
    }
    /// Up to `limit` messages after `after`, in order, and no more than `max_bytes` of
    /// message bytes together (the first message always, whatever its size): what one
    /// read holds in memory is bounded by bytes, not by count alone.
    fn read_after(
        &self,
        log: &Log,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<Stored>, StorageError>> + Send;
    /// Signs every commit batch from now on with `notary` (custody receipts). Set once,
    /// when the relay starts; later calls change nothing.
    fn set_notary(&self, notary: Arc<Notary>);
    fn membership(
        &self,
        channel: &[u8; 32],
    ) -> impl Future<Output = Result<Option<Membership>, StorageError>> + Send;
    /// Stores `membership` if it is newer than the stored one (or none is stored), as one
    /// atomic step; returns whether it was stored. Several relay processes sharing one
    /// database may race here: the version decides, never the order of arrival.
    fn set_membership(
        &self,
        channel: &[u8; 32],
        membership: &Membership,
    ) -> impl Future<Output = Result<bool, StorageError>> + Send;
    /// Records that `device` committed everything up to `seq`, and deletes what every
    /// one of `members` acknowledged. Returns how many messages were deleted.
    fn acknowledge(
        &self,
        log: Log,
        device: [u8; 32],
        seq: u64,
        members: Vec<[u8; 32]>,
    ) -> impl Future<Output = Result<u64, StorageError>> + Send;
    /// Deletes every message stored before `before_ms` (retention).
    fn expire(&self, before_ms: u64) -> impl Future<Output = Result<u64, StorageError>> + Send;
    /// Removes the oldest message of `log` and returns it, as one atomic step; `None`
    /// when the log is empty. Two claims never get the same message, even from relay
    /// processes sharing one database. The log's byte count drops by what was removed.
    fn claim_first(
        &self,
        log: Log,
    ) -> impl Future<Output = Result<Option<(u64, Vec<u8>)>, StorageError>> + Send;
    /// Bytes held in every log together (what the relay's storage bound counts).
    fn used_bytes(&self) -> impl Future<Output = Result<u64, StorageError>> + Send;
    /// Durations of recent group commits, in seconds, for metrics.
    fn take_commit_durations(&self) -> Vec<f64>;
    /// Waits for appends to the log stored under `key` (see [`Log::storage_key`]) by
    /// other processes sharing this storage; `None` when this process is the only
    /// writer (its own appends wake its readers).
    fn changes(&self, key: &[u8]) -> Option<Waiting<'_>> {
        let _ = key;
        None
    }
}

enum Job {
    Append {
        log: Log,
        bytes: Vec<u8>,
        answer: oneshot::Sender<Result<Appended, StorageError>>,
    },
    /// Records a device's acknowledgement and deletes what every member acknowledged.
    Acknowledge {
        log: Log,
        device: [u8; 32],
        seq: u64,
        members: Vec<[u8; 32]>,
        answer: oneshot::Sender<Result<u64, StorageError>>,
    },
    /// Deletes every message stored before `before_ms`.
    Expire {
        before_ms: u64,
        answer: oneshot::Sender<Result<u64, StorageError>>,
    },
    /// Removes and returns the oldest message of a log.
    Claim {
        log: Log,
        answer: oneshot::Sender<Result<Claimed, StorageError>>,
    },
}

/// A claimed message (sequence number, bytes), or none.
type Claimed = Option<(u64, Vec<u8>)>;

/// What a job gave, before it is sent back.
enum Answer {
    Appended(Result<Appended, StorageError>),
    Deleted(Result<u64, StorageError>),
    Claimed(Claimed),
}

impl Job {
    fn answer(self, result: Result<Answer, String>) {
        let failed = |message: &String| {
            StorageError::Database(rusqlite::Error::InvalidParameterName(message.clone()))
        };
        match self {
            Job::Append { answer, .. } => {
                let _ = answer.send(match result {
                    Ok(Answer::Appended(result)) => result,
                    Ok(_) => Err(StorageError::WriterGone),
                    Err(message) => Err(failed(&message)),
                });
            }
            Job::Acknowledge { answer, .. } | Job::Expire { answer, .. } => {
                let _ = answer.send(match result {
                    Ok(Answer::Deleted(result)) => result,
                    Ok(_) => Err(StorageError::WriterGone),
                    Err(message) => Err(failed(&message)),
                });
            }
            Job::Claim { answer, .. } => {
                let _ = answer.send(match result {
                    Ok(Answer::Claimed(claimed)) => Ok(claimed),
                    Ok(_) => Err(StorageError::WriterGone),
                    Err(message) => Err(failed(&message)),
                });
            }
        }
    }
}

/// SQLite backend: WAL, `synchronous=FULL`, one writer thread doing group commits.
pub struct SqliteStorage {
    jobs: mpsc::Sender<Job>,
    reader: Mutex<Connection>,
    commit_durations: Arc<Mutex<Vec<f64>>>,
    notary: NotarySlot,
    /// Dropped with the storage: the checkpoint thread then stops.
    _checkpoints: mpsc::Sender<()>,
}

/// How often the checkpoint thread looks for new commits to move into the database.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Moves what the writer committed from the WAL into the database file, every
/// [`CHECKPOINT_EVERY`] that something was committed, on a connection of its own (a
/// PASSIVE checkpoint: it waits for nobody and nobody waits for it), until `stopped`'s
/// sender is dropped. The writer's commits then never wait for a checkpoint.
fn checkpoint_loop(connection: &Connection, stopped: &mpsc::Receiver<()>) {
    let mut seen: Option<i64> = None;
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
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

impl std::fmt::Debug for SqliteStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStorage").finish_non_exhaustive()
    }
}

/// The messages table (named), without an index on hashes: the writer keeps its own
/// ([`Known::hashes`]).
fn messages_table(name: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {name} (
            log BLOB NOT NULL,
            seq INTEGER NOT NULL,
            hash BLOB NOT NULL,
            bytes BLOB NOT NULL,
            stored_ms INTEGER NOT NULL DEFAULT 0,
            receipt BLOB,
            PRIMARY KEY (log, seq)
        ) WITHOUT ROWID;"
    )
}

/// Databases made before the writer indexed hashes itself carry a unique index on
/// (log, hash), which SQLite cannot drop: the table is copied once without it.
fn drop_hash_index(connection: &mut Connection) -> Result<(), rusqlite::Error> {
    let indexed: bool = connection
        .prepare_cached(
            "SELECT COUNT(*) > 0 FROM pragma_index_list('messages') WHERE origin = 'u'",
        )?
        .query_row([], |row| row.get(0))?;
    if !indexed {
        return Ok(());
    }
    let transaction = connection.transaction()?;
    transaction.execute_batch(&format!(
        "{}
         INSERT INTO messages_unindexed (log, seq, hash, bytes, stored_ms, receipt)
             SELECT log, seq, hash, bytes, stored_ms, receipt FROM messages;
         DROP TABLE messages;
         ALTER TABLE messages_unindexed RENAME TO messages;",
        messages_table("messages_unindexed")
    ))?;
    transaction.commit()
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS heads (
    log BLOB PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    used INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS acks (
    log BLOB NOT NULL,
    device BLOB NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (log, device)
);
CREATE TABLE IF NOT EXISTS memberships (
    channel BLOB PRIMARY KEY,
    committer BLOB NOT NULL,
    version INTEGER NOT NULL,
    members BLOB NOT NULL
);";

fn open(path: &Path) -> Result<Connection, rusqlite::Error> {
    let connection = Connection::open(path)?;
    connection.busy_timeout(std::time::Duration::from_secs(30))?;
    // Plans never depend on bound values: without this, SQLite marks a statement with
    // `LIMIT ?` to be parsed and planned again each time its limit is bound, and the
    // reads the relay pushes from all have one.
    connection.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    // 16 KiB pages (for new databases): a 1 KiB message and its receipt fit in a page of
    // the table, where 4 KiB pages sent each to an overflow page of its own.
    connection.pragma_update(None, "page_size", 16384)?;
    // Checkpoints run beside the writer ([`checkpoint_loop`]), every quarter second
    // that something was committed, so that a commit seldom waits for one; a commit
    // still checkpoints when the WAL reached 4 MiB (256 such pages, as SQLite's default
    // does with 4 KiB pages) before the thread came round: a WAL let grow (64 MiB was
    // tried) is extended by its commits, and every extension is synced with them (the
    // relay's rate at 16 senders fell by a fifth).
    connection.pragma_update(None, "wal_autocheckpoint", 256)?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    Ok(connection)
}

impl SqliteStorage {
    /// Opens (or creates) the database; `quotas` bound the bytes of one log.
    pub fn open(path: &Path, quotas: impl Into<Quotas>) -> Result<Self, StorageError> {
        let quotas = quotas.into();
        let mut writer = open(path)?;
        writer.execute_batch(&messages_table("messages"))?;
        writer.execute_batch(SCHEMA)?;
        // Databases made before relays signed receipts gain the column.
        let has_receipts: bool = writer
            .prepare_cached(
                "SELECT COUNT(*) > 0 FROM pragma_table_info('messages') WHERE name = 'receipt'",
            )?
            .query_row([], |row| row.get(0))?;
        if !has_receipts {
            writer.execute_batch("ALTER TABLE messages ADD COLUMN receipt BLOB")?;
        }
        drop_hash_index(&mut writer)?;
        let reader = open(path)?;
        let (jobs, receiver) = mpsc::channel::<Job>();
        let commit_durations = Arc::new(Mutex::new(Vec::new()));
        let durations = Arc::clone(&commit_durations);
        let notary = NotarySlot::default();
        let sealer = Arc::clone(&notary);
        std::thread::Builder::new()
            .name("relay-storage-writer".into())
            .spawn(move || write_loop(writer, receiver, quotas, durations, sealer))
            .map_err(|_| StorageError::WriterGone)?;
        let checkpointer = open(path)?;
        let (checkpoints, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("relay-checkpoints".into())
            .spawn(move || checkpoint_loop(&checkpointer, &stopped))
            .map_err(|_| StorageError::WriterGone)?;
        Ok(Self {
            jobs,
            reader: Mutex::new(reader),
            commit_durations,
            notary,
            _checkpoints: checkpoints,
        })
    }
}

/// Waits for the writer's answer to each queued append, in order (one whose queueing
/// failed, or whose writer stopped, is `WriterGone`).
pub(crate) async fn answers_in_order<E>(
    waits: Vec<Result<oneshot::Receiver<Result<Appended, StorageError>>, E>>,
) -> Vec<Result<Appended, StorageError>> {
    let mut answers = Vec::with_capacity(waits.len());
    for wait in waits {
        answers.push(match wait {
            Ok(wait) => wait.await.unwrap_or(Err(StorageError::WriterGone)),
            Err(_) => Err(StorageError::WriterGone),
        });
    }
    answers
}

/// What the writer (the only one) knows of the logs, read from the database the first
/// time a log comes up and forgotten when a batch rolls back.
#[derive(Default)]
struct Known {
    /// Per log, its last sequence number and the bytes it holds.
    heads: HashMap<Vec<u8>, (i64, i64)>,
    /// Per log, the first 128 bits of each held message's SHA-256 and its sequence
    /// number: how a repeated append is found. An index on (log, hash) in the database
    /// did the same at the price of a page written at random per append, which halved
    /// the writer's rate; this costs about 30 bytes of memory per held message.
    hashes: HashMap<Vec<u8>, HashMap<u128, i64>>,
}

/// A held message's sequence number and receipt (if it has one).
type Held = (i64, Option<Vec<u8>>);

/// A message's key in [`Known::hashes`].
fn tag(hash: &[u8; 32]) -> u128 {
    let mut first = [0u8; 16];
    first.copy_from_slice(&hash[..16]);
    u128::from_be_bytes(first)
}

impl Known {
    /// The index of `key`'s hashes, read from the database the first time.
    fn hashes(
        &mut self,
        transaction: &rusqlite::Transaction<'_>,
        key: &[u8],
    ) -> Result<&mut HashMap<u128, i64>, rusqlite::Error> {
        if !self.hashes.contains_key(key) {
            let mut held = HashMap::new();
            let mut statement =
                transaction.prepare_cached("SELECT seq, hash FROM messages WHERE log = ?1")?;
            let mut rows = statement.query([key])?;
            while let Some(row) = rows.next()? {
                let (seq, hash): (i64, Vec<u8>) = (row.get(0)?, row.get(1)?);
                if let Ok(hash) = <[u8; 32]>::try_from(hash) {
                    held.insert(tag(&hash), seq);
                }
            }
            self.hashes.insert(key.to_vec(), held);
        }
        Ok(self.hashes.entry(key.to_vec()).or_default())
    }

    /// The sequence number and receipt of the message of `key` with SHA-256 `hash`, if
    /// the log holds it (the index's answer checked against the stored hash).
    fn stored(
        &mut self,
        transaction: &rusqlite::Transaction<'_>,
        key: &[u8],
        hash: &[u8; 32],
    ) -> Result<Option<Held>, rusqlite::Error> {
        let Some(&seq) = self.hashes(transaction, key)?.get(&tag(hash)) else {
            return Ok(None);
        };
        let stored: Option<(Vec<u8>, Option<Vec<u8>>)> = transaction
            .prepare_cached("SELECT hash, receipt FROM messages WHERE log = ?1 AND seq = ?2")?
            .query_row(params![key, seq], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        Ok(stored
            .filter(|(stored, _)| stored[..] == hash[..])
            .map(|(_, receipt)| (seq, receipt)))
    }
}

/// Drains every waiting job into one transaction; answers after COMMIT.
fn write_loop(
    mut connection: Connection,
    jobs: mpsc::Receiver<Job>,
    quotas: Quotas,
    durations: Arc<Mutex<Vec<f64>>>,
    notary: NotarySlot,
) {
    let mut known = Known::default();
    let mut synced = true;
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while let Ok(more) = jobs.try_recv() {
            batch.push(more);
            if batch.len() >= 4096 {
                break;
            }
        }
        // Deletions alone (acknowledgements, expiry) are committed without waiting for
        // the disk: lost in a power failure, they are only done again (a member
        // acknowledges again, expiry runs again), and the next durable commit makes
        // them durable with it. An append waiting behind one then waits for no fsync
        // of it. Appends and claims (a key package must never be handed out twice)
        // are durable before they are answered.
        let durable = batch
            .iter()
            .any(|job| !matches!(job, Job::Acknowledge { .. } | Job::Expire { .. }));
        if durable != synced {
            let mode = if durable { "FULL" } else { "NORMAL" };
            match connection.pragma_update(None, "synchronous", mode) {
                Ok(()) => synced = durable,
                // Never a durable batch on an unsynced connection.
                Err(error) if durable => {
                    for job in batch {
                        job.answer(Err(error.to_string()));
                    }
                    continue;
                }
                // Deletions then wait for the disk, as appends do.
                Err(_) => {}
            }
        }
        let start = Instant::now();
        let results: Vec<Result<Answer, String>> =
            match commit_batch(&mut connection, &batch, quotas, &mut known, &notary) {
                Ok(results) => results.into_iter().map(Ok).collect(),
                Err(error) => {
                    // The rolled-back batch may have changed what the writer knew: read
                    // again from the database as logs come up.
                    known = Known::default();
                    batch.iter().map(|_| Err(error.to_string())).collect()
                }
            };
        if let Ok(mut durations) = durations.lock()
            && durations.len() < 100_000
        {
            durations.push(start.elapsed().as_secs_f64());
        }
        for (job, result) in batch.into_iter().zip(results) {
            job.answer(result);
        }
    }
}

/// Why a commit batch failed (every job in it fails with this).
#[derive(Debug, Error)]
enum CommitError {
    #[error("database: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("sealing the batch: {0}")]
    Seal(String),
}

fn commit_batch(
    connection: &mut Connection,
    batch: &[Job],
    quotas: Quotas,
    known: &mut Known,
    notary: &NotarySlot,
) -> Result<Vec<Answer>, CommitError> {
    let transaction =
        connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(batch.len());
    // Logs appended to in this batch, whose head rows are written before the commit.
    let mut appended_to: std::collections::BTreeSet<Vec<u8>> = Default::default();
    // What this batch stored, sealed together before the commit.
    let mut leaves: Vec<Leaf> = Vec::new();
    for job in batch {
        let (log, bytes) = match job {
            Job::Append { log, bytes, .. } => (log, bytes),
            Job::Acknowledge {
                log,
                device,
                seq,
                members,
                ..
            } => {
                results.push(Answer::Deleted(Ok(acknowledge(
                    &transaction,
                    known,
                    log,
                    device,
                    *seq,
                    members,
                )?)));
                continue;
            }
            Job::Expire { before_ms, .. } => {
                results.push(Answer::Deleted(Ok(expire(
                    &transaction,
                    known,
                    *before_ms,
                )?)));
                continue;
            }
            Job::Claim { log, .. } => {
                results.push(Answer::Claimed(claim_first(&transaction, known, log)?));
                continue;
            }
        };
        let key = log.storage_key();
        let hash: [u8; 32] = Sha256::digest(bytes).into();
        if let Some((seq, receipt)) = known.stored(&transaction, &key, &hash)? {
            // One stored earlier in this batch gets its receipt with the seal.
            results.push(Answer::Appended(Ok(Appended {
                seq: seq as u64,
                duplicate: true,
                receipt,
            })));
            continue;
        }
        let (last, used) = head(&transaction, known, &key)?;
        let quota = quotas.of_key(&key);
        if used as u64 + bytes.len() as u64 > quota {
            results.push(Answer::Appended(Err(StorageError::QuotaExceeded(quota))));
            continue;
        }
        let seq = last + 1;
        // The head's row is written once per log, at the end of the batch.
        known
            .heads
            .insert(key.clone(), (seq, used + bytes.len() as i64));
        known.hashes(&transaction, &key)?.insert(tag(&hash), seq);
        transaction
            .prepare_cached(
                "INSERT INTO messages (log, seq, hash, bytes, stored_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![key, seq, &hash[..], bytes, now_ms() as i64])?;
        leaves.push(Leaf {
            log: key.clone(),
            seq: seq as u64,
            hash,
        });
        appended_to.insert(key);
        results.push(Answer::Appended(Ok(Appended {
            seq: seq as u64,
            duplicate: false,
            receipt: None,
        })));
    }
    // One signature for the batch; each message keeps its receipt (duplicates and
    // reads hand it out again).
    let mut receipts: HashMap<(Vec<u8>, u64), Vec<u8>> = HashMap::new();
    let sealed = seal_batch(notary, leaves.clone()).map_err(CommitError::Seal)?;
    for (leaf, receipt) in leaves.into_iter().zip(sealed) {
        let Some(receipt) = receipt else { continue };
        transaction
            .prepare_cached("UPDATE messages SET receipt = ?3 WHERE log = ?1 AND seq = ?2")?
            .execute(params![leaf.log, leaf.seq as i64, receipt])?;
        receipts.insert((leaf.log, leaf.seq), receipt);
    }
    if !receipts.is_empty() {
        let logs = batch.iter().map(|job| match job {
            Job::Append { log, .. } => Some(log.storage_key()),
            _ => None,
        });
        for (result, key) in results.iter_mut().zip(logs) {
            if let (Answer::Appended(Ok(appended)), Some(key)) = (result, key)
                && appended.receipt.is_none()
            {
                appended.receipt = receipts.get(&(key, appended.seq)).cloned();
            }
        }
    }
    for key in appended_to {
        if let Some(&(last, used)) = known.heads.get(&key) {
            set_head(&transaction, known, &key, last, used)?;
        }
    }
    transaction.commit()?;
    Ok(results)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A log's last sequence number and bytes used. Sequence numbers never go back, even
/// when every message was deleted: the head is stored, not derived from the messages.
fn head(
    transaction: &rusqlite::Transaction<'_>,
    known: &mut Known,
    key: &[u8],
) -> Result<(i64, i64), rusqlite::Error> {
    if let Some(head) = known.heads.get(key) {
        return Ok(*head);
    }
    let stored: Option<(i64, i64)> = transaction
        .prepare_cached("SELECT last_seq, used FROM heads WHERE log = ?1")?
        .query_row([key], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let head = match stored {
        Some(head) => head,
        None => transaction.prepare_cached("SELECT COALESCE(MAX(seq), 0), COALESCE(SUM(LENGTH(bytes)), 0) FROM messages WHERE log = ?1")?
.query_row(
            [key],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?,
    };
    known.heads.insert(key.to_vec(), head);
    Ok(head)
}

fn set_head(
    transaction: &rusqlite::Transaction<'_>,
    known: &mut Known,
    key: &[u8],
    last_seq: i64,
    used: i64,
) -> Result<(), rusqlite::Error> {
    transaction
        .prepare_cached(
            "INSERT INTO heads (log, last_seq, used) VALUES (?1, ?2, ?3)
             ON CONFLICT (log) DO UPDATE SET last_seq = ?2, used = ?3",
        )?
        .execute(params![key, last_seq, used])?;
    known.heads.insert(key.to_vec(), (last_seq, used));
    Ok(())
}

/// Deletes messages of `key` up to `up_to`, keeping the head's byte count true.
fn delete_up_to(
    transaction: &rusqlite::Transaction<'_>,
    known: &mut Known,
    key: &[u8],
    up_to: i64,
) -> Result<u64, rusqlite::Error> {
    // What goes, and its hashes out of the writer's index.
    let (mut count, mut bytes) = (0i64, 0i64);
    let mut hashes = known.hashes.get_mut(key);
    let mut going = transaction.prepare_cached(
        "SELECT seq, hash, LENGTH(bytes) FROM messages WHERE log = ?1 AND seq <= ?2",
    )?;
    let mut rows = going.query(params![key, up_to])?;
    while let Some(row) = rows.next()? {
        let (seq, hash, length): (i64, Vec<u8>, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
        count += 1;
        bytes += length;
        if let (Some(hashes), Ok(hash)) = (hashes.as_deref_mut(), <[u8; 32]>::try_from(hash)) {
            let tag = tag(&hash);
            if hashes.get(&tag) == Some(&seq) {
                hashes.remove(&tag);
            }
        }
    }
    drop(rows);
    drop(going);
    if count == 0 {
        return Ok(0);
    }
    let (last, used) = head(transaction, known, key)?;
    transaction
        .prepare_cached("DELETE FROM messages WHERE log = ?1 AND seq <= ?2")?
        .execute(params![key, up_to])?;
    set_head(transaction, known, key, last, (used - bytes).max(0))?;
    Ok(count as u64)
}

fn acknowledge(
    transaction: &rusqlite::Transaction<'_>,
    known: &mut Known,
    log: &Log,
    device: &[u8; 32],
    seq: u64,
    members: &[[u8; 32]],
) -> Result<u64, rusqlite::Error> {
    let key = log.storage_key();
    transaction
        .prepare_cached(
            "INSERT INTO acks (log, device, seq) VALUES (?1, ?2, ?3)
         ON CONFLICT (log, device) DO UPDATE SET seq = MAX(seq, ?3)",
        )?
        .execute(params![key, &device[..], seq as i64])?;
    // What every current member device acknowledged can go.
    let mut lowest = i64::MAX;
    for member in members {
        let acked: Option<i64> = transaction
            .prepare_cached("SELECT seq FROM acks WHERE log = ?1 AND device = ?2")?
            .query_row(params![key, &member[..]], |row| row.get(0))
            .optional()?;
        lowest = lowest.min(acked.unwrap_or(0));
    }
    if members.is_empty() || lowest == 0 {
        return Ok(0);
    }
    delete_up_to(transaction, known, &key, lowest)
}

fn expire(
    transaction: &rusqlite::Transaction<'_>,
    known: &mut Known,
    before_ms: u64,
) -> Result<u64, rusqlite::Error> {
    let logs: Vec<(Vec<u8>, i64)> = transaction
        .prepare("SELECT log, MAX(seq) FROM messages WHERE stored_ms < ?1 GROUP BY log")?
        .query_map([before_ms as i64], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut deleted = 0;
    for (key, up_to) in logs {
        deleted += delete_up_to(transaction, known, &key, up_to)?;
    }
    Ok(deleted)
}

/// Removes the oldest message of `log`, keeping the head's byte count true. The writer
/// runs jobs one after the other, so two claims never see the same message.
fn claim_first(
    transaction: &rusqlite::Transaction<'_>,
    known: &mut Known,
    log: &Log,
) -> Result<Option<(u64, Vec<u8>)>, rusqlite::Error> {
    let key = log.storage_key();
    let oldest: Option<(i64, Vec<u8>)> = transaction
        .prepare_cached("SELECT seq, bytes FROM messages WHERE log = ?1 ORDER BY seq LIMIT 1")?
        .query_row([&key], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let Some((seq, bytes)) = oldest else {
        return Ok(None);
    };
    delete_up_to(transaction, known, &key, seq)?;
    Ok(Some((seq as u64, bytes)))
}

impl RelayStorage for SqliteStorage {
    async fn append(&self, log: Log, bytes: Vec<u8>) -> Result<Appended, StorageError> {
        let (answer, wait) = oneshot::channel();
        self.jobs
            .send(Job::Append { log, bytes, answer })
            .map_err(|_| StorageError::WriterGone)?;
        wait.await.map_err(|_| StorageError::WriterGone)?
    }

    /// Queues every message before waiting for any: the writer commits them in order,
    /// in as few transactions as it drains.
    async fn append_all(
        &self,
        log: Log,
        messages: Vec<Vec<u8>>,
    ) -> Vec<Result<Appended, StorageError>> {
        let mut waits = Vec::with_capacity(messages.len());
        for bytes in messages {
            let (answer, wait) = oneshot::channel();
            let log = log.clone();
            waits.push(
                self.jobs
                    .send(Job::Append { log, bytes, answer })
                    .map(|()| wait),
            );
        }
        answers_in_order(waits).await
    }

    async fn acknowledge(
        &self,
        log: Log,
        device: [u8; 32],
        seq: u64,
        members: Vec<[u8; 32]>,
    ) -> Result<u64, StorageError> {
        let (answer, wait) = oneshot::channel();
        self.jobs
            .send(Job::Acknowledge {
                log,
                device,
                seq,
                members,
                answer,
            })
            .map_err(|_| StorageError::WriterGone)?;
        wait.await.map_err(|_| StorageError::WriterGone)?
    }

    async fn expire(&self, before_ms: u64) -> Result<u64, StorageError> {
        let (answer, wait) = oneshot::channel();
        self.jobs
            .send(Job::Expire { before_ms, answer })
            .map_err(|_| StorageError::WriterGone)?;
        wait.await.map_err(|_| StorageError::WriterGone)?
    }

    async fn claim_first(&self, log: Log) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let (answer, wait) = oneshot::channel();
        self.jobs
            .send(Job::Claim { log, answer })
            .map_err(|_| StorageError::WriterGone)?;
        wait.await.map_err(|_| StorageError::WriterGone)?
    }

    async fn read_after(
        &self,
        log: &Log,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Stored>, StorageError> {
        let reader = self.reader.lock().map_err(|_| StorageError::WriterGone)?;
        // The size first: a message that would go over the budget is never loaded.
        let mut statement = reader.prepare_cached(
            "SELECT seq, length(bytes) FROM messages WHERE log = ?1 AND seq > ?2
             ORDER BY seq LIMIT ?3",
        )?;
        let mut rows = statement.query(params![log.storage_key(), after as i64, limit as i64])?;
        let (mut last, mut total) = (None, 0usize);
        while let Some(row) = rows.next()? {
            let size = row.get::<_, i64>(1)? as usize;
            if last.is_some() && total + size > max_bytes {
                break;
            }
            total += size;
            last = Some(row.get::<_, i64>(0)?);
        }
        drop(rows);
        let Some(last) = last else {
            return Ok(Vec::new());
        };
        let mut statement = reader.prepare_cached(
            "SELECT seq, bytes, receipt FROM messages WHERE log = ?1 AND seq > ?2 AND seq <= ?3
             ORDER BY seq",
        )?;
        let rows = statement.query_map(params![log.storage_key(), after as i64, last], |row| {
            Ok(Stored {
                seq: row.get::<_, i64>(0)? as u64,
                bytes: row.get(1)?,
                receipt: row.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_notary(&self, notary: Arc<Notary>) {
        let _ = self.notary.set(notary);
    }

    async fn membership(&self, channel: &[u8; 32]) -> Result<Option<Membership>, StorageError> {
        let reader = self.reader.lock().map_err(|_| StorageError::WriterGone)?;
        let row: Option<(Vec<u8>, i64, Vec<u8>)> = reader
            .prepare_cached(
                "SELECT committer, version, members FROM memberships WHERE channel = ?1",
            )?
            .query_row([&channel[..]], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .optional()?;
        Ok(row.and_then(|(committer, version, members)| {
            Membership::from_stored(&committer, version, &members)
        }))
    }

    async fn set_membership(
        &self,
        channel: &[u8; 32],
        membership: &Membership,
    ) -> Result<bool, StorageError> {
        let reader = self.reader.lock().map_err(|_| StorageError::WriterGone)?;
        let members = membership.stored_members();
        let changed = reader.prepare_cached("INSERT INTO memberships (channel, committer, version, members) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (channel) DO UPDATE SET committer = ?2, version = ?3, members = ?4
             WHERE excluded.version > memberships.version")?
.execute(
            params![
                &channel[..],
                &membership.committer[..],
                membership.version as i64,
                members
            ],
        )?;
        Ok(changed == 1)
    }

    async fn used_bytes(&self) -> Result<u64, StorageError> {
        let reader = self.reader.lock().map_err(|_| StorageError::WriterGone)?;
        let used: i64 = reader
            .prepare_cached("SELECT COALESCE(SUM(used), 0) FROM heads")?
            .query_row([], |row| row.get(0))?;
        Ok(used.max(0) as u64)
    }

    fn take_commit_durations(&self) -> Vec<f64> {
        self.commit_durations
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn an_append_wakes_its_own_logs_readers_only() {
        let (a, b) = (
            Log::Channel([1; 32]).storage_key(),
            Log::Channel([2; 32]).storage_key(),
        );
        let waiters = Waiters::default();
        // Nobody waits: nothing to wake, nothing kept.
        assert!(!waiters.wake(&a, 1));
        assert_eq!(waiters.logs(), 0);
        let mut on_a = waiters.wait_on(&a);
        let mut on_b = waiters.wait_on(&b);
        let mut also_on_b = waiters.wait_on(&b);
        assert_eq!(waiters.logs(), 2);
        // An append to b before b's readers await still wakes them; a's stays asleep.
        assert!(waiters.wake(&b, 1));
        let soon = Duration::from_millis(50);
        assert!(tokio::time::timeout(soon, on_b.changed()).await.is_ok());
        assert!(
            tokio::time::timeout(soon, also_on_b.changed())
                .await
                .is_ok()
        );
        assert!(tokio::time::timeout(soon, on_a.changed()).await.is_err());
        // Woken once per append: b's readers sleep again until the next.
        assert!(tokio::time::timeout(soon, on_b.changed()).await.is_err());
        assert!(waiters.wake(&a, 1));
        assert!(tokio::time::timeout(soon, on_a.changed()).await.is_ok());
        // Appends not named (another process's, too many to name) wake everyone.
        waiters.wake_all();
        assert!(tokio::time::timeout(soon, on_a.changed()).await.is_ok());
        assert!(tokio::time::timeout(soon, on_b.changed()).await.is_ok());
        assert!(
            tokio::time::timeout(soon, also_on_b.changed())
                .await
                .is_ok()
        );
        // A log's entry goes with its last reader.
        drop(on_b);
        assert_eq!(waiters.logs(), 2);
        drop(also_on_b);
        assert_eq!(waiters.logs(), 1);
        drop(on_a);
        assert_eq!(waiters.logs(), 0);
        assert!(!waiters.wake(&b, 1));
    }
}
