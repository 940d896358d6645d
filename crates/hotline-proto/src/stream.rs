//! The stream protocol (`hotline-stream/1`): one TLS connection, authenticated once,
//! then messages both ways without a signature or an HTTP request each.
//!
//! A device selects it with ALPN `hotline-stream/1` on the relay's usual port (the
//! one-shot HTTP routes answer on the same port, ALPN `http/1.1` or none). Then, in
//! frames of `u32 length | u8 kind | body` (big-endian, the length counting kind and
//! body, at most [`MAX_FRAME`]):
//!
//! ```text
//!   relay  ─► Challenge  [32] nonce
//!   device ─► Hello      [32] device key, [64] Ed25519 signature over
//!                        "hotline-stream-v1" || nonce || TLS exporter (32 bytes,
//!                        label "EXPORTER-hotline-stream-v1", no context)
//!   relay  ─► Ready                        (or Refused with id 0, then closes)
//!   device ─► Append     u64 id, [32] channel, bytes message
//!   relay  ─► Appended   u64 id, u64 seq, u8 duplicate, bytes receipt
//!                        (after the commit's fsync; the receipt is empty for none)
//!   device ─► Subscribe  u64 id, [32] channel, u64 after
//!   relay  ─► Message    u64 id, [32] channel, u64 seq, bytes message, bytes receipt
//!                        (pushed as they commit; the id of the subscription that
//!                        pushed it)
//!   device ─► Ack        u64 id, [32] channel, u64 seq
//!   relay  ─► Acked      u64 id, u64 deleted
//!   relay  ─► Refused    u64 id, u16 status, string code, string detail
//!   device ─► Ping                         (every 30 s)
//!   relay  ─► Pong
//! ```
//!
//! The signature binds the proof of the device's key to this TLS session (the exporter
//! differs on every connection), so it cannot be replayed on another; the relay's
//! nonce makes it fresh. Appends may be pipelined: the relay commits those waiting
//! together and answers each by its id, in any order. A subscription pushes the
//! channel's messages after `after`, in order, as they are stored: at most
//! [`WINDOW`] messages (or [`WINDOW_BYTES`]), then it waits for the device to
//! subscribe again after the last one it took (flow control: a device reading slowly
//! holds at most a window; a relay that pushes more is dropped). A `Refused` with the
//! subscription's id ends it (not a member, a limit, a storage error). A device pings
//! every [`PING_INTERVAL`] and the relay answers; either side closes a connection it
//! has heard nothing on for [`IDLE_TIMEOUT`] (a silently dead connection is noticed,
//! and an idle one does not hold a relay's slot). The
//! relay applies the same membership checks, rate limits and quotas as on the HTTP
//! routes, and answers a request it cannot take (a malformed frame, a limit) with
//! `Refused`; a frame it cannot parse at all closes the connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hotline_core::codec::{DecodeError, Reader, Writer};
use hotline_core::{DeviceIdentity, DeviceKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use crate::client::ClientError;
use crate::tls;
use crate::{Log, Stored};

/// The ALPN name of the stream protocol.
pub const ALPN: &[u8] = b"hotline-stream/1";
/// The TLS exporter label the authentication signs.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-hotline-stream-v1";
/// Largest frame: a message of the relay's largest size, its receipt, and room for its
/// header.
pub const MAX_FRAME: usize = crate::limits::MAX_MESSAGE + crate::custody::MAX_RECEIPT + 1024;

/// Most messages a subscription pushes before the device subscribes again.
pub const WINDOW: usize = 64;
/// Most bytes of messages a subscription pushes before the device subscribes again
/// (at least one message is pushed, whatever its size).
pub const WINDOW_BYTES: usize = 4 << 20;

/// A device's read buffer (the relay reads from TLS's own buffer: an idle connection
/// holds none of its own).
pub const BUFFER: usize = 8 * 1024;

/// How often a device pings the relay.
pub const PING_INTERVAL: Duration = Duration::from_secs(30);
/// Silence after which either side closes the connection.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

const SIGNATURE_CONTEXT: &[u8] = b"hotline-stream-v1";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Frames waiting to be written on one connection.
const QUEUE: usize = 1024;

/// What the device signs to authenticate a connection.
pub fn hello_message(nonce: &[u8; 32], exporter: &[u8; 32]) -> Vec<u8> {
    [SIGNATURE_CONTEXT, nonce, exporter].concat()
}

/// Whether `signature` by `device` authenticates the connection whose nonce and
/// exporter are given (the relay's check of a Hello).
pub fn check_hello(
    device: &[u8; 32],
    signature: &[u8; 64],
    nonce: &[u8; 32],
    exporter: &[u8; 32],
) -> bool {
    DeviceKey(*device)
        .verify(&hello_message(nonce, exporter), signature)
        .is_ok()
}

/// One frame of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Challenge {
        nonce: [u8; 32],
    },
    Hello {
        device: [u8; 32],
        signature: [u8; 64],
    },
    Ready,
    Append {
        id: u64,
        channel: [u8; 32],
        message: Vec<u8>,
    },
    Appended {
        id: u64,
        seq: u64,
        duplicate: bool,
        receipt: Option<Vec<u8>>,
    },
    Subscribe {
        id: u64,
        channel: [u8; 32],
        after: u64,
    },
    Message {
        id: u64,
        channel: [u8; 32],
        seq: u64,
        message: Vec<u8>,
        receipt: Option<Vec<u8>>,
    },
    Ack {
        id: u64,
        channel: [u8; 32],
        seq: u64,
    },
    Acked {
        id: u64,
        deleted: u64,
    },
    Refused {
        id: u64,
        status: u16,
        code: String,
        detail: String,
    },
    Ping,
    Pong,
}

