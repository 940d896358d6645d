//! Strangers against a real relay process: connections that never authenticate (a
//! request trickled a byte a second, or plain idle TCP) cannot take the members' slots
//! or slow them down, and a relay out of file descriptors pauses instead of spinning.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Relay, data_dir};
use hotline_core::DeviceIdentity;
use hotline_relay::client::RelayClient;
use hotline_relay::storage::Membership;
use hotline_relay::tls;
use rand::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

fn address_of(url: &str) -> (SocketAddr, [u8; 32]) {
    let (base, pin) = tls::parse_url(url).unwrap();
    (base.trim_start_matches("https://").parse().unwrap(), pin)
}

/// A TCP connection to `relay` from the loopback address `source`.
async fn connect_from(source: IpAddr, relay: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(relay).await
}

/// Until `stop`: a TLS connection from `source` that sends a request head announcing a
/// megabyte and then trickles its body a byte a second; opened again a second after
/// the relay closes it. Counts the connections it opened.
async fn trickler(
    source: IpAddr,
    relay: SocketAddr,
    pin: [u8; 32],
    opened: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls::client_config(pin).unwrap()));
    let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(relay.ip().into());
    while !stop.load(Ordering::Relaxed) {
        let attempt = async {
            let tcp = connect_from(source, relay).await?;
            let mut stream = connector.connect(name.clone(), tcp).await?;
            opened.fetch_add(1, Ordering::Relaxed);
            stream
                .write_all(
                    b"POST /v1/inbox/00 HTTP/1.1\r\nhost: relay\r\ncontent-length: 1048576\r\n\r\n",
                )
                .await?;
            while !stop.load(Ordering::Relaxed) {
                stream.write_all(b"x").await?;
                stream.flush().await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok::<(), std::io::Error>(())
        };
        let _ = attempt.await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Until `stop`: a plain TCP connection from `source` that says nothing; opened again
/// two seconds after the relay closes it.
async fn idler(source: IpAddr, relay: SocketAddr, opened: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut stream) = connect_from(source, relay).await {
            opened.fetch_add(1, Ordering::Relaxed);
            let mut byte = [0u8; 1];
            // Returns when the relay closes it (or the test ends).
            let _ = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut byte)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// One of the relay's `/metrics` values (a plain HTTP/1.1 GET over the pinned TLS).
async fn metric(url: &str, name: &str) -> f64 {
    let (relay, pin) = address_of(url);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls::client_config(pin).unwrap()));
    let name_of = tokio_rustls::rustls::pki_types::ServerName::IpAddress(relay.ip().into());
    let tcp = connect_from([127, 0, 0, 1].into(), relay).await.unwrap();
    let mut stream = connector.connect(name_of, tcp).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text).await;
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// 1,100 connections trickling a request (from 127.0.0.2) and 5,000 idle ones (from
/// 127.0.0.3), each opened again when the relay closes it, for the whole test: a
/// member (from 127.0.0.1) sends 300 messages meanwhile, each answered durably, p99
/// under one second; the relay held at most its pending budget of them and closed the
/// rest to make room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_holding_thousands_of_connections_do_not_slow_a_member() {
    tls::install_provider();
    // This process holds 6,100 sockets; the relay (a child) raises its own limit.
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap();
    assert!(
        limit >= 8_192,
        "the open-file hard limit is {limit}; this test needs 8,192"
    );
    let relay = Relay::start(&data_dir("strangers"));
    let (address, pin) = address_of(&relay.url);
    let north =
        DeviceIdentity::generate("north", "desk", &mut rand::rngs::StdRng::seed_from_u64(1))
            .unwrap();
    let channel = [7u8; 32];
    let client = RelayClient::new(&relay.url).unwrap();
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

    let stop = Arc::new(AtomicBool::new(false));
    let (trickling, idle) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut strangers = tokio::task::JoinSet::new();
    for _ in 0..1_100 {
        let (opened, stop) = (Arc::clone(&trickling), Arc::clone(&stop));
        strangers.spawn(trickler([127, 0, 0, 2].into(), address, pin, opened, stop));
    }
    for _ in 0..5_000 {
        let (opened, stop) = (Arc::clone(&idle), Arc::clone(&stop));
        strangers.spawn(idler([127, 0, 0, 3].into(), address, opened, stop));
    }
    // Every stranger has connected at least once.
    let deadline = Instant::now() + Duration::from_secs(60);
    while trickling.load(Ordering::Relaxed) < 1_100 || idle.load(Ordering::Relaxed) < 5_000 {
        assert!(
            Instant::now() < deadline,
            "strangers connected: {} trickling, {} idle",
            trickling.load(Ordering::Relaxed),
            idle.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // As a member's sync does: a post that fails to connect is tried again at once.
    let mut latencies = Vec::with_capacity(300);
    let mut retried = 0;
    for n in 0..300u32 {
        let started = Instant::now();
        loop {
            let post = client.post(&north, &channel, format!("message {n}").into_bytes());
            match tokio::time::timeout(Duration::from_secs(20), post).await {
                Ok(Ok(_)) => break,
                Ok(Err(error)) if started.elapsed() < Duration::from_secs(20) => {
                    eprintln!("message {n}: {error}; again");
                    retried += 1;
                }
                other => panic!("message {n} not stored: {other:?}"),
            }
        }
        latencies.push(started.elapsed());
    }
    assert!(retried <= 3, "{retried} posts had to be tried again");
    latencies.sort();
    let p50 = latencies[150];
    let p99 = latencies[297];
    eprintln!(
        "member's sends under {} + {} strangers' connections: p50 {p50:?}, p99 {p99:?}",
        trickling.load(Ordering::Relaxed),
        idle.load(Ordering::Relaxed)
    );
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    let pending = metric(&relay.url, "hotline_relay_pending_connections").await;
    let evicted = metric(&relay.url, "hotline_relay_evicted_connections_total").await;
    assert!(pending <= 256.0, "pending {pending}");
    assert!(evicted >= 5_000.0, "evicted {evicted}");
    stop.store(true, Ordering::Relaxed);
    strangers.abort_all();
    let mut stored = 0;
    let mut after = 0;
    loop {
        let page = client
            .fetch(&north, &channel, after, Duration::ZERO)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        stored += page.len();
    }
    assert_eq!(stored, 300);
}

/// CPU time a process used so far, in clock ticks (utime + stime of /proc/PID/stat).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after ") ".
    let fields: Vec<&str> = stat[stat.rfind(") ").unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A relay started under a hard limit of 128 open files, flooded with 400 idle
/// connections: it runs out of descriptors, pauses its accepts (saying so once, on
/// stderr) instead of spinning a core, and serves a member again once the strangers'
/// connections were closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_out_of_file_descriptors_pauses_instead_of_spinning() {
    tls::install_provider();
    let data = data_dir("emfile");
    std::fs::create_dir_all(&data).unwrap();
    let log = data.join("stderr");
    let mut command = Command::new("sh");
    command.arg("-c").arg(format!(
        "ulimit -n 128 && exec '{}' relay serve --data '{}' --listen 127.0.0.1:0 2>'{}'",
        assert_cmd::cargo::cargo_bin("hotline").display(),
        data.display(),
        log.display()
    ));
    let relay = Relay::spawn(command);
    let started = Instant::now();
    let (address, _) = address_of(&relay.url);
    let mut held = Vec::new();
    for n in 0..400usize {
        // Once the kernel's queue for the relay is full, connecting waits: enough.
        // From several addresses: one address's share of the pending budget (64) is
        // below the relay's 128 descriptors, and its oldest are closed at once.
        let connect = connect_from([127, 0, 0, 3 + (n % 6) as u8].into(), address);
        match tokio::time::timeout(Duration::from_millis(500), connect).await {
            Ok(Ok(stream)) => held.push(stream),
            _ => break,
        }
    }
    assert!(held.len() > 128, "only {} connections", held.len());
    let pid = relay.child.id();
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_ticks(pid) - before;
    // A spinning accept loop burns a core: 300 ticks in 3 s.
    assert!(
        used < 60,
        "the relay used {used} ticks of CPU in 3 s while out of descriptors"
    );
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("cannot accept connections"), "{said}");
    // Said once, then at most every ten seconds.
    let most = 1 + started.elapsed().as_secs() as usize / 10;
    assert!(
        said.lines().filter(|l| l.contains("cannot accept")).count() <= most,
        "{said}"
    );
    drop(held);
    // Served again: the strangers' connections are gone.
    let north =
        DeviceIdentity::generate("north", "desk", &mut rand::rngs::StdRng::seed_from_u64(2))
            .unwrap();
    let client = RelayClient::new(&relay.url).unwrap();
    let served = tokio::time::timeout(
        Duration::from_secs(15),
        client.register(
            &north,
            &[9u8; 32],
            &Membership {
                committer: north.key().0,
                version: 1,
                members: vec![north.key().0],
            },
        ),
    )
    .await;
    assert!(matches!(served, Ok(Ok(()))), "{served:?}");
}

