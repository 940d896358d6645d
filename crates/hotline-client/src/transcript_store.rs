//! The transcript's storage in the device's database ([`TranscriptStore`] on SQLite).
//!
//! One row per accepted envelope (`entries`: its order key, chain place, frontier,
//! settled position and bytes), who read what (`readers`), the settled prefix's
//! complete Merkle subtrees (`merkle_nodes`) and the processed ciphertext hashes
//! (`processed`), all keyed by channel. It works on the device's one connection, so
//! every write joins the operation's transaction with the MLS state: a crash keeps all
//! of it or none. Every lookup is by index: what a command costs does not depend on how
//! many envelopes the channel holds.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use hotline_core::merkle::{Hash, MerkleNodes, StorageError};
use hotline_core::transcript_store::{Entry, OrderKey, TranscriptStore};
use hotline_core::{DeviceKey, Envelope, EnvelopeId};
use rusqlite::{Connection, OptionalExtension, params};

/// The tables, created by schema version 8 (see `store::MIGRATIONS`).
pub(crate) const SCHEMA: &str = "
    CREATE TABLE entries (
        channel BLOB NOT NULL,
        id BLOB NOT NULL,
        lamport INTEGER NOT NULL,
        sender BLOB NOT NULL,
        seq INTEGER NOT NULL,
        partial INTEGER NOT NULL,
        frontier BLOB NOT NULL,
        position INTEGER,
        bytes BLOB NOT NULL,
        UNIQUE (channel, id)
    );
    CREATE UNIQUE INDEX entries_order ON entries (channel, lamport, id);
    CREATE UNIQUE INDEX entries_chain ON entries (channel, sender, seq);
    CREATE TABLE readers (
        channel BLOB NOT NULL,
        id BLOB NOT NULL,
        reader BLOB NOT NULL,
        PRIMARY KEY (channel, id, reader)
    ) WITHOUT ROWID;
    CREATE TABLE merkle_nodes (
        channel BLOB NOT NULL,
        level INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        hash BLOB NOT NULL,
        PRIMARY KEY (channel, level, idx)
    ) WITHOUT ROWID;
    -- Messages with a read-by deadline, until every other party read them.
    CREATE TABLE deadlines (
        channel BLOB NOT NULL,
        id BLOB NOT NULL,
        sender BLOB NOT NULL,
        deadline_ms INTEGER NOT NULL,
        PRIMARY KEY (channel, id)
    ) WITHOUT ROWID;
    -- Channels whose transcript is rebuilt from their envelopes at the next open.
    CREATE TABLE rebuild (channel BLOB PRIMARY KEY) WITHOUT ROWID;
    INSERT INTO rebuild (channel) SELECT id FROM channels;";

