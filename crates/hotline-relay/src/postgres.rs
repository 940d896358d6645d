//! PostgreSQL backend: several relay processes share one database.
//!
//! ```text
//!   relay process A ──┐  append: one transaction, the log's head row locked
//!   relay process B ──┼─► (FOR UPDATE), so processes never hand out one number twice;
//!   relay process C ──┘  pg_notify on commit, naming the logs ──► every process's LISTEN
//!                        wakes the readers waiting on them
//! ```
//!
//! Durability is PostgreSQL's: an append is answered after COMMIT with
//! `synchronous_commit` on (the server default). Each process has one writer that
//! commits every append waiting at that moment in one transaction (group commit: one
//! WAL flush per batch, two round trips to the database whatever the number of logs in
//! it). Connections are plain TCP (`NoTls`): run the
//! database on the relay's host or a trusted network.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::future::{join3, join4};
use sha2::{Digest, Sha256};
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement, Transaction};

use crate::storage::{
    Appended, Leaf, Log, Membership, Notary, NotarySlot, Quotas, RelayStorage, StorageError,
    Stored, Waiters, Waiting, answers_in_order, seal_batch,
};

const CHANNEL: &str = "hotline_appended";

/// A pool of connections to one PostgreSQL schema, and a listener for other processes'
/// appends.
pub struct PostgresStorage {
    appends: tokio::sync::mpsc::UnboundedSender<AppendJob>,
    pool: Vec<tokio::sync::Mutex<Client>>,
    next: AtomicUsize,
    /// Readers waiting on logs, woken by every process's commits (LISTEN).
    changes: Arc<Waiters>,
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
    // Every statement of the relay looks rows up by key. On a young table (no
    // statistics yet) the planner prefers scanning it whole and hashing, and a prepared
    // statement keeps that plan while the table grows: the duplicate lookup then read
    // every message per batch (most of PostgreSQL's time in a profile).
    client
        .batch_execute(&format!(
            "SET search_path TO {schema}; SET enable_seqscan = off; SET enable_hashjoin = off; \
             SET enable_mergejoin = off"
        ))
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

        // One more connection LISTENs; a notification names the logs a commit appended
        // to and wakes their readers in this process.
        let (listener, mut connection) = tokio_postgres::connect(url, NoTls)
            .await
            .map_err(database)?;
        // This process's notifications name it: their readers were woken on commit,
        // in this process, with the fresh messages in hand.
        let origin = format!("{:016x}", rand::random::<u64>());
        let changes = Arc::new(Waiters::default());
        let notify = Arc::clone(&changes);
        let own = origin.clone();
        tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(notification))) => {
                        wake_named(&notify, notification.payload(), &own);
                    }
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
        let statements = Statements::prepare(&writer).await.map_err(database)?;
        let notary = NotarySlot::default();
        tokio::spawn(write_loop(
            writer,
            statements,
            jobs,
            quotas,
            Arc::clone(&commit_durations),
            Arc::clone(&notary),
            origin,
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

/// The writer's statements, prepared once on its connection: a statement given as text
/// costs a round trip of its own to prepare every time it runs.
struct Statements {
    create_heads: Statement,
    lock_heads: Statement,
    known: Statement,
    insert: Statement,
    set_heads: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            // In key order, as the locks below: two processes creating the same new
            // heads wait for each other in one order, never in a cycle.
            create_heads: client
                .prepare(
                    "INSERT INTO heads (log, last_seq, used)
                     SELECT log, 0, 0 FROM UNNEST($1::BYTEA[]) AS log ON CONFLICT DO NOTHING",
                )
                .await?,
            // ORDER BY under FOR UPDATE: rows are locked in the order they are sorted.
            lock_heads: client
                .prepare(
                    "SELECT log, last_seq, used FROM heads WHERE log = ANY($1)
                     ORDER BY log FOR UPDATE",
                )
                .await?,
            known: client
                .prepare(
                    "SELECT m.log, m.hash, m.seq, m.receipt FROM messages m
                     JOIN UNNEST($1::BYTEA[], $2::BYTEA[]) AS r(log, hash)
                       ON m.log = r.log AND m.hash = r.hash",
                )
                .await?,
            insert: client
                .prepare(
                    "INSERT INTO messages (log, seq, hash, bytes, stored_ms, receipt)
                     SELECT * FROM UNNEST($1::BYTEA[], $2::BIGINT[], $3::BYTEA[], $4::BYTEA[],
                                          $5::BIGINT[], $6::BYTEA[])",
                )
                .await?,
            set_heads: client
                .prepare(
                    "UPDATE heads SET last_seq = u.last, used = u.used
                     FROM UNNEST($1::BYTEA[], $2::BIGINT[], $3::BIGINT[]) AS u(log, last, used)
                     WHERE heads.log = u.log",
                )
                .await?,
        })
    }
}

