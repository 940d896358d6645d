//! The schema of the device's database and its forward migrations (`user_version`).

use super::*;

/// Schema version of hotline's own tables; migrations run forward from `user_version`.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Prepared statements kept per connection.
pub(crate) const STATEMENT_CACHE: usize = 256;

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
    // Version 4: link tests, relay health, alarms (see `line` and `link`).
    LINE,
    // Version 5: stored alarms can be cleared by the operator (evidence kept); an outbox
    // row can name its own relays (a relay change goes to the old and the new ones).
    "ALTER TABLE alarms ADD COLUMN cleared_ms INTEGER;
    ALTER TABLE outbox ADD COLUMN only_relays TEXT;
    ALTER TABLE outbox ADD COLUMN offered_ms INTEGER;",
    // Version 6: copies of messages held for their commit, by relay, to place in their
    // sender's chain once opened (see `copies`).
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
    // Version 10: link tests are ephemeral frames, kept locally (see `link`).
    LINK_TESTS_EPHEMERAL,
    // Version 11: how many of a contact's one-time key packages this device used (each
    // channel created with the contact takes the next; then the last-resort one).
    "ALTER TABLE contacts ADD COLUMN key_packages_used INTEGER NOT NULL DEFAULT 0;",
    // Version 12: this device's short names for relays (its own labels, never sent).
    "CREATE TABLE relay_names (
        url TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE
    );",
    // Version 13: how far this device's chain was reported delivered to each party (the
    // `delivered` events of `sync --follow --json`).
    "CREATE TABLE delivered_reported (
        channel BLOB NOT NULL,
        party TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (channel, party)
    );",
    // Version 14: the devices this device invited, and when: "invited, not joined" until
    // the transcript holds something of theirs.
    "CREATE TABLE invited (
        channel BLOB NOT NULL,
        device BLOB NOT NULL,
        party TEXT NOT NULL,
        invited_ms INTEGER NOT NULL,
        PRIMARY KEY (channel, device)
    ) WITHOUT ROWID;",
    // Version 15: the one-time key packages this device keeps on its inbox relays (see
    // `stock`): what each relay said it holds, and the packages stocked, to forget
    // their private parts once no relay hands them out.
    "CREATE TABLE key_package_stock (
        relay TEXT PRIMARY KEY,
        checked_ms INTEGER NOT NULL,
        stock INTEGER NOT NULL
    );
    CREATE TABLE stocked_key_packages (
        hash_ref BLOB PRIMARY KEY,
        created_ms INTEGER NOT NULL
    ) WITHOUT ROWID;",
    // Version 16: precedence. Messages jump the outbox by it, messages with a deadline
    // keep it (the other parties' too, until this party reads them), and each
    // escalation (a message a party had not read by its deadline) is made once.
    crate::transcript_store::PRECEDENCE,
    // Version 17: relays' custody receipts for the copies this device posted and
    // received, by relay and message hash (see `copies`): kept for the link-test
    // retention window, and for good in the alarms that cite them.
    "CREATE TABLE custody (
        relay TEXT NOT NULL,
        hash BLOB NOT NULL,
        receipt BLOB NOT NULL,
        kept_ms INTEGER NOT NULL,
        PRIMARY KEY (relay, hash, receipt)
    ) WITHOUT ROWID;
    CREATE INDEX custody_by_time ON custody (kept_ms);",
    // Version 18: relays' key rotations this device followed (see
    // `hotline_proto::rotation`): the pin each started from, the pin it led to, and the
    // signed statements that proved it.
    "CREATE TABLE relay_rotations (
        from_pin BLOB PRIMARY KEY,
        to_pin BLOB NOT NULL,
        chain BLOB NOT NULL,
        learned_ms INTEGER NOT NULL
    ) WITHOUT ROWID;",
    // Version 19: after a restore from a backup, the relays each channel still reads to
    // its end before it seals again (see `crate::backup`).
    "CREATE TABLE catch_up (
        channel BLOB NOT NULL,
        relay TEXT NOT NULL,
        PRIMARY KEY (channel, relay)
    ) WITHOUT ROWID;",
    // Version 20: the membership version each channel's relays must hold from this
    // device (epoch + 1 where it is the committer, 0 where it is not), written with
    // the channel, so that a push finds what to register without loading a channel.
    // NULL (channels saved before this version): unknown until the channel is saved.
    "ALTER TABLE channels ADD COLUMN registers INTEGER;",
];

