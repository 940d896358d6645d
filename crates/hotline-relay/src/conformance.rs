//! The conformance suite every [`RelayStorage`] backend must pass: the relay's promises
//! (nothing acknowledged is lost, sequence numbers never go back, posting is idempotent,
//! membership only moves forward) stated once, as checks, for any backend.
//!
//! A backend's test calls [`check`] with a function that opens its storage on the same
//! data every time (the suite drops and reopens it to check durability), with a quota of
//! [`QUOTA`] bytes per log. Each check uses logs of its own, so a database that is not
//! empty (PostgreSQL shared by several test runs) does not disturb it.

use std::future::Future;

use std::sync::Arc;

use crate::storage::{Log, Membership, Notary, Receipt, RelayStorage, StorageError, Stored};
use hotline_proto::custody::message_hash;

/// The per-log quota `open` must give the storage.
pub const QUOTA: u64 = 64 * 1024;

/// Runs every check; panics, naming the check, at the first broken promise.
pub async fn check<S, F, Fut>(open: F)
where
    S: RelayStorage,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let storage = open().await;
    let notary = Arc::new(notary());
    storage.set_notary(Arc::clone(&notary));
    appends_in_order_per_log(&storage).await;
    idempotent_by_bytes(&storage).await;
    reads_after_a_cursor_with_a_limit(&storage).await;
    membership_only_moves_forward(&storage).await;
    acknowledged_by_every_member_is_deleted(&storage).await;
    deleted_bytes_append_as_new(&storage).await;
    quota_refuses_and_changes_nothing(&storage).await;
    expiry_deletes_old_and_keeps_the_sequence(&storage).await;
    concurrent_appends_get_distinct_contiguous_numbers(&storage).await;
    a_batch_appends_in_order_each_as_alone(&storage).await;
    claims_take_the_oldest_first_then_none(&storage).await;
    claims_leave_other_logs_alone(&storage).await;
    concurrent_claims_never_share_a_message(&storage).await;
    let (log, expected) = written_before_reopen(&storage).await;
    receipts_prove_what_was_stored(&storage, &notary).await;
    drop(storage);
    let storage = open().await;
    survives_reopen(&storage, &log, &expected).await;
}

/// A log nobody else uses: random 32-byte id.
fn fresh_channel() -> [u8; 32] {
    rand::random()
}

fn message(tag: &str, n: usize) -> Vec<u8> {
    format!("{tag}-{n}-{}", hex::encode(rand::random::<[u8; 8]>())).into_bytes()
}

async fn append(storage: &impl RelayStorage, log: &Log, bytes: Vec<u8>) -> (u64, bool) {
    let appended = storage
        .append(log.clone(), bytes)
        .await
        .expect("append failed");
    (appended.seq, appended.duplicate)
}

async fn read_all(storage: &impl RelayStorage, log: &Log) -> Vec<(u64, Vec<u8>)> {
    storage
        .read_after(log, 0, 10_000, usize::MAX)
        .await
        .expect("read failed")
        .into_iter()
        .map(|stored| (stored.seq, stored.bytes))
        .collect()
}

/// A notary with a fresh key, as a relay's (ECDSA P-256, made by rcgen).
pub fn notary() -> Notary {
    let key = rcgen::KeyPair::generate().expect("a key");
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Notary::new(&der).expect("a notary")
}

/// Every append is answered with a receipt that the relay's pin alone verifies, for
/// that log, sequence number and bytes; a duplicate gets its first append's receipt,
/// and reads hand the same receipts out.
async fn receipts_prove_what_was_stored(storage: &impl RelayStorage, notary: &Notary) {
    let log = Log::Channel(fresh_channel());
    let messages: Vec<Vec<u8>> = (0..5).map(|n| message("c", n)).collect();
    let answers = storage.append_all(log.clone(), messages.clone()).await;
    let mut receipts = Vec::new();
    for (answer, bytes) in answers.into_iter().zip(&messages) {
        let appended = answer.expect("append failed");
        let receipt = appended
            .receipt
            .expect("receipts_prove_what_was_stored: no receipt");
        Receipt::decode(&receipt)
            .expect("receipts_prove_what_was_stored: malformed")
            .verify_for(&notary.pin(), &log, appended.seq, &message_hash(bytes))
            .expect("receipts_prove_what_was_stored: does not verify");
        receipts.push(receipt);
    }
    let again = storage
        .append(log.clone(), messages[2].clone())
        .await
        .expect("append failed");
    assert!(again.duplicate, "receipts_prove_what_was_stored: duplicate");
    assert_eq!(
        again.receipt.as_ref(),
        Some(&receipts[2]),
        "receipts_prove_what_was_stored: a duplicate's receipt"
    );
    let read: Vec<Option<Vec<u8>>> = storage
        .read_after(&log, 0, 100, usize::MAX)
        .await
        .expect("read failed")
        .into_iter()
        .map(|stored| stored.receipt)
        .collect();
    assert_eq!(
        read,
        receipts.into_iter().map(Some).collect::<Vec<_>>(),
        "receipts_prove_what_was_stored: reads"
    );
}