/// Schema version 16: the precedence of messages with a deadline and in the outbox,
/// the escalations made, the agreed texts' proposals and steps, and the cosignatures
/// waiting to be checked (their envelopes' ids: what they say is read from the
/// transcript).
pub(crate) const PRECEDENCE: &str = "
    ALTER TABLE deadlines ADD COLUMN precedence INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE deadlines ADD COLUMN escalated INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX deadlines_by_time ON deadlines (channel, deadline_ms);
    CREATE INDEX deadlines_due ON deadlines (sender, escalated, deadline_ms);
    ALTER TABLE outbox ADD COLUMN precedence INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE escalations (
        channel BLOB NOT NULL,
        id BLOB NOT NULL,
        party TEXT NOT NULL,
        statement BLOB NOT NULL,
        delivered INTEGER NOT NULL,
        at_ms INTEGER NOT NULL,
        PRIMARY KEY (channel, id, party)
    ) WITHOUT ROWID;
    -- Agreed texts: each proposal, and each party's signature or rejection as it came.
    CREATE TABLE agreements (
        channel BLOB NOT NULL,
        proposal BLOB NOT NULL,
        -- 'accepted' or 'rejected' once it was: a final state stays final, whatever
        -- membership changes follow.
        final TEXT,
        PRIMARY KEY (channel, proposal)
    ) WITHOUT ROWID;
    CREATE TABLE agreement_steps (
        channel BLOB NOT NULL,
        proposal BLOB NOT NULL,
        step BLOB NOT NULL,
        PRIMARY KEY (channel, proposal, step)
    ) WITHOUT ROWID;
    -- Cosigned roots: the cosignatures received, until checked against this device's
    -- settled prefix, and the last root this device cosigned per channel.
    CREATE TABLE cosigns (
        channel BLOB NOT NULL,
        step BLOB NOT NULL,
        PRIMARY KEY (channel, step)
    ) WITHOUT ROWID;
    CREATE TABLE cosigned (
        channel BLOB PRIMARY KEY,
        horizon INTEGER NOT NULL,
        size INTEGER NOT NULL,
        at_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    -- Per later horizon: how far this device read its settled prefix to compute the
    -- root of that horizon's envelopes (hotline_core::cosign::HorizonCursor).
    -- The channel's handling times (ms per precedence, FLASH first), when its
    -- committer set them; else the defaults.
    CREATE TABLE handling_times (
        channel BLOB PRIMARY KEY,
        times TEXT NOT NULL
    ) WITHOUT ROWID;
    -- Later horizons whose root this device found its own: it cosigns at the latest.
    CREATE TABLE cosign_horizons (
        channel BLOB NOT NULL,
        horizon INTEGER NOT NULL,
        PRIMARY KEY (channel, horizon)
    ) WITHOUT ROWID;
    CREATE TABLE cosign_cursors (
        channel BLOB NOT NULL,
        horizon INTEGER NOT NULL,
        cursor BLOB NOT NULL,
        PRIMARY KEY (channel, horizon)
    ) WITHOUT ROWID;";

/// A transcript store in a new scratch database at `path` (which must not exist), for
/// verifying a long export in bounded memory. Nothing in it needs to survive a crash.
pub fn scratch(
    path: &std::path::Path,
    channel: [u8; 32],
) -> rusqlite::Result<Box<dyn TranscriptStore>> {
    let connection = Connection::open(path)?;
    connection.set_prepared_statement_cache_capacity(crate::store::STATEMENT_CACHE);
    connection.pragma_update(None, "journal_mode", "OFF")?;
    // A bounded page cache (16 MiB), beside the file the kernel caches.
    connection.pragma_update(None, "cache_size", -16_384)?;
    connection.pragma_update(None, "synchronous", "OFF")?;
    connection.execute_batch(
        "CREATE TABLE channels (id BLOB PRIMARY KEY);
         CREATE TABLE envelopes (channel BLOB, id BLOB, lamport INTEGER, bytes BLOB);
         CREATE TABLE processed (channel BLOB, hash BLOB, PRIMARY KEY (channel, hash));
         CREATE TABLE outbox (seq INTEGER PRIMARY KEY);",
    )?;
    connection.execute_batch(SCHEMA)?;
    connection.execute_batch(PRECEDENCE)?;
    // One transaction for the whole verification: nothing is synced until it ends.
    connection.execute_batch("BEGIN")?;
    Ok(SqliteTranscript::boxed(Rc::new(connection), channel))
}

/// One channel's transcript in the device's database.
#[derive(Debug)]
pub struct SqliteTranscript {
    connection: Rc<Connection>,
    channel: [u8; 32],
}

impl SqliteTranscript {
    pub fn boxed(connection: Rc<Connection>, channel: [u8; 32]) -> Box<dyn TranscriptStore> {
        Box::new(Self {
            connection,
            channel,
        })
    }
}

fn failed(error: impl std::fmt::Display) -> StorageError {
    StorageError(error.to_string())
}

fn limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn key(bytes: Vec<u8>, what: &str) -> Result<[u8; 32], StorageError> {
    bytes
        .try_into()
        .map_err(|_| StorageError(format!("stored {what} is not 32 bytes")))
}

fn encode_frontier(frontier: &BTreeMap<DeviceKey, u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(frontier.len() * 40);
    for (device, seq) in frontier {
        out.extend_from_slice(&device.0);
        out.extend_from_slice(&seq.to_be_bytes());
    }
    out
}

fn decode_frontier(bytes: &[u8]) -> Result<BTreeMap<DeviceKey, u64>, StorageError> {
    if !bytes.len().is_multiple_of(40) {
        return Err(StorageError("stored frontier is malformed".into()));
    }
    Ok(bytes
        .chunks_exact(40)
        .map(|chunk| {
            let mut device = [0u8; 32];
            device.copy_from_slice(&chunk[..32]);
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&chunk[32..]);
            (DeviceKey(device), u64::from_be_bytes(seq))
        })
        .collect())
}