/// Version 4.
const LINE: &str = "
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    CREATE TABLE probes (
        id BLOB PRIMARY KEY,
        channel BLOB NOT NULL,
        sent_ms INTEGER NOT NULL
    );
    CREATE INDEX probes_by_channel ON probes (channel, sent_ms);
    CREATE TABLE probe_copies (
        hash BLOB PRIMARY KEY,
        probe BLOB NOT NULL
    );
    CREATE TABLE answered (
        probe BLOB NOT NULL,
        relay TEXT NOT NULL,
        PRIMARY KEY (probe, relay)
    );
    CREATE TABLE paths (
        channel BLOB NOT NULL,
        relay TEXT NOT NULL,
        party TEXT NOT NULL,
        last_ok_ms INTEGER NOT NULL,
        rtt_ms INTEGER NOT NULL,
        PRIMARY KEY (channel, relay, party)
    );
    CREATE TABLE heard (
        channel BLOB NOT NULL,
        party TEXT NOT NULL,
        last_ms INTEGER NOT NULL,
        PRIMARY KEY (channel, party)
    );
    CREATE TABLE relay_health (
        url TEXT PRIMARY KEY,
        last_ok_ms INTEGER,
        error TEXT,
        error_since_ms INTEGER
    );
    CREATE TABLE copies (
        hash BLOB PRIMARY KEY,
        channel BLOB NOT NULL,
        sender BLOB NOT NULL,
        seq INTEGER NOT NULL
    );
    CREATE TABLE relay_heads (
        relay TEXT NOT NULL,
        channel BLOB NOT NULL,
        sender BLOB NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (relay, channel, sender)
    );
    CREATE TABLE alarms (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        relay TEXT,
        party TEXT,
        message TEXT,
        detail TEXT NOT NULL,
        evidence BLOB,
        since_ms INTEGER NOT NULL,
        UNIQUE (kind, relay, party, message)
    );";

/// Version 10 of the schema: link tests become ephemeral (the probes of earlier
/// versions were envelopes, and are dropped with their tables).
const LINK_TESTS_EPHEMERAL: &str = "
    DROP TABLE probes;
    DROP TABLE probe_copies;
    DROP TABLE answered;
    CREATE TABLE probes (
        hash BLOB PRIMARY KEY,
        channel BLOB NOT NULL,
        relay TEXT NOT NULL,
        sent_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX probes_by_path ON probes (channel, relay, sent_ms);
    CREATE INDEX probes_by_time ON probes (sent_ms);
    CREATE TABLE answers (
        probe BLOB NOT NULL,
        device BLOB NOT NULL,
        party TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        PRIMARY KEY (probe, device)
    ) WITHOUT ROWID;
    CREATE INDEX answers_by_time ON answers (at_ms);
    CREATE INDEX answers_by_party ON answers (party, at_ms);
    CREATE TABLE frames (
        hash BLOB PRIMARY KEY,
        at_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX frames_by_time ON frames (at_ms);
    CREATE TABLE frames_out (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        channel BLOB NOT NULL,
        relay TEXT NOT NULL,
        bytes BLOB NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE answer_floor (
        channel BLOB NOT NULL,
        device BLOB NOT NULL,
        relay TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        PRIMARY KEY (channel, device, relay)
    ) WITHOUT ROWID;
    CREATE TABLE receipts_due (
        channel BLOB PRIMARY KEY
    );
    CREATE TABLE link_state (
        channel BLOB PRIMARY KEY,
        record_since_ms INTEGER NOT NULL,
        last_probe_ms INTEGER NOT NULL
    );";

pub(crate) fn open_connection(home: &Home) -> Result<Connection, StoreError> {
    let mut connection = Connection::open(home.database())?;
    // Every statement of an operation stays prepared (the default keeps 16, fewer than
    // a receive uses: they were parsed again and again).
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    connection.busy_timeout(Duration::from_secs(30))?;
    // Plans never depend on bound values: otherwise a statement with `LIMIT ?` is
    // parsed and planned again every time it runs, cached or not.
    connection.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    migrate(&mut connection)?;
    Ok(connection)
}

pub(crate) fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
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
