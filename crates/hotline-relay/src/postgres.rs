//! PostgreSQL backend: several relay processes share one database.
//!
//! ```text
//!   relay process A ──┐  append: one transaction, the log's head row locked
//!   relay process B ──┼─► (FOR UPDATE), so processes never hand out one number twice;
//!   relay process C ──┘  pg_notify on commit ──► every process's LISTEN wakes its long polls
//! ```
//!
//! Durability is PostgreSQL's: an append is answered after COMMIT with
//! `synchronous_commit` on (the server default). Each process has one writer that
//! commits every append waiting at that moment in one transaction (group commit: one
//! head lock and one WAL flush per log and batch, one INSERT per log). Connections are plain TCP (`NoTls`): run the
//! database on the relay's host or a trusted network.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, Client, NoTls, Transaction};

use crate::storage::{
    Appended, Leaf, Log, Membership, Notary, NotarySlot, Quotas, RelayStorage, StorageError,
    Stored, answers_in_order, seal_batch,
};

const CHANNEL: &str = "hotline_appended";

/// A pool of connections to one PostgreSQL schema, and a listener for other processes'
/// appends.
pub struct PostgresStorage {
    appends: tokio::sync::mpsc::UnboundedSender<AppendJob>,
    pool: Vec<tokio::sync::Mutex<Client>>,
    next: AtomicUsize,
    changes: watch::Receiver<u64>,
    commit_durations: Arc<Mutex<Vec<f64>>>,
    notary: NotarySlot,
}

impl std::fmt::Debug for PostgresStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStorage")
            .field("connections", &self.pool.len())
            .finish_non_exhaustive()
    }
}

fn database(error: tokio_postgres::Error) -> StorageError {
    StorageError::Postgres(error.to_string())
}

fn schema_sql(schema: &str) -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         SET search_path TO {schema};
         CREATE TABLE IF NOT EXISTS messages (
             log BYTEA NOT NULL,
             seq BIGINT NOT NULL,
             hash BYTEA NOT NULL,
             bytes BYTEA NOT NULL,
             stored_ms BIGINT NOT NULL,
             receipt BYTEA,
             PRIMARY KEY (log, seq),
             UNIQUE (log, hash)
         );
         ALTER TABLE messages ADD COLUMN IF NOT EXISTS receipt BYTEA;
         CREATE TABLE IF NOT EXISTS heads (
             log BYTEA PRIMARY KEY,
             last_seq BIGINT NOT NULL,
             used BIGINT NOT NULL
         );
         CREATE TABLE IF NOT EXISTS acks (
             log BYTEA NOT NULL,
             device BYTEA NOT NULL,
             seq BIGINT NOT NULL,
             PRIMARY KEY (log, device)
         );
         CREATE TABLE IF NOT EXISTS memberships (
             channel BYTEA PRIMARY KEY,
             committer BYTEA NOT NULL,
             version BIGINT NOT NULL,
             members BYTEA NOT NULL
         );
         CREATE INDEX IF NOT EXISTS messages_by_age ON messages (stored_ms);"
    )
}

async fn open(url: &str, schema: &str) -> Result<Client, StorageError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(database)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
        .batch_execute(&format!("SET search_path TO {schema}"))
        .await
        .map_err(database)?;
    Ok(client)
}

impl PostgresStorage {
    /// Connects `connections` clients to `url`, creating the tables in `schema` if they
    /// are not there (`schema`: letters, digits and `_`). `quotas` bound one log's bytes.
    pub async fn connect(
        url: &str,
        schema: &str,
        quotas: impl Into<Quotas>,
        connections: usize,
    ) -> Result<Self, StorageError> {
        let quotas = quotas.into();
        if schema.is_empty()
            || !schema
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(StorageError::Postgres(format!(
                "schema name {schema:?}: use letters, digits and _"
            )));
        }
        let setup = open(url, "public").await?;
        // Several processes may start at once: one creates, the others wait.
        setup
            .batch_execute(&format!(
                "SELECT pg_advisory_lock(72616164); {} SELECT pg_advisory_unlock(72616164);",
                schema_sql(schema)
            ))
            .await
            .map_err(database)?;
        drop(setup);

        let mut pool = Vec::with_capacity(connections.max(1));
        for _ in 0..connections.max(1) {
            pool.push(tokio::sync::Mutex::new(open(url, schema).await?));
        }