impl Frame {
    /// The frame with its length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = Writer::new();
        writer.u32(0);
        match self {
            Frame::Challenge { nonce } => {
                writer.u8(1);
                writer.fixed(nonce);
            }
            Frame::Hello { device, signature } => {
                writer.u8(2);
                writer.fixed(device);
                writer.fixed(signature);
            }
            Frame::Ready => writer.u8(3),
            Frame::Append {
                id,
                channel,
                message,
            } => {
                writer.u8(4);
                writer.u64(*id);
                writer.fixed(channel);
                writer.bytes(message);
            }
            Frame::Appended {
                id,
                seq,
                duplicate,
                receipt,
            } => {
                writer.u8(5);
                writer.u64(*id);
                writer.u64(*seq);
                writer.u8(u8::from(*duplicate));
                writer.bytes(receipt.as_deref().unwrap_or_default());
            }
            Frame::Subscribe { id, channel, after } => {
                writer.u8(7);
                writer.u64(*id);
                writer.fixed(channel);
                writer.u64(*after);
            }
            Frame::Message {
                id,
                channel,
                seq,
                message,
                receipt,
            } => {
                writer.u8(8);
                writer.u64(*id);
                writer.fixed(channel);
                writer.u64(*seq);
                writer.bytes(message);
                writer.bytes(receipt.as_deref().unwrap_or_default());
            }
            Frame::Ack { id, channel, seq } => {
                writer.u8(9);
                writer.u64(*id);
                writer.fixed(channel);
                writer.u64(*seq);
            }
            Frame::Acked { id, deleted } => {
                writer.u8(10);
                writer.u64(*id);
                writer.u64(*deleted);
            }
            Frame::Refused {
                id,
                status,
                code,
                detail,
            } => {
                writer.u8(6);
                writer.u64(*id);
                writer.u16(*status);
                writer.string(code);
                writer.string(detail);
            }
            Frame::Ping => writer.u8(11),
            Frame::Pong => writer.u8(12),
        }
        let len = writer.as_bytes().len() - 4;
        writer.patch_u32(0, len as u32);
        writer.into_bytes()
    }

    /// A frame's kind and body (without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(body);
        let frame = match reader.u8("frame kind")? {
            1 => Frame::Challenge {
                nonce: reader.array("nonce")?,
            },
            2 => Frame::Hello {
                device: reader.array("device")?,
                signature: reader.array("signature")?,
            },
            3 => Frame::Ready,
            4 => Frame::Append {
                id: reader.u64("id")?,
                channel: reader.array("channel")?,
                message: reader.bytes("message", MAX_FRAME)?.to_vec(),
            },
            5 => Frame::Appended {
                id: reader.u64("id")?,
                seq: reader.u64("seq")?,
                duplicate: reader.flag("duplicate")?,
                receipt: receipt(&mut reader)?,
            },
            6 => Frame::Refused {
                id: reader.u64("id")?,
                status: reader.u16("status")?,
                code: reader.string("code", 64)?,
                detail: reader.string("detail", 1024)?,
            },
            7 => Frame::Subscribe {
                id: reader.u64("id")?,
                channel: reader.array("channel")?,
                after: reader.u64("after")?,
            },
            8 => Frame::Message {
                id: reader.u64("id")?,
                channel: reader.array("channel")?,
                seq: reader.u64("seq")?,
                message: reader.bytes("message", MAX_FRAME)?.to_vec(),
                receipt: receipt(&mut reader)?,
            },
            9 => Frame::Ack {
                id: reader.u64("id")?,
                channel: reader.array("channel")?,
                seq: reader.u64("seq")?,
            },
            10 => Frame::Acked {
                id: reader.u64("id")?,
                deleted: reader.u64("deleted")?,
            },
            11 => Frame::Ping,
            12 => Frame::Pong,
            _ => {
                return Err(DecodeError::Invalid {
                    field: "frame kind",
                    reason: "unknown",
                });
            }
        };
        reader.finish()?;
        Ok(frame)
    }
}

