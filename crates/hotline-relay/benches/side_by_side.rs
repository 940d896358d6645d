//! Durable ingest side by side, in one run, at 1, 16 and 64 concurrent senders with
//! 1 KiB messages, each sender with one message in flight (as redis-benchmark's
//! clients): the disk's group-commit limit, Redis `XADD` with `appendfsync always`
//! (plain and over TLS, a redis-server of its own started by this bench), and
//! hotline's relay over the stream protocol (authenticated once per connection) and
//! over the one-shot HTTP route (one signed request per message). Every figure is
//! durable before it is answered (fsync; Redis fsyncs its append-only file before
//! replying with `appendfsync always`), except NATS JetStream's: a nats-server of this
//! bench's own (file storage, plain and TLS) publishing with an acknowledgement, which
//! the server sends once the message is written to its file, not synced (it syncs every
//! two minutes; `sync_interval: always` does not exist before nats-server 2.10, and the
//! bench says which version ran). Its column is there to compare speed, not durability.
//!
//! hotline's stream column is measured twice: from a load generator that, as
//! redis-benchmark does, reads each answer and checks nothing in it (what the relay
//! can carry: on separate machines the senders' work is not the relay's), and from
//! devices that check each answer's custody receipt (a signature verification per
//! message) in this process, on the relay's two cores.
//!
//! `cargo bench -p hotline-relay --bench side_by_side` (`HOTLINE_BENCH_MESSAGES`
//! messages per run, default 4000; `HOTLINE_BENCH_SENDERS`, default `1,16,64`). Redis is skipped, saying so, when `redis-server`
//! or `redis-benchmark` is not on the PATH; NATS when `nats-server` is not.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotline_core::DeviceIdentity;
use hotline_proto::stream::StreamClient;
use hotline_relay::client::RelayClient;
use hotline_relay::server::{self, Limits};
use hotline_relay::storage::SqliteStorage;