        // One more connection LISTENs; every notification wakes this process's polls.
        let (listener, mut connection) = tokio_postgres::connect(url, NoTls)
            .await
            .map_err(database)?;
        let (notify, changes) = watch::channel(0u64);
        tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(_))) => notify.send_modify(|n| *n += 1),
                    Some(Ok(_)) => {}
                    // The connection ended: polls fall back to their own timeouts.
                    Some(Err(_)) | None => break,
                }
            }
        });
        listener
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(database)?;
        // The listener must live as long as its connection task is useful.
        tokio::spawn(async move {
            let _keep = listener;
            std::future::pending::<()>().await;
        });

        // Appends go through one writer per process, which commits every append waiting
        // at that moment in one transaction (group commit).
        let commit_durations = Arc::new(Mutex::new(Vec::new()));
        let (appends, jobs) = tokio::sync::mpsc::unbounded_channel();
        let writer = open(url, schema).await?;
        let notary = NotarySlot::default();
        tokio::spawn(write_loop(
            writer,
            jobs,
            quotas,
            Arc::clone(&commit_durations),
            Arc::clone(&notary),
        ));

        Ok(Self {
            appends,
            pool,
            next: AtomicUsize::new(0),
            changes,
            commit_durations,
            notary,
        })
    }

    async fn client(&self) -> tokio::sync::MutexGuard<'_, Client> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len();
        self.pool[index].lock().await
    }
}