/// A receipt field: empty for none.
fn receipt(reader: &mut Reader<'_>) -> Result<Option<Vec<u8>>, DecodeError> {
    let receipt = reader.bytes("receipt", crate::custody::MAX_RECEIPT)?;
    Ok((!receipt.is_empty()).then(|| receipt.to_vec()))
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes, over the limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(#[from] DecodeError),
}

/// Reads one frame; `Ok(None)` at a clean end of the connection. The length is checked
/// before anything is allocated. Not cancel-safe: a read dropped midway leaves the
/// connection in the middle of a frame (end the connection then).
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Option<Frame>, FrameError> {
    let mut prefix = [0u8; 4];
    match reader.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 || len > limit {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    Ok(Some(Frame::decode(&body)?))
}

/// Writes frames from `frames` as they come, those waiting together in one write (many
/// answers in one TLS record under load, no delay when idle). Nothing is buffered
/// between bursts: an idle connection holds no write buffer.
pub async fn write_frames<W: AsyncWrite + Unpin, F: AsRef<[u8]>>(
    mut writer: W,
    mut frames: mpsc::Receiver<F>,
) -> std::io::Result<()> {
    while let Some(first) = frames.recv().await {
        let mut burst = first.as_ref().to_vec();
        drop(first);
        while burst.len() < BUFFER * 16
            && let Ok(frame) = frames.try_recv()
        {
            burst.extend_from_slice(frame.as_ref());
        }
        writer.write_all(&burst).await?;
        writer.flush().await?;
    }
    writer.shutdown().await
}

/// An append's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    pub duplicate: bool,
    /// The relay's encoded custody receipt (see [`crate::custody`]).
    pub receipt: Option<Vec<u8>>,
}

enum Pending {
    Append(oneshot::Sender<Result<Appended, ClientError>>),
    Ack(oneshot::Sender<Result<u64, ClientError>>),
}

/// Where a subscription's messages (sequence number, bytes) go, and how much of its
/// window the relay used (a relay that pushes beyond it is dropped: the buffer is
/// bounded by the window, whatever the relay does).
struct Subscription {
    id: u64,
    pushed: mpsc::UnboundedSender<Stored>,
    count: usize,
    bytes: usize,
}

/// A channel's pushed messages as a device reads them, and where it is.
struct Feed {
    receiver: mpsc::UnboundedReceiver<Stored>,
    /// The last sequence number handed out.
    position: u64,
    /// Messages and bytes taken since the last subscription (its window).
    taken: usize,
    taken_bytes: usize,
}

#[derive(Default)]
struct Shared {
    pending: HashMap<u64, Pending>,
    /// Per channel, the current subscription's id and where its messages go (frames of
    /// an earlier subscription, still on their way, are dropped).
    subscriptions: HashMap<[u8; 32], Subscription>,
    next: u64,
    /// Why the connection ended, once it did.
    closed: Option<String>,
}

/// A TLS connection to a relay for the stream protocol, before any frame: the relay's
/// key checked against the address's pin, ALPN `hotline-stream/1` agreed, and the
/// session's exporter, which a Hello signs.
pub struct Opened {
    /// The relay's address without its pin (`https://HOST:PORT`).
    pub base: String,
    pub pin: [u8; 32],
    pub tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    pub exporter: [u8; 32],
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Opens a TLS connection to the relay at `url` (`https://HOST:PORT/#sha256=PIN`) for
/// the stream protocol, within the connection deadline.
pub async fn open(url: &str) -> Result<Opened, ClientError> {
    let (base, pin) = tls::parse_url(url)?;
    let network = |detail: String| ClientError::Network {
        relay: base.clone(),
        detail,
    };
    let authority = base.trim_start_matches("https://").to_owned();
    let mut config = tls::client_config(pin)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    // The pin, not the name, authenticates the relay: any valid name will do.
    let name = rustls::pki_types::ServerName::try_from("relay.hotline.invalid")
        .map_err(|e| network(e.to_string()))?;
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(&authority).await?;
        tcp.set_nodelay(true)?;
        connector.connect(name, tcp).await
    };
    let tls = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| network("connection timed out".into()))?
        .map_err(|e| network(e.to_string()))?;
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(ALPN) {
        return Err(network(
            "the relay does not speak the stream protocol (hotline-stream/1)".into(),
        ));
    }
    let mut exporter = [0u8; 32];
    session
        .export_keying_material(&mut exporter, EXPORTER_LABEL, None)
        .map_err(|e| network(e.to_string()))?;
    Ok(Opened {
        base,
        pin,
        tls,
        exporter,
    })
}

