//! The stream protocol against a relay on loopback with real TLS: a device
//! authenticates once per connection and then appends (pipelined, answered after the
//! commit) and receives pushed messages; a proof of another session, a silent
//! connection, a non-member and garbage get nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{checked, identity, relay};
use hotline_core::DeviceIdentity;
use hotline_proto::stream::{self, Frame, StreamClient};
use hotline_relay::client::{ClientError, RelayClient};
use hotline_relay::server::Limits;
use hotline_relay::storage::{Log, Membership, Receipt};
use hotline_relay::tls;
use tokio::io::AsyncWriteExt;

async fn channel_of(
    url: &str,
    committer: &DeviceIdentity,
    members: &[&DeviceIdentity],
) -> [u8; 32] {
    register(url, committer, [9u8; 32], members).await
}

/// Registers `channel` with `members` (version 1), committed by `committer`.
async fn register(
    url: &str,
    committer: &DeviceIdentity,
    channel: [u8; 32],
    members: &[&DeviceIdentity],
) -> [u8; 32] {
    RelayClient::new(url)
        .unwrap()
        .register(
            committer,
            &channel,
            &Membership {
                committer: committer.key().0,
                version: 1,
                members: members.iter().map(|m| m.key().0).collect(),
            },
        )
        .await
        .unwrap();
    channel
}