fn key(log: &Log) -> Vec<u8> {
    match log {
        Log::Channel(id) => [&[1u8][..], id].concat(),
        Log::Inbox(id) => [&[2u8][..], id].concat(),
        Log::KeyPackages(id) => [&[3u8][..], id].concat(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Locks a log's head (creating it), returning (last sequence number, bytes used).
async fn lock_head(transaction: &Transaction<'_>, key: &[u8]) -> Result<(i64, i64), StorageError> {
    transaction
        .execute(
            "INSERT INTO heads (log, last_seq, used) VALUES ($1, 0, 0) ON CONFLICT DO NOTHING",
            &[&key],
        )
        .await
        .map_err(database)?;
    let row = transaction
        .query_one(
            "SELECT last_seq, used FROM heads WHERE log = $1 FOR UPDATE",
            &[&key],
        )
        .await
        .map_err(database)?;
    Ok((row.get(0), row.get(1)))
}

/// Deletes a log's messages up to `up_to`, keeping the head's byte count true. The
/// head must be locked by the caller's transaction.
async fn delete_up_to(
    transaction: &Transaction<'_>,
    key: &[u8],
    up_to: i64,
) -> Result<u64, StorageError> {
    let row = transaction
        .query_one(
            "WITH gone AS (DELETE FROM messages WHERE log = $1 AND seq <= $2 RETURNING bytes)
             SELECT COUNT(*), COALESCE(SUM(LENGTH(bytes)), 0)::BIGINT FROM gone",
            &[&key, &up_to],
        )
        .await
        .map_err(database)?;
    let (count, bytes): (i64, i64) = (row.get(0), row.get(1));
    if count > 0 {
        transaction
            .execute(
                "UPDATE heads SET used = GREATEST(used - $2, 0) WHERE log = $1",
                &[&key, &bytes],
            )
            .await
            .map_err(database)?;
    }
    Ok(count as u64)
}

struct AppendJob {
    key: Vec<u8>,
    bytes: Vec<u8>,
    answer: tokio::sync::oneshot::Sender<Result<Appended, StorageError>>,
}

/// Takes every append waiting, commits them in one transaction, answers after COMMIT.
async fn write_loop(
    mut client: Client,
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<AppendJob>,
    quotas: Quotas,
    durations: Arc<Mutex<Vec<f64>>>,
    notary: NotarySlot,
) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let start = Instant::now();
        let requests: Vec<(Vec<u8>, Vec<u8>)> = batch
            .iter()
            .map(|job| (job.key.clone(), job.bytes.clone()))
            .collect();
        let results = commit_appends(&mut client, &requests, quotas, &notary).await;
        if let Ok(mut durations) = durations.lock()
            && durations.len() < 100_000
        {
            durations.push(start.elapsed().as_secs_f64());
        }
        match results {
            Ok(results) => {
                for (job, result) in batch.into_iter().zip(results) {
                    let _ = job.answer.send(result);
                }
            }
            Err(error) => {
                for job in batch {
                    let _ = job.answer.send(Err(match &error {
                        CommitError::Database(error) => StorageError::Postgres(error.to_string()),
                        CommitError::Seal(error) => StorageError::Seal(error.clone()),
                    }));
                }
            }
        }
    }
}

/// Why a batch of appends failed (every append in it fails with this).
enum CommitError {
    Database(tokio_postgres::Error),
    Seal(String),
}

impl From<tokio_postgres::Error> for CommitError {
    fn from(error: tokio_postgres::Error) -> Self {
        CommitError::Database(error)
    }
}

/// New messages of one log in a batch, inserted together.
#[derive(Default)]
struct LogInserts {
    last: i64,
    used: i64,
    seqs: Vec<i64>,
    hashes: Vec<Vec<u8>>,
    bodies: Vec<Vec<u8>>,
    times: Vec<i64>,
    receipts: Vec<Option<Vec<u8>>>,
}

/// One transaction for a batch of appends: each log's head locked once (in key order,
/// so that relay processes never deadlock), duplicates looked up at once, the batch
/// sealed with one signature, every new message inserted by one statement per log,
/// one notification.
async fn commit_appends(
    client: &mut Client,
    requests: &[(Vec<u8>, Vec<u8>)],
    quotas: Quotas,
    notary: &NotarySlot,
) -> Result<Vec<Result<Appended, StorageError>>, CommitError> {
    let mut logs: Vec<&Vec<u8>> = requests.iter().map(|(key, _)| key).collect();
    logs.sort();
    logs.dedup();
    let transaction = client.transaction().await?;
    let mut results: Vec<Option<Result<Appended, StorageError>>> =
        (0..requests.len()).map(|_| None).collect();
    let mut inserts: Vec<(&Vec<u8>, LogInserts)> = Vec::new();
    let mut leaves = Vec::new();
    for key in logs {
        transaction
            .execute(
                "INSERT INTO heads (log, last_seq, used) VALUES ($1, 0, 0) ON CONFLICT DO NOTHING",
                &[key],
            )
            .await?;
        let head = transaction
            .query_one(
                "SELECT last_seq, used FROM heads WHERE log = $1 FOR UPDATE",
                &[key],
            )
            .await?;
        let mut log = LogInserts {
            last: head.get(0),
            used: head.get(1),
            ..LogInserts::default()
        };
        let mine: Vec<usize> = (0..requests.len())
            .filter(|i| &requests[*i].0 == key)
            .collect();
        let hashes: Vec<Vec<u8>> = mine
            .iter()
            .map(|i| Sha256::digest(&requests[*i].1).to_vec())
            .collect();
        let mut known: std::collections::HashMap<Vec<u8>, (i64, Option<Vec<u8>>)> = transaction
            .query(
                "SELECT hash, seq, receipt FROM messages WHERE log = $1 AND hash = ANY($2)",
                &[key, &hashes],
            )
            .await?
            .iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2))))
            .collect();
        for (index, hash) in mine.into_iter().zip(hashes) {
            let bytes = &requests[index].1;
            if let Some((seq, receipt)) = known.get(&hash) {
                // One stored earlier in this batch gets its receipt with the seal.
                results[index] = Some(Ok(Appended {
                    seq: *seq as u64,
                    duplicate: true,
                    receipt: receipt.clone(),
                }));
                continue;
            }
            let quota = quotas.of_key(key);
            if log.used as u64 + bytes.len() as u64 > quota {
                results[index] = Some(Err(StorageError::QuotaExceeded(quota)));
                continue;
            }
            log.last += 1;
            log.used += bytes.len() as i64;
            known.insert(hash.clone(), (log.last, None));
            leaves.push(Leaf {
                log: key.clone(),
                seq: log.last as u64,
                hash: hash.as_slice().try_into().unwrap_or([0; 32]),
            });
            log.seqs.push(log.last);
            log.hashes.push(hash);
            log.bodies.push(bytes.clone());
            log.times.push(now_ms());
            results[index] = Some(Ok(Appended {
                seq: log.last as u64,
                duplicate: false,
                receipt: None,
            }));
        }
        if !log.seqs.is_empty() {
            inserts.push((key, log));
        }
    }
    // One signature for the batch; each message keeps its receipt.
    let mut sealed = seal_batch(notary, leaves)
        .map_err(CommitError::Seal)?
        .into_iter();
    let mut receipts = std::collections::HashMap::new();
    for (key, log) in &mut inserts {
        for seq in &log.seqs {
            let receipt = sealed.next().flatten();
            if let Some(receipt) = &receipt {
                receipts.insert(((*key).clone(), *seq as u64), receipt.clone());
            }
            log.receipts.push(receipt);
        }
    }
    for (key, log) in &inserts {
        transaction
            .execute(
                "INSERT INTO messages (log, seq, hash, bytes, stored_ms, receipt)
                 SELECT $1, * FROM UNNEST($2::BIGINT[], $3::BYTEA[], $4::BYTEA[], $5::BIGINT[],
                                          $6::BYTEA[])",
                &[
                    key,
                    &log.seqs,
                    &log.hashes,
                    &log.bodies,
                    &log.times,
                    &log.receipts,
                ],
            )
            .await?;
        transaction
            .execute(
                "UPDATE heads SET last_seq = $2, used = $3 WHERE log = $1",
                &[key, &log.last, &log.used],
            )
            .await?;
    }
    if !inserts.is_empty() {
        transaction
            .execute(&format!("SELECT pg_notify('{CHANNEL}', '')"), &[])
            .await?;
    }
    transaction.commit().await?;
    Ok(results
        .into_iter()
        .zip(requests)
        .map(|(result, (key, _))| match result {
            Some(Ok(mut appended)) => {
                if appended.receipt.is_none() {
                    appended.receipt = receipts.get(&(key.clone(), appended.seq)).cloned();
                }
                Ok(appended)
            }
            Some(Err(error)) => Err(error),
            None => Err(StorageError::WriterGone),
        })
        .collect())
}