/// A redis-server of this bench's own: append-only file fsynced on every write, on a
/// plain port and a TLS port. Stopped when dropped.
struct Redis {
    child: Child,
    port: u16,
    tls_port: u16,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_redis(dir: &std::path::Path) -> Option<Redis> {
    let found = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !found("redis-server") || !found("redis-benchmark") {
        println!("(redis-server or redis-benchmark not found: the Redis baseline is skipped)");
        return None;
    }
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.join("redis-cert.pem"), dir.join("redis-key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let (port, tls_port) = (free_port(), free_port());
    let data = dir.join("redis");
    std::fs::create_dir_all(&data).unwrap();
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--tls-port", &tls_port.to_string()])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-ca-cert-file")
        .arg(&cert)
        .args(["--tls-auth-clients", "no"])
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let redis = Redis {
        child,
        port,
        tls_port,
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(redis);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("(redis-server did not start: the Redis baseline is skipped)");
    None
}

/// `XADD` of a 1 KiB field by `clients` redis-benchmark clients: requests/s, p50 and
/// p99 in ms.
fn redis_xadd(redis: &Redis, tls: bool, clients: usize, total: usize) -> Option<(f64, f64, f64)> {
    let value = "x".repeat(1024);
    let mut command = Command::new("redis-benchmark");
    command.args(["-h", "127.0.0.1", "--csv"]);
    if tls {
        command.args(["-p", &redis.tls_port.to_string(), "--tls", "--insecure"]);
    } else {
        command.args(["-p", &redis.port.to_string()]);
    }
    command
        .args(["-c", &clients.to_string(), "-n", &total.to_string()])
        .args(["XADD", "hotline-bench", "*", "f", &value]);
    let output = command.output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let line = text.lines().find(|l| l.starts_with("\"XADD"))?;
    let fields: Vec<f64> = line
        .split("\",\"")
        .skip(1)
        .map(|f| f.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    Some((*fields.first()?, *fields.get(3)?, *fields.get(5)?))
}

/// One relay, one channel with `senders` member devices; returns the relay, its
/// address, the devices and the channel.
async fn relay_with_channel(
    data: &std::path::Path,
    senders: usize,
) -> (server::Running, String, Vec<Arc<DeviceIdentity>>, [u8; 32]) {
    std::fs::create_dir_all(data).unwrap();
    let limits = Limits {
        rate_per_second: 1e9,
        rate_burst: 1e9,
        sender_bytes_per_second: 1e12,
        sender_burst_bytes: 1e12,
        ..Limits::default()
    };
    let storage = SqliteStorage::open(&data.join("relay.db"), limits.quotas()).unwrap();
    let (running, url) = server::serve_from(data, "127.0.0.1:0".parse().unwrap(), storage, limits)
        .await
        .unwrap();
    let (identities, channel) = common::senders_on_channel(&url, senders).await;
    (running, url, identities, channel)
}

/// How the senders reach the relay.
#[derive(Clone, Copy)]
enum How {
    /// The stream protocol, from a load generator that, as redis-benchmark, reads each
    /// answer and checks nothing in it: what the relay can carry.
    Load,
    /// The stream protocol, from devices (`StreamClient::append`), each checking its
    /// custody receipt in this process, on the relay's cores.
    Devices,
    /// One signed HTTPS request per message (`RelayClient::post`), receipts checked.
    OneShot,
}

/// One sender's way in.
enum Sender {
    Load(Box<load::Connection>),
    Device(StreamClient),
    OneShot(RelayClient, Arc<DeviceIdentity>),
}

impl Sender {
    async fn append(&mut self, channel: &[u8; 32], message: Vec<u8>) {
        match self {
            Sender::Load(connection) => {
                connection.append(channel, message).await;
            }
            Sender::Device(stream) => {
                stream.append(channel, message).await.unwrap();
            }
            Sender::OneShot(http, identity) => {
                http.post(identity, channel, message).await.unwrap();
            }
        }
    }
}

/// Messages/s, p50 and p99 in ms, of `senders` devices sending `total` messages
/// between them, one in flight each, as `how` says.
async fn hotline(
    data: &std::path::Path,
    senders: usize,
    total: usize,
    how: How,
) -> (f64, f64, f64) {
    let (running, url, identities, channel) = relay_with_channel(data, senders).await;
    let per_sender = total / senders;
    // Connections first (authenticated once each), then the clock.
    let mut ways = Vec::new();
    for identity in identities {
        ways.push(match how {
            How::Load => Sender::Load(Box::new(load::Connection::open(&url, &identity).await)),
            How::Devices => Sender::Device(StreamClient::connect(&url, &identity).await.unwrap()),
            How::OneShot => Sender::OneShot(RelayClient::new(&url).unwrap(), identity),
        });
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (n, mut way) in ways.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_sender);
            for m in 0..per_sender {
                let sent = Instant::now();
                way.append(&channel, common::payload(n, m)).await;
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut latencies: Vec<Duration> = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let rate = latencies.len() as f64 / start.elapsed().as_secs_f64();
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (p50, p99) = (
        ms(latencies[latencies.len() / 2]),
        ms(latencies[latencies.len() * 99 / 100]),
    );
    running.shutdown().await;
    (rate, p50, p99)
}

fn main() {
    let (total, dir, runtime) = common::setup("sbs", 4000);
    let redis = start_redis(&dir);
    let nats = nats::start(&dir);

    println!(
        "1 KiB messages, durable before the answer, one in flight per sender; msg/s (p50 / p99 ms)"
    );
    println!();
    println!(
        "| senders | disk group-commit limit | Redis XADD, fsync always | Redis XADD, fsync always, TLS | NATS JetStream file, not synced | NATS JetStream file, not synced, TLS | hotline stream, load generator (TLS) | hotline stream, devices checking receipts (TLS) | hotline one-shot HTTPS | load generator ÷ Redis TLS | devices ÷ Redis TLS |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let counts: Vec<usize> = std::env::var("HOTLINE_BENCH_SENDERS")
        .ok()
        .map(|counts| {
            counts
                .split(',')
                .filter_map(|n| n.trim().parse().ok())
                .collect()
        })
        .unwrap_or_else(|| vec![1, 16, 64]);
    for senders in counts {
        let total = total.max(senders * 20);
        let limit = common::group_commit_limit(&dir, senders, total);
        let cell = |figure: Option<(f64, f64, f64)>| match figure {
            Some((rate, p50, p99)) => format!("{rate:.0} ({p50:.2} / {p99:.2})"),
            None => "-".to_owned(),
        };
        let plain = redis
            .as_ref()
            .and_then(|r| redis_xadd(r, false, senders, total));
        let over_tls = redis
            .as_ref()
            .and_then(|r| redis_xadd(r, true, senders, total));
        let (nats_plain, nats_tls) = match &nats {
            Some(server) => (
                runtime.block_on(nats::publish(server, false, senders, total)),
                runtime.block_on(nats::publish(server, true, senders, total)),
            ),
            None => (None, None),
        };
        let run = |name: &str, how: How| {
            runtime.block_on(hotline(
                &dir.join(format!("{name}-{senders}")),
                senders,
                total,
                how,
            ))
        };
        let (load, devices, oneshot) = (
            run("load", How::Load),
            run("devices", How::Devices),
            run("oneshot", How::OneShot),
        );
        let ratio = |hotline: (f64, f64, f64)| {
            over_tls.map_or("-".to_owned(), |(redis, ..)| {
                format!("{:.2}×", hotline.0 / redis)
            })
        };
        println!(
            "| {senders} | {limit:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(plain),
            cell(over_tls),
            cell(nats_plain),
            cell(nats_tls),
            cell(Some(load)),
            cell(Some(devices)),
            cell(Some(oneshot)),
            ratio(load),
            ratio(devices),
        );
    }
    drop(redis);
    if let Some(server) = &nats {
        println!();
        println!(
            "({}; JetStream file storage, acknowledged before fsync)",
            server.version
        );
    }
    drop(nats);
    let _ = std::fs::remove_dir_all(&dir);
}

/// NATS JetStream as a baseline: a nats-server of the bench's own, and publishers that
/// speak the NATS client protocol themselves (text lines over TCP, TLS after the
/// server's INFO), each with one publication in flight awaiting JetStream's
/// acknowledgement on its own reply subject.
mod nats {
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use tokio::io::{
        AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
    };

    pub struct Server {
        child: Child,
        port: u16,
        pin: [u8; 32],
        pub version: String,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Starts nats-server with JetStream on a fresh store and TLS on its port (TLS
    /// optional for clients: `allow_non_tls`), then creates the stream `BENCH` (file
    /// storage, one replica) for subjects `bench.>`.
    pub fn start(dir: &std::path::Path) -> Option<Server> {
        let version = Command::new("nats-server")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        let Some(version) = version else {
            println!("(nats-server not found: the NATS baseline is skipped)");
            return None;
        };
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.join("nats-cert.pem"), dir.join("nats-key.pem"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        let pin = hotline_proto::tls::pin_of(certified.cert.der());
        let port = super::free_port();
        let store = dir.join("nats");
        let config = dir.join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\nallow_non_tls: true\n\
                 tls {{\n  cert_file: {cert:?}\n  key_file: {key:?}\n}}\n\
                 jetstream {{\n  store_dir: {store:?}\n}}\n"
            ),
        )
        .unwrap();
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let server = Server {
            child,
            port,
            pin,
            version,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                let created = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(create_stream(&server));
                return match created {
                    Ok(()) => Some(server),
                    Err(error) => {
                        println!(
                            "(NATS stream not created: {error}; the NATS baseline is skipped)"
                        );
                        None
                    }
                };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("(nats-server did not start: the NATS baseline is skipped)");
        None
    }

    trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

    /// A client connection: subscribed to its own reply subject.
    struct Client {
        io: BufReader<Box<dyn Io>>,
        inbox: String,
    }

    impl Client {
        async fn connect(server: &Server, tls: bool, name: usize) -> Result<Self, String> {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
                .await
                .map_err(|e| e.to_string())?;
            tcp.set_nodelay(true).map_err(|e| e.to_string())?;
            // The server speaks first, in the clear: INFO.
            let mut plain = BufReader::new(tcp);
            let mut info = String::new();
            plain
                .read_line(&mut info)
                .await
                .map_err(|e| e.to_string())?;
            if !info.starts_with("INFO ") {
                return Err(format!("expected INFO, got {info:?}"));
            }
            let io: Box<dyn Io> = if tls {
                let config =
                    hotline_proto::tls::client_config(server.pin).map_err(|e| e.to_string())?;
                let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                Box::new(
                    connector
                        .connect(name, plain.into_inner())
                        .await
                        .map_err(|e| e.to_string())?,
                )
            } else {
                Box::new(plain.into_inner())
            };
            let inbox = format!("_INBOX.bench.{name}");
            let mut client = Self {
                io: BufReader::new(io),
                inbox,
            };
            let hello = format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false,\"tls_required\":{tls},\"protocol\":1}}\r\nSUB {} 1\r\nPING\r\n",
                client.inbox
            );
            client.write(hello.as_bytes()).await?;
            // PONG: the server took CONNECT and SUB.
            loop {
                let line = client.line().await?;
                if line == "PONG" {
                    return Ok(client);
                }
                if line.starts_with("-ERR") {
                    return Err(line);
                }
            }
        }

        async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
            let io = self.io.get_mut();
            io.write_all(bytes).await.map_err(|e| e.to_string())?;
            io.flush().await.map_err(|e| e.to_string())
        }

        async fn line(&mut self) -> Result<String, String> {
            let mut line = String::new();
            if self
                .io
                .read_line(&mut line)
                .await
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err("connection closed".into());
            }
            Ok(line.trim_end().to_owned())
        }

        /// Publishes `payload` to `subject` and returns the reply (JetStream's
        /// acknowledgement), answering the server's PINGs meanwhile.
        async fn request(&mut self, subject: &str, payload: &[u8]) -> Result<Vec<u8>, String> {
            let mut frame =
                format!("PUB {subject} {} {}\r\n", self.inbox, payload.len()).into_bytes();
            frame.extend_from_slice(payload);
            frame.extend_from_slice(b"\r\n");
            self.write(&frame).await?;
            loop {
                let line = self.line().await?;
                if line == "PING" {
                    self.write(b"PONG\r\n").await?;
                    continue;
                }
                if line.starts_with("-ERR") {
                    return Err(line);
                }
                let Some(header) = line.strip_prefix("MSG ") else {
                    continue;
                };
                let len: usize = header
                    .split(' ')
                    .next_back()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| format!("bad MSG line {line:?}"))?;
                let mut body = vec![0u8; len + 2];
                self.io
                    .read_exact(&mut body)
                    .await
                    .map_err(|e| e.to_string())?;
                body.truncate(len);
                return Ok(body);
            }
        }
    }

    async fn create_stream(server: &Server) -> Result<(), String> {
        let mut client = Client::connect(server, false, usize::MAX).await?;
        let config = br#"{"name":"BENCH","subjects":["bench.>"],"storage":"file","num_replicas":1,"retention":"limits","discard":"old"}"#;
        let answer = client
            .request("$JS.API.STREAM.CREATE.BENCH", config)
            .await?;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        if answer.contains("\"error\"") {
            return Err(answer);
        }
        Ok(())
    }

    /// Messages/s, p50 and p99 in ms of `senders` publishers sending `total` 1 KiB
    /// messages between them, one acknowledged publication in flight each.
    pub async fn publish(
        server: &Server,
        tls: bool,
        senders: usize,
        total: usize,
    ) -> Option<(f64, f64, f64)> {
        let per_sender = total / senders;
        let mut clients = Vec::new();
        for n in 0..senders {
            match Client::connect(server, tls, n).await {
                Ok(client) => clients.push(client),
                Err(error) => {
                    println!("(NATS publisher {n} could not connect: {error})");
                    return None;
                }
            }
        }
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (n, mut client) in clients.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                let subject = format!("bench.{n}");
                let mut latencies = Vec::with_capacity(per_sender);
                for m in 0..per_sender {
                    let sent = Instant::now();
                    let ack = client
                        .request(&subject, &super::common::payload(n, m))
                        .await?;
                    if !ack.starts_with(br#"{"stream":"BENCH""#) {
                        return Err(format!(
                            "not acknowledged: {}",
                            String::from_utf8_lossy(&ack)
                        ));
                    }
                    latencies.push(sent.elapsed());
                }
                Ok::<_, String>(latencies)
            }));
        }
        let mut latencies: Vec<Duration> = Vec::new();
        for task in tasks {
            match task.await {
                Ok(Ok(more)) => latencies.extend(more),
                Ok(Err(error)) => {
                    println!("(NATS publishing failed: {error})");
                    return None;
                }
                Err(error) => {
                    println!("(NATS publisher failed: {error})");
                    return None;
                }
            }
        }
        let rate = latencies.len() as f64 / start.elapsed().as_secs_f64();
        latencies.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Some((
            rate,
            ms(latencies[latencies.len() / 2]),
            ms(latencies[latencies.len() * 99 / 100]),
        ))
    }
}