fn decode_envelope(bytes: &[u8]) -> Result<(Envelope, EnvelopeId), StorageError> {
    Envelope::decode(bytes).map_err(|e| StorageError(format!("stored envelope: {e}")))
}

impl SqliteTranscript {
    fn envelopes(
        &self,
        sql: &str,
        key: Option<OrderKey>,
        count: usize,
    ) -> Result<Vec<(EnvelopeId, Envelope)>, StorageError> {
        let (lamport, id) = key.map_or((-1, vec![]), |(l, id)| (l as i64, id.0.to_vec()));
        let mut statement = self.connection.prepare_cached(sql).map_err(failed)?;
        let rows = statement
            .query_map(
                params![&self.channel[..], lamport, id, limit(count)],
                |row| row.get::<_, Vec<u8>>(0),
            )
            .map_err(failed)?;
        rows.map(|bytes| {
            let (envelope, id) = decode_envelope(&bytes.map_err(failed)?)?;
            Ok((id, envelope))
        })
        .collect()
    }
}

impl MerkleNodes for SqliteTranscript {
    fn node(&self, level: u32, index: u64) -> Result<Option<Hash>, StorageError> {
        self.connection
            .prepare_cached(
                "SELECT hash FROM merkle_nodes WHERE channel = ?1 AND level = ?2 AND idx = ?3",
            )
            .and_then(|mut statement| {
                statement
                    .query_row(params![&self.channel[..], level, index as i64], |row| {
                        row.get::<_, Vec<u8>>(0)
                    })
                    .optional()
            })
            .map_err(failed)?
            .map(|hash| key(hash, "merkle node"))
            .transpose()
    }

    fn put_node(&mut self, level: u32, index: u64, hash: Hash) -> Result<(), StorageError> {
        self.connection
            .prepare_cached(
                "INSERT OR REPLACE INTO merkle_nodes (channel, level, idx, hash) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut statement| {
                statement.execute(params![&self.channel[..], level, index as i64, &hash[..]])
            })
            .map_err(failed)?;
        Ok(())
    }
}

impl TranscriptStore for SqliteTranscript {
    fn entry(&self, id: &EnvelopeId) -> Result<Option<Entry>, StorageError> {
        let row = self
            .connection
            .prepare_cached(
                "SELECT bytes, frontier, partial, position FROM entries WHERE channel = ?1 AND id = ?2",
            )
            .and_then(|mut statement| {
                statement
                    .query_row(params![&self.channel[..], &id.0[..]], |row| {
                        Ok((
                            row.get::<_, Vec<u8>>(0)?,
                            row.get::<_, Vec<u8>>(1)?,
                            row.get::<_, bool>(2)?,
                            row.get::<_, Option<i64>>(3)?,
                        ))
                    })
                    .optional()
            })
            .map_err(failed)?;
        let Some((bytes, frontier, partial, position)) = row else {
            return Ok(None);
        };
        Ok(Some(Entry {
            envelope: decode_envelope(&bytes)?.0,
            frontier: decode_frontier(&frontier)?,
            partial,
            position: position.map(|p| p as u64),
        }))
    }