impl RelayStorage for PostgresStorage {
    async fn append(&self, log: Log, bytes: Vec<u8>) -> Result<Appended, StorageError> {
        let (answer, wait) = tokio::sync::oneshot::channel();
        self.appends
            .send(AppendJob {
                key: key(&log),
                bytes,
                answer,
            })
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
            let (answer, wait) = tokio::sync::oneshot::channel();
            let job = AppendJob {
                key: key(&log),
                bytes,
                answer,
            };
            waits.push(self.appends.send(job).map(|()| wait));
        }
        answers_in_order(waits).await
    }

    async fn read_after(
        &self,
        log: &Log,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Stored>, StorageError> {
        let client = self.client().await;
        // The running total of sizes is summed on the server: only messages within the
        // budget (the first always) travel and are held here.
        let rows = client
            .query(
                "SELECT seq, bytes, receipt FROM messages WHERE log = $1 AND seq > $2
                   AND seq <= (
                     SELECT COALESCE(MAX(seq) FILTER (WHERE running <= $4), MIN(seq))
                     FROM (SELECT seq, SUM(octet_length(bytes)) OVER (ORDER BY seq) AS running
                           FROM messages WHERE log = $1 AND seq > $2 ORDER BY seq LIMIT $3) page)
                 ORDER BY seq",
                &[
                    &key(log),
                    &(after as i64),
                    &(limit as i64),
                    &(max_bytes.min(i64::MAX as usize) as i64),
                ],
            )
            .await
            .map_err(database)?;
        Ok(rows
            .iter()
            .map(|row| Stored {
                seq: row.get::<_, i64>(0) as u64,
                bytes: row.get(1),
                receipt: row.get(2),
            })
            .collect())
    }

    fn set_notary(&self, notary: Arc<Notary>) {
        let _ = self.notary.set(notary);
    }

    async fn membership(&self, channel: &[u8; 32]) -> Result<Option<Membership>, StorageError> {
        let client = self.client().await;
        let row = client
            .query_opt(
                "SELECT committer, version, members FROM memberships WHERE channel = $1",
                &[&&channel[..]],
            )
            .await
            .map_err(database)?;
        Ok(row.and_then(|row| {
            let (committer, members): (Vec<u8>, Vec<u8>) = (row.get(0), row.get(2));
            Membership::from_stored(&committer, row.get(1), &members)
        }))
    }

    async fn set_membership(
        &self,
        channel: &[u8; 32],
        membership: &Membership,
    ) -> Result<bool, StorageError> {
        let members = membership.stored_members();
        let client = self.client().await;
        let changed = client
            .execute(
                "INSERT INTO memberships (channel, committer, version, members)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (channel) DO UPDATE SET committer = EXCLUDED.committer,
                   version = EXCLUDED.version, members = EXCLUDED.members
                 WHERE memberships.version < EXCLUDED.version",
                &[
                    &&channel[..],
                    &&membership.committer[..],
                    &(membership.version as i64),
                    &members,
                ],
            )
            .await
            .map_err(database)?;
        Ok(changed == 1)
    }

    async fn acknowledge(
        &self,
        log: Log,
        device: [u8; 32],
        seq: u64,
        members: Vec<[u8; 32]>,
    ) -> Result<u64, StorageError> {
        let key = key(&log);
        let mut client = self.client().await;
        let transaction = client.transaction().await.map_err(database)?;
        lock_head(&transaction, &key).await?;
        transaction
            .execute(
                "INSERT INTO acks (log, device, seq) VALUES ($1, $2, $3)
                 ON CONFLICT (log, device) DO UPDATE SET seq = GREATEST(acks.seq, EXCLUDED.seq)",
                &[&key, &&device[..], &(seq as i64)],
            )
            .await
            .map_err(database)?;
        let mut lowest = i64::MAX;
        for member in &members {
            let acked = transaction
                .query_opt(
                    "SELECT seq FROM acks WHERE log = $1 AND device = $2",
                    &[&key, &&member[..]],
                )
                .await
                .map_err(database)?
                .map_or(0, |row| row.get::<_, i64>(0));
            lowest = lowest.min(acked);
        }
        let deleted = if members.is_empty() || lowest == 0 {
            0
        } else {
            delete_up_to(&transaction, &key, lowest).await?
        };
        transaction.commit().await.map_err(database)?;
        Ok(deleted)
    }

    async fn expire(&self, before_ms: u64) -> Result<u64, StorageError> {
        let logs: Vec<(Vec<u8>, i64)> = {
            let client = self.client().await;
            client
                .query(
                    "SELECT log, MAX(seq) FROM messages WHERE stored_ms < $1 GROUP BY log",
                    &[&(before_ms as i64)],
                )
                .await
                .map_err(database)?
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect()
        };
        let mut deleted = 0;
        for (key, up_to) in logs {
            let mut client = self.client().await;
            let transaction = client.transaction().await.map_err(database)?;
            lock_head(&transaction, &key).await?;
            deleted += delete_up_to(&transaction, &key, up_to).await?;
            transaction.commit().await.map_err(database)?;
        }
        Ok(deleted)
    }

    /// Locks the log's head first (as acknowledgements and expiry do, so that they never
    /// deadlock with a claim), then deletes the oldest message: claims on one log, from
    /// any process, take turns, and each sees what the one before it removed.
    async fn claim_first(&self, log: Log) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let key = key(&log);
        let mut client = self.client().await;
        let transaction = client.transaction().await.map_err(database)?;
        // No head: nothing was ever appended to this log (and a claim creates none).
        let head = transaction
            .query_opt("SELECT used FROM heads WHERE log = $1 FOR UPDATE", &[&key])
            .await
            .map_err(database)?;
        if head.is_none() {
            transaction.commit().await.map_err(database)?;
            return Ok(None);
        }
        let claimed = transaction
            .query_opt(
                "DELETE FROM messages WHERE (log, seq) = (
                     SELECT log, seq FROM messages WHERE log = $1
                     ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)
                 RETURNING seq, bytes",
                &[&key],
            )
            .await
            .map_err(database)?
            .map(|row| (row.get::<_, i64>(0), row.get::<_, Vec<u8>>(1)));
        if let Some((_, bytes)) = &claimed {
            transaction
                .execute(
                    "UPDATE heads SET used = GREATEST(used - $2, 0) WHERE log = $1",
                    &[&key, &(bytes.len() as i64)],
                )
                .await
                .map_err(database)?;
        }
        transaction.commit().await.map_err(database)?;
        Ok(claimed.map(|(seq, bytes)| (seq as u64, bytes)))
    }

    async fn used_bytes(&self) -> Result<u64, StorageError> {
        let row = self
            .client()
            .await
            .query_one("SELECT COALESCE(SUM(used), 0)::BIGINT FROM heads", &[])
            .await
            .map_err(database)?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }

    fn take_commit_durations(&self) -> Vec<f64> {
        self.commit_durations
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default()
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.clone())
    }
}