/// `append_all`: in order, consecutive numbers, a duplicate answered with its first
/// number, and a message over the quota refused alone, while concurrent batches on
/// other logs keep their own order.
async fn a_batch_appends_in_order_each_as_alone(storage: &impl RelayStorage) {
    let log = Log::Channel(fresh_channel());
    let first = message("b", 0);
    assert_eq!(append(storage, &log, first.clone()).await, (1, false));
    let mut batch: Vec<Vec<u8>> = (1..=40).map(|n| message("b", n)).collect();
    batch.insert(10, first.clone());
    batch.push(vec![0u8; QUOTA as usize]);
    batch.push(message("b", 41));
    let other = Log::Channel(fresh_channel());
    let others: Vec<Vec<u8>> = (1..=40).map(|n| message("o", n)).collect();
    let (answers, other_answers) = tokio::join!(
        storage.append_all(log.clone(), batch.clone()),
        storage.append_all(other.clone(), others.clone()),
    );
    assert_eq!(answers.len(), batch.len(), "one answer per message");
    let mut expected = 2;
    for (index, answer) in answers.iter().enumerate() {
        match (index, answer) {
            (10, Ok(appended)) => assert_eq!(
                (appended.seq, appended.duplicate),
                (1, true),
                "a batch's duplicate keeps its number"
            ),
            (41, Err(StorageError::QuotaExceeded(_))) => {}
            (_, Ok(appended)) => {
                assert_eq!(
                    (appended.seq, appended.duplicate),
                    (expected, false),
                    "a batch is numbered in order (message {index})"
                );
                expected += 1;
            }
            (_, Err(error)) => panic!("a batch's message {index} failed: {error}"),
        }
    }
    let stored: Vec<Vec<u8>> = read_all(storage, &log)
        .await
        .into_iter()
        .map(|(_, bytes)| bytes)
        .collect();
    let mut wanted = vec![first];
    wanted.extend(
        batch
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != 10 && *index != 41)
            .map(|(_, bytes)| bytes.clone()),
    );
    assert_eq!(stored, wanted, "a batch is stored in order");
    let other_seqs: Vec<u64> = other_answers
        .into_iter()
        .map(|answer| answer.expect("other batch").seq)
        .collect();
    assert_eq!(other_seqs, (1..=40).collect::<Vec<u64>>());
}

async fn appends_in_order_per_log(storage: &impl RelayStorage) {
    let id = fresh_channel();
    let (channel, inbox) = (Log::Channel(id), Log::Inbox(id));
    for n in 1..=5u64 {
        assert_eq!(
            append(storage, &channel, message("c", n as usize)).await,
            (n, false)
        );
    }
    // Same id, other kind of log: its own numbering.
    assert_eq!(append(storage, &inbox, message("i", 1)).await, (1, false));
    let read = read_all(storage, &channel).await;
    assert_eq!(
        read.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5],
        "appends_in_order_per_log"
    );
    assert!(
        read[0].1.starts_with(b"c-1-"),
        "appends_in_order_per_log: bytes"
    );
    assert_eq!(read_all(storage, &inbox).await.len(), 1);
}

async fn idempotent_by_bytes(storage: &impl RelayStorage) {
    let log = Log::Channel(fresh_channel());
    let bytes = message("same", 0);
    assert_eq!(append(storage, &log, bytes.clone()).await, (1, false));
    assert_eq!(append(storage, &log, message("other", 0)).await, (2, false));
    assert_eq!(
        append(storage, &log, bytes).await,
        (1, true),
        "idempotent_by_bytes: the same bytes get their first number back"
    );
    assert_eq!(
        read_all(storage, &log).await.len(),
        2,
        "idempotent_by_bytes"
    );
}