/// The relay's log (`--log-level debug`, stderr): start and stop, and a stranger's
/// refused request with its reason and source address, never the bytes it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_logged_with_its_reason_and_source_and_never_the_bytes() {
    tls::install_provider();
    let data = data_dir("log");
    std::fs::create_dir_all(&data).unwrap();
    let log = data.join("stderr");
    let mut command = Command::new(assert_cmd::cargo::cargo_bin("hotline"));
    command
        .args([
            "relay",
            "serve",
            "--log-level",
            "debug",
            "--listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(&data)
        .stderr(std::fs::File::create(&log).unwrap());
    let relay = Relay::spawn(command);
    let (address, pin) = address_of(&relay.url);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls::client_config(pin).unwrap()));
    let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(address.ip().into());
    let tcp = connect_from([127, 0, 0, 2].into(), address).await.unwrap();
    let mut stream = connector.connect(name, tcp).await.unwrap();
    let body = "SECRET-BODY-BYTES";
    stream
        .write_all(
            format!(
                "POST /v1/channels/{}/messages HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\
                 content-length: {}\r\n\r\n{body}",
                "ab".repeat(32),
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    relay.stop();
    let said = std::fs::read_to_string(&log).unwrap();
    let refusal = said
        .lines()
        .find(|l| l.contains("refused"))
        .unwrap_or_else(|| panic!("no refusal logged: {said}"));
    assert!(
        refusal.contains("unauthenticated") && refusal.contains("source=127.0.0.2"),
        "{refusal}"
    );
    assert!(!said.contains(body), "{said}");
    assert!(
        said.contains("relay listening") && said.contains("relay stopped"),
        "{said}"
    );
}

/// A relay whose operator named the committers it serves registers channels of those
/// only: anyone else's channel is refused (403) before a byte of it is stored, and the
/// named committer's channel works as on any relay.
#[test]
fn a_relay_registers_channels_of_the_named_committers_only() {
    use common::{cli, field, ok, verified_homes};
    let dir = data_dir("committers");
    let open = Relay::start(&dir.join("open"));
    let homes = verified_homes(&dir, &["north", "south"], &open.url);
    let (north, south) = (&homes[0], &homes[1]);
    let north_key = field(&ok(north, &["id", "--json"]), "key");
    let guarded = Relay::start_with(
        &dir.join("guarded"),
        "127.0.0.1:0",
        &["--committers", north_key.as_str().unwrap()],
    );
    let (code, _) = cli(
        south,
        &[
            "channel",
            "create",
            "theirs",
            "--with",
            "north",
            "--relay",
            &guarded.url,
        ],
    );
    assert_eq!(
        code, 0,
        "the channel is made here; the relay is what refuses it"
    );
    ok(south, &["sync"]);
    let (code, status) = cli(south, &["status", "--json"]);
    assert_ne!(code, 0, "the line is down and an alarm open: {status}");
    let alarms = field(&status, "alarms");
    let refused: Vec<_> = alarms
        .as_array()
        .unwrap()
        .iter()
        .filter(|alarm| alarm["kind"] == "refused")
        .collect();
    assert_eq!(
        refused.len(),
        1,
        "raised once, whatever the rounds: {alarms}"
    );
    assert!(
        refused[0]["detail"]
            .as_str()
            .unwrap()
            .contains("committers")
    );
    ok(
        north,
        &[
            "channel",
            "create",
            "crisis",
            "--with",
            "south",
            "--relay",
            &guarded.url,
        ],
    );
    ok(south, &["sync"]);
    ok(north, &["send", "crisis", "through the guarded relay"]);
    ok(south, &["sync"]);
    assert!(ok(south, &["log", "crisis"]).contains("through the guarded relay"));
    std::fs::remove_dir_all(&dir).unwrap();
}