/// A load generator for the stream protocol, as redis-benchmark is one for Redis: it
/// authenticates once per connection (the relay's pin checked, the Hello signed), then
/// writes one Append at a time and reads its answer, parsed but not checked.
mod load {
    use hotline_core::DeviceIdentity;
    use hotline_proto::stream::{self, Frame};
    use tokio::io::{AsyncWriteExt, BufReader};
    use tokio::net::TcpStream;
    use tokio_rustls::client::TlsStream;

    pub struct Connection {
        tls: BufReader<TlsStream<TcpStream>>,
        next: u64,
    }

    impl Connection {
        pub async fn open(url: &str, identity: &DeviceIdentity) -> Self {
            let stream::Opened { tls, exporter, .. } = stream::open(url).await.unwrap();
            let mut connection = Self {
                tls: BufReader::with_capacity(stream::BUFFER, tls),
                next: 1,
            };
            let Some(Frame::Challenge { nonce }) = connection.frame().await else {
                panic!("no challenge");
            };
            connection
                .send(Frame::Hello {
                    device: identity.key().0,
                    signature: identity.sign(&stream::hello_message(&nonce, &exporter)),
                })
                .await;
            assert!(matches!(connection.frame().await, Some(Frame::Ready)));
            connection
        }

        async fn frame(&mut self) -> Option<Frame> {
            stream::read_frame(&mut self.tls, stream::MAX_FRAME)
                .await
                .unwrap()
        }

        async fn send(&mut self, frame: Frame) {
            self.tls.write_all(&frame.encode()).await.unwrap();
            self.tls.flush().await.unwrap();
        }

        /// Appends and waits for the answer: the message's sequence number.
        pub async fn append(&mut self, channel: &[u8; 32], message: Vec<u8>) -> u64 {
            let id = self.next;
            self.next += 1;
            self.send(Frame::Append {
                id,
                channel: *channel,
                message,
            })
            .await;
            loop {
                match self.frame().await {
                    Some(Frame::Appended {
                        id: answered, seq, ..
                    }) if answered == id => {
                        return seq;
                    }
                    Some(Frame::Pong) => {}
                    other => panic!("unexpected answer {other:?}"),
                }
            }
        }
    }
}