/// A raw TLS connection that chose the stream protocol, and its exporter.
async fn raw(
    url: &str,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    [u8; 32],
) {
    let opened = stream::open(url).await.unwrap();
    (opened.tls, opened.exporter)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_appends_pipelined_and_another_receives_each_message_pushed_in_order() {
    let (running, url) = relay("push", Limits::default()).await;
    let (north, south) = (identity("north", 1), identity("south", 2));
    let channel = channel_of(&url, &north, &[&north, &south]).await;

    let receiver = StreamClient::connect(&url, &south).await.unwrap();
    // Nothing there yet: a read waits, and comes back empty.
    assert!(
        receiver
            .next_after(&channel, 0, Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty()
    );
    let sender = StreamClient::connect(&url, &north).await.unwrap();
    let (_, pin) = tls::parse_url(&url).unwrap();

    // 300 appends in flight at once on one connection: each answered once stored,
    // numbered 1..=300 between them; the same bytes again are a duplicate.
    let appends = (0..300u32).map(|n| {
        let sender = sender.clone();
        async move { sender.append(&channel, n.to_be_bytes().repeat(256)).await }
    });
    let mut seqs: Vec<u64> = futures_util::future::join_all(appends)
        .await
        .into_iter()
        .map(|answer| {
            let appended = answer.unwrap();
            assert!(!appended.duplicate);
            // Each answer carries the relay's receipt for what it stored.
            let receipt = Receipt::decode(&appended.receipt.unwrap()).unwrap();
            receipt.verify(&pin).unwrap();
            assert_eq!(receipt.leaf.seq, appended.seq);
            appended.seq
        })
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=300).collect::<Vec<u64>>());
    let again = sender
        .append(&channel, 0u32.to_be_bytes().repeat(256))
        .await
        .unwrap();
    assert!(again.duplicate);

    // Every message reaches the reader, in order, a window at a time, without a
    // request per read.
    let mut position = 0;
    while position < 300 {
        let pushed = receiver
            .next_after(&channel, position, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(!pushed.is_empty() && pushed.len() <= stream::WINDOW);
        for (seq, bytes) in checked(&url, &Log::Channel(channel), pushed) {
            assert_eq!(seq, position + 1);
            assert_eq!(bytes.len(), 1024);
            position = seq;
        }
    }
    // One more, later: pushed as it is stored, to a reader already waiting.
    let waiting = {
        let receiver = receiver.clone();
        tokio::spawn(async move {
            receiver
                .next_after(&channel, 300, Duration::from_secs(10))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    sender.append(&channel, b"later".to_vec()).await.unwrap();
    let pushed = waiting.await.unwrap().unwrap();
    assert_eq!(
        checked(&url, &Log::Channel(channel), pushed),
        vec![(301, b"later".to_vec())]
    );

    // The one-shot routes see the same log; acknowledging over the stream deletes
    // what both members acknowledged.
    let http = RelayClient::new(&url).unwrap();
    let fetched = http
        .fetch(&north, &channel, 300, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        checked(&url, &Log::Channel(channel), fetched),
        vec![(301, b"later".to_vec())]
    );
    assert_eq!(sender.ack(&channel, 301).await.unwrap(), 0);
    assert_eq!(receiver.ack(&channel, 301).await.unwrap(), 301);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_does_not_read_is_pushed_one_window_at_most() {
    let (running, url) = relay("window", Limits::default()).await;
    let (north, south) = (identity("north", 1), identity("south", 2));
    let channel = channel_of(&url, &north, &[&north, &south]).await;
    let sender = StreamClient::connect(&url, &north).await.unwrap();
    for n in 0..200u32 {
        sender
            .append(&channel, n.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    let receiver = StreamClient::connect(&url, &south).await.unwrap();
    let mut pushed = receiver.subscribe(&channel, 0).await.unwrap();
    let mut got = Vec::new();
    while let Ok(Some(stored)) =
        tokio::time::timeout(Duration::from_millis(500), pushed.recv()).await
    {
        got.push(stored.seq);
    }
    assert_eq!(got, (1..=stream::WINDOW as u64).collect::<Vec<_>>());
    // Subscribing again after the last one taken: the next window.
    let mut pushed = receiver
        .subscribe(&channel, stream::WINDOW as u64)
        .await
        .unwrap();
    let stored = tokio::time::timeout(Duration::from_secs(5), pushed.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.seq, stream::WINDOW as u64 + 1);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_member_is_refused_and_a_stranger_cannot_replay_a_proof() {
    let limits = Limits {
        header_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let (running, url) = relay("refusals", limits).await;
    let (north, stranger) = (identity("north", 1), identity("stranger", 3));
    let channel = channel_of(&url, &north, &[&north]).await;

    // Authenticated, but not a member: nothing stored, nothing pushed.
    let outsider = StreamClient::connect(&url, &stranger).await.unwrap();
    match outsider.append(&channel, b"intrusion".to_vec()).await {
        Err(ClientError::Refused { status, code, .. }) => {
            assert_eq!((status, code.as_str()), (403, "not-a-member"));
        }
        other => panic!("a non-member's append was not refused: {other:?}"),
    }
    let http = RelayClient::new(&url).unwrap();
    assert!(
        http.fetch(&north, &channel, 0, Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );

    // A Hello signed over another session's exporter (a replayed proof) is refused
    // and the connection closed.
    let (mut tls, exporter) = raw(&url).await;
    let mut reader = tokio::io::BufReader::new(&mut tls);
    let Some(Frame::Challenge { nonce }) = stream::read_frame(&mut reader, 1 << 16).await.unwrap()
    else {
        panic!("no challenge");
    };
    let mut other = exporter;
    other[0] ^= 1;
    let hello = Frame::Hello {
        device: north.key().0,
        signature: north.sign(&stream::hello_message(&nonce, &other)),
    };
    drop(reader);
    tls.write_all(&hello.encode()).await.unwrap();
    tls.flush().await.unwrap();
    let mut reader = tokio::io::BufReader::new(&mut tls);
    match stream::read_frame(&mut reader, 1 << 16).await.unwrap() {
        Some(Frame::Refused {
            id: 0,
            status: 401,
            code,
            ..
        }) => assert_eq!(code, "unauthenticated"),
        other => panic!("a replayed proof was not refused: {other:?}"),
    }
    assert!(matches!(
        stream::read_frame(&mut reader, 1 << 16).await,
        Ok(None) | Err(_)
    ));

    // A connection that never says Hello is closed at the handshake deadline.
    let (mut silent, _) = raw(&url).await;
    let started = std::time::Instant::now();
    let mut reader = tokio::io::BufReader::new(&mut silent);
    assert!(matches!(
        stream::read_frame(&mut reader, 1 << 16).await,
        Ok(Some(Frame::Challenge { .. }))
    ));
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream::read_frame(&mut reader, 1 << 16).await {
                Ok(Some(Frame::Refused { status: 401, .. })) => continue,
                Ok(Some(other)) => panic!("unexpected {other:?}"),
                Ok(None) | Err(_) => break,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent connection was held");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Garbage after authentication: refused, the connection closed, nothing stored.
    let (mut tls, exporter) = raw(&url).await;
    let mut reader = tokio::io::BufReader::new(&mut tls);
    let Some(Frame::Challenge { nonce }) = stream::read_frame(&mut reader, 1 << 16).await.unwrap()
    else {
        panic!("no challenge");
    };
    drop(reader);
    let hello = Frame::Hello {
        device: north.key().0,
        signature: north.sign(&stream::hello_message(&nonce, &exporter)),
    };
    tls.write_all(&hello.encode()).await.unwrap();
    tls.write_all(&[0, 0, 0, 3, 4, 1, 2]).await.unwrap();
    tls.flush().await.unwrap();
    let mut reader = tokio::io::BufReader::new(&mut tls);
    assert_eq!(
        stream::read_frame(&mut reader, 1 << 16).await.unwrap(),
        Some(Frame::Ready)
    );
    match stream::read_frame(&mut reader, 1 << 16).await.unwrap() {
        Some(Frame::Refused {
            id: 0,
            status: 400,
            code,
            ..
        }) => assert_eq!(code, "malformed"),
        other => panic!("garbage was not refused: {other:?}"),
    }
    assert!(
        http.fetch(&north, &channel, 0, Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );
    running.shutdown().await;
}

/// A member removed through this relay appends nothing more on the connection it
/// holds, not even within the second its membership stays cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_removed_here_appends_nothing_more_on_its_open_connection() {
    let (running, url) = relay("removed", Limits::default()).await;
    let (north, south) = (identity("north", 1), identity("south", 2));
    let channel = channel_of(&url, &north, &[&north, &south]).await;
    let connection = StreamClient::connect(&url, &south).await.unwrap();
    connection
        .append(&channel, b"while a member".to_vec())
        .await
        .unwrap();
    // North removes south (membership version 2, without it), through this relay.
    RelayClient::new(&url)
        .unwrap()
        .register(
            &north,
            &channel,
            &Membership {
                committer: north.key().0,
                version: 2,
                members: vec![north.key().0],
            },
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    match connection.append(&channel, b"after removal".to_vec()).await {
        Err(ClientError::Refused { status, code, .. }) => {
            assert_eq!((status, code.as_str()), (403, "not-a-member"));
        }
        other => panic!("a removed member's append was not refused: {other:?}"),
    }
    // Refused on the membership just registered, not on the cache's second running out.
    assert!(started.elapsed() < Duration::from_secs(1));
    let stored = RelayClient::new(&url)
        .unwrap()
        .fetch(&north, &channel, 0, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_flow_window_after_window_and_limits_hold() {
    let (running, url) = relay("large", Limits::default()).await;
    let (north, south) = (identity("north", 1), identity("south", 2));
    let channel = channel_of(&url, &north, &[&north, &south]).await;
    let sender = StreamClient::connect(&url, &north).await.unwrap();
    // Ten messages of 900 KiB: a window holds four or five (4 MiB), and the reader
    // renews it as it takes them, to the last.
    for n in 0..10u8 {
        sender.append(&channel, vec![n; 900 << 10]).await.unwrap();
    }
    let receiver = StreamClient::connect(&url, &south).await.unwrap();
    let mut position = 0;
    while position < 10 {
        let pushed = receiver
            .next_after(&channel, position, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(!pushed.is_empty(), "the reader stalled at {position}");
        for (seq, bytes) in checked(&url, &Log::Channel(channel), pushed) {
            assert_eq!(seq, position + 1);
            assert_eq!(bytes, vec![(seq - 1) as u8; 900 << 10]);
            position = seq;
        }
    }
    // Over the message limit: refused, nothing stored.
    match sender.append(&channel, vec![0; (1 << 20) + 1]).await {
        Err(ClientError::Refused { status, code, .. }) => {
            assert_eq!((status, code.as_str()), (413, "too-large"));
        }
        other => panic!("an oversized message was not refused: {other:?}"),
    }
    // A device holds at most eight stream connections at once.
    let mut held = Vec::new();
    for _ in 0..7 {
        held.push(StreamClient::connect(&url, &north).await.unwrap());
    }
    match StreamClient::connect(&url, &north).await {
        Err(ClientError::Refused { status, code, .. }) => {
            assert_eq!((status, code.as_str()), (429, "slow-down"));
        }
        other => panic!("a ninth connection was not refused: {other:?}"),
    }
    // Closed ones make room again.
    drop(held);
    drop(sender);
    let mut connected = None;
    for _ in 0..50 {
        if let Ok(client) = StreamClient::connect(&url, &north).await {
            connected = Some(client);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        connected.is_some(),
        "closed connections were never counted out"
    );
    running.shutdown().await;
}

/// The relay's metrics, read over its pinned TLS.
async fn metrics(url: &str) -> String {
    let (base, pin) = tls::parse_url(url).unwrap();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls::client_config(pin).unwrap())
        .build()
        .unwrap()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn storage_reads(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("hotline_relay_storage_reads_total ")?
                .trim()
                .parse()
                .ok()
        })
        .expect("the relay counts its storage reads")
}

/// Every append wakes every waiting reader; one waiting at the end of another channel's
/// log goes back to waiting without reading the storage, and one of this channel takes
/// the fresh message from memory: ten readers of a quiet channel, one of
/// the busy one (one window: 50 appends), and (nearly) no reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_of_a_quiet_channel_read_nothing_while_another_is_busy() {
    let (running, url) = relay("quiet", Limits::default()).await;
    let (north, south) = (identity("north", 1), identity("south", 2));
    let busy = channel_of(&url, &north, &[&north, &south]).await;
    let readers: Vec<DeviceIdentity> = (0..10u64).map(|n| identity("reader", 100 + n)).collect();
    let mut members = vec![&north, &south];
    members.extend(&readers);
    let quiet = register(&url, &north, [7u8; 32], &members).await;
    let mut waiting = Vec::new();
    for reader in &readers {
        let client = StreamClient::connect(&url, reader).await.unwrap();
        let pushed = client.subscribe(&quiet, 0).await.unwrap();
        waiting.push((client, pushed));
    }
    let receiver = StreamClient::connect(&url, &south).await.unwrap();
    let mut pushed = receiver.subscribe(&busy, 0).await.unwrap();
    // Every subscription has read its log once, found nothing, and waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = storage_reads(&metrics(&url).await);
    let sender = StreamClient::connect(&url, &north).await.unwrap();
    for n in 0..50u32 {
        sender
            .append(&busy, n.to_be_bytes().to_vec())
            .await
            .unwrap();
        let stored = tokio::time::timeout(Duration::from_secs(5), pushed.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.seq, u64::from(n) + 1);
    }
    let reads = storage_reads(&metrics(&url).await) - before;
    // Before: each append made the eleven waiting readers read, and the busy one read
    // once more after each push (550 reads).
    assert!(reads <= 5, "{reads} storage reads for 50 appends");
    for (_, pushed) in &mut waiting {
        assert!(pushed.try_recv().is_err(), "a quiet channel got a message");
    }
    running.shutdown().await;
}