/// A device's authenticated stream connection to one relay. Cheap to clone; requests
/// from clones share the connection (and are pipelined).
#[derive(Clone)]
pub struct StreamClient {
    relay: String,
    /// The relay's pinned key, which signs its custody receipts.
    pin: [u8; 32],
    frames: mpsc::Sender<Vec<u8>>,
    shared: Arc<Mutex<Shared>>,
    /// Per channel, its feed (each locked on its own: a wait on one channel never
    /// holds up another).
    feeds: Arc<Mutex<HashMap<[u8; 32], FeedSlot>>>,
}

type FeedSlot = Arc<tokio::sync::Mutex<Option<Feed>>>;

impl std::fmt::Debug for StreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamClient")
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

impl StreamClient {
    /// Connects to the relay at `url` (`https://HOST:PORT/#sha256=PIN`) and
    /// authenticates as `identity`.
    pub async fn connect(url: &str, identity: &DeviceIdentity) -> Result<Self, ClientError> {
        let Opened {
            base,
            pin,
            tls,
            exporter,
        } = open(url).await?;
        let network = |detail: String| ClientError::Network {
            relay: base.clone(),
            detail,
        };
        let (read, mut write) = tokio::io::split(tls);
        let mut read = BufReader::with_capacity(BUFFER, read);
        let malformed = |e: FrameError| network(format!("during authentication: {e}"));
        let handshake = async {
            let nonce = match read_frame(&mut read, MAX_FRAME).await.map_err(malformed)? {
                Some(Frame::Challenge { nonce }) => nonce,
                other => return Err(network(format!("expected a challenge, got {other:?}"))),
            };
            let hello = Frame::Hello {
                device: identity.key().0,
                signature: identity.sign(&hello_message(&nonce, &exporter)),
            };
            write
                .write_all(&hello.encode())
                .await
                .map_err(|e| network(e.to_string()))?;
            write.flush().await.map_err(|e| network(e.to_string()))?;
            match read_frame(&mut read, MAX_FRAME).await.map_err(malformed)? {
                Some(Frame::Ready) => Ok(()),
                Some(Frame::Refused {
                    status,
                    code,
                    detail,
                    ..
                }) => Err(ClientError::Refused {
                    relay: base.clone(),
                    status,
                    code,
                    detail,
                    retry_after: None,
                }),
                other => Err(network(format!("expected ready, got {other:?}"))),
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| network("authentication timed out".into()))??;

        let (frames, queue) = mpsc::channel(QUEUE);
        let shared = Arc::new(Mutex::new(Shared {
            next: 1,
            ..Shared::default()
        }));
        tokio::spawn(write_frames(write, queue));
        tokio::spawn(dispatch(read, Arc::clone(&shared), base.clone()));
        // Pings while the connection lives (the relay's answers keep this side's
        // reader from timing out, and its silence ends the connection).
        // Only while a client holds the connection: the last one dropped closes it.
        let pings = frames.downgrade();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PING_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(frames) = pings.upgrade() else {
                    break;
                };
                if frames.send(Frame::Ping.encode()).await.is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            relay: base,
            pin,
            frames,
            shared,
            feeds: Arc::default(),
        })
    }

    pub fn relay(&self) -> &str {
        &self.relay
    }

    fn gone(&self, why: &str) -> ClientError {
        ClientError::Network {
            relay: self.relay.clone(),
            detail: why.to_owned(),
        }
    }

    /// Registers a pending answer under a fresh id; `Err` if the connection ended.
    fn register(&self, pending: impl FnOnce() -> Pending) -> Result<u64, ClientError> {
        let mut shared = self.shared.lock().map_err(|_| self.gone("poisoned"))?;
        if let Some(why) = &shared.closed {
            return Err(self.gone(why));
        }
        let id = shared.next;
        shared.next += 1;
        shared.pending.insert(id, pending());
        Ok(id)
    }

    async fn send(&self, frame: Frame) -> Result<(), ClientError> {
        self.frames
            .send(frame.encode())
            .await
            .map_err(|_| self.gone("connection closed"))
    }

    /// Appends a message to a channel; answered once the relay stored it durably, with
    /// its custody receipt checked against the pinned key.
    pub async fn append(
        &self,
        channel: &[u8; 32],
        message: Vec<u8>,
    ) -> Result<Appended, ClientError> {
        let hash = crate::custody::message_hash(&message);
        let appended = self.append_unchecked(channel, message).await?;
        // The receipt must be the relay's word on this message at this place, as the
        // one-shot route's answer is.
        crate::custody::check_appended(&self.pin, &Log::Channel(*channel), &hash, &appended)
            .map_err(|error| ClientError::BadReceipt {
                relay: self.relay.clone(),
                detail: format!("message {}: {error}", appended.seq),
            })?;
        Ok(appended)
    }

    /// Appends a message whose custody nobody keeps (a link test, a delivery or read
    /// receipt: what it proves is its answer coming back, not the relay's word): answered
    /// once stored durably, the receipt left unchecked (a verification saved per frame).
    pub async fn append_unchecked(
        &self,
        channel: &[u8; 32],
        message: Vec<u8>,
    ) -> Result<Appended, ClientError> {
        let (answer, wait) = oneshot::channel();
        let id = self.register(|| Pending::Append(answer))?;
        self.send(Frame::Append {
            id,
            channel: *channel,
            message,
        })
        .await?;
        wait.await.map_err(|_| self.gone("connection closed"))?
    }

    /// Tells the relay this device committed the channel up to `seq`; how many messages
    /// it deleted.
    pub async fn ack(&self, channel: &[u8; 32], seq: u64) -> Result<u64, ClientError> {
        let (answer, wait) = oneshot::channel();
        let id = self.register(|| Pending::Ack(answer))?;
        self.send(Frame::Ack {
            id,
            channel: *channel,
            seq,
        })
        .await?;
        wait.await.map_err(|_| self.gone("connection closed"))?
    }

    /// Whether the connection ended (a new one is needed).
    pub fn is_closed(&self) -> bool {
        self.shared.lock().map_or(true, |s| s.closed.is_some())
    }

    /// The channel's messages after `after`, as the relay pushes them: what arrived,
    /// else the first to arrive within `wait` (none if none did), at most [`WINDOW`].
    /// Used as a long poll is, without a request each time: the subscription stays
    /// open between calls, and is renewed when a window was taken or the caller asks
    /// from another position.
    pub async fn next_after(
        &self,
        channel: &[u8; 32],
        after: u64,
        wait: Duration,
    ) -> Result<Vec<Stored>, ClientError> {
        let slot: FeedSlot = {
            let mut feeds = self.feeds.lock().map_err(|_| self.gone("poisoned"))?;
            Arc::clone(feeds.entry(*channel).or_default())
        };
        let mut slot = slot.lock().await;
        let renew = slot.as_ref().is_none_or(|feed| {
            feed.position != after
                || feed.taken >= WINDOW / 2
                || feed.taken_bytes >= WINDOW_BYTES / 2
        });
        if renew {
            let receiver = self.subscribe(channel, after).await?;
            *slot = Some(Feed {
                receiver,
                position: after,
                taken: 0,
                taken_bytes: 0,
            });
        }
        let Some(feed) = slot.as_mut() else {
            return Ok(Vec::new());
        };
        let ended = || self.gone("the relay ended the subscription");
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while out.is_empty() {
            let mut next = match feed.receiver.try_recv() {
                Ok(next) => Some(next),
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, feed.receiver.recv()).await {
                        Ok(Some(next)) => Some(next),
                        Ok(None) => {
                            *slot = None;
                            return Err(ended());
                        }
                        Err(_) => return Ok(out),
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    *slot = None;
                    return Err(ended());
                }
            };
            // Only the current subscription's messages reach the feed, in order.
            while let Some(stored) = next.take() {
                if stored.seq > feed.position {
                    feed.position = stored.seq;
                    feed.taken += 1;
                    feed.taken_bytes += stored.bytes.len();
                    out.push(stored);
                }
                if out.len() >= WINDOW {
                    break;
                }
                next = feed.receiver.try_recv().ok();
            }
        }
        Ok(out)
    }

    /// The channel's messages after `after`, then each new one as the relay stores it,
    /// a window at a time, until the connection ends (the receiver then closes). One
    /// subscription per channel per connection: a second replaces the first.
    pub async fn subscribe(
        &self,
        channel: &[u8; 32],
        after: u64,
    ) -> Result<mpsc::UnboundedReceiver<Stored>, ClientError> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let id = {
            let mut shared = self.shared.lock().map_err(|_| self.gone("poisoned"))?;
            if let Some(why) = &shared.closed {
                return Err(self.gone(why));
            }
            let id = shared.next;
            shared.next += 1;
            shared.subscriptions.insert(
                *channel,
                Subscription {
                    id,
                    pushed: sender,
                    count: 0,
                    bytes: 0,
                },
            );
            id
        };
        self.send(Frame::Subscribe {
            id,
            channel: *channel,
            after,
        })
        .await?;
        Ok(receiver)
    }
}