async fn reads_after_a_cursor_with_a_limit(storage: &impl RelayStorage) {
    let log = Log::Channel(fresh_channel());
    for n in 0..10 {
        append(storage, &log, message("r", n)).await;
    }
    let page = storage.read_after(&log, 3, 4, usize::MAX).await.unwrap();
    assert_eq!(
        page.iter().map(|stored| stored.seq).collect::<Vec<_>>(),
        [4, 5, 6, 7],
        "reads_after_a_cursor_with_a_limit"
    );
    assert!(
        storage
            .read_after(&log, 10, 4, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    let unknown = Log::Channel(fresh_channel());
    assert!(
        storage
            .read_after(&unknown, 0, 4, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    // A byte budget: as many whole messages as fit, and always the first.
    let sized = Log::Channel(fresh_channel());
    for n in 0..6u8 {
        append(storage, &sized, vec![n; 1000]).await;
    }
    let seqs = |page: Vec<Stored>| page.iter().map(|stored| stored.seq).collect::<Vec<_>>();
    let read = |after, max_bytes| storage.read_after(&sized, after, 100, max_bytes);
    assert_eq!(seqs(read(0, 2500).await.unwrap()), [1, 2], "byte budget");
    assert_eq!(
        seqs(read(0, 3000).await.unwrap()),
        [1, 2, 3],
        "budget met exactly"
    );
    assert_eq!(
        seqs(read(2, 10).await.unwrap()),
        [3],
        "the first, whatever its size"
    );
    assert_eq!(seqs(read(4, usize::MAX).await.unwrap()), [5, 6]);
    assert!(read(6, 10).await.unwrap().is_empty());
}

async fn membership_only_moves_forward(storage: &impl RelayStorage) {
    let channel = fresh_channel();
    let version = |version: u64, members: Vec<[u8; 32]>| Membership {
        committer: [7; 32],
        version,
        members,
    };
    assert_eq!(storage.membership(&channel).await.unwrap(), None);
    assert!(
        storage
            .set_membership(&channel, &version(1, vec![[1; 32]]))
            .await
            .unwrap()
    );
    assert!(
        !storage
            .set_membership(&channel, &version(1, vec![[2; 32]]))
            .await
            .unwrap(),
        "membership_only_moves_forward: the same version twice"
    );
    assert!(
        storage
            .set_membership(&channel, &version(3, vec![[1; 32], [3; 32]]))
            .await
            .unwrap()
    );
    assert!(
        !storage
            .set_membership(&channel, &version(2, vec![[9; 32]]))
            .await
            .unwrap(),
        "membership_only_moves_forward: an older version"
    );
    assert_eq!(
        storage.membership(&channel).await.unwrap(),
        Some(version(3, vec![[1; 32], [3; 32]]))
    );
}

async fn acknowledged_by_every_member_is_deleted(storage: &impl RelayStorage) {
    let log = Log::Channel(fresh_channel());
    for n in 0..6 {
        append(storage, &log, message("a", n)).await;
    }
    let (a, b) = ([1u8; 32], [2u8; 32]);
    let members = vec![a, b];
    let ack = |device, seq| storage.acknowledge(log.clone(), device, seq, members.clone());
    assert_eq!(
        ack(a, 4).await.unwrap(),
        0,
        "one member is not every member"
    );
    assert_eq!(ack(b, 2).await.unwrap(), 2, "both acknowledged 1..=2");
    assert_eq!(ack(b, 6).await.unwrap(), 2, "both acknowledged 3..=4");
    // An acknowledgement never goes back.
    assert_eq!(ack(a, 1).await.unwrap(), 0);
    let left: Vec<u64> = read_all(storage, &log)
        .await
        .iter()
        .map(|(seq, _)| *seq)
        .collect();
    assert_eq!(left, [5, 6], "acknowledged_by_every_member_is_deleted");
    assert_eq!(ack(a, 6).await.unwrap(), 2);
    assert!(read_all(storage, &log).await.is_empty());
    // Numbering goes on after everything was deleted.
    let again = message("a", 99);
    assert_eq!(
        append(storage, &log, again.clone()).await,
        (7, false),
        "sequence numbers never go back"
    );
    assert_eq!(
        append(storage, &log, again).await,
        (7, true),
        "a message appended after deletions is found again"
    );
}

/// Bytes whose message was deleted (acknowledged by every member) are a new message
/// when appended again, not a duplicate of what is gone.
async fn deleted_bytes_append_as_new(storage: &impl RelayStorage) {
    let log = Log::Channel(fresh_channel());
    let first = message("gone", 0);
    assert_eq!(append(storage, &log, first.clone()).await, (1, false));
    assert_eq!(append(storage, &log, message("gone", 1)).await, (2, false));
    let member = [3u8; 32];
    assert_eq!(
        storage
            .acknowledge(log.clone(), member, 1, vec![member])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        append(storage, &log, first).await,
        (3, false),
        "deleted_bytes_append_as_new"
    );
}

async fn quota_refuses_and_changes_nothing(storage: &impl RelayStorage) {
    let log = Log::Channel(fresh_channel());
    let big = vec![b'q'; (QUOTA as usize) * 3 / 4];
    assert_eq!(append(storage, &log, big).await, (1, false));
    let refused = storage
        .append(log.clone(), vec![b'r'; QUOTA as usize / 2])
        .await;
    assert!(
        matches!(refused, Err(StorageError::QuotaExceeded(_))),
        "quota_refuses_and_changes_nothing: got {refused:?}"
    );
    assert_eq!(read_all(storage, &log).await.len(), 1);
    // Small enough still fits, with the next number.
    assert_eq!(append(storage, &log, vec![b's'; 100]).await, (2, false));
    // Deleting frees the quota.
    storage
        .acknowledge(log.clone(), [1; 32], 2, vec![[1; 32]])
        .await
        .unwrap();
    assert_eq!(
        append(storage, &log, vec![b't'; QUOTA as usize / 2]).await,
        (3, false),
        "quota_refuses_and_changes_nothing: deletion frees the quota"
    );
}

async fn expiry_deletes_old_and_keeps_the_sequence(storage: &impl RelayStorage) {
    let log = Log::Channel(fresh_channel());
    for n in 0..3 {
        append(storage, &log, message("e", n)).await;
    }
    assert_eq!(
        storage.expire(0).await.unwrap(),
        0,
        "nothing is older than 1970"
    );
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 1_000;
    assert!(storage.expire(later).await.unwrap() >= 3);
    assert!(read_all(storage, &log).await.is_empty());
    assert_eq!(append(storage, &log, message("e", 9)).await, (4, false));
}

async fn concurrent_appends_get_distinct_contiguous_numbers(storage: &impl RelayStorage) {
    let log = Log::Channel(fresh_channel());
    let appends = (0..64).map(|n| storage.append(log.clone(), message("p", n)));
    let mut seqs: Vec<u64> = futures_join_all(appends)
        .await
        .into_iter()
        .map(|appended| appended.expect("concurrent append").seq)
        .collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=64).collect::<Vec<_>>(),
        "concurrent_appends_get_distinct_contiguous_numbers"
    );
}

async fn claim(storage: &impl RelayStorage, log: &Log) -> Option<(u64, Vec<u8>)> {
    storage
        .claim_first(log.clone())
        .await
        .expect("claim failed")
}

/// `claim_first`: oldest first, then `None`; what is claimed is gone, frees its bytes
/// of the quota, and the numbering goes on.
async fn claims_take_the_oldest_first_then_none(storage: &impl RelayStorage) {
    let log = Log::KeyPackages(fresh_channel());
    assert_eq!(
        claim(storage, &log).await,
        None,
        "a log never written is empty"
    );
    let packages: Vec<Vec<u8>> = (0..3).map(|n| message("k", n)).collect();
    for (n, package) in packages.iter().enumerate() {
        assert_eq!(
            append(storage, &log, package.clone()).await,
            (n as u64 + 1, false)
        );
    }
    for (n, package) in packages.iter().enumerate() {
        assert_eq!(
            claim(storage, &log).await,
            Some((n as u64 + 1, package.clone())),
            "claims_take_the_oldest_first_then_none: claim {n}"
        );
    }
    assert_eq!(
        claim(storage, &log).await,
        None,
        "an emptied log gives none"
    );
    assert!(read_all(storage, &log).await.is_empty());
    // A claim frees its bytes: two packages of 3/4 of the quota fit one after the other.
    let big = vec![b'k'; (QUOTA as usize) * 3 / 4];
    assert_eq!(append(storage, &log, big.clone()).await, (4, false));
    assert_eq!(claim(storage, &log).await, Some((4, big)));
    let bigger = vec![b'l'; (QUOTA as usize) * 3 / 4];
    assert_eq!(
        append(storage, &log, bigger.clone()).await,
        (5, false),
        "claims_take_the_oldest_first_then_none: a claim frees the quota"
    );
    assert_eq!(claim(storage, &log).await, Some((5, bigger)));
}

/// A claim touches its own log only: not the channel or inbox of the same id, not
/// another device's stock.
async fn claims_leave_other_logs_alone(storage: &impl RelayStorage) {
    let id = fresh_channel();
    let (stock, channel, inbox) = (Log::KeyPackages(id), Log::Channel(id), Log::Inbox(id));
    let other = Log::KeyPackages(fresh_channel());
    for log in [&channel, &inbox, &other] {
        append(storage, log, message("x", 0)).await;
        append(storage, log, message("x", 1)).await;
    }
    assert_eq!(
        claim(storage, &stock).await,
        None,
        "claims_leave_other_logs_alone"
    );
    let package = message("k", 0);
    append(storage, &stock, package.clone()).await;
    assert_eq!(claim(storage, &stock).await, Some((1, package)));
    assert_eq!(claim(storage, &stock).await, None);
    for log in [&channel, &inbox, &other] {
        assert_eq!(
            read_all(storage, log)
                .await
                .iter()
                .map(|(seq, _)| *seq)
                .collect::<Vec<_>>(),
            [1, 2],
            "claims_leave_other_logs_alone: {log:?}"
        );
    }
}

/// Eight claims at once against five packages: five distinct packages, three `None`.
async fn concurrent_claims_never_share_a_message(storage: &impl RelayStorage) {
    let log = Log::KeyPackages(fresh_channel());
    let packages: Vec<Vec<u8>> = (0..5).map(|n| message("c", n)).collect();
    for package in &packages {
        append(storage, &log, package.clone()).await;
    }
    let claims = (0..8).map(|_| storage.claim_first(log.clone()));
    let answers: Vec<Option<(u64, Vec<u8>)>> = futures_join_all(claims)
        .await
        .into_iter()
        .map(|answer| answer.expect("concurrent claim"))
        .collect();
    let mut claimed: Vec<(u64, Vec<u8>)> = answers.iter().flatten().cloned().collect();
    claimed.sort();
    assert_eq!(
        claimed,
        packages
            .iter()
            .enumerate()
            .map(|(n, package)| (n as u64 + 1, package.clone()))
            .collect::<Vec<_>>(),
        "concurrent_claims_never_share_a_message: each package claimed exactly once"
    );
    assert_eq!(
        answers.iter().filter(|answer| answer.is_none()).count(),
        3,
        "concurrent_claims_never_share_a_message: the claims beyond the stock get none"
    );
    assert!(read_all(storage, &log).await.is_empty());
}

/// Polls every future to completion, concurrently, on the current task.
async fn futures_join_all<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for future in futures {
        set.push(Box::pin(future));
    }
    let mut outputs: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in set.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

async fn written_before_reopen(storage: &impl RelayStorage) -> (Log, Vec<(u64, Vec<u8>)>) {
    let id = fresh_channel();
    let log = Log::Channel(id);
    for n in 0..5 {
        append(storage, &log, message("d", n)).await;
    }
    storage
        .set_membership(
            &id,
            &Membership {
                committer: [5; 32],
                version: 2,
                members: vec![[5; 32]],
            },
        )
        .await
        .unwrap();
    // Delete the first two: the head must survive the reopen too.
    storage
        .acknowledge(log.clone(), [5; 32], 2, vec![[5; 32]])
        .await
        .unwrap();
    (log.clone(), read_all(storage, &log).await)
}

async fn survives_reopen(storage: &impl RelayStorage, log: &Log, expected: &[(u64, Vec<u8>)]) {
    assert_eq!(
        read_all(storage, log).await,
        expected,
        "survives_reopen: every acknowledged append is there"
    );
    let Log::Channel(id) = log else {
        unreachable!("written_before_reopen uses a channel")
    };
    assert_eq!(
        storage.membership(id).await.unwrap().map(|m| m.version),
        Some(2),
        "survives_reopen: membership"
    );
    assert_eq!(
        append(storage, log, expected[0].1.clone()).await,
        (expected[0].0, true),
        "survives_reopen: a message held before is a duplicate"
    );
    assert_eq!(
        append(storage, log, message("d", 5)).await,
        (6, false),
        "survives_reopen: numbering goes on"
    );
}
