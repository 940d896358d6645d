//! A relay's certificate renewed: its address pins its key, so members keep talking
//! through it without a new address; an address that pinned the old certificate stops
//! working, as it must.

mod common;

use std::process::Command;

use common::{Relay, data_dir, ok, verified_homes};

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
    let homes = verified_homes(&dir, &["north", "south"], &url);
    let (north, south) = (&homes[0], &homes[1]);
    ok(
        north,
        &[
            "channel", "create", "crisis", "--with", "south", "--relay", &url,
        ],
    );
    ok(north, &["sync"]);
    ok(south, &["sync"]);
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