/// Reads the relay's frames and hands each to whoever waits for it; when the
/// connection ends, every waiter learns why.
async fn dispatch<R: AsyncRead + Unpin>(mut read: R, shared: Arc<Mutex<Shared>>, relay: String) {
    let why = loop {
        // A timed-out read is not resumed: the connection ends.
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut read, MAX_FRAME)).await
        {
            Err(_) => break "no word from the relay in 90 s".to_owned(),
            Ok(frame) => frame,
        };
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => break "the relay closed the connection".to_owned(),
            Err(error) => break error.to_string(),
        };
        let Ok(mut shared) = shared.lock() else {
            return;
        };
        match frame {
            Frame::Appended {
                id,
                seq,
                duplicate,
                receipt,
            } => {
                if let Some(Pending::Append(answer)) = shared.pending.remove(&id) {
                    let _ = answer.send(Ok(Appended {
                        seq,
                        duplicate,
                        receipt,
                    }));
                }
            }
            Frame::Acked { id, deleted } => {
                if let Some(Pending::Ack(answer)) = shared.pending.remove(&id) {
                    let _ = answer.send(Ok(deleted));
                }
            }
            Frame::Message {
                id,
                channel,
                seq,
                message,
                receipt,
            } => {
                let Some(subscription) = shared.subscriptions.get_mut(&channel) else {
                    continue;
                };
                if subscription.id != id {
                    continue;
                }
                subscription.count += 1;
                subscription.bytes += message.len();
                // One message may exceed the byte window alone; never two windows.
                if subscription.count > WINDOW || subscription.bytes > WINDOW_BYTES + MAX_FRAME {
                    break "the relay pushed beyond the subscription's window".to_owned();
                }
                let stored = Stored {
                    seq,
                    bytes: message,
                    receipt,
                };
                if subscription.pushed.send(stored).is_err() {
                    shared.subscriptions.remove(&channel);
                }
            }
            Frame::Pong => {}
            Frame::Refused {
                id,
                status,
                code,
                detail,
            } => {
                let refused = ClientError::Refused {
                    relay: relay.clone(),
                    status,
                    code,
                    detail,
                    retry_after: None,
                };
                match shared.pending.remove(&id) {
                    Some(Pending::Append(answer)) => {
                        let _ = answer.send(Err(refused));
                    }
                    Some(Pending::Ack(answer)) => {
                        let _ = answer.send(Err(refused));
                    }
                    // A subscription ended (its feed sees it closed), or the whole
                    // connection refused (id 0: it closes next).
                    None => shared.subscriptions.retain(|_, s| s.id != id),
                }
            }
            // Nothing else comes from a relay after Ready.
            _ => break "the relay sent an unexpected frame".to_owned(),
        }
    };
    if let Ok(mut shared) = shared.lock() {
        for (_, pending) in shared.pending.drain() {
            let error = ClientError::Network {
                relay: relay.clone(),
                detail: why.clone(),
            };
            match pending {
                Pending::Append(answer) => {
                    let _ = answer.send(Err(error));
                }
                Pending::Ack(answer) => {
                    let _ = answer.send(Err(error));
                }
            }
        }
        shared.subscriptions.clear();
        shared.closed = Some(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Challenge { nonce: [1; 32] },
            Frame::Hello {
                device: [2; 32],
                signature: [3; 64],
            },
            Frame::Ready,
            Frame::Append {
                id: 7,
                channel: [4; 32],
                message: b"hello".to_vec(),
            },
            Frame::Appended {
                id: 7,
                seq: 9,
                duplicate: true,
                receipt: Some(vec![1; 300]),
            },
            Frame::Subscribe {
                id: 6,
                channel: [5; 32],
                after: 3,
            },
            Frame::Message {
                id: 6,
                channel: [5; 32],
                seq: 4,
                message: vec![0; 100],
                receipt: None,
            },
            Frame::Ack {
                id: 8,
                channel: [5; 32],
                seq: 4,
            },
            Frame::Acked { id: 8, deleted: 2 },
            Frame::Refused {
                id: 9,
                status: 403,
                code: "not-a-member".into(),
                detail: "no".into(),
            },
            Frame::Ping,
            Frame::Pong,
        ]
    }

    #[tokio::test]
    async fn every_frame_reads_back_as_written() {
        let bytes: Vec<u8> = frames().iter().flat_map(Frame::encode).collect();
        let mut reader = &bytes[..];
        for frame in frames() {
            assert_eq!(
                read_frame(&mut reader, MAX_FRAME).await.unwrap(),
                Some(frame)
            );
        }
        assert_eq!(read_frame(&mut reader, MAX_FRAME).await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_empty_and_malformed_frames_are_refused() {
        let huge = (MAX_FRAME as u32 + 1).to_be_bytes();
        assert!(matches!(
            read_frame(&mut &huge[..], MAX_FRAME).await,
            Err(FrameError::TooLarge(_))
        ));
        let empty = 0u32.to_be_bytes();
        assert!(matches!(
            read_frame(&mut &empty[..], MAX_FRAME).await,
            Err(FrameError::TooLarge(0))
        ));
        for body in [&[99u8][..], &[4, 0, 0], &[3, 0]] {
            let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(body);
            assert!(matches!(
                read_frame(&mut &bytes[..], MAX_FRAME).await,
                Err(FrameError::Malformed(_))
            ));
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = Frame::decode(&bytes);
        }
    }
}
