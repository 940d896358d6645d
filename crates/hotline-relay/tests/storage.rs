//! The storage conformance suite on the embedded SQLite backend.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hotline_relay::conformance::{self, QUOTA};
use hotline_relay::storage::SqliteStorage;

#[tokio::test]
async fn sqlite_backend_passes_the_conformance_suite() {
    let dir = std::env::temp_dir().join(format!("hotline-conformance-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("relay.db");
    conformance::check(|| {
        let path = path.clone();
        async move { SqliteStorage::open(&path, QUOTA).unwrap() }
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The PostgreSQL backend (127.0.0.1:5432, database `test`, or `HOTLINE_TEST_POSTGRES`),
/// in a schema of its own. Without a reachable server the test says so and passes,
/// except under CI (`CI` set), where PostgreSQL is part of the machine and its absence
/// is a failure.
#[tokio::test]
async fn postgres_backend_passes_the_conformance_suite() {
    use hotline_relay::postgres::PostgresStorage;
    let url = std::env::var("HOTLINE_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into());
    let schema = format!("hotline_conformance_{}", std::process::id());
    if let Err(error) = PostgresStorage::connect(&url, &schema, QUOTA, 2).await {
        assert!(
            std::env::var_os("CI").is_none(),
            "PostgreSQL unreachable under CI: {error}"
        );
        eprintln!("skipped: PostgreSQL unreachable at {url}: {error}");
        return;
    }
    conformance::check(|| {
        let (url, schema) = (url.clone(), schema.clone());
        async move {
            PostgresStorage::connect(&url, &schema, QUOTA, 4)
                .await
                .unwrap()
        }
    })
    .await;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// Two relay processes sharing one PostgreSQL database (two storages on one schema, each
/// with its own connections) claim from one stock at once: every package goes to
/// exactly one claim, the others get none, and the log's byte count comes back to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_claims_from_two_processes_never_share_a_package() {
    use hotline_relay::postgres::PostgresStorage;
    use hotline_relay::storage::{Log, RelayStorage};
    let url = std::env::var("HOTLINE_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into());
    let schema = format!("hotline_claims_{}", std::process::id());
    let first = match PostgresStorage::connect(&url, &schema, QUOTA, 4).await {
        Ok(storage) => storage,
        Err(error) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL unreachable under CI: {error}"
            );
            eprintln!("skipped: PostgreSQL unreachable at {url}: {error}");
            return;
        }
    };
    let second = PostgresStorage::connect(&url, &schema, QUOTA, 4)
        .await
        .unwrap();
    let device: [u8; 32] = rand::random();
    let log = Log::KeyPackages(device);
    let packages: Vec<Vec<u8>> = (0..20)
        .map(|n| format!("package-{n}").into_bytes())
        .collect();
    for package in &packages {
        first.append(log.clone(), package.clone()).await.unwrap();
    }
    let (first, second) = (std::sync::Arc::new(first), std::sync::Arc::new(second));
    let mut claims = tokio::task::JoinSet::new();
    for n in 0..32 {
        let storage = std::sync::Arc::clone(if n % 2 == 0 { &first } else { &second });
        let log = log.clone();
        claims.spawn(async move { storage.claim_first(log).await.unwrap() });
    }
    let mut claimed = Vec::new();
    let mut none = 0;
    while let Some(answer) = claims.join_next().await {
        match answer.unwrap() {
            Some((_, bytes)) => claimed.push(bytes),
            None => none += 1,
        }
    }
    claimed.sort();
    let mut expected = packages.clone();
    expected.sort();
    assert_eq!(claimed, expected, "each package claimed exactly once");
    assert_eq!(none, 12);
    assert!(
        first
            .read_after(&log, 0, 100, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );

    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let key = [&[3u8][..], &device[..]].concat();
    let used: i64 = client
        .query_one(
            &format!("SELECT used FROM {schema}.heads WHERE log = $1"),
            &[&key],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(used, 0, "the claims gave back every byte of the quota");
    drop((first, second));
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// A relay database made before relays signed receipts (and with a unique index on
/// hashes) opens: its messages are read without one (and a duplicate of one is answered
/// without one), new ones get theirs.
#[tokio::test]
async fn a_database_from_before_receipts_opens_and_keeps_its_messages() {
    use hotline_relay::storage::{Log, Notary, Receipt, RelayStorage};
    let dir = std::env::temp_dir().join(format!("hotline-before-receipts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("relay.db");
    let log = Log::Channel([9; 32]);
    {
        let old = rusqlite::Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE messages (
                log BLOB NOT NULL, seq INTEGER NOT NULL, hash BLOB NOT NULL,
                bytes BLOB NOT NULL, stored_ms INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (log, seq), UNIQUE (log, hash)
            ) WITHOUT ROWID;",
        )
        .unwrap();
        let hash = hotline_proto::custody::message_hash(b"old");
        old.execute(
            "INSERT INTO messages (log, seq, hash, bytes) VALUES (?1, 1, ?2, ?3)",
            rusqlite::params![log.storage_key(), &hash[..], b"old".to_vec()],
        )
        .unwrap();
    }
    let storage = SqliteStorage::open(&path, QUOTA).unwrap();
    // Its unique index on (log, hash) is gone (the writer indexes hashes itself).
    let unique: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM pragma_index_list('messages') WHERE origin = 'u'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(unique, 0);
    let key = rcgen::KeyPair::generate().unwrap();
    let notary = Notary::new(&rustls::pki_types::PrivateKeyDer::Pkcs8(
        key.serialize_der().into(),
    ))
    .unwrap();
    let pin = notary.pin();
    storage.set_notary(std::sync::Arc::new(notary));
    let again = storage.append(log.clone(), b"old".to_vec()).await.unwrap();
    assert_eq!((again.seq, again.duplicate, again.receipt), (1, true, None));
    let new = storage.append(log.clone(), b"new".to_vec()).await.unwrap();
    assert_eq!(new.seq, 2);
    let read = storage.read_after(&log, 0, 10, usize::MAX).await.unwrap();
    assert_eq!(read[0].receipt, None);
    let receipt = Receipt::decode(read[1].receipt.as_ref().unwrap()).unwrap();
    receipt
        .verify_for(&pin, &log, 2, &hotline_proto::custody::message_hash(b"new"))
        .unwrap();
    drop(storage);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The writer's commits do not checkpoint below 4 MiB of WAL (256 pages of 16 KiB): a
/// thread beside it moves what was committed into the database file within a few of
/// its rounds.
#[tokio::test]
async fn checkpoints_run_beside_the_writer() {
    use hotline_relay::storage::{Log, RelayStorage};
    let dir = std::env::temp_dir().join(format!("hotline-checkpoints-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("relay.db");
    let storage = SqliteStorage::open(&path, 1u64 << 30).unwrap();
    storage.set_notary(std::sync::Arc::new(conformance::notary()));
    let size = || std::fs::metadata(&path).unwrap().len();
    let before = size();
    let log = Log::Channel([7; 32]);
    // 40 commits of a few pages each: well below the writer's 256.
    for n in 0..40u32 {
        let mut message = vec![b'x'; 1024];
        message[..4].copy_from_slice(&n.to_be_bytes());
        storage.append(log.clone(), message).await.unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while size() < before + 40 * 1024 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing reached the database file beside the writer ({} bytes, {before} before)",
            size()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(storage);
    let _ = std::fs::remove_dir_all(&dir);
}