    fn chain(&self, sender: &DeviceKey, seq: u64) -> Result<Option<EnvelopeId>, StorageError> {
        self.connection
            .prepare_cached(
                "SELECT id FROM entries WHERE channel = ?1 AND sender = ?2 AND seq = ?3",
            )
            .and_then(|mut statement| {
                statement
                    .query_row(
                        params![&self.channel[..], &sender.0[..], seq as i64],
                        |row| row.get::<_, Vec<u8>>(0),
                    )
                    .optional()
            })
            .map_err(failed)?
            .map(|id| key(id, "envelope id").map(EnvelopeId))
            .transpose()
    }

    fn insert(&mut self, id: &EnvelopeId, entry: &Entry) -> Result<(), StorageError> {
        let envelope = &entry.envelope;
        self.connection
            .prepare_cached(
                "INSERT INTO entries (channel, id, lamport, sender, seq, partial, frontier, position, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .and_then(|mut statement| {
                statement.execute(params![
                    &self.channel[..],
                    &id.0[..],
                    envelope.lamport as i64,
                    &envelope.sender.0[..],
                    envelope.seq as i64,
                    entry.partial,
                    encode_frontier(&entry.frontier),
                    entry.position.map(|p| p as i64),
                    envelope.encode(),
                ])
            })
            .map_err(failed)?;
        match &envelope.body {
            hotline_core::Body::Agreement(hotline_core::Agreement::Propose(_)) => {
                self.connection
                    .prepare_cached(
                        "INSERT OR IGNORE INTO agreements (channel, proposal) VALUES (?1, ?2)",
                    )
                    .and_then(|mut statement| {
                        statement.execute(params![&self.channel[..], &id.0[..]])
                    })
                    .map_err(failed)?;
            }
            hotline_core::Body::Agreement(
                hotline_core::Agreement::Sign { proposal, .. }
                | hotline_core::Agreement::Reject { proposal, .. },
            ) => {
                self.connection
                    .prepare_cached(
                        "INSERT OR IGNORE INTO agreement_steps (channel, proposal, step)
                         VALUES (?1, ?2, ?3)",
                    )
                    .and_then(|mut statement| {
                        statement.execute(params![&self.channel[..], &proposal.0[..], &id.0[..]])
                    })
                    .map_err(failed)?;
            }
            hotline_core::Body::Cosignature(_) => {
                self.connection
                    .prepare_cached("INSERT OR IGNORE INTO cosigns (channel, step) VALUES (?1, ?2)")
                    .and_then(|mut statement| {
                        statement.execute(params![&self.channel[..], &id.0[..]])
                    })
                    .map_err(failed)?;
            }
            _ => {}
        }
        if let (Some(deadline), hotline_core::Body::Message(message)) =
            (envelope.deadline_ms, &envelope.body)
        {
            self.connection
                .prepare_cached(
                    "INSERT OR IGNORE INTO deadlines (channel, id, sender, deadline_ms, precedence)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .and_then(|mut statement| {
                    statement.execute(params![
                        &self.channel[..],
                        &id.0[..],
                        &envelope.sender.0[..],
                        deadline.min(i64::MAX as u64) as i64,
                        message.precedence as i64
                    ])
                })
                .map_err(failed)?;
        }
        Ok(())
    }

    fn forget_waiting(&mut self, id: &EnvelopeId) -> Result<(), StorageError> {
        self.connection
            .prepare_cached("DELETE FROM envelopes WHERE channel = ?1 AND id = ?2")
            .and_then(|mut statement| statement.execute(params![&self.channel[..], &id.0[..]]))
            .map_err(failed)?;
        Ok(())
    }

    fn set_position(&mut self, id: &EnvelopeId, position: u64) -> Result<(), StorageError> {
        let changed = self
            .connection
            .prepare_cached("UPDATE entries SET position = ?3 WHERE channel = ?1 AND id = ?2")
            .and_then(|mut statement| {
                statement.execute(params![&self.channel[..], &id.0[..], position as i64])
            })
            .map_err(failed)?;
        if changed != 1 {
            return Err(StorageError(format!("no entry {id} to settle")));
        }
        Ok(())
    }

    fn ids_after(
        &self,
        after: Option<OrderKey>,
        count: usize,
    ) -> Result<Vec<OrderKey>, StorageError> {
        let (lamport, id) = after.map_or((-1, vec![]), |(l, id)| (l as i64, id.0.to_vec()));
        let mut statement = self
            .connection
            .prepare_cached(
                "SELECT lamport, id FROM entries WHERE channel = ?1 AND (lamport, id) > (?2, ?3)
                 ORDER BY lamport, id LIMIT ?4",
            )
            .map_err(failed)?;
        let rows = statement
            .query_map(
                params![&self.channel[..], lamport, id, limit(count)],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?)),
            )
            .map_err(failed)?;
        rows.map(|row| {
            let (lamport, id) = row.map_err(failed)?;
            Ok((lamport as u64, EnvelopeId(key(id, "envelope id")?)))
        })
        .collect()
    }

    fn page_after(
        &self,
        after: Option<OrderKey>,
        count: usize,
    ) -> Result<Vec<(EnvelopeId, Envelope)>, StorageError> {
        self.envelopes(
            "SELECT bytes FROM entries WHERE channel = ?1 AND (lamport, id) > (?2, ?3)
             ORDER BY lamport, id LIMIT ?4",
            after,
            count,
        )
    }

    fn page_before(
        &self,
        before: Option<OrderKey>,
        count: usize,
    ) -> Result<Vec<(EnvelopeId, Envelope)>, StorageError> {
        match before {
            Some(before) => self.envelopes(
                "SELECT bytes FROM entries WHERE channel = ?1 AND (lamport, id) < (?2, ?3)
                 ORDER BY lamport DESC, id DESC LIMIT ?4",
                Some(before),
                count,
            ),
            None => self.envelopes(
                "SELECT bytes FROM entries WHERE channel = ?1 AND ?2 = ?2 AND ?3 = ?3
                 ORDER BY lamport DESC, id DESC LIMIT ?4",
                None,
                count,
            ),
        }
    }

    fn readers(&self, id: &EnvelopeId) -> Result<BTreeSet<DeviceKey>, StorageError> {
        let mut statement = self
            .connection
            .prepare_cached("SELECT reader FROM readers WHERE channel = ?1 AND id = ?2")
            .map_err(failed)?;
        let rows = statement
            .query_map(params![&self.channel[..], &id.0[..]], |row| {
                row.get::<_, Vec<u8>>(0)
            })
            .map_err(failed)?;
        rows.map(|reader| Ok(DeviceKey(key(reader.map_err(failed)?, "reader")?)))
            .collect()
    }

    fn add_reader(&mut self, id: &EnvelopeId, reader: &DeviceKey) -> Result<(), StorageError> {
        self.connection
            .prepare_cached(
                "INSERT OR IGNORE INTO readers (channel, id, reader) VALUES (?1, ?2, ?3)",
            )
            .and_then(|mut statement| {
                statement.execute(params![&self.channel[..], &id.0[..], &reader.0[..]])
            })
            .map_err(failed)?;
        Ok(())
    }

    fn is_processed(&self, hash: &[u8; 32]) -> Result<bool, StorageError> {
        Ok(self
            .connection
            .prepare_cached("SELECT 1 FROM processed WHERE channel = ?1 AND hash = ?2")
            .and_then(|mut statement| {
                statement
                    .query_row(params![&self.channel[..], &hash[..]], |_| Ok(()))
                    .optional()
            })
            .map_err(failed)?
            .is_some())
    }

    fn mark_processed(&mut self, hash: &[u8; 32]) -> Result<bool, StorageError> {
        let inserted = self
            .connection
            .prepare_cached("INSERT OR IGNORE INTO processed (channel, hash) VALUES (?1, ?2)")
            .and_then(|mut statement| statement.execute(params![&self.channel[..], &hash[..]]))
            .map_err(failed)?;
        Ok(inserted == 1)
    }
}
