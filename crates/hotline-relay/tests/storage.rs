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