/// Takes every append waiting, commits them in one transaction, answers after COMMIT.
async fn write_loop(
    client: Client,
    statements: Statements,
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<AppendJob>,
    quotas: Quotas,
    durations: Arc<Mutex<Vec<f64>>>,
    notary: NotarySlot,
    origin: String,
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
        let requests: Vec<(&[u8], &[u8])> = batch
            .iter()
            .map(|job| (job.key.as_slice(), job.bytes.as_slice()))
            .collect();
        let results =
            commit_appends(&client, &statements, &requests, quotas, &notary, &origin).await;
        if results.is_err() {
            // Whatever failed, the transaction must not stay open for the next batch
            // (a warning, no harm, if it already ended).
            let _ = client.batch_execute("ROLLBACK").await;
        }
        drop(requests);
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

/// A message the log holds: its sequence number and receipt (none yet for one stored
/// earlier in the same batch).
type Held = (i64, Option<Vec<u8>>);

/// A log's head as the batch moves it, and the rows it adds.
#[derive(Default)]
struct Head {
    last: i64,
    used: i64,
    seqs: Vec<i64>,
}

/// One transaction for a batch of appends, in two round trips whatever the number of
/// logs in it (tokio-postgres pipelines statements sent before their answers are
/// awaited): first BEGIN, every head created if new and locked (in key order, so that
/// relay processes never deadlock) and every duplicate looked up; then, the batch sealed
/// with one signature, every new message inserted by one statement, every head moved by
/// another, one notification (from `origin`, this process) and COMMIT.
async fn commit_appends(
    client: &Client,
    statements: &Statements,
    requests: &[(&[u8], &[u8])],
    quotas: Quotas,
    notary: &NotarySlot,
    origin: &str,
) -> Result<Vec<Result<Appended, StorageError>>, CommitError> {
    let mut logs: Vec<&[u8]> = requests.iter().map(|(key, _)| *key).collect();
    logs.sort_unstable();
    logs.dedup();
    let hashes: Vec<Vec<u8>> = requests
        .iter()
        .map(|(_, bytes)| Sha256::digest(bytes).to_vec())
        .collect();
    let request_logs: Vec<&[u8]> = requests.iter().map(|(key, _)| *key).collect();
    let (begun, created, locked, known) = join4(
        client.batch_execute("BEGIN"),
        client.execute(&statements.create_heads, &[&logs]),
        client.query(&statements.lock_heads, &[&logs]),
        client.query(&statements.known, &[&request_logs, &hashes]),
    )
    .await;
    begun?;
    created?;
    let mut heads: HashMap<Vec<u8>, Head> = locked?
        .iter()
        .map(|row| {
            let head = Head {
                last: row.get(1),
                used: row.get(2),
                seqs: Vec::new(),
            };
            (row.get(0), head)
        })
        .collect();
    let mut known: HashMap<(Vec<u8>, Vec<u8>), Held> = known?
        .iter()
        .map(|row| ((row.get(0), row.get(1)), (row.get(2), row.get(3))))
        .collect();

    let mut results: Vec<Result<Appended, StorageError>> = Vec::with_capacity(requests.len());
    let mut rows = Rows::default();
    let mut leaves = Vec::new();
    for ((key, bytes), hash) in requests.iter().zip(&hashes) {
        let id = (key.to_vec(), hash.clone());
        if let Some((seq, receipt)) = known.get(&id) {
            // One stored earlier in this batch gets its receipt with the seal, below.
            results.push(Ok(Appended {
                seq: *seq as u64,
                duplicate: true,
                receipt: receipt.clone(),
            }));
            continue;
        }
        let Some(head) = heads.get_mut(*key) else {
            // Created and locked above; a head missing here is a broken database.
            results.push(Err(StorageError::Postgres(
                "a log's head vanished inside its transaction".into(),
            )));
            continue;
        };
        let quota = quotas.of_key(key);
        if head.used as u64 + bytes.len() as u64 > quota {
            results.push(Err(StorageError::QuotaExceeded(quota)));
            continue;
        }
        head.last += 1;
        head.used += bytes.len() as i64;
        head.seqs.push(head.last);
        known.insert(id, (head.last, None));
        leaves.push(Leaf {
            log: key.to_vec(),
            seq: head.last as u64,
            hash: hash.as_slice().try_into().unwrap_or([0; 32]),
        });
        rows.push(key, head.last, hash, bytes);
        results.push(Ok(Appended {
            seq: head.last as u64,
            duplicate: false,
            receipt: None,
        }));
    }

    // One signature for the batch; each message keeps its receipt.
    rows.receipts = seal_batch(notary, leaves).map_err(CommitError::Seal)?;
    if rows.logs.is_empty() {
        client.batch_execute("COMMIT").await?;
    } else {
        let moved: Vec<(&Vec<u8>, &Head)> = heads
            .iter()
            .filter(|(_, head)| !head.seqs.is_empty())
            .collect();
        let moved_logs: Vec<&[u8]> = moved.iter().map(|(key, _)| key.as_slice()).collect();
        let moved_last: Vec<i64> = moved.iter().map(|(_, head)| head.last).collect();
        let moved_used: Vec<i64> = moved.iter().map(|(_, head)| head.used).collect();
        let commit = format!(
            "SELECT pg_notify('{CHANNEL}', '{}'); COMMIT",
            notification(origin, &moved_logs)
        );
        let (inserted, set, committed) = join3(
            client.execute(
                &statements.insert,
                &[
                    &rows.logs,
                    &rows.seqs,
                    &rows.hashes,
                    &rows.bodies,
                    &rows.times,
                    &rows.receipts,
                ],
            ),
            client.execute(
                &statements.set_heads,
                &[&moved_logs, &moved_last, &moved_used],
            ),
            client.batch_execute(&commit),
        )
        .await;
        inserted?;
        set?;
        committed?;
    }
    let receipts: HashMap<(&[u8], i64), &Option<Vec<u8>>> = rows
        .logs
        .iter()
        .zip(&rows.seqs)
        .zip(&rows.receipts)
        .map(|((key, seq), receipt)| ((*key, *seq), receipt))
        .collect();
    Ok(results
        .into_iter()
        .zip(requests)
        .map(|(result, (key, _))| {
            result.map(|mut appended| {
                if appended.receipt.is_none() {
                    appended.receipt = receipts
                        .get(&(*key, appended.seq as i64))
                        .and_then(|receipt| (*receipt).clone());
                }
                appended
            })
        })
        .collect())
}

/// The new messages of a batch, column by column, as one INSERT takes them.
#[derive(Default)]
struct Rows<'a> {
    logs: Vec<&'a [u8]>,
    seqs: Vec<i64>,
    hashes: Vec<&'a [u8]>,
    bodies: Vec<&'a [u8]>,
    times: Vec<i64>,
    receipts: Vec<Option<Vec<u8>>>,
}

