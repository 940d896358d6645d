//! A relay's certificate renewed: its address pins its key, so members keep talking
//! through it without a new address; an address that pinned the old certificate stops
//! working, as it must.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::{Relay, data_dir, ok, two_parties_in_crisis};

fn relay_url(data: &std::path::Path) -> String {
    let output = Command::new(assert_cmd::cargo::cargo_bin("hotline"))
        .args(["relay", "url", "--data"])
        .arg(data)
        .output()
        .unwrap();
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[test]
fn a_renewed_certificate_keeps_every_member_connected() {
    let dir = data_dir("rotation");
    let data = dir.join("relay");
    let relay = Relay::start(&data);
    let url = relay.url.clone();
    let homes = two_parties_in_crisis(&dir, &url);
    let (north, south) = (&homes[0], &homes[1]);
    ok(north, &["send", "crisis", "before the renewal"]);
    ok(north, &["sync"]);
    let certificate = std::fs::read(data.join("relay-cert.der")).unwrap();
    // An address pinning the certificate itself, as relays printed before key pins.
    let (base, _) = hotline_relay::tls::parse_url(&url).unwrap();
    let certificate_pin = hotline_relay::tls::certificate_pin_of(&certificate.clone().into());
    let old_style =
        hotline_relay::tls::relay_url(base.trim_start_matches("https://"), &certificate_pin);
    let address = relay.address();
    relay.stop();

    let renewed = Command::new(assert_cmd::cargo::cargo_bin("hotline"))
        .args(["relay", "renew-cert", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(renewed.status.success(), "{renewed:?}");
    assert_eq!(String::from_utf8_lossy(&renewed.stdout).trim(), url);
    assert_ne!(
        std::fs::read(data.join("relay-cert.der")).unwrap(),
        certificate
    );
    let relay = Relay::start_on(&data, &address);
    assert_eq!(
        relay.url, url,
        "the address is the same: the pin is the key's"
    );
    assert_eq!(relay_url(&data), url);

    // Members carry on through the renewed certificate.
    ok(south, &["sync"]);
    ok(south, &["send", "crisis", "after the renewal"]);
    ok(south, &["sync"]);
    ok(north, &["sync"]);
    for home in [north, south] {
        let log = ok(home, &["log", "crisis", "--json"]);
        assert!(
            log.contains("before the renewal") && log.contains("after the renewal"),
            "{log}"
        );
    }
    let status = ok(north, &["status", "--json"]);
    assert!(!status.contains("does not match the pin"), "{status}");

    // The old certificate's pin no longer matches what the relay serves.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    hotline_relay::tls::install_provider();
    let identity = hotline_core::DeviceIdentity::generate(
        "stranger",
        "desk",
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(4),
    )
    .unwrap();
    let refused = runtime.block_on(
        hotline_relay::client::RelayClient::new(&old_style)
            .unwrap()
            .fetch_inbox(&identity, 0, std::time::Duration::ZERO),
    );
    let error = refused.expect_err("the old certificate's pin still matched");
    assert!(format!("{error}").contains("unreachable"), "{error}");
    relay.stop();
}

/// The certificate a relay serves now, as `openssl s_client` sees it (DER).
fn served_certificate(address: &str) -> Vec<u8> {
    let shown = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {address} -servername localhost </dev/null 2>/dev/null \
             | openssl x509 -outform DER"
        ))
        .output()
        .unwrap();
    assert!(shown.status.success(), "{shown:?}");
    shown.stdout
}

#[test]
fn sighup_serves_a_renewed_certificate_without_a_restart() {
    let dir = data_dir("sighup");
    let data = dir.join("relay");
    let relay = Relay::start(&data);
    let address = relay.address();
    let before = std::fs::read(data.join("relay-cert.der")).unwrap();
    assert_eq!(served_certificate(&address), before);
    let renewed = Command::new(assert_cmd::cargo::cargo_bin("hotline"))
        .args(["relay", "renew-cert", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(renewed.status.success(), "{renewed:?}");
    let after = std::fs::read(data.join("relay-cert.der")).unwrap();
    assert_ne!(after, before);
    // Until told, the running relay serves the certificate it started with.
    assert_eq!(served_certificate(&address), before);
    let hup = Command::new("kill")
        .args(["-HUP", &relay.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while served_certificate(&address) != after {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay still serves the old certificate 10 s after SIGHUP"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Still the same relay process, at the same address: SIGHUP did not stop it.
    let mut relay = relay;
    assert!(relay.child.try_wait().unwrap().is_none());
    assert_eq!(
        relay_url(&data).split('#').nth(1),
        relay.url.split('#').nth(1)
    );
    relay.stop();
}

#[test]
fn a_rotated_key_is_followed_and_an_unsigned_one_refused() {
    let dir = data_dir("rotate-key");
    let data = dir.join("relay");
    let relay = Relay::start(&data);
    let url = relay.url.clone();
    let homes = two_parties_in_crisis(&dir, &url);
    let (north, south) = (&homes[0], &homes[1]);
    ok(north, &["send", "crisis", "before the rotation"]);
    ok(north, &["sync"]);
    let address = relay.address();
    relay.stop();

    // The operator rotates the key: a new pin, signed over by the old key.
    let rotated = Command::new(assert_cmd::cargo::cargo_bin("hotline"))
        .args(["relay", "rotate-key", "--json", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(rotated.status.success(), "{rotated:?}");
    let printed: serde_json::Value = serde_json::from_slice(&rotated.stdout).unwrap();
    let new_url = printed["url"].as_str().unwrap().to_owned();
    assert_ne!(new_url, url, "the pin is the new key's");
    let relay = Relay::start_on(&data, &address);
    assert_eq!(relay.url, new_url);

    // Members still hold the old address (in their channel and cards): they check the
    // statement and carry on, in one sync each.
    ok(north, &["send", "crisis", "after the rotation"]);
    ok(north, &["sync"]);
    ok(south, &["sync"]);
    for home in [north, south] {
        let log = ok(home, &["log", "crisis", "--json"]);
        assert!(
            log.contains("before the rotation") && log.contains("after the rotation"),
            "{log}"
        );
        let status: serde_json::Value =
            serde_json::from_str(ok(home, &["status", "--json"]).trim()).unwrap();
        let relays = status["relays"].as_array().unwrap();
        assert!(
            relays.iter().all(|r| r["state"] != "down"),
            "a relay is down after the rotation: {status}"
        );
    }
    // A new device gets the new address; one that followed still accepts receipts
    // signed by the new key (the sync above checked every one).
    let address_after = relay_url(&data);
    assert_eq!(address_after, new_url);
    relay.stop();

    // A relay at the same address with a key nobody signed over (a fresh data
    // directory: an impostor, or a lost key) is refused, and says why.
    let impostor = Relay::start_on(&dir.join("impostor"), &address);
    let (code, _) = common::cli(north, &["sync"]);
    assert_ne!(code, 0);
    let status: serde_json::Value =
        serde_json::from_str(common::cli(north, &["status", "--json"]).1.trim()).unwrap();
    let error = status["relays"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.contains("no valid rotation"),
        "the impostor's key was not refused as unsigned: {status}"
    );
    impostor.stop();
}
