//! Key-package stock on a relay, on loopback with real TLS: a device stocks its own
//! one-time key packages, strangers can neither stock for it nor count its stock nor
//! claim from it, a holder of its card (its inbox capability) claims them one at a
//! time, oldest first, until none is left; a stock over the limit or a package too
//! large is refused whole, storing nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{card_capability, identity, relay};
use hotline_core::DeviceIdentity;
use hotline_relay::client::{ClientError, RelayClient};
use hotline_relay::server::{self, Limits, MAX_KEY_PACKAGE, MAX_KEY_PACKAGE_STOCK};
use hotline_relay::tls;

fn refused_with<T: std::fmt::Debug>(answer: Result<T, ClientError>, status: u16, code: &str) {
    match answer {
        Err(ClientError::Refused {
            status: got,
            code: got_code,
            ..
        }) if got == status && got_code == code => {}
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

fn package(tag: &str, n: usize) -> Vec<u8> {
    format!("key-package-{tag}-{n}").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_stocks_key_packages_and_others_claim_each_once_in_order() {
    let (running, url) = relay("claims", Limits::default()).await;
    let (owner, stranger, inviter) = (
        identity("owner", 1),
        identity("stranger", 2),
        identity("inviter", 3),
    );
    let client = RelayClient::new(&url).unwrap();

    assert_eq!(client.key_package_stock(&owner).await.unwrap(), 0);
    let stocked: Vec<Vec<u8>> = (0..3).map(|n| package("owner", n)).collect();
    assert_eq!(
        client.stock_key_packages(&owner, &stocked).await.unwrap(),
        3
    );
    assert_eq!(client.key_package_stock(&owner).await.unwrap(), 3);

    // A stranger can neither stock for the owner nor count the owner's stock.
    let (base, pin) = tls::parse_url(&url).unwrap();
    let raw = reqwest::Client::builder()
        .tls_backend_preconfigured(tls::client_config(pin).unwrap())
        .build()
        .unwrap();
    let signed = |who: &DeviceIdentity, method: &str, path: &str, body: &[u8]| {
        let mut request = raw.request(method.parse().unwrap(), format!("{base}{path}"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        for (name, value) in hotline_relay::auth::sign_request(who, method, path, now, body) {
            request = request.header(name, value);
        }
        request
            .header(
                hotline_relay::capability::HEADER,
                card_capability(&owner).to_hex(),
            )
            .body(body.to_vec())
    };
    let owner_path = format!("/v1/keypackages/{}", owner.key());
    let intruder = server::encode_batch(&[b"intruder".to_vec()]);
    for (method, body) in [("POST", &intruder[..]), ("GET", &b""[..])] {
        let response = signed(&stranger, method, &owner_path, body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 403, "{method} by a stranger");
        let problem: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(problem["code"], "not-a-member");
    }
    // A claim carries no body.
    let response = signed(
        &inviter,
        "POST",
        &format!("{owner_path}/claim"),
        b"something",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(client.key_package_stock(&owner).await.unwrap(), 3);

    // Another device claims them, oldest first, each once; then there is none.
    // Without the capability from the owner's card, a claim takes nothing.
    refused_with(
        client
            .claim_key_package(&stranger, &owner.key(), &card_capability(&stranger))
            .await,
        403,
        "no-capability",
    );
    for expected in &stocked {
        assert_eq!(
            client
                .claim_key_package(&inviter, &owner.key(), &card_capability(&owner))
                .await
                .unwrap()
                .as_ref(),
            Some(expected)
        );
    }
    assert_eq!(
        client
            .claim_key_package(&inviter, &owner.key(), &card_capability(&owner))
            .await
            .unwrap(),
        None
    );
    assert_eq!(client.key_package_stock(&owner).await.unwrap(), 0);
    // The answer to an empty stock is a typed problem.
    let response = signed(&inviter, "POST", &format!("{owner_path}/claim"), b"")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    let problem: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(problem["code"], "no-key-package");
    assert_eq!(problem["detail"], "no key package in stock for this device");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_over_the_limit_or_a_package_too_large_is_refused_whole() {
    let (running, url) = relay("limits", Limits::default()).await;
    let owner = identity("owner", 1);
    let client = RelayClient::new(&url).unwrap();

    let too_many: Vec<Vec<u8>> = (0..=MAX_KEY_PACKAGE_STOCK)
        .map(|n| package("many", n))
        .collect();
    refused_with(
        client.stock_key_packages(&owner, &too_many).await,
        409,
        "stock-full",
    );
    assert_eq!(client.key_package_stock(&owner).await.unwrap(), 0);

    let mut oversized: Vec<Vec<u8>> = vec![package("fits", 0)];
    oversized.push(vec![b'k'; MAX_KEY_PACKAGE + 1]);
    refused_with(
        client.stock_key_packages(&owner, &oversized).await,
        413,
        "too-large",
    );
    assert_eq!(client.key_package_stock(&owner).await.unwrap(), 0);

    // Exactly the limit fits; one more does not, and stores nothing.
    let full: Vec<Vec<u8>> = (0..MAX_KEY_PACKAGE_STOCK)
        .map(|n| package("full", n))
        .collect();
    assert_eq!(
        client.stock_key_packages(&owner, &full).await.unwrap(),
        MAX_KEY_PACKAGE_STOCK as u64
    );
    refused_with(
        client
            .stock_key_packages(&owner, &[package("one-more", 0)])
            .await,
        409,
        "stock-full",
    );
    // Stocking again what is in stock adds nothing, so it is not refused.
    assert_eq!(
        client.stock_key_packages(&owner, &full[..2]).await.unwrap(),
        MAX_KEY_PACKAGE_STOCK as u64
    );
    // A claim makes room for one.
    assert_eq!(
        client
            .claim_key_package(&owner, &owner.key(), &card_capability(&owner))
            .await
            .unwrap(),
        Some(full[0].clone())
    );
    assert_eq!(
        client
            .stock_key_packages(&owner, &[package("one-more", 0)])
            .await
            .unwrap(),
        MAX_KEY_PACKAGE_STOCK as u64
    );
    running.shutdown().await;
}