impl<'a> Rows<'a> {
    fn push(&mut self, log: &'a [u8], seq: i64, hash: &'a [u8], body: &'a [u8]) {
        self.logs.push(log);
        self.seqs.push(seq);
        self.hashes.push(hash);
        self.bodies.push(body);
        self.times.push(now_ms());
    }
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

    fn changes(&self, key: &[u8]) -> Option<Waiting<'_>> {
        Some(self.changes.wait_on(key))
    }
}

/// The payload of the notification of a commit by the process `origin` (hex) that
/// appended to `logs`: the origin, `;`, and the logs' storage keys in hex separated by
/// commas, or `*` (every log) when they would not fit in PostgreSQL's 8,000 bytes.
/// Only hex digits, `;`, commas and `*`: safe inside quotes.
fn notification(origin: &str, logs: &[&[u8]]) -> String {
    let named = logs.iter().map(hex::encode).collect::<Vec<_>>().join(",");
    if named.len() > NOTIFICATION_BYTES {
        format!("{origin};*")
    } else {
        format!("{origin};{named}")
    }
}

/// Room for the logs named in one notification, under PostgreSQL's 8,000-byte limit.
const NOTIFICATION_BYTES: usize = 7_000;

/// Wakes the readers of the logs a notification names: none for one of this process
/// (`own`: its readers were woken as it committed), all of them for `*`, and for an
/// empty payload (a relay process of a version that named none). A payload without an
/// origin is of a version that named none.
fn wake_named(waiters: &Waiters, payload: &str, own: &str) {
    let payload = match payload.split_once(';') {
        Some((origin, _)) if origin == own => return,
        Some((_, logs)) => logs,
        None => payload,
    };
    if payload.is_empty() || payload == "*" {
        waiters.wake_all();
        return;
    }
    for named in payload.split(',') {
        match hex::decode(named) {
            Ok(key) => {
                waiters.wake(&key, 1);
            }
            Err(_) => return waiters.wake_all(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_notification_wakes_the_logs_it_names_or_all_when_they_do_not_fit() {
        let (a, b, c) = (
            Log::Channel([1; 32]).storage_key(),
            Log::Channel([2; 32]).storage_key(),
            Log::Inbox([3; 32]).storage_key(),
        );
        let waiters = Waiters::default();
        let (mut on_a, mut on_b, mut on_c) = (
            waiters.wait_on(&a),
            waiters.wait_on(&b),
            waiters.wait_on(&c),
        );
        let soon = std::time::Duration::from_millis(50);
        let (own, other) = ("00000000000000aa", "00000000000000bb");
        // This process's own commit: its readers were woken as it committed.
        wake_named(&waiters, &notification(own, &[&a, &b, &c]), own);
        assert!(tokio::time::timeout(soon, on_a.changed()).await.is_err());
        assert!(tokio::time::timeout(soon, on_b.changed()).await.is_err());
        let payload = notification(other, &[&a, &c]);
        assert!(payload.len() < NOTIFICATION_BYTES + 17);
        wake_named(&waiters, &payload, own);
        assert!(tokio::time::timeout(soon, on_a.changed()).await.is_ok());
        assert!(tokio::time::timeout(soon, on_c.changed()).await.is_ok());
        assert!(tokio::time::timeout(soon, on_b.changed()).await.is_err());
        // Too many logs to name (a batch of many channels): every reader wakes.
        let many: Vec<Vec<u8>> = (0..200u8)
            .map(|n| Log::Channel([n; 32]).storage_key())
            .collect();
        let many: Vec<&[u8]> = many.iter().map(Vec::as_slice).collect();
        assert_eq!(notification(other, &many), format!("{other};*"));
        wake_named(&waiters, &notification(other, &many), own);
        assert!(tokio::time::timeout(soon, on_b.changed()).await.is_ok());
        // A process that names nothing (an older version), or a garbled name: all.
        wake_named(&waiters, "", own);
        assert!(tokio::time::timeout(soon, on_a.changed()).await.is_ok());
        // An older version's names, without an origin.
        wake_named(&waiters, &hex::encode(&b), own);
        assert!(tokio::time::timeout(soon, on_b.changed()).await.is_ok());
        wake_named(&waiters, "zz", own);
        assert!(tokio::time::timeout(soon, on_c.changed()).await.is_ok());
    }
}
