//! A relay under abuse, on loopback with real TLS: a slow client is cut off while
//! others are served, a flooding device is slowed down while another device's messages
//! go through, garbage changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{card_capability, checked, identity, relay};
use hotline_relay::capability::Capability;
use hotline_relay::client::{ClientError, RelayClient};
use hotline_relay::server::Limits;
use hotline_relay::storage::{Log, Membership};
use hotline_relay::tls;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_one_byte_a_second_is_cut_off_while_others_are_served() {
    let limits = Limits {
        header_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let (running, url) = relay("slow", limits).await;
    let north = identity("north", 1);
    let channel = [1u8; 32];
    let client = RelayClient::new(&url).unwrap();
    client
        .register(
            &north,
            &channel,
            &Membership {
                committer: north.key().0,
                version: 1,
                members: vec![north.key().0],
            },
        )
        .await
        .unwrap();

    let started = Instant::now();
    let slow = tokio::spawn({
        let address = running.address;
        async move {
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            // The start of a TLS ClientHello, one byte a second.
            for byte in [
                0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0, 0, 0, 0, 0,
                0, 0, 0, 0,
            ] {
                if stream.write_all(&[byte]).await.is_err() {
                    return Instant::now();
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Instant::now()
        }
    });
    // Meanwhile the relay serves others.
    for n in 0..5u8 {
        client
            .post(&north, &channel, vec![n + 1; 100])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cut_at = slow.await.unwrap();
    let held = cut_at.duration_since(started);
    assert!(
        held < Duration::from_secs(15),
        "the slow client held its connection for {held:?}"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_is_slowed_down_and_others_still_get_through() {
    let limits = Limits {
        rate_per_second: 20.0,
        rate_burst: 40.0,
        ..Limits::default()
    };
    let (running, url) = relay("flood", limits).await;
    let (north, south) = (identity("north", 1), identity("south", 2));
    let channel = [2u8; 32];
    let client = RelayClient::new(&url).unwrap();
    client
        .register(
            &north,
            &channel,
            &Membership {
                committer: north.key().0,
                version: 1,
                members: vec![north.key().0, south.key().0],
            },
        )
        .await
        .unwrap();
    let mut slowed = 0;
    for n in 0..200u32 {
        match client
            .post(&north, &channel, n.to_be_bytes().to_vec())
            .await
        {
            Ok(_) => {}
            Err(ClientError::Refused {
                status: 429,
                code,
                retry_after,
                ..
            }) => {
                assert_eq!(code, "slow-down");
                // One request lacking at 20 a second: 50 ms, said in whole seconds.
                assert_eq!(retry_after, Some(Duration::from_secs(1)));
                slowed += 1;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(
        slowed > 100,
        "only {slowed} of 200 flooding requests were slowed down"
    );
    // South is not affected by north's flood.
    for n in 0..10u8 {
        client.post(&south, &channel, vec![n; 10]).await.unwrap();
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_refused_with_its_code_and_changes_nothing() {
    let (running, url) = relay("garbage", Limits::default()).await;
    let north = identity("north", 1);
    let channel = [3u8; 32];
    let client = RelayClient::new(&url).unwrap();
    client
        .register(
            &north,
            &channel,
            &Membership {
                committer: north.key().0,
                version: 1,
                members: vec![north.key().0],
            },
        )
        .await
        .unwrap();
    client
        .post(&north, &channel, b"one".to_vec())
        .await
        .unwrap();

    let (base, pin) = tls::parse_url(&url).unwrap();
    let raw = reqwest::Client::builder()
        .tls_backend_preconfigured(tls::client_config(pin).unwrap())
        .build()
        .unwrap();
    let signed = |method: &str, path: &str, body: &[u8]| {
        let mut request = raw.request(method.parse().unwrap(), format!("{base}{path}"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        for (name, value) in hotline_relay::auth::sign_request(&north, method, path, now, body) {
            request = request.header(name, value);
        }
        request.body(body.to_vec())
    };
    let members_path = format!("/v1/channels/{}/members", hex::encode(channel));
    for (body, status) in [
        (&b"{not json"[..], 400),
        (
            &br#"{"committer":"zz","version":2,"members":[],"signature":"00"}"#[..],
            400,
        ),
    ] {
        let response = signed("PUT", &members_path, body).send().await.unwrap();
        assert_eq!(response.status().as_u16(), status);
    }
    let bad_id = signed("GET", "/v1/channels/not-hex/messages", b"")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_id.status().as_u16(), 400);
    // A signature over another body: 401, nothing stored.
    let messages_path = format!("/v1/channels/{}/messages", hex::encode(channel));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut forged = raw.post(format!("{base}{messages_path}"));
    for (name, value) in
        hotline_relay::auth::sign_request(&north, "POST", &messages_path, now, b"the signed body")
    {
        forged = forged.header(name, value);
    }
    assert_eq!(
        forged
            .body(b"another body".to_vec())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    // Malformed batches: 400, nothing stored.
    let batch_path = format!("/v1/channels/{}/batch", hex::encode(channel));
    let too_many: Vec<Vec<u8>> = (0..=hotline_relay::server::MAX_BATCH)
        .map(|n| n.to_be_bytes().to_vec())
        .collect();
    let mut truncated = hotline_relay::server::encode_batch(&[b"whole".to_vec()]);
    truncated.pop();
    for body in [
        b"garbage".to_vec(),
        hotline_relay::server::encode_batch(&[]),
        hotline_relay::server::encode_batch(&[b"x".to_vec(), Vec::new()]),
        hotline_relay::server::encode_batch(&too_many),
        truncated,
    ] {
        let response = signed("POST", &batch_path, &body).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 400);
    }
    // A batch from a device that is not a member: 403.
    let stranger = identity("stranger", 9);
    let refused = client
        .post_batch(&stranger, &channel, &[b"intruder".to_vec()])
        .await;
    assert!(
        matches!(refused, Err(ClientError::Refused { status: 403, .. })),
        "{refused:?}"
    );
    // A request from an hour ago: 401.
    let mut stale = raw.post(format!("{base}{messages_path}"));
    for (name, value) in
        hotline_relay::auth::sign_request(&north, "POST", &messages_path, now - 3_600_000, b"late")
    {
        stale = stale.header(name, value);
    }
    assert_eq!(
        stale
            .body(b"late".to_vec())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    // State unchanged: one message, membership version 1 still in force.
    let log = Log::Channel(channel);
    let fetched = client
        .fetch(&north, &channel, 0, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(checked(&url, &log, fetched), vec![(1, b"one".to_vec())]);
    // A well-formed batch: appended in order, its duplicate answered with its number.
    let answers = client
        .post_batch(
            &north,
            &channel,
            &[b"two".to_vec(), b"one".to_vec(), b"three".to_vec()],
        )
        .await
        .unwrap();
    let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
    let seqs: Vec<u64> = answers.iter().map(|appended| appended.seq).collect();
    assert_eq!(seqs, [2, 1, 3]);
    // Each answer carries its receipt; the duplicate its first append's.
    let fetched = client
        .fetch(&north, &channel, 0, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(answers[1].receipt, fetched[0].receipt);
    assert_eq!(answers[2].receipt, fetched[2].receipt);
    assert_eq!(
        checked(&url, &log, fetched[1..].to_vec()),
        vec![(2, b"two".to_vec()), (3, b"three".to_vec())]
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_every_member_acknowledged_is_deleted_and_old_messages_expire() {
    let (running, url) = relay("ack", Limits::default()).await;
    let (north, south) = (identity("north", 1), identity("south", 2));
    let channel = [4u8; 32];
    let client = RelayClient::new(&url).unwrap();
    client
        .register(
            &north,
            &channel,
            &Membership {
                committer: north.key().0,
                version: 1,
                members: vec![north.key().0, south.key().0],
            },
        )
        .await
        .unwrap();
    for n in 1..=3u8 {
        client.post(&north, &channel, vec![n; 8]).await.unwrap();
    }
    // South alone acknowledging deletes nothing: north has not.
    client.ack(&south, &channel, 2).await.unwrap();
    assert_eq!(
        client
            .fetch(&south, &channel, 0, Duration::ZERO)
            .await
            .unwrap()
            .len(),
        3
    );
    // Once both did, everything up to the lower acknowledgement goes.
    client.ack(&north, &channel, 3).await.unwrap();
    let fetched = client
        .fetch(&south, &channel, 0, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        checked(&url, &Log::Channel(channel), fetched),
        vec![(3, vec![3; 8])]
    );
    // Sequence numbers never go back.
    assert_eq!(
        client.post(&north, &channel, vec![4; 8]).await.unwrap().seq,
        4
    );
    running.shutdown().await;

    // Retention: with a retention of zero, the sweep removes everything stored before it.
    let limits = Limits {
        retention: Duration::ZERO,
        sweep_interval: Duration::from_millis(100),
        ..Limits::default()
    };
    let (running, url) = relay("retention", limits).await;
    let client = RelayClient::new(&url).unwrap();
    client
        .register(
            &north,
            &channel,
            &Membership {
                committer: north.key().0,
                version: 1,
                members: vec![north.key().0],
            },
        )
        .await
        .unwrap();
    client
        .post(&north, &channel, b"old".to_vec())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client
        .fetch(&north, &channel, 0, Duration::ZERO)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "retention did not delete the message"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        client
            .post(&north, &channel, b"new".to_vec())
            .await
            .unwrap()
            .seq,
        2
    );
    running.shutdown().await;
}

fn refused(answer: Result<u64, ClientError>) -> (u16, String) {
    match answer {
        Err(ClientError::Refused { status, code, .. }) => (status, code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_write_to_inboxes_and_storage_is_bounded_per_inbox_sender_and_relay() {
    let limits = Limits {
        quota_per_inbox: 64 << 10,
        sender_bytes_per_second: 1.0,
        sender_burst_bytes: (200 << 10) as f64,
        max_storage: 400 << 10,
        ..Limits::default()
    };
    let (running, url) = relay("bounds", limits).await;
    let client = RelayClient::new(&url).unwrap();
    let owner = identity("owner", 1);
    let inbox = owner.key().0;

    // 100 strangers with fresh keys: without the owner's card none of them stores a
    // byte, whatever capability they make up.
    for seed in 100..200 {
        let stranger = identity("stranger", seed);
        let made_up = [
            card_capability(&stranger),
            Capability::new([seed as u8; 64]),
        ];
        for capability in &made_up {
            assert_eq!(
                refused(
                    client
                        .post_inbox(&stranger, &inbox, capability, vec![7; 1024])
                        .await
                ),
                (403, "no-capability".to_owned())
            );
        }
    }
    assert!(
        client
            .fetch_inbox(&owner, 0, Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );

    // A card holder fills the inbox up to its quota, and no further (507 quota).
    let holder = identity("holder", 2);
    let capability = card_capability(&owner);
    for n in 0..4u8 {
        client
            .post_inbox(&holder, &inbox, &capability, vec![n; 16 << 10])
            .await
            .unwrap();
    }
    assert_eq!(
        refused(
            client
                .post_inbox(&holder, &inbox, &capability, vec![9; 1024])
                .await
        ),
        (507, "quota".to_owned())
    );
    assert_eq!(
        client
            .fetch_inbox(&owner, 0, Duration::ZERO)
            .await
            .unwrap()
            .len(),
        4
    );

    // One sender's bytes: past its burst it waits (429), while another device's
    // messages still go through.
    let (flooder, other) = (identity("flooder", 3), identity("other", 4));
    let channel = [5u8; 32];
    client
        .register(
            &flooder,
            &channel,
            &Membership {
                committer: flooder.key().0,
                version: 1,
                members: vec![flooder.key().0, other.key().0],
            },
        )
        .await
        .unwrap();
    let mut sent = 0usize;
    let slowed = loop {
        match client
            .post(&flooder, &channel, vec![sent as u8; 32 << 10])
            .await
        {
            Ok(_) => sent += 1,
            Err(error) => break error,
        }
        assert!(sent < 100, "a sender's bytes were never bounded");
    };
    assert!(
        matches!(&slowed, ClientError::Refused { status: 429, code, .. } if code == "slow-down"),
        "{slowed:?}"
    );
    // The relay says when the bytes will be there again: at one byte a second, hours
    // from now, which the device takes as the longest wait it honours.
    let ClientError::Refused { retry_after, .. } = &slowed else {
        unreachable!()
    };
    assert_eq!(
        *retry_after,
        Some(hotline_proto::client::MAX_RETRY_AFTER),
        "{slowed:?}"
    );
    assert_eq!(sent, 6, "200 KiB of burst holds six messages of 32 KiB");

    // The relay as a whole: past its bound nothing more is stored (507 storage-full),
    // for anyone; what is stored stays readable.
    let mut filled = 0usize;
    let full = loop {
        let sender = identity("filler", 1000 + filled as u64);
        let answer = client
            .post_inbox(&sender, &inbox, &capability, vec![1; 1])
            .await;
        let answer = match answer {
            Err(ClientError::Refused {
                status: 507, code, ..
            }) if code == "quota" => {
                // The inbox is full: fill through the channel, from fresh members.
                let channel = [filled as u8 + 10; 32];
                client
                    .register(
                        &sender,
                        &channel,
                        &Membership {
                            committer: sender.key().0,
                            version: 1,
                            members: vec![sender.key().0],
                        },
                    )
                    .await
                    .unwrap();
                client
                    .post(&sender, &channel, vec![2; 48 << 10])
                    .await
                    .map(|appended| appended.seq)
            }
            other => other,
        };
        match answer {
            Ok(_) => filled += 1,
            Err(error) => break error,
        }
        assert!(filled < 100, "the relay's storage was never bounded");
    };
    assert!(
        matches!(&full, ClientError::Refused { status: 507, code, .. } if code == "storage-full"),
        "{full:?}"
    );
    // 400 KiB: the inbox's 64 KiB, the flooder's 192 KiB, and three more of 48 KiB.
    assert_eq!(filled, 3);
    assert_eq!(
        refused(
            client
                .post(&other, &channel, vec![3; 100])
                .await
                .map(|appended| appended.seq)
        ),
        (507, "storage-full".to_owned())
    );
    assert_eq!(
        client
            .fetch(&other, &channel, 0, Duration::ZERO)
            .await
            .unwrap()
            .len(),
        sent
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_a_problem_document_even_those_axum_makes() {
    let (running, url) = relay("problems", Limits::default()).await;
    let (base, pin) = tls::parse_url(&url).unwrap();
    let raw = reqwest::Client::builder()
        .tls_backend_preconfigured(tls::client_config(pin).unwrap())
        .build()
        .unwrap();
    let channel = "00".repeat(32);
    let requests = [
        (
            raw.delete(format!("{base}/healthz")),
            405,
            "method-not-allowed",
        ),
        // Over the size limit, from a device whose headers authenticate: refused once
        // the body passes the limit (a stranger's is refused from its headers alone, its
        // body never read: `a_body_is_read_only_after_the_headers_authenticate`).
        (
            signed_post(
                &raw,
                &base,
                &format!("/v1/channels/{channel}/messages"),
                vec![0u8; (1 << 20) + 1],
            ),
            413,
            "too-large",
        ),
        (raw.get(format!("{base}/nowhere")), 404, "not-found"),
        (
            raw.get(format!("{base}/v1/channels/{channel}/messages?wait=-1")),
            401,
            "unauthenticated",
        ),
    ];
    for (request, status, code) in requests {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status);
        let allow = response.headers().get("allow").cloned();
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(problem["code"], code);
        assert_eq!(problem["status"], status);
        if status == 405 {
            assert_eq!(allow.unwrap(), "GET,HEAD");
        }
    }
    // A signed read with a query that does not parse: 400, a problem.
    let north = identity("north", 1);
    let path = format!("/v1/channels/{channel}/messages?wait=-1");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut request = raw.get(format!("{base}{path}"));
    for (name, value) in hotline_relay::auth::sign_request(&north, "GET", &path, now, b"") {
        request = request.header(name, value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let problem: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(problem["code"], "malformed");
    running.shutdown().await;
}

/// A POST of `body` to `path`, signed by a device of its own.
fn signed_post(
    raw: &reqwest::Client,
    base: &str,
    path: &str,
    body: Vec<u8>,
) -> reqwest::RequestBuilder {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut request = raw.post(format!("{base}{path}"));
    let signer = identity("signer", 77);
    for (name, value) in hotline_relay::auth::sign_request(&signer, "POST", path, now, &body) {
        request = request.header(name, value);
    }
    request.body(body)
}

/// A request that announces a body is answered 401 from its headers alone when they do
/// not authenticate: the relay never waits for (or reads) the body of a stranger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_is_read_only_after_the_headers_authenticate() {
    use tokio::io::AsyncReadExt;
    let (running, url) = relay("unread", Limits::default()).await;
    let (_, pin) = tls::parse_url(&url).unwrap();
    let connector =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls::client_config(pin).unwrap()));
    let north = identity("north", 1);
    let path = format!("/v1/channels/{}/messages", hex::encode([6u8; 32]));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let forged = format!(
        "hotline-device: {}\r\nhotline-time: {now}\r\nhotline-signature: {}\r\n\
         hotline-content-sha256: {}\r\n",
        north.key(),
        "00".repeat(64),
        "11".repeat(32)
    );
    for headers in [String::new(), forged] {
        let tcp = tokio::net::TcpStream::connect(running.address)
            .await
            .unwrap();
        let server = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut stream = connector.connect(server, tcp).await.unwrap();
        // 1 MiB announced, not one byte of it sent.
        stream
            .write_all(
                format!(
                    "POST {path} HTTP/1.1\r\nhost: relay\r\ncontent-length: 1048576\r\n{headers}\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let mut answer = vec![0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut answer))
            .await
            .expect("no answer without the body: the relay waited for it")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..read]).into_owned();
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(answer.contains("unauthenticated"), "{answer}");
    }
    running.shutdown().await;
}
