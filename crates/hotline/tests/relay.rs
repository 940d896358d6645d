//! A real relay process on loopback (port 0), real TLS with the pinned certificate,
//! clients of the relay API, and the documented refusals.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod common;

use common::{Follower, Relay, cli, data_dir, field, ok, verified_homes};
use hotline_core::DeviceIdentity;
use hotline_relay::capability::Capability;
use hotline_relay::client::{ClientError, RelayClient};
use hotline_relay::storage::Membership;
use rand::SeedableRng;

fn identity(party: &str, seed: u64) -> DeviceIdentity {
    DeviceIdentity::generate(party, "desk", &mut rand::rngs::StdRng::seed_from_u64(seed)).unwrap()
}

fn refused_code(result: Result<impl std::fmt::Debug, ClientError>) -> (u16, String) {
    match result {
        Err(ClientError::Refused { status, code, .. }) => (status, code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_forward_membership_and_refusals() {
    hotline_relay::tls::install_provider();
    let data = data_dir("main");
    let relay = Relay::start(&data);
    let (north, south, outsider) = (
        identity("north", 1),
        identity("south", 2),
        identity("outsider", 3),
    );
    let client = RelayClient::new(&relay.url).unwrap();
    let channel = [7u8; 32];

    // Nothing registered: nobody may post.
    assert_eq!(
        refused_code(client.post(&north, &channel, b"x".to_vec()).await),
        (403, "not-a-member".into())
    );

    // North registers the membership; replays and strangers are refused.
    let membership = Membership {
        committer: north.key().0,
        version: 1,
        members: vec![north.key().0, south.key().0],
    };
    client
        .register(&north, &channel, &membership)
        .await
        .unwrap();
    assert_eq!(
        refused_code(client.register(&north, &channel, &membership).await),
        (409, "conflict".into())
    );
    let hijack = Membership {
        committer: outsider.key().0,
        version: 2,
        members: vec![outsider.key().0],
    };
    assert_eq!(
        refused_code(client.register(&outsider, &channel, &hijack).await),
        (403, "not-committer".into())
    );

    // Store and forward, idempotent by content.
    assert_eq!(
        client
            .post(&north, &channel, b"ciphertext one".to_vec())
            .await
            .unwrap()
            .seq,
        1
    );
    assert_eq!(
        client
            .post(&north, &channel, b"ciphertext one".to_vec())
            .await
            .unwrap()
            .seq,
        1
    );
    assert_eq!(
        client
            .post(&south, &channel, b"ciphertext two".to_vec())
            .await
            .unwrap()
            .seq,
        2
    );
    let read = client
        .fetch(&south, &channel, 0, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        pairs(read),
        vec![
            (1, b"ciphertext one".to_vec()),
            (2, b"ciphertext two".to_vec())
        ]
    );
    assert_eq!(
        client
            .fetch(&south, &channel, 2, Duration::ZERO)
            .await
            .unwrap(),
        vec![]
    );

    // Non-members can neither read nor post.
    assert_eq!(
        refused_code(client.fetch(&outsider, &channel, 0, Duration::ZERO).await),
        (403, "not-a-member".into())
    );
    assert_eq!(
        refused_code(client.post(&outsider, &channel, b"spam".to_vec()).await),
        (403, "not-a-member".into())
    );

    // Too large, empty, malformed ids.
    assert_eq!(
        refused_code(client.post(&north, &channel, vec![0; (1 << 20) + 1]).await).0,
        413
    );
    assert_eq!(
        refused_code(client.post(&north, &channel, Vec::new()).await),
        (400, "malformed".into())
    );

    // Long poll: a waiting reader gets the next message as soon as it is stored.
    let waiting = {
        let (client, south) = (
            client.clone(),
            DeviceIdentity::from_secret_bytes(&south.to_secret_bytes()).unwrap(),
        );
        tokio::spawn(async move {
            client
                .fetch(&south, &channel, 2, Duration::from_secs(20))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    client
        .post(&north, &channel, b"three".to_vec())
        .await
        .unwrap();
    let woke = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pairs(woke), vec![(3, b"three".to_vec())]);

    // Inboxes: only a holder of the owner's card (its capability) may leave an
    // invitation; a stranger's post, without it or with another device's, stores
    // nothing; only the owner reads the inbox.
    let capability =
        |identity: &DeviceIdentity| Capability::new(hotline_core::card::inbox_capability(identity));
    for presented in [capability(&north), Capability::new([0u8; 64])] {
        match client
            .post_inbox(&north, &south.key().0, &presented, b"spam".to_vec())
            .await
        {
            Err(ClientError::Refused { status, code, .. }) => {
                assert_eq!((status, code.as_str()), (403, "no-capability"));
            }
            other => panic!("a post without the capability was not refused: {other:?}"),
        }
    }
    client
        .post_inbox(
            &north,
            &south.key().0,
            &capability(&south),
            b"welcome".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(
        pairs(client.fetch_inbox(&south, 0, Duration::ZERO).await.unwrap()),
        vec![(1, b"welcome".to_vec())]
    );

    // Unauthenticated and wrongly signed requests: 401.
    let (base, pin) = hotline_relay::tls::parse_url(&relay.url).unwrap();
    let raw = reqwest::Client::builder()
        .tls_backend_preconfigured(hotline_relay::tls::client_config(pin).unwrap())
        .build()
        .unwrap();
    let response = raw
        .get(format!(
            "{base}/v1/channels/{}/messages",
            hex::encode(channel)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let problem: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(problem["code"], "unauthenticated");
    assert_eq!(
        raw.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    let metrics = raw
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("hotline_relay_messages_stored_total 4"),
        "{metrics}"
    );
    assert!(metrics.contains("reason=\"not-a-member\""));
    // Checked by Prometheus's own client library: HELP and TYPE for every family,
    // counters named _total, a build-info metric.
    let exposition = data.join("metrics.txt");
    std::fs::write(&exposition, &metrics).unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check_metrics.py");
    let checked = std::process::Command::new("python3")
        .arg(script)
        .arg(&exposition)
        .output()
        .unwrap();
    match checked.status.code() {
        Some(0) => {}
        Some(77) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped the metrics check: pip install prometheus-client");
        }
        _ => panic!(
            "/metrics does not pass the Prometheus parser: {}{}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        ),
    }

    // A wrong pin: the client refuses the relay's certificate.
    let wrong = format!("{base}/#sha256={}", "00".repeat(32));
    match RelayClient::new(&wrong)
        .unwrap()
        .fetch(&south, &channel, 0, Duration::ZERO)
        .await
    {
        Err(ClientError::Network { detail, .. }) => assert!(
            detail.contains("pin") || detail.contains("certificate"),
            "{detail}"
        ),
        other => panic!("a wrong pin must fail the handshake, got {other:?}"),
    }

    // SIGTERM stops it cleanly; a restart on the same data keeps the pin and the messages.
    assert!(relay.stop().success());
    let restarted = Relay::start(&data);
    let (_, new_pin) = hotline_relay::tls::parse_url(&restarted.url).unwrap();
    assert_eq!(new_pin, pin);
    let client = RelayClient::new(&restarted.url).unwrap();
    assert_eq!(
        client
            .fetch(&south, &channel, 0, Duration::ZERO)
            .await
            .unwrap()
            .len(),
        3
    );
    let url = Command::new(assert_cmd::cargo::cargo_bin("hotline"))
        .args(["relay", "url", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(url.stdout).unwrap().trim(), restarted.url);
    restarted.stop();
}

/// Two devices over a real relay process: invitation through the inbox, messages and
/// receipts both ways; with the relay down, `sync` exits 3 and nothing is lost.
#[test]
fn two_devices_over_a_relay() {
    let dir = data_dir("cli");
    let relay = Relay::start(&dir.join("relay"));
    let (north, south) = (dir.join("north"), dir.join("south"));
    ok(&north, &["init", "--party", "north", "--relay", &relay.url]);
    ok(&south, &["init", "--party", "south", "--relay", &relay.url]);
    let fp = |home: &Path| {
        field(&ok(home, &["id", "--json"]), "fingerprint")
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (north_fp, south_fp) = (fp(&north), fp(&south));
    let (north_card, south_card) = (dir.join("north.card"), dir.join("south.card"));
    ok(
        &north,
        &["card", "export", "--out", north_card.to_str().unwrap()],
    );
    ok(
        &south,
        &["card", "export", "--out", south_card.to_str().unwrap()],
    );
    ok(
        &north,
        &[
            "card",
            "import",
            south_card.to_str().unwrap(),
            "--fingerprint",
            &south_fp,
        ],
    );
    ok(
        &south,
        &[
            "card",
            "import",
            north_card.to_str().unwrap(),
            "--fingerprint",
            &north_fp,
        ],
    );
    // The commit goes to the relay at once; the invitation follows the merge.
    let created = ok(
        &north,
        &[
            "channel", "create", "crisis", "--with", "south", "--relay", &relay.url, "--json",
        ],
    );
    assert_eq!(field(&created, "relayed"), 1);
    assert_eq!(
        field(&ok(&south, &["sync", "--json"]), "joined"),
        serde_json::json!(["crisis"])
    );

    let sent = ok(&north, &["send", "crisis", "over the relay", "--json"]);
    // `send` hands the message to the relay at once when it can.
    assert_eq!(field(&sent, "relayed"), 1);
    let id = field(&sent, "id").as_str().unwrap().to_owned();
    assert_eq!(field(&ok(&south, &["sync", "--json"]), "received"), 1);
    let log = ok(&south, &["log", "crisis", "--json"]);
    assert_eq!(field(&log, "text"), "over the relay");
    ok(&south, &["ack", "crisis", &id[..12]]);
    ok(&south, &["send", "crisis", "acknowledged"]);
    ok(&south, &["sync"]);
    ok(&north, &["sync"]);
    let log = ok(&north, &["log", "crisis", "--json"]);
    assert_eq!(field(&log, "read_by"), serde_json::json!(["south"]));
    assert_eq!(log.lines().count(), 2);

    // The relay stops: sync says so with exit 3, and the message waits in the outbox.
    let address = relay.address();
    relay.stop();
    let sent = ok(
        &north,
        &["send", "crisis", "while the relay is down", "--json"],
    );
    assert_eq!(field(&sent, "relayed"), 0);
    for text in ["queued second", "queued third"] {
        ok(&north, &["send", "crisis", text]);
    }
    assert_eq!(cli(&north, &["sync"]).0, 3);
    // Back: the three queued messages go in one batch, in order.
    let relay = Relay::start_on(&dir.join("relay"), &address);
    ok(&north, &["sync"]);
    ok(&south, &["sync"]);
    let log = ok(&south, &["log", "crisis", "--json"]);
    assert_eq!(log.lines().count(), 5, "{log}");
    let down = log.find("while the relay is down").unwrap();
    let second = log.find("queued second").unwrap();
    let third = log.find("queued third").unwrap();
    assert!(down < second && second < third, "{log}");

    // `sync --follow`: a message arrives while it waits, without another command; the
    // relay dies and comes back, and it resumes from its cursor.
    let mut follower = Follower::start(&south);
    ok(&north, &["send", "crisis", "to a follower"]);
    follower.expect_received();
    drop(relay);
    let sent = ok(&north, &["send", "crisis", "relay dead again", "--json"]);
    assert_eq!(field(&sent, "relayed"), 0);
    let relay = Relay::start_on(&dir.join("relay"), &address);
    ok(&north, &["sync"]);
    follower.expect_received();
    assert_eq!(follower.stop(), Some(0), "SIGTERM ends --follow cleanly");
    let log = ok(&south, &["log", "crisis", "--json"]);
    assert_eq!(log.lines().count(), 7);
    assert!(log.contains("relay dead again"));

    // A message the relay lost after accepting it is offered again, sealed anew, once
    // south has sent something more than the threshold (here 1 s) later that does not
    // acknowledge it; a party that is merely silent is no reason to offer anything.
    ok(&south, &["send", "crisis", "caught up"]);
    ok(&north, &["sync"]);
    cli(&north, &["status", "--undelivered-after", "1s"]);
    let relay_db = || rusqlite::Connection::open(dir.join("relay").join("relay.db")).unwrap();
    let last_seq = |db: &rusqlite::Connection| -> i64 {
        db.query_row(
            "SELECT MAX(seq) FROM messages WHERE substr(log, 1, 1) = x'01'",
            [],
            |row| row.get(0),
        )
        .unwrap()
    };
    let before = last_seq(&relay_db());
    ok(&north, &["send", "crisis", "offered again"]);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(field(&ok(&north, &["sync", "--json"]), "reoffered"), 0);
    let address = relay.address();
    relay.stop();
    // The relay loses the message it accepted.
    let db = relay_db();
    assert_eq!(
        last_seq(&db),
        before + 1,
        "the message is the channel's newest"
    );
    let lost = db
        .execute(
            "DELETE FROM messages WHERE substr(log, 1, 1) = x'01' AND seq = ?1",
            [before + 1],
        )
        .unwrap();
    assert_eq!(lost, 1);
    drop(db);
    let relay = Relay::start_on(&dir.join("relay"), &address);
    ok(&south, &["sync"]);
    assert!(!ok(&south, &["log", "crisis"]).contains("offered again"));
    std::thread::sleep(Duration::from_millis(1200));
    ok(&south, &["send", "crisis", "still here"]);
    ok(&north, &["sync"]);
    assert_eq!(field(&ok(&north, &["sync", "--json"]), "reoffered"), 1);
    ok(&south, &["sync"]);
    ok(&south, &["send", "crisis", "got it"]);
    ok(&north, &["sync"]);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(field(&ok(&north, &["sync", "--json"]), "reoffered"), 0);
    let log = ok(&south, &["log", "crisis"]);
    assert_eq!(log.matches("offered again").count(), 1);
    relay.stop();
}

/// Three parties over a real relay process: invitation, a member's key update by
/// proposal (committed by the committer), the committer's own key update, and the
/// removal of the mediator, after which it reads nothing and the relay refuses it.
#[test]
fn three_parties_key_updates_and_removal_over_a_relay() {
    let dir = data_dir("three");
    let relay = Relay::start(&dir.join("relay"));
    // A second relay carries every commit and message too: copies through it must
    // raise no alarm.
    let second = Relay::start(&dir.join("second"));
    let homes = verified_homes(&dir, &["north", "south", "mediator"], &relay.url);
    let [north, south, mediator] = &homes[..] else {
        unreachable!()
    };
    let sync_all = || {
        for home in &homes {
            cli(home, &["sync"]);
        }
    };
    let epochs = || -> Vec<u64> {
        homes
            .iter()
            .map(|home| {
                field(&ok(home, &["channel", "list", "--json"]), "epoch")
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    ok(
        north,
        &[
            "channel",
            "create",
            "crisis",
            "--with",
            "south",
            "--with",
            "mediator",
            "--relay",
            &relay.url,
            "--relay",
            &second.url,
        ],
    );
    sync_all();
    assert_eq!(epochs(), [1, 1, 1], "everyone joined at the same epoch");

    // South proposes new keys; north commits them on its next sync; all follow.
    let rekey = ok(south, &["channel", "rekey", "crisis", "--json"]);
    assert_eq!(field(&rekey, "update"), "proposal");
    sync_all();
    sync_all();
    assert_eq!(epochs(), [2, 2, 2], "the member's key update was committed");
    let rekey = ok(north, &["channel", "rekey", "crisis", "--json"]);
    assert_eq!(field(&rekey, "update"), "commit");
    assert_eq!(field(&rekey, "relayed"), 2);
    sync_all();
    assert_eq!(epochs(), [3, 3, 3], "the committer's key update");
    ok(south, &["send", "crisis", "after the key updates"]);
    sync_all();
    for home in [north, mediator] {
        assert!(ok(home, &["log", "crisis"]).contains("after the key updates"));
    }

    // The mediator is removed: it reads nothing sent afterwards.
    let removed = ok(
        north,
        &[
            "channel", "remove", "crisis", "--party", "mediator", "--json",
        ],
    );
    assert_eq!(field(&removed, "devices"), 1);
    ok(north, &["send", "crisis", "without the mediator"]);
    sync_all();
    let parties = field(&ok(north, &["channel", "list", "--json"]), "parties");
    assert_eq!(parties, serde_json::json!(["north", "south"]));
    assert!(ok(south, &["log", "crisis"]).contains("without the mediator"));
    assert!(!ok(mediator, &["log", "crisis"]).contains("without the mediator"));
    // The relay enforces the new membership: the mediator's device is refused.
    let (_, report) = cli(mediator, &["sync", "--json"]);
    let relays = field(&report, "relays");
    assert!(
        relays
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["error"].as_str().is_some_and(|e| e.contains("403"))),
        "{report}"
    );
    // Three epochs of commits and their copies through two relays: no alarm anywhere.
    for home in [north, south] {
        let (code, status) = cli(home, &["status", "--json"]);
        assert_eq!(code, 0, "{status}");
    }
    relay.stop();
    second.stop();
}

/// A relay in front of two stores: every new connection goes to the backend chosen at
/// that moment. Backends sharing one TLS identity (a copied data directory) make one
/// relay, as its URL pins it, that shows each member whatever the test decides.
struct SplitRelay {
    url: String,
    backend: std::sync::Arc<std::sync::atomic::AtomicU16>,
}

impl SplitRelay {
    /// Listens on a port of its own, serving `relay`'s identity, first from `relay`.
    fn start(relay: &Relay) -> SplitRelay {
        use std::sync::atomic::{AtomicU16, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let backend_port: u16 = relay.address().rsplit(':').next().unwrap().parse().unwrap();
        let backend = std::sync::Arc::new(AtomicU16::new(backend_port));
        let chosen = std::sync::Arc::clone(&backend);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let port = chosen.load(Ordering::SeqCst);
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        let pin = &relay.url[relay.url.find('#').unwrap()..];
        SplitRelay {
            url: format!("https://127.0.0.1:{port}/{pin}"),
            backend,
        }
    }

    fn route_to(&self, relay: &Relay) {
        let port: u16 = relay.address().rsplit(':').next().unwrap().parse().unwrap();
        self.backend
            .store(port, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A relay that shows members different histories, for as long as it likes: from some
/// moment on, north and the mediator are served one copy of its store and south
/// another, so what south sends through it never reaches the others and the reverse.
/// The honest relay carries the truth: every message arrives, transcripts agree. Link
/// tests find the split: each side sees the other's answers through the honest relay
/// but not through this one, which answers every request, and raises `path-down`
/// alarms naming it and the party cut off; no alarm names the honest relay.
#[test]
fn a_relay_showing_members_different_histories_is_caught_and_named() {
    let dir = data_dir("split");
    let honest = Relay::start(&dir.join("honest"));
    let first = Relay::start(&dir.join("split-1"));
    let split = SplitRelay::start(&first);
    let homes = verified_homes(&dir, &["north", "south", "mediator"], &honest.url);
    let [north, south, mediator] = &homes[..] else {
        unreachable!()
    };
    ok(
        north,
        &[
            "channel",
            "create",
            "crisis",
            "--with",
            "south",
            "--with",
            "mediator",
            "--relay",
            &honest.url,
            "--relay",
            &split.url,
        ],
    );
    let round = |routes: &[(&Path, &Relay)]| {
        for (home, backend) in routes {
            split.route_to(backend);
            ok(home, &["sync", "--link-test-interval", "1"]);
        }
    };
    for _ in 0..2 {
        round(&[(north, &first), (south, &first), (mediator, &first)]);
    }

    // The split: a second store, a copy of the first, for south alone.
    let first_address = first.address();
    first.stop();
    copy_dir(&dir.join("split-1"), &dir.join("split-2"));
    let first = Relay::start_on(&dir.join("split-1"), &first_address);
    let second = Relay::start(&dir.join("split-2"));
    let views: [(&Path, &Relay); 3] = [(north, &first), (south, &second), (mediator, &first)];
    split.route_to(&first);
    ok(north, &["send", "crisis", "north during the split"]);
    split.route_to(&second);
    ok(south, &["send", "crisis", "south during the split"]);
    let started = std::time::Instant::now();
    let alarms = |home: &Path| -> Vec<serde_json::Value> {
        let (_, status) = cli(home, &["status", "--json"]);
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        status["alarms"].as_array().unwrap().clone()
    };
    let cut_off = |home: &Path, party: &str| {
        alarms(home).iter().any(|alarm| {
            alarm["kind"] == "path-down"
                && alarm["relay"] == split.url.as_str()
                && alarm["party"] == party
        })
    };
    loop {
        round(&views);
        if cut_off(north, "south") && cut_off(south, "north") && cut_off(south, "mediator") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no split found: north {:?}, south {:?}",
            alarms(north),
            alarms(south)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!("split found {:?} after it began", started.elapsed());
    // Between north and the mediator, the relay is honest: no alarm says otherwise.
    assert!(!cut_off(north, "mediator"));
    assert!(!cut_off(mediator, "north"));
    for home in &homes {
        assert!(
            alarms(home)
                .iter()
                .all(|alarm| alarm["relay"] != honest.url.as_str()),
            "an alarm names the honest relay: {:?}",
            alarms(home)
        );
        let log = ok(home, &["log", "crisis"]);
        assert!(log.contains("north during the split"), "{log}");
        assert!(log.contains("south during the split"), "{log}");
    }
    honest.stop();
    first.stop();
    second.stop();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A member cut off while the committer moves more than five epochs on can no longer
/// open what another member sealed before (MLS keeps five past epochs): the mediator's
/// message reaches relay A only, north's six key updates reach relay B only, so south and
/// north meet the message only after the commits. Both raise a `lost` alarm naming the
/// relay; the mediator, seeing that neither acknowledged it, seals it again in the
/// current epoch when it offers it again; everyone then holds it exactly once and no
/// relay is accused of a replay.
#[test]
fn a_message_too_many_epochs_late_is_sealed_again_and_arrives_once() {
    let dir = data_dir("epochs");
    let a = Relay::start(&dir.join("relay-a"));
    let b = Relay::start(&dir.join("relay-b"));
    let homes = verified_homes(&dir, &["north", "south", "mediator"], &a.url);
    let [north, south, mediator] = &homes[..] else {
        unreachable!()
    };
    ok(
        north,
        &[
            "channel", "create", "crisis", "--with", "south", "--with", "mediator", "--relay",
            &a.url, "--relay", &b.url,
        ],
    );
    for home in &homes {
        ok(home, &["sync"]);
    }
    let epoch = |home: &Path| {
        field(&ok(home, &["channel", "list", "--json"]), "epoch")
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        homes.iter().map(|h| epoch(h)).collect::<Vec<_>>(),
        [1, 1, 1]
    );

    // The mediator's message reaches A only.
    let (b_address, b_data) = (b.address(), dir.join("relay-b"));
    b.stop();
    let sent = ok(
        mediator,
        &["send", "crisis", "sealed at epoch one", "--json"],
    );
    assert_eq!(field(&sent, "relayed"), 1);
    // North's six key updates reach B only.
    let (a_address, a_data) = (a.address(), dir.join("relay-a"));
    a.stop();
    let b = Relay::start_on(&b_data, &b_address);
    for _ in 0..6 {
        let rekey = ok(north, &["channel", "rekey", "crisis", "--json"]);
        assert_eq!(field(&rekey, "relayed"), 1, "{rekey}");
    }
    assert_eq!(epoch(north), 7);
    cli(south, &["sync"]);
    assert_eq!(epoch(south), 7);
    // A returns: its copy of the message is too old to open for south and north.
    let a = Relay::start_on(&a_data, &a_address);
    ok(south, &["sync"]);
    ok(north, &["sync"]);
    for home in [north, south] {
        assert!(!ok(home, &["log", "crisis"]).contains("sealed at epoch one"));
        let (code, status) = cli(home, &["status", "--json"]);
        assert_eq!(code, 6, "{status}");
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        let alarms = status["alarms"].as_array().unwrap();
        assert!(
            alarms
                .iter()
                .any(|alarm| alarm["kind"] == "lost" && alarm["relay"] == a.url.as_str()),
            "{status}"
        );
    }

    // The mediator catches up to epoch 7, then offers what is unacknowledged again:
    // sealed anew, in epoch 7.
    ok(mediator, &["sync"]);
    assert_eq!(epoch(mediator), 7);
    for home in &homes {
        cli(home, &["status", "--undelivered-after", "1s"]);
    }
    std::thread::sleep(Duration::from_millis(1100));
    // North and south write again without acknowledging it: evidence they missed it.
    ok(north, &["send", "crisis", "north again"]);
    ok(south, &["send", "crisis", "south again"]);
    ok(mediator, &["sync"]);
    let report = ok(mediator, &["sync", "--json"]);
    assert!(
        field(&report, "reoffered").as_u64().unwrap() >= 2,
        "offered to both relays: {report}"
    );
    // The message references what the mediator held when it wrote it, among which the
    // first checkpoints of south (sealed at epoch 1 too, lost to north alike): each
    // device offers its own unacknowledged envelopes again, so a few rounds bring it.
    let arrived = || {
        [north, south]
            .iter()
            .all(|home| ok(home, &["log", "crisis"]).contains("sealed at epoch one"))
    };
    for _ in 0..5 {
        for home in [north, south, mediator, north, south] {
            ok(home, &["sync"]);
        }
        if arrived() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1100));
    }
    for home in [north, south] {
        let log = ok(home, &["log", "crisis"]);
        assert_eq!(log.matches("sealed at epoch one").count(), 1, "{log}");
        let status: serde_json::Value =
            serde_json::from_str(&cli(home, &["status", "--json"]).1).unwrap();
        let kinds: BTreeSet<&str> = status["alarms"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|alarm| alarm["kind"].as_str())
            .collect();
        assert_eq!(kinds, BTreeSet::from(["lost"]), "{status}");
    }
    // Every device offers what is unacknowledged again, until every transcript holds
    // the same envelopes.
    let roots = || -> BTreeSet<String> {
        homes
            .iter()
            .map(|home| field(&ok(home, &["channel", "list", "--json"]), "root").to_string())
            .collect()
    };
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(1100));
        for _ in 0..2 {
            for home in &homes {
                ok(home, &["sync"]);
            }
        }
        if roots().len() == 1 {
            break;
        }
    }
    let roots = roots();
    assert_eq!(roots.len(), 1, "{roots:?}");
    // Holding the same envelopes, every member settled as far, to the same final root.
    let settled: BTreeSet<String> = homes
        .iter()
        .map(|home| {
            let list = ok(home, &["channel", "list", "--json"]);
            format!(
                "{} {}",
                field(&list, "settled"),
                field(&list, "settled_root")
            )
        })
        .collect();
    assert_eq!(settled.len(), 1, "{settled:?}");
    assert!(!settled.iter().any(|s| s.starts_with("0 ")), "{settled:?}");
    a.stop();
    b.stop();
}

/// Two devices following two relays with link tests every 2 s: `status` shows both paths
/// up with a round trip; one relay stopped is shown down (and alarmed, naming it) within
/// three intervals while messages still flow through the other; a message unread past
/// its deadline raises its alarm; `status` exits 6 while an alarm is open.
#[test]
fn status_shows_a_stopped_relay_down_and_a_missed_deadline() {
    let dir = data_dir("status");
    let first = Relay::start(&dir.join("relay-1"));
    let second = Relay::start(&dir.join("relay-2"));
    let homes = verified_homes(&dir, &["north", "south"], &first.url);
    let (north, south) = (homes[0].clone(), homes[1].clone());
    ok(
        &north,
        &[
            "channel",
            "create",
            "crisis",
            "--with",
            "south",
            "--relay",
            &first.url,
            "--relay",
            &second.url,
        ],
    );
    ok(&north, &["sync"]);
    ok(&south, &["sync"]);
    let interval = Duration::from_secs(2);
    let follow =
        |home: &Path| Follower::start_with(home, &["--round", "1", "--link-test-interval", "2"]);
    let (_north_follows, _south_follows) = (follow(&north), follow(&south));
    let status = |home: &Path| -> (i32, serde_json::Value) {
        let (code, out) = cli(home, &["status", "--json"]);
        (code, serde_json::from_str(out.trim()).unwrap())
    };
    let state_of = |status: &serde_json::Value, url: &str| -> String {
        status["relays"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["url"] == url)
            .map(|r| r["state"].as_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let wait_for = |what: &str, limit: Duration, check: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + limit;
        while !check() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for("both paths up", Duration::from_secs(30), &|| {
        let (_, s) = status(&north);
        state_of(&s, &first.url) == "up" && state_of(&s, &second.url) == "up"
    });
    let (code, up) = status(&north);
    assert_eq!(code, 0, "{up}");
    assert_eq!(up["line"], "up");
    assert!(up["relays"][0]["rtt_ms"].as_u64().is_some());
    assert!(up["parties"][0]["last_heard"].as_u64().is_some());
    assert_eq!(up["parties"][0]["party"], "south");
    // Link tests never enter the transcript (their availability records will).
    assert!(!ok(&north, &["log", "crisis", "--link-tests"]).contains("[link test"));

    // The second relay stops: down within three intervals, alarmed by name.
    let stopped = std::time::Instant::now();
    let second_url = second.url.clone();
    drop(second);
    wait_for(
        "the stopped relay shown down",
        interval * 3 + Duration::from_secs(2),
        &|| state_of(&status(&north).1, &second_url) == "down",
    );
    let took = stopped.elapsed();
    let (code, down) = status(&north);
    assert_eq!(code, 6, "an open alarm: {down}");
    assert_eq!(down["line"], "up", "the other relay carries the line");
    assert_eq!(state_of(&down, &first.url), "up");
    let alarm = down["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "relay-down")
        .cloned()
        .unwrap_or_else(|| panic!("no relay-down alarm: {down}"));
    assert_eq!(alarm["relay"], second_url.as_str());
    eprintln!("relay shown down {took:?} after it stopped");

    // Messages still flow; one with a deadline nobody reads raises its alarm.
    let sent = ok(
        &north,
        &[
            "send",
            "crisis",
            "read me in 2 s",
            "--deadline",
            "2s",
            "--json",
        ],
    );
    let id = field(&sent, "id").as_str().unwrap().to_owned();
    wait_for(
        "delivery through the live relay",
        Duration::from_secs(15),
        &|| ok(&south, &["log", "crisis"]).contains("read me in 2 s"),
    );
    wait_for("the deadline alarm", Duration::from_secs(15), &|| {
        status(&north).1["alarms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| {
                a["kind"] == "deadline" && a["message"] == id.as_str() && a["party"] == "south"
            })
    });
    first.stop();
}

/// A hostile relay, with a second relay carrying the truth: after north read it, its
/// stored messages are tampered with (one dropped, one altered, one served again, one
/// replayed from another channel), so that it shows south a different history than it
/// showed north. South's transcript stays correct, each case raises an alarm naming the
/// hostile relay (none names the honest one), and `status` exits 6; north, shown the
/// intact history, is alarmed only by what the relay added afterwards.
#[test]
fn a_hostile_relay_is_caught_and_named_while_the_honest_one_carries_the_truth() {
    let dir = data_dir("hostile");
    let honest = Relay::start(&dir.join("honest"));
    let hostile = Relay::start(&dir.join("hostile"));
    let homes = verified_homes(&dir, &["north", "south"], &honest.url);
    let (north, south) = (homes[0].clone(), homes[1].clone());
    for name in ["crisis", "other"] {
        ok(
            &north,
            &[
                "channel",
                "create",
                name,
                "--with",
                "south",
                "--relay",
                &honest.url,
                "--relay",
                &hostile.url,
            ],
        );
    }
    for _ in 0..2 {
        ok(&north, &["sync"]);
        ok(&south, &["sync"]);
    }
    // North answers south's first link tests now, so that the channel's four newest
    // messages on the relays are the four texts below.
    ok(&north, &["sync"]);
    let channel_id = |name: &str| -> Vec<u8> {
        let list = ok(&north, &["channel", "list", "--json"]);
        let line = list
            .lines()
            .find(|l| l.contains(&format!("\"name\":\"{name}\"")))
            .unwrap();
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        hex::decode(value["id"].as_str().unwrap()).unwrap()
    };
    let (crisis, other) = (channel_id("crisis"), channel_id("other"));
    for n in 1..=4 {
        let sent = ok(
            &north,
            &["send", "crisis", &format!("message {n}"), "--json"],
        );
        assert_eq!(field(&sent, "relayed"), 2);
    }
    let sent = ok(&north, &["send", "other", "elsewhere", "--json"]);
    assert_eq!(field(&sent, "relayed"), 2);

    // North reads the relays now: it is shown the untampered history.
    ok(&north, &["sync"]);

    // Tamper with the hostile relay's store while it is down (among the last four
    // messages of the channel: one dropped, one altered, one served again, and one of
    // the other channel added): from now on it shows south a different history than the
    // one it showed north.
    let address = hostile
        .url
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let hostile_url = hostile.url.clone();
    hostile.stop();
    {
        let db = rusqlite::Connection::open(dir.join("hostile").join("relay.db")).unwrap();
        let log = |id: &[u8]| [&[1u8][..], id].concat();
        let rows: Vec<(i64, Vec<u8>)> = db
            .prepare("SELECT seq, bytes FROM messages WHERE log = ?1 ORDER BY seq DESC LIMIT 4")
            .unwrap()
            .query_map([log(&crisis)], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let [(_, _), (third, third_bytes), (second, _), (_, first_bytes)] = &rows[..] else {
            panic!(
                "expected four messages on the hostile relay, got {}",
                rows.len()
            )
        };
        let (foreign_bytes,): (Vec<u8>,) = db
            .query_row(
                "SELECT bytes FROM messages WHERE log = ?1 ORDER BY seq DESC LIMIT 1",
                [log(&other)],
                |row| Ok((row.get(0)?,)),
            )
            .unwrap();
        let last: i64 = db
            .query_row(
                "SELECT MAX(seq) FROM messages WHERE log = ?1",
                [log(&crisis)],
                |row| row.get(0),
            )
            .unwrap();
        // Dropped: the third-last. Altered: one byte of the second-last.
        db.execute(
            "DELETE FROM messages WHERE log = ?1 AND seq = ?2",
            rusqlite::params![log(&crisis), second],
        )
        .unwrap();
        let mut altered = third_bytes.clone();
        let middle = altered.len() - 20;
        altered[middle] ^= 0x01;
        db.execute(
            "UPDATE messages SET bytes = ?3 WHERE log = ?1 AND seq = ?2",
            rusqlite::params![log(&crisis), third, altered],
        )
        .unwrap();
        // Served again: the fourth-last, at the end. Replayed from elsewhere: "other"'s.
        for (offset, bytes) in [(1, first_bytes), (2, &foreign_bytes)] {
            db.execute(
                "INSERT INTO messages (log, seq, hash, bytes, stored_ms)
                 SELECT ?1, ?2, ?3, ?4, stored_ms FROM messages WHERE log = ?1 AND seq = ?5",
                rusqlite::params![
                    log(&crisis),
                    last + offset,
                    vec![offset as u8; 32],
                    bytes,
                    last
                ],
            )
            .unwrap();
        }
        db.execute(
            "UPDATE heads SET last_seq = ?2 WHERE log = ?1",
            rusqlite::params![log(&crisis), last + 2],
        )
        .unwrap();
    }
    let hostile = Relay::start_on(&dir.join("hostile"), &address);
    assert_eq!(hostile.url, hostile_url);

    ok(&south, &["sync"]);
    let log = ok(&south, &["log", "crisis", "--json"]);
    let texts: Vec<String> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        texts,
        ["message 1", "message 2", "message 3", "message 4"],
        "the truth, once each"
    );
    let (code, status) = cli(&south, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    assert_eq!(code, 6, "{status}");
    let alarms = status["alarms"].as_array().unwrap();
    for kind in ["dropped", "altered", "replayed", "foreign"] {
        assert!(
            alarms
                .iter()
                .any(|a| a["kind"] == kind && a["relay"] == hostile_url.as_str()),
            "no {kind} alarm naming the hostile relay: {status}"
        );
    }
    assert!(
        alarms.iter().all(|a| a["relay"] != honest.url.as_str()),
        "an alarm names the honest relay: {status}"
    );
    // The dropped alarm keeps the relay's own receipt for the message it served after
    // the gap: anyone with the relay's address checks it, and a changed one fails.
    let dropped = alarms.iter().find(|a| a["kind"] == "dropped").unwrap();
    let receipts = dropped["receipts"].as_array().unwrap();
    assert!(!receipts.is_empty(), "no receipt as evidence: {dropped}");
    let receipt = receipts[0].as_str().unwrap();
    let (code, checked) = cli(
        &south,
        &["relay", "check-receipt", &hostile_url, receipt, "--json"],
    );
    let checked: serde_json::Value = serde_json::from_str(checked.trim()).unwrap();
    assert_eq!(
        (code, &checked["valid"]),
        (0, &serde_json::json!(true)),
        "{checked}"
    );
    assert_eq!(checked["log"], format!("channel {}", hex::encode(&crisis)));
    let mut forged = hex::decode(receipt).unwrap();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert_eq!(
        cli(
            &south,
            &["relay", "check-receipt", &hostile_url, &hex::encode(forged)]
        )
        .0,
        5
    );
    // Checked against another relay's address: not its receipt.
    assert_eq!(
        cli(&south, &["relay", "check-receipt", &honest.url, receipt]).0,
        5
    );
    // The operator clears one after reading it: the others stay open.
    let first = alarms[0]["id"].as_u64().expect("stored alarms have ids");
    assert_eq!(
        cli(&south, &["status", "--clear-id", &first.to_string()]).0,
        6
    );
    let (_, after) = cli(&south, &["status", "--json"]);
    let after: serde_json::Value = serde_json::from_str(after.trim()).unwrap();
    let left = after["alarms"].as_array().unwrap();
    assert_eq!(left.len(), alarms.len() - 1, "{after}");
    assert!(left.iter().all(|a| a["id"].as_u64() != Some(first)));
    // Not twice, and not one that does not exist.
    assert_eq!(
        cli(&south, &["status", "--clear-id", &first.to_string()]).0,
        1
    );
    // The rest, all at once: the line is quiet again.
    assert_eq!(cli(&south, &["status", "--clear"]).0, 6);
    assert_eq!(cli(&south, &["status"]).0, 0);

    // North was shown the other history: it sees only what the relay added since.
    ok(&north, &["sync"]);
    let (code, status) = cli(&north, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    assert_eq!(code, 6, "{status}");
    let kinds: BTreeSet<&str> = status["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .inspect(|a| assert_eq!(a["relay"], hostile_url.as_str(), "{status}"))
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, BTreeSet::from(["foreign", "replayed"]), "{status}");
    hostile.stop();
    honest.stop();
}

/// The committer moves the channel from one relay to another in two signed steps (add
/// the new one, then drop the old one); the other member follows each step, and after the
/// old relay is gone messages still arrive. A member that is not the committer cannot
/// change the relays.
#[test]
fn the_committer_moves_the_channel_to_another_relay_and_members_follow() {
    let dir = data_dir("move");
    let old = Relay::start(&dir.join("old"));
    let new = Relay::start(&dir.join("new"));
    let homes = verified_homes(&dir, &["north", "south"], &old.url);
    let (north, south) = (homes[0].clone(), homes[1].clone());
    ok(
        &north,
        &[
            "channel", "create", "crisis", "--with", "south", "--relay", &old.url,
        ],
    );
    ok(&south, &["sync"]);
    let relays_of = |home: &Path| -> Vec<String> {
        let (_, out) = cli(home, &["status", "--json"]);
        let status: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let mut urls: Vec<String> = status["relays"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["url"].as_str().unwrap().to_owned())
            .collect();
        urls.sort();
        urls
    };
    let mut both = vec![old.url.clone(), new.url.clone()];
    both.sort();

    // Only the committer decides.
    assert_eq!(
        cli(
            &south,
            &["channel", "relays", "crisis", "--relay", &new.url]
        )
        .0,
        1
    );
    ok(
        &north,
        &[
            "channel", "relays", "crisis", "--relay", &old.url, "--relay", &new.url,
        ],
    );
    ok(&north, &["sync"]);
    ok(&south, &["sync"]);
    assert_eq!(relays_of(&north), both);
    assert_eq!(
        relays_of(&south),
        both,
        "south follows the committer's note"
    );

    ok(
        &north,
        &["channel", "relays", "crisis", "--relay", &new.url],
    );
    ok(&north, &["sync"]);
    ok(&south, &["sync"]);
    assert_eq!(relays_of(&south), std::slice::from_ref(&new.url));
    old.stop();
    let sent = ok(
        &north,
        &["send", "crisis", "through the new relay", "--json"],
    );
    assert_eq!(field(&sent, "relayed"), 1);
    ok(&south, &["sync"]);
    assert!(ok(&south, &["log", "crisis"]).contains("through the new relay"));
    new.stop();
}

/// Two relay processes sharing one PostgreSQL schema are one relay with two doors: a
/// membership registered and a message posted through one are served by the other, and
/// a long poll waiting on the other wakes when the message lands (LISTEN/NOTIFY across
/// processes). Skipped without a reachable PostgreSQL, except under CI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relay_processes_share_one_postgres() {
    hotline_relay::tls::install_provider();
    let url = std::env::var("HOTLINE_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into());
    let schema = format!("hotline_relays_{}", std::process::id());
    if let Err(error) =
        hotline_relay::postgres::PostgresStorage::connect(&url, &schema, 1 << 20, 1).await
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "PostgreSQL unreachable under CI: {error}"
        );
        eprintln!("skipped: PostgreSQL unreachable at {url}: {error}");
        return;
    }
    let dir = data_dir("postgres");
    let options = [
        "--postgres",
        url.as_str(),
        "--postgres-schema",
        schema.as_str(),
    ];
    let first = Relay::start_with(&dir.join("first"), "127.0.0.1:0", &options);
    let second = Relay::start_with(&dir.join("second"), "127.0.0.1:0", &options);
    let (north, south) = (identity("north", 11), identity("south", 12));
    let (through_first, through_second) = (
        RelayClient::new(&first.url).unwrap(),
        RelayClient::new(&second.url).unwrap(),
    );
    let channel = [9u8; 32];
    let membership = Membership {
        committer: north.key().0,
        version: 1,
        members: vec![north.key().0, south.key().0],
    };
    through_first
        .register(&north, &channel, &membership)
        .await
        .unwrap();
    // The other door knows the membership: a replay there is a conflict.
    assert_eq!(
        refused_code(through_second.register(&north, &channel, &membership).await),
        (409, "conflict".into())
    );
    assert_eq!(
        through_first
            .post(&north, &channel, b"first".to_vec())
            .await
            .unwrap()
            .seq,
        1
    );
    let read = through_second
        .fetch(&south, &channel, 0, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(pairs(read), [(1, b"first".to_vec())]);

    // A long poll on the second door wakes for a post through the first.
    let waiting = {
        let (client, south) = (through_second.clone(), identity("south", 12));
        tokio::spawn(async move {
            client
                .fetch(&south, &channel, 1, Duration::from_secs(20))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        through_first
            .post(&north, &channel, b"second".to_vec())
            .await
            .unwrap()
            .seq,
        2
    );
    let woken = waiting.await.unwrap().unwrap();
    assert_eq!(
        pairs(woken),
        [(2, b"second".to_vec())],
        "the long poll woke with it"
    );
    // Numbering is shared: a post through the second door comes next.
    assert_eq!(
        through_second
            .post(&south, &channel, b"third".to_vec())
            .await
            .unwrap()
            .seq,
        3
    );
    // A notification names the logs its commit appended to: a long poll on another
    // channel at the second door sleeps through the first door's posts (each woke it,
    // and it read its log, before).
    let quiet = [10u8; 32];
    through_first
        .register(&north, &quiet, &membership)
        .await
        .unwrap();
    let idle = {
        let (client, south) = (through_second.clone(), identity("south", 12));
        tokio::spawn(async move {
            client
                .fetch(&south, &quiet, 0, Duration::from_secs(20))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // And the first door's own notifications wake nothing there: its readers were
    // woken as it committed. Here a long poll on the channel, past its end (so that no
    // post answers it), where each post's notification made a storage read before.
    let beyond = {
        let (client, south) = (through_first.clone(), identity("south", 12));
        tokio::spawn(async move {
            client
                .fetch(&south, &channel, 1_000_000, Duration::from_secs(20))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reads = |relay: &Relay| {
        let url = relay.url.clone();
        async move {
            let metrics = tokio::task::spawn_blocking(move || relay_metrics(&url))
                .await
                .unwrap();
            metric(&metrics, "hotline_relay_storage_reads_total")
        }
    };
    let (before, before_first) = (reads(&second).await, reads(&first).await);
    for n in 0..20u32 {
        through_first
            .post(&north, &channel, n.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = reads(&second).await - before;
    assert!(
        read <= 2,
        "{read} storage reads at the second door for 20 posts elsewhere"
    );
    let read = reads(&first).await - before_first;
    assert!(
        read <= 2,
        "{read} storage reads at the first door for its own 20 posts"
    );
    assert!(!idle.is_finished(), "the quiet channel's long poll woke");
    assert!(!beyond.is_finished(), "the long poll past the end woke");
    idle.abort();
    beyond.abort();
    first.stop();
    second.stop();
    let drop_schema = std::process::Command::new("psql")
        .args([url.as_str(), "-c", &format!("DROP SCHEMA {schema} CASCADE")])
        .output();
    let _ = drop_schema;
}

/// A client streams messages while the relay is SIGKILLed at random moments and
/// restarted on the same data, `HOTLINE_RELAY_KILLS` times (default 100): every message
/// the relay acknowledged is there afterwards, exactly once, in order of acknowledgement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_at_random_moments_keeps_every_acknowledged_message() {
    use rand::Rng;
    hotline_relay::tls::install_provider();
    let kills: usize = std::env::var("HOTLINE_RELAY_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(100);
    let seed: u64 = std::env::var("HOTLINE_RELAY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    println!("relay crash test: seed {seed}, {kills} kills");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data = data_dir("crash");
    let north = identity("north", 1);
    let channel = [9u8; 32];
    let mut relay = Relay::start(&data);
    let address = relay.address();
    let membership = Membership {
        committer: north.key().0,
        version: 1,
        members: vec![north.key().0],
    };
    RelayClient::new(&relay.url)
        .unwrap()
        .register(&north, &channel, &membership)
        .await
        .unwrap();

    let mut acknowledged: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut counter = 0u64;
    for _ in 0..kills {
        let client = RelayClient::new(&relay.url).unwrap();
        let stream = {
            let north = DeviceIdentity::from_secret_bytes(&north.to_secret_bytes()).unwrap();
            let start = counter;
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for n in start.. {
                    let payload = format!("message {n}").into_bytes();
                    match client.post(&north, &channel, payload.clone()).await {
                        Ok(appended) => acked.push((appended.seq, payload)),
                        Err(_) => break,
                    }
                }
                acked
            })
        };
        tokio::time::sleep(Duration::from_millis(rng.gen_range(5..80))).await;
        relay.child.kill().unwrap();
        relay.child.wait().unwrap();
        let acked = stream.await.unwrap();
        counter += acked.len() as u64 + 1;
        acknowledged.extend(acked);
        relay = Relay::start_on(&data, &address);
    }
    let client = RelayClient::new(&relay.url).unwrap();
    let mut stored = Vec::new();
    loop {
        let after = stored.last().map_or(0, |(seq, _): &(u64, Vec<u8>)| *seq);
        let batch = client
            .fetch(&north, &channel, after, Duration::ZERO)
            .await
            .unwrap();
        if batch.is_empty() {
            break;
        }
        stored.extend(pairs(batch));
    }
    assert!(
        acknowledged.len() > kills,
        "too few acknowledged messages ({}) to mean much",
        acknowledged.len()
    );
    for (seq, payload) in &acknowledged {
        let copies = stored.iter().filter(|(_, bytes)| bytes == payload).count();
        assert_eq!(
            copies, 1,
            "acknowledged message {seq} stored {copies} times"
        );
        assert!(
            stored.contains(&(*seq, payload.clone())),
            "acknowledged message {seq} lost or moved"
        );
    }
    println!(
        "{} acknowledged messages survived {kills} kills",
        acknowledged.len()
    );
    relay.stop();
}

/// North and south, verified, with channel "crisis" on one new relay (named on north's
/// device when `name` is given), both synced once: the data directory, the relay, the
/// two homes.
fn crisis_on_one_relay(
    dir_name: &str,
    name: Option<&str>,
) -> (std::path::PathBuf, Relay, Vec<std::path::PathBuf>) {
    let dir = data_dir(dir_name);
    let relay = Relay::start(&dir.join("relay"));
    let homes = verified_homes(&dir, &["north", "south"], &relay.url);
    let argument = match name {
        Some(name) => format!("{name}={}", relay.url),
        None => relay.url.clone(),
    };
    ok(
        &homes[0],
        &[
            "channel", "create", "crisis", "--with", "south", "--relay", &argument,
        ],
    );
    ok(&homes[0], &["sync"]);
    ok(&homes[1], &["sync"]);
    (dir, relay, homes)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Three parties on three relays test every path every 200 ms (thousands of link
/// tests) while one relay is stopped for a known window. The permanent transcript grows
/// only by what people sent and by each device's signed availability records (with a
/// checkpoint each); the records, verified offline from an export, show the stopped
/// relay down through that window for every tester and party and the other relays
/// answering; and all three transcripts end with the same root. `HOTLINE_SOAK_SECONDS`
/// (default 8) sets how long each phase runs.
#[test]
fn three_parties_on_three_relays_keep_the_line_tested_and_the_record_bounded() {
    let phase = Duration::from_secs(
        std::env::var("HOTLINE_SOAK_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(8),
    );
    let dir = data_dir("availability");
    let relays: Vec<Relay> = (1..=3)
        .map(|i| Relay::start(&dir.join(format!("relay-{i}"))))
        .collect();
    let urls: Vec<String> = relays.iter().map(|relay| relay.url.clone()).collect();
    let parties = ["north", "south", "mediator"];
    let homes = verified_homes(&dir, &parties, &urls[0]);
    let mut create = vec![
        "channel", "create", "crisis", "--with", "south", "--with", "mediator",
    ];
    for url in &urls {
        create.extend(["--relay", url.as_str()]);
    }
    ok(&homes[0], &create);
    for _ in 0..2 {
        for home in &homes {
            ok(home, &["sync"]);
        }
    }
    let envelopes = |home: &Path| field(&ok(home, &["channel", "list", "--json"]), "envelopes");
    let before = envelopes(&homes[0]).as_u64().unwrap();

    let follow = |home: &Path| {
        Follower::start_with(
            home,
            &[
                "--round",
                "1",
                "--link-test-interval",
                "200ms",
                "--record-every",
                "4s",
            ],
        )
    };
    let followers: Vec<Follower> = homes.iter().map(|home| follow(home)).collect();
    std::thread::sleep(phase);
    ok(&homes[1], &["send", "crisis", "south: holding"]);

    // The third relay stops for one phase, then comes back on the same address and data.
    let mut relays = relays;
    let third = relays.pop().unwrap();
    let address = third.address();
    third.stop();
    // Down from when its process is gone (a stopping relay still serves the
    // connections it has for a while).
    let stopped_ms = now_ms();
    std::thread::sleep(phase);
    let restarted_ms = now_ms();
    relays.push(Relay::start_on(&dir.join("relay-3"), &address));
    std::thread::sleep(phase + Duration::from_secs(6));
    ok(&homes[0], &["send", "crisis", "north: understood"]);
    for follower in followers {
        follower.stop();
    }
    // No new record from now on, so that three rounds bring everyone level.
    for _ in 0..3 {
        for home in &homes {
            ok(home, &["sync", "--record-every", "1h"]);
        }
    }
    let roots: BTreeSet<String> = homes
        .iter()
        .map(|home| field(&ok(home, &["channel", "list", "--json"]), "root").to_string())
        .collect();
    assert_eq!(roots.len(), 1, "{roots:?}");

    let export = dir.join("crisis.export");
    ok(
        &homes[0],
        &["export", "crisis", "--out", export.to_str().unwrap()],
    );
    let report: serde_json::Value = serde_json::from_str(&ok(
        &homes[0],
        &["verify", export.to_str().unwrap(), "--json"],
    ))
    .unwrap();
    let paths = report["availability"].as_array().unwrap();
    let probes: u64 = paths.iter().map(|p| p["sent"].as_u64().unwrap()).sum();
    // Each tester's records name every path; count them once per tester.
    let records: u64 = parties
        .iter()
        .map(|tester| {
            paths
                .iter()
                .filter(|p| p["tester"]["party"] == *tester)
                .map(|p| p["records"].as_u64().unwrap())
                .max()
                .unwrap_or(0)
        })
        .sum();
    let count = |name: &str| report[name].as_u64().unwrap();
    eprintln!(
        "{probes} probes in {records} availability records; transcript {before} → {} envelopes",
        count("envelopes")
    );
    assert!(probes >= 1_000, "only {probes} probes");
    // Nothing but the two membership notes, the two messages, checkpoints, cosigned
    // roots and the availability records: no link test entered the transcript.
    assert_eq!(
        count("envelopes"),
        2 + count("messages") + count("checkpoints") + count("cosignatures") + records,
        "{report}"
    );
    assert_eq!(count("messages"), 2);
    // Bounded by time, not by the probes: per device and period one record and one
    // checkpoint, plus each device's first checkpoint and the export's.
    let periods = (phase.as_secs() * 3 + 6) / 4 + 2;
    assert!(records <= 3 * periods, "{records} records");
    assert!(count("checkpoints") <= records + 3 + 1, "{report}");
    // Cosigned roots: per device and period its own and at most the two others'
    // (cosigned again when they are its own too), plus the first and the export's.
    assert!(count("cosignatures") <= 3 * (3 * periods + 2), "{report}");
    // What the records say agrees with what happened.
    let window = restarted_ms - stopped_ms;
    for tester in parties {
        for party in parties.iter().filter(|p| **p != tester) {
            for (index, url) in urls.iter().enumerate() {
                let path = paths
                    .iter()
                    .find(|p| {
                        p["tester"]["party"] == tester
                            && p["party"] == *party
                            && p["relay"] == url.as_str()
                    })
                    .unwrap_or_else(|| panic!("no record of {tester} → {party} via relay {index}"));
                let covered: u64 = path["longest_outages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|o| {
                        let (from, to) =
                            (o["from_ms"].as_u64().unwrap(), o["to_ms"].as_u64().unwrap());
                        to.min(restarted_ms).saturating_sub(from.max(stopped_ms))
                    })
                    .sum();
                let (sent, answered) = (
                    path["sent"].as_u64().unwrap(),
                    path["answered"].as_u64().unwrap(),
                );
                if index == 2 {
                    assert!(
                        covered * 10 >= window * 7,
                        "{tester} → {party}: the stopped relay's outage covers {covered} of {window} ms: {path}"
                    );
                } else {
                    assert!(
                        covered * 2 < window && answered * 10 >= sent * 7,
                        "{tester} → {party} via a live relay: {path}"
                    );
                }
            }
        }
    }
    for relay in relays {
        relay.stop();
    }
}

/// Delivery is explicit and prompt: after one `sync` on the receiver and one on the
/// sender, the sender sees its message delivered (the receiver told it with a receipt
/// frame as it committed the message, without writing anything); `ack` pushes the read
/// receipt at once, so one `sync` of the sender shows it read. Neither receipt frame
/// enters the transcript.
#[test]
fn one_sync_on_each_side_shows_delivered_and_ack_shows_read() {
    let (_dir, relay, homes) = crisis_on_one_relay("receipts", None);
    let (north, south) = (&homes[0], &homes[1]);
    // South's first link tests and checkpoint reach north.
    for home in [south, north] {
        ok(home, &["sync"]);
    }
    let envelopes = |home: &Path| field(&ok(home, &["channel", "list", "--json"]), "envelopes");
    let before = envelopes(north);
    let sent = ok(north, &["send", "crisis", "are you there?", "--json"]);
    let id = field(&sent, "id").as_str().unwrap().to_owned();
    let entry = |home: &Path| -> serde_json::Value {
        ok(home, &["log", "crisis", "--json"])
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .find(|entry| entry["id"] == id.as_str())
            .unwrap()
    };
    assert_eq!(entry(north)["delivered_to"], serde_json::json!([]));
    ok(south, &["sync"]);
    ok(north, &["sync"]);
    assert_eq!(entry(north)["delivered_to"], serde_json::json!(["south"]));
    assert_eq!(entry(north)["read_by"], serde_json::json!([]));
    // South wrote nothing: the receipt was a frame, not an envelope.
    assert_eq!(envelopes(south), envelopes(north));

    ok(south, &["ack", "crisis", &id[..12]]);
    ok(north, &["sync"]);
    assert_eq!(entry(north)["read_by"], serde_json::json!(["south"]));
    // The read receipt is an envelope (it is on the record); nothing else was added.
    assert_eq!(
        envelopes(north).as_u64().unwrap(),
        before.as_u64().unwrap() + 2,
        "the message and the read receipt"
    );
    relay.stop();
}

/// The only relay dies under two followers testing every second: `status` says the line
/// is down (exit 3) within three intervals (plus a second of slack for this machine),
/// and up again soon after the relay returns on the same address (the followers' polls
/// never back off longer than an interval); a round trip shown is the path's, in
/// milliseconds, not a poll's.
#[test]
fn the_sole_relay_dies_and_returns_and_status_follows_within_intervals() {
    // North names the relay on its device.
    let (dir, relay, homes) = crisis_on_one_relay("sole", Some("sole"));
    let (north, south) = (&homes[0], &homes[1]);
    let follow =
        |home: &Path| Follower::start_with(home, &["--round", "1", "--link-test-interval", "1s"]);
    let (_north_follows, _south_follows) = (follow(north), follow(south));
    let status = |home: &Path| -> (i32, serde_json::Value) {
        let (code, out) = cli(home, &["status", "--json"]);
        (code, serde_json::from_str(out.trim()).unwrap())
    };
    let wait_for = |what: &str, limit: Duration, check: &dyn Fn() -> bool| {
        let started = std::time::Instant::now();
        while !check() {
            assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        started.elapsed()
    };
    wait_for("the line up", Duration::from_secs(30), &|| {
        status(north).1["relays"][0]["state"] == "up"
    });
    // The round trip is the path's: well under a second on loopback.
    wait_for("a path's round trip", Duration::from_secs(10), &|| {
        status(north).1["relays"][0]["rtt_ms"]
            .as_u64()
            .is_some_and(|ms| ms < 500)
    });
    // One line per relay path and per party, the relay by its name here and by its
    // host:port on the device that did not name it.
    assert_eq!(status(north).1["relays"][0]["name"], "sole");
    let text = cli(north, &["status"]).1;
    assert!(
        text.lines().any(|l| l.starts_with("relay  sole   up")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("party  south  last heard")),
        "{text}"
    );
    let host = relay.address();
    let text = cli(south, &["status"]).1;
    assert!(text.contains(&format!("relay  {host}")), "{text}");

    let address = relay.address();
    relay.stop();
    let took = wait_for("the line down", Duration::from_secs(4), &|| {
        status(north).0 == 3
    });
    let (_, down) = status(north);
    assert_eq!(down["line"], "down", "{down}");
    eprintln!("line shown down {took:?} after its only relay stopped");

    let relay = Relay::start_on(&dir.join("relay"), &address);
    let took = wait_for("the line up again", Duration::from_secs(6), &|| {
        status(north).1["relays"][0]["state"] == "up"
    });
    eprintln!("line shown up {took:?} after the relay returned");
    relay.stop();
}

/// `sync --follow --json` is a stream of events a script can react to: the receiver's
/// follower prints the message (with its text), the sender's prints it delivered (from
/// the receiver's receipt frame) and, after `ack`, read; both print the relay going
/// down and coming back.
#[test]
fn follow_json_prints_messages_deliveries_reads_and_relay_changes() {
    let (dir, relay, homes) = crisis_on_one_relay("events", None);
    let (north, south) = (&homes[0], &homes[1]);
    let mut north_follows = Follower::start(north);
    let mut south_follows = Follower::start(south);
    std::thread::sleep(Duration::from_millis(500));

    let started = std::time::Instant::now();
    let sent = ok(north, &["send", "crisis", "hello\u{1b}[2J south", "--json"]);
    let id = field(&sent, "id").as_str().unwrap().to_owned();
    let message = south_follows.expect_event("message");
    assert_eq!(message["channel"], "crisis");
    assert_eq!(message["from"], "north");
    assert_eq!(message["id"], id.as_str());
    assert_eq!(
        message["text"], "hello\u{1b}[2J south",
        "JSON keeps the exact text"
    );
    let delivered = north_follows.expect_event("delivered");
    eprintln!("delivered shown {:?} after send", started.elapsed());
    assert_eq!(delivered["message"], id.as_str());
    assert_eq!(delivered["to"], "south");

    let started = std::time::Instant::now();
    ok(south, &["ack", "crisis", &id[..12]]);
    let read = north_follows.expect_event("read");
    eprintln!("read shown {:?} after ack", started.elapsed());
    assert_eq!(read["message"], id.as_str());
    assert_eq!(read["by"], "south");

    let address = relay.address();
    relay.stop();
    let down = north_follows.expect_event("relay");
    assert_eq!(down["state"], "down", "{down}");
    let relay = Relay::start_on(&dir.join("relay"), &address);
    let up = north_follows.expect_event("relay");
    assert_eq!(up["state"], "up", "{up}");
    assert_eq!(north_follows.stop(), Some(0));
    assert_eq!(south_follows.stop(), Some(0));
    relay.stop();
}

/// Five channels between the same two parties over one relay, each joined and each
/// carrying a message both ways, each opened with a fresh key package that south
/// stocked on its relay and north claimed there (the card's are spared). Then an invitation south cannot accept (it includes a party
/// south never verified) is never silent: south's alarm names the inviter and the
/// channel, and north shows south "invited, not joined", alarmed once the
/// undelivered-after time passed.
#[test]
fn five_channels_between_two_parties_all_join_and_a_refused_invitation_alarms_both_ends() {
    let dir = data_dir("five-channels");
    let relay = Relay::start(&dir.join("relay"));
    let homes = verified_homes(&dir, &["north", "south"], &relay.url);
    let (north, south) = (&homes[0], &homes[1]);
    // South's first sync stocks fresh key packages on its inbox relay.
    ok(south, &["sync"]);
    for n in 1..=5 {
        let name = format!("line-{n}");
        ok(
            north,
            &[
                "channel", "create", &name, "--with", "south", "--relay", &relay.url,
            ],
        );
        ok(north, &["sync"]);
        ok(south, &["sync"]);
        ok(north, &["send", &name, &format!("north on {name}")]);
        ok(south, &["sync"]);
        ok(south, &["send", &name, &format!("south on {name}")]);
        ok(north, &["sync"]);
        for home in [north, south] {
            let log = ok(home, &["log", &name, "--json"]);
            let texts: Vec<String> = log.lines().map(|l| field(l, "text").to_string()).collect();
            assert_eq!(
                texts,
                [
                    format!("\"north on {name}\""),
                    format!("\"south on {name}\"")
                ],
                "{}",
                home.display()
            );
        }
    }
    let list = ok(north, &["channel", "list"]);
    assert!(!list.contains("not joined"), "{list}");
    // Every channel opened with a package claimed from the relay: none of the card's.
    let used: i64 = rusqlite::Connection::open(north.join("device.db"))
        .unwrap()
        .query_row(
            "SELECT key_packages_used FROM contacts WHERE party = 'south'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(used, 0, "north fell back to south's card");

    // A mediator that verified north and south, whom north verified and south never
    // heard of.
    let mediator = dir.join("mediator");
    ok(
        &mediator,
        &["init", "--party", "mediator", "--relay", &relay.url],
    );
    for (party, home) in [("north", north), ("south", south)] {
        let fingerprint = field(&ok(home, &["id", "--json"]), "fingerprint");
        let card = dir.join(format!("{party}.card"));
        ok(
            &mediator,
            &[
                "card",
                "import",
                card.to_str().unwrap(),
                "--fingerprint",
                fingerprint.as_str().unwrap(),
            ],
        );
    }
    let card = dir.join("mediator.card");
    ok(
        &mediator,
        &["card", "export", "--out", card.to_str().unwrap()],
    );
    let fingerprint = field(&ok(&mediator, &["id", "--json"]), "fingerprint");
    ok(
        north,
        &[
            "card",
            "import",
            card.to_str().unwrap(),
            "--fingerprint",
            fingerprint.as_str().unwrap(),
        ],
    );
    ok(
        north,
        &[
            "channel",
            "create",
            "trilateral",
            "--with",
            "south",
            "--with",
            "mediator",
            "--relay",
            &relay.url,
        ],
    );
    ok(north, &["sync"]);
    ok(south, &["sync"]);
    ok(&mediator, &["sync"]);
    ok(north, &["sync"]);
    // South: an alarm (status exits 6) that says who invited it to what.
    let (code, status) = cli(south, &["status", "--json"]);
    assert_eq!(code, 6, "{status}");
    let alarms = field(&status, "alarms");
    let refused = alarms
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "invitation")
        .unwrap_or_else(|| panic!("no invitation alarm: {status}"));
    let detail = refused["detail"].as_str().unwrap();
    assert!(
        detail.contains("from north/") && detail.contains("\"trilateral\""),
        "{detail}"
    );
    // North: south invited, not joined (the mediator joined); alarmed after the
    // undelivered-after time.
    let listed = ok(north, &["channel", "list", "--json"]);
    let trilateral = listed
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|c| c["name"] == "trilateral")
        .unwrap();
    assert_eq!(trilateral["not_joined"], serde_json::json!(["south"]));
    let text = ok(north, &["status"]);
    assert!(
        text.lines().any(|l| l.starts_with("party")
            && l.contains("south")
            && l.contains("invited, not joined: trilateral")),
        "{text}"
    );
    std::thread::sleep(Duration::from_millis(1100));
    let (code, status) = cli(north, &["status", "--json", "--undelivered-after", "1s"]);
    assert_eq!(code, 6, "{status}");
    let alarms = field(&status, "alarms");
    assert!(
        alarms
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "not-joined"
                && a["party"] == "south"
                && a["detail"].as_str().unwrap().contains("trilateral")),
        "{status}"
    );
    assert!(
        !alarms
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "not-joined" && a["party"] == "mediator"),
        "{status}"
    );
    relay.stop();
}

/// Fetched messages as (sequence number, bytes).
fn pairs(stored: Vec<hotline_relay::storage::Stored>) -> Vec<(u64, Vec<u8>)> {
    stored
        .into_iter()
        .map(|stored| (stored.seq, stored.bytes))
        .collect()
}

/// The relay's metrics as text, read over its pinned TLS.
fn relay_metrics(url: &str) -> String {
    let (base, pin) = hotline_relay::tls::parse_url(url).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        reqwest::Client::builder()
            .tls_backend_preconfigured(hotline_relay::tls::client_config(pin).unwrap())
            .build()
            .unwrap()
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    })
}

fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// `hotline send` beside a running `hotline sync --follow` of the same home (real
/// processes) hands its push to the follower, which appends over the stream connection
/// it holds; with the follower stopped, `send` posts itself over the one-shot route.
#[test]
fn send_beside_a_follower_hands_it_the_push() {
    let dir = data_dir("hand-off");
    let relay = Relay::start(&dir.join("relay"));
    let homes = common::two_parties_in_crisis(&dir, &relay.url);
    let (north, south) = (&homes[0], &homes[1]);
    let streamed =
        |metrics: &str| metric(metrics, "hotline_relay_messages_stored_over_streams_total ");
    let follower = Follower::start(north);
    let socket = north.join(hotline_client::handoff::SOCKET);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = streamed(&relay_metrics(&relay.url));
    let sent = ok(north, &["send", "crisis", "handed over", "--json"]);
    assert_eq!(field(&sent, "by_follower"), true, "{sent}");
    assert_eq!(field(&sent, "relayed"), 1, "{sent}");
    // The relay stored it before the follower answered, over the stream.
    assert!(streamed(&relay_metrics(&relay.url)) > before);

    assert_eq!(follower.stop(), Some(0));
    assert!(!socket.exists(), "a stopped follower leaves no socket");
    let sent = ok(north, &["send", "crisis", "posted by send", "--json"]);
    assert_eq!(field(&sent, "by_follower"), false, "{sent}");
    assert_eq!(field(&sent, "relayed"), 1, "{sent}");

    ok(south, &["sync"]);
    let log = ok(south, &["log", "crisis", "--json"]);
    for text in ["handed over", "posted by send"] {
        assert!(log.contains(text), "{log}");
    }
}

/// A running follower appends what its device sends over the stream connection it
/// holds to the relay (no signed request per message), when woken as the console wakes
/// it; the relay (a real process) counts it as such, and the message arrives.
/// North and south, each with the other's card, and north's channel `crisis` with south
/// in it, on the relay at `url` (not yet synced).
fn stores_in_crisis(dir: &Path, url: &str) -> (hotline_client::Store, hotline_client::Store) {
    use hotline_client::Store;
    let urls = [url.to_owned()];
    let mut north = Store::init(&dir.join("north"), "north", "desk", &urls).unwrap();
    let mut south = Store::init(&dir.join("south"), "south", "desk", &urls).unwrap();
    north
        .import_card(&south.card().unwrap(), &south.identity().fingerprint())
        .unwrap();
    south
        .import_card(&north.card().unwrap(), &north.identity().fingerprint())
        .unwrap();
    north
        .create_channel("crisis", &["south".into()], &urls)
        .unwrap();
    (north, south)
}

#[test]
fn a_following_device_appends_over_its_stream_connection() {
    use hotline_client::Store;
    use hotline_client::sync::{FollowConfig, Wake, follow, sync_once};
    hotline_relay::tls::install_provider();
    let dir = data_dir("stream-appends");
    let relay = Relay::start(&dir.join("relay"));
    let (mut north, mut south) = stores_in_crisis(&dir, &relay.url);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(sync_once(&mut north)).unwrap();
    runtime.block_on(sync_once(&mut south)).unwrap();
    let streamed =
        |metrics: &str| metric(metrics, "hotline_relay_messages_stored_over_streams_total ");
    let before = relay_metrics(&relay.url);
    assert_eq!(streamed(&before), 0, "nobody followed yet: {before}");

    // North follows on a thread of its own (its own handle on its home), as the
    // console does, and is woken after each send.
    let wake = Wake::default();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let follower = {
        let (home, wake, stop) = (
            dir.join("north"),
            wake.clone(),
            std::sync::Arc::clone(&stop),
        );
        std::thread::spawn(move || {
            let mut store = Store::open(&home).unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // Short rounds: it sees `stop` soon.
            let config = FollowConfig {
                wake,
                round: Duration::from_millis(300),
                ..FollowConfig::default()
            };
            runtime
                .block_on(follow(&mut store, &config, |_| {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        std::ops::ControlFlow::Break(())
                    } else {
                        std::ops::ControlFlow::Continue(())
                    }
                }))
                .unwrap();
        })
    };
    north
        .send("crisis", hotline_core::Body::text("over the stream"), None)
        .unwrap();
    wake.ring();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let metrics = relay_metrics(&relay.url);
        if streamed(&metrics) > 0 {
            break metrics;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the follower appended nothing over its stream: {metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        metric(&metrics, "hotline_relay_messages_stored_total ")
            > metric(&before, "hotline_relay_messages_stored_total "),
        "{metrics}"
    );
    // Its own message comes back to it over the stream; it acknowledges over the
    // stream too (beside its loop, not in it).
    loop {
        let metrics = relay_metrics(&relay.url);
        if metric(
            &metrics,
            "hotline_relay_acknowledgements_over_streams_total ",
        ) > 0
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the follower acknowledged nothing over its stream: {metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Frames go over the stream as well: here the delivery receipt that north seals as
    // it commits south's message (south posts over the one-shot route).
    let streamed_before = streamed(&relay_metrics(&relay.url));
    let answer = south
        .send("crisis", hotline_core::Body::text("heard"), None)
        .unwrap();
    loop {
        runtime.block_on(sync_once(&mut south)).unwrap();
        let delivered = south.log("crisis").unwrap().iter().any(|entry| {
            entry.id == answer && entry.delivered_to.iter().any(|party| party == "north")
        });
        if delivered {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "north's delivery receipt never reached south"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = relay_metrics(&relay.url);
    assert!(
        streamed(&metrics) > streamed_before,
        "the delivery receipt was not posted over the stream: {metrics}"
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    wake.ring();
    follower.join().unwrap();
    runtime.block_on(sync_once(&mut south)).unwrap();
    let log = south.log("crisis").unwrap();
    assert!(
        log.iter().any(|entry| entry.text == "over the stream"),
        "{log:?}"
    );
}

/// A relay that refuses a device with 429 and `Retry-After` is left alone for as long
/// as it asked (at most five minutes): the next push does not ask it again, and says
/// why nothing went there.
#[test]
fn a_relay_that_asks_a_device_to_slow_down_is_left_alone_as_long_as_it_asked() {
    use hotline_client::sync::{Session, sync_once};
    hotline_relay::tls::install_provider();
    let dir = data_dir("retry-after");
    // One byte a second after a burst of 8 KiB: a few messages, then hours of waiting.
    let relay = Relay::start_with(
        &dir.join("relay"),
        "127.0.0.1:0",
        &["--bytes-per-second", "1", "--byte-burst", "8KiB"],
    );
    let (mut north, _south) = stores_in_crisis(&dir, &relay.url);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(sync_once(&mut north)).unwrap();
    let mut session = Session::new(&north).unwrap();
    let slowed = (0..20)
        .find_map(|_| {
            north
                .send("crisis", hotline_core::Body::text("x".repeat(1024)), None)
                .unwrap();
            let report = runtime.block_on(session.push(&mut north)).unwrap();
            report.relays[&relay.url]
                .clone()
                .filter(|error| error.contains("429"))
        })
        .expect("the relay never slowed north down");
    assert!(
        slowed.contains("slow-down") && slowed.contains("(retry after 300 s)"),
        "{slowed}"
    );
    let refusals = |metrics: &str| {
        metrics
            .lines()
            .find(|line| line.starts_with("hotline_relay_rejected_total{reason=\"slow-down\"}"))
            .and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = refusals(&relay_metrics(&relay.url));
    assert!(before >= 1);
    // Pushed again at once: nothing is asked of the relay, and the report says why.
    let report = runtime.block_on(session.push(&mut north)).unwrap();
    let error = report.relays[&relay.url].clone().unwrap_or_default();
    assert!(
        error.contains("asked this device to slow down") && error.contains("s more"),
        "{error}"
    );
    assert_eq!(refusals(&relay_metrics(&relay.url)), before);
}
