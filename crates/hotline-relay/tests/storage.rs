//! The storage conformance suite on the embedded SQLite backend.

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
