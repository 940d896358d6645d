//! The relay's side of the stream protocol (`hotline-stream/1`, see
//! `hotline_proto::stream`): one authenticated connection per device, appends
//! pipelined into the group commit, messages pushed to subscribers as they are stored.
//!
//! ```text
//!   accept, TLS (ALPN hotline-stream/1) ─► Challenge ─► Hello checked within the
//!   handshake deadline (else closed; still pending in the strangers' budget)
//!        │
//!        ▼ authenticated: a member's slot
//!   read loop ── Append ──► membership (cached 1 s), rate, quota ─► task: append ─┐
//!            ── Ack ──────► task: acknowledge ───────────────────────────────────┤
//!            ── Subscribe ► task: read after, wait for appends, push Messages ───┤
//!                                                                                 ▼
//!                                           writer: frames out, one flush per burst
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hotline_core::DeviceKey;
use hotline_proto::stream::{self, Frame, FrameError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::admission::Ticket;
use crate::server::{AppState, Problem};
use crate::storage::{Log, RelayStorage};

/// Frames waiting to be written on one connection.
const QUEUE: usize = 1024;
/// Bytes of frames waiting to be written on one connection: whatever its pushes and
/// answers, a connection whose device reads slowly holds this much at most (a larger
/// frame waits until the queue is empty).
const QUEUE_BYTES: usize = 16 << 20;
/// Appends and acknowledgements one connection may have in flight; the next frame is
/// read only when one finishes.
const IN_FLIGHT: usize = 256;
/// Channels one connection may subscribe to.
const SUBSCRIPTIONS: usize = 256;
/// How long a membership check holds for a connection (a removed member may append
/// for up to this long on a connection opened before).
const MEMBERSHIP_TTL: Duration = Duration::from_secs(1);
/// Largest Hello frame.
const HELLO_LIMIT: usize = 128;

/// Serves one connection that chose the stream protocol, until it ends, the relay
/// stops, or (while unauthenticated) it is evicted to make room.
pub(crate) async fn serve<S: RelayStorage, IO: AsyncRead + AsyncWrite + Send + 'static>(
    state: Arc<AppState<S>>,
    io: IO,
    exporter: [u8; 32],
    ticket: Arc<Ticket>,
    mut stop: watch::Receiver<bool>,
) {
    let (read, write) = tokio::io::split(io);
    // Frames are read straight from TLS's buffer of decrypted bytes.
    let mut read = read;
    let (frames, queue) = Outbound::new();
    let writer = tokio::spawn(stream::write_frames(write, queue));
    let source = crate::admission::peer();

    // The handshake: a Hello that checks, within the deadline.
    let nonce: [u8; 32] = rand::random();
    let _ = frames.send(Frame::Challenge { nonce }.encode()).await;
    let deadline = state.limits.header_timeout;
    let hello = tokio::select! {
        hello = tokio::time::timeout(deadline, stream::read_frame(&mut read, HELLO_LIMIT)) => {
            hello.ok().and_then(Result::ok).flatten()
        }
        () = ticket.evicted() => None,
    };
    let device = match hello {
        Some(Frame::Hello { device, signature })
            if stream::check_hello(&device, &signature, &nonce, &exporter) =>
        {
            DeviceKey(device)
        }
        _ => {
            let problem = state.reject(Problem::new(
                axum::http::StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "the stream needs a Hello signed over the challenge and this TLS session",
            ));
            return close_with(frames, writer, &problem).await;
        }
    };
    // One device holds a few stream connections at most (a stranger's fresh key is
    // free, but each key's connections are bounded; strangers' budget still held it
    // until now).
    let Some(_held) = state.hold_stream(device) else {
        let problem = state.reject(Problem::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "slow-down",
            format!(
                "at most {} stream connections per device",
                crate::server::STREAMS_PER_DEVICE
            ),
        ));
        return close_with(frames, writer, &problem).await;
    };
    ticket.authenticated();
    tracing::debug!(%device, source = ?source, "stream authenticated");
    let _ = frames.send(Frame::Ready.encode()).await;

    let mut session = Session {
        state,
        device,
        frames,
        memberships: HashMap::new(),
        work: JoinSet::new(),
        subscriptions: HashMap::new(),
    };
    let limit = session.state.limits.max_message + 1024;
    loop {
        // Backpressure: at most IN_FLIGHT appends and acknowledgements.
        while session.work.try_join_next().is_some() {}
        while session.work.len() >= IN_FLIGHT {
            session.work.join_next().await;
        }
        // Only stopping or silence may interrupt a read (reading a frame is not
        // cancel-safe: the connection ends then). A device pings every 30 s.
        let frame = tokio::select! {
            frame = tokio::time::timeout(stream::IDLE_TIMEOUT, stream::read_frame(&mut read, limit)) => match frame {
                Ok(frame) => frame,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        match frame {
            Ok(Some(frame)) => {
                if !session.take(frame).await {
                    break;
                }
            }
            Ok(None) => break,
            Err(error) => {
                let status = match error {
                    FrameError::TooLarge(_) => axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                    _ => axum::http::StatusCode::BAD_REQUEST,
                };
                if !matches!(error, FrameError::Io(_)) {
                    let problem = session.state.reject(Problem::new(
                        status,
                        if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                            "too-large"
                        } else {
                            "malformed"
                        },
                        error.to_string(),
                    ));
                    let _ = session.frames.send(refused(0, &problem).encode()).await;
                }
                break;
            }
        }
    }
    // In-flight appends finish (their commits are answered); pushes stop.
    for (_, subscription) in session.subscriptions.drain() {
        subscription.abort();
    }
    while session.work.join_next().await.is_some() {}
    drop(session);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

/// Refuses the whole connection (id 0) and closes it once the refusal is written.
async fn close_with(
    frames: Outbound,
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
    problem: &Problem,
) {
    let _ = frames.send(refused(0, problem).encode()).await;
    drop(frames);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
}

fn refused(id: u64, problem: &Problem) -> Frame {
    Frame::Refused {
        id,
        status: problem.status.as_u16(),
        code: problem.code.to_owned(),
        detail: problem.detail.clone(),
    }
}

struct Session<S> {
    state: Arc<AppState<S>>,
    device: DeviceKey,
    frames: Outbound,
    /// Channel → (checked at, memberships this process had registered then, member?).
    memberships: HashMap<[u8; 32], (Instant, u64, bool)>,
    work: JoinSet<()>,
    subscriptions: HashMap<[u8; 32], tokio::task::AbortHandle>,
}

impl<S: RelayStorage> Session<S> {
    /// Takes one request; `false` ends the connection.
    async fn take(&mut self, frame: Frame) -> bool {
        match frame {
            Frame::Append {
                id,
                channel,
                message,
            } => {
                let limit = self.state.limits.max_message;
                if message.len() > limit {
                    let problem = self.state.reject(Problem::new(
                        axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                        "too-large",
                        format!("a message is at most {limit} bytes"),
                    ));
                    return self.refuse(id, &problem).await;
                }
                if let Err(problem) = self.admit(&channel, message.len()).await {
                    return self.refuse(id, &problem).await;
                }
                let (state, frames) = (Arc::clone(&self.state), self.frames.clone());
                self.work.spawn(async move {
                    let answer = match state.append(Log::Channel(channel), message.into()).await {
                        Ok(appended) => {
                            if !appended.duplicate {
                                state
                                    .metrics
                                    .stored_over_streams
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Frame::Appended {
                                id,
                                seq: appended.seq,
                                duplicate: appended.duplicate,
                                receipt: appended.receipt,
                            }
                        }
                        Err(problem) => refused(id, &problem),
                    };
                    let _ = frames.send(answer.encode()).await;
                });
                true
            }
            Frame::Ack { id, channel, seq } => {
                if let Err(problem) = self.admit(&channel, 0).await {
                    return self.refuse(id, &problem).await;
                }
                let (state, frames, device) =
                    (Arc::clone(&self.state), self.frames.clone(), self.device);
                self.work.spawn(async move {
                    let answer = match state.acknowledge(channel, device, seq).await {
                        Ok(deleted) => {
                            state
                                .metrics
                                .acknowledged_over_streams
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            Frame::Acked { id, deleted }
                        }
                        Err(problem) => refused(id, &problem),
                    };
                    let _ = frames.send(answer.encode()).await;
                });
                true
            }
            Frame::Subscribe { id, channel, after } => {
                if let Err(problem) = self.admit(&channel, 0).await {
                    return self.refuse(id, &problem).await;
                }
                if let Some(previous) = self.subscriptions.remove(&channel) {
                    previous.abort();
                }
                // Windows pushed to the end no longer count.
                self.subscriptions.retain(|_, task| !task.is_finished());
                if self.subscriptions.len() >= SUBSCRIPTIONS {
                    let problem = self.state.reject(Problem::new(
                        axum::http::StatusCode::TOO_MANY_REQUESTS,
                        "slow-down",
                        format!("at most {SUBSCRIPTIONS} subscriptions per connection"),
                    ));
                    return self.refuse(id, &problem).await;
                }
                let (state, frames) = (Arc::clone(&self.state), self.frames.clone());
                let task = tokio::spawn(push(state, frames, self.device, id, channel, after));
                self.subscriptions.insert(channel, task.abort_handle());
                true
            }
            Frame::Ping => self.frames.send(Frame::Pong.encode()).await.is_ok(),
            _ => {
                let problem = self.state.reject(Problem::new(
                    axum::http::StatusCode::BAD_REQUEST,
                    "malformed",
                    "a device sends Append, Ack, Subscribe or Ping frames on an open stream",
                ));
                self.refuse(0, &problem).await;
                false
            }
        }
    }

    /// Charges the device and checks it is a member of `channel`: cached for at most a
    /// second, and only while this process registered no membership since.
    async fn admit(&mut self, channel: &[u8; 32], bytes: usize) -> Result<(), Problem> {
        self.state.charge(self.device, 1.0, bytes as f64)?;
        let registered = self.state.memberships_set.load(Ordering::SeqCst);
        let fresh = self
            .memberships
            .get(channel)
            .is_some_and(|(at, then, member)| {
                *member && *then == registered && at.elapsed() < MEMBERSHIP_TTL
            });
        if !fresh {
            let checked = self.state.require_member(channel, &self.device).await;
            if self.memberships.len() > SUBSCRIPTIONS * 4 {
                self.memberships.clear();
            }
            self.memberships
                .insert(*channel, (Instant::now(), registered, checked.is_ok()));
            checked?;
        }
        Ok(())
    }

    async fn refuse(&self, id: u64, problem: &Problem) -> bool {
        self.frames
            .send(refused(id, problem).encode())
            .await
            .is_ok()
    }
}

/// Pushes `channel`'s messages after `after` to the connection as they are stored, a
/// window at most, while `device` is a member (checked again at most once a second).
async fn push<S: RelayStorage>(
    state: Arc<AppState<S>>,
    frames: Outbound,
    device: DeviceKey,
    id: u64,
    channel: [u8; 32],
    mut after: u64,
) {
    // When membership was last checked here, and how many memberships this process
    // had registered then (the subscription was admitted on a cached answer).
    let mut checked: Option<(Instant, u64)> = None;
    let (mut pushed, mut bytes) = (0usize, 0usize);
    loop {
        let messages = match state
            .read_some(
                Log::Channel(channel),
                after,
                state.limits.max_wait,
                stream::WINDOW - pushed,
                stream::WINDOW_BYTES.saturating_sub(bytes),
            )
            .await
        {
            Ok(messages) => messages,
            Err(problem) => {
                let _ = frames.send(refused(id, &problem).encode()).await;
                return;
            }
        };
        // Still a member: checked at most once a second (so before anything that a
        // long wait brought is pushed), and at once after this process registered a
        // membership (a member removed here gets nothing more). A removal registered
        // through another relay process sharing the storage is seen within a second.
        let registered = state.memberships_set.load(Ordering::SeqCst);
        if checked.is_none_or(|(at, then)| at.elapsed() >= MEMBERSHIP_TTL || then != registered) {
            if let Err(problem) = state.require_member(&channel, &device).await {
                let _ = frames.send(refused(id, &problem).encode()).await;
                return;
            }
            checked = Some((Instant::now(), registered));
        }
        for stored in messages {
            after = stored.seq;
            pushed += 1;
            bytes += stored.bytes.len();
            let frame = Frame::Message {
                id,
                channel,
                seq: stored.seq,
                message: stored.bytes,
                receipt: stored.receipt,
            };
            if frames.send(frame.encode()).await.is_err() {
                return;
            }
            // The window is full: the device subscribes again when it took it.
            if pushed >= stream::WINDOW || bytes >= stream::WINDOW_BYTES {
                return;
            }
        }
    }
}

/// A frame queued for the writer, holding its share of the connection's byte budget
/// until the writer took it.
struct Queued(Vec<u8>, #[allow(dead_code)] OwnedSemaphorePermit);

impl AsRef<[u8]> for Queued {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The frames one connection sends, bounded in count ([`QUEUE`]) and in bytes
/// ([`QUEUE_BYTES`]).
#[derive(Clone)]
struct Outbound {
    queue: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
}

impl Outbound {
    fn new() -> (Self, mpsc::Receiver<Queued>) {
        let (queue, receiver) = mpsc::channel(QUEUE);
        let budget = Arc::new(Semaphore::new(QUEUE_BYTES));
        (Self { queue, budget }, receiver)
    }

    /// Queues `frame` once the budget has room for it; `Err` when the writer is gone.
    async fn send(&self, frame: Vec<u8>) -> Result<(), ()> {
        let share = frame.len().clamp(1, QUEUE_BYTES) as u32;
        let permit = Arc::clone(&self.budget)
            .acquire_many_owned(share)
            .await
            .map_err(|_| ())?;
        self.queue.send(Queued(frame, permit)).await.map_err(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection whose device does not read holds at most QUEUE_BYTES of frames:
    /// the next frame waits until the writer took some, then goes.
    #[tokio::test]
    async fn the_queue_is_bounded_by_bytes() {
        let (outbound, mut receiver) = Outbound::new();
        let frame = vec![7u8; 1 << 20];
        for _ in 0..QUEUE_BYTES >> 20 {
            outbound.send(frame.clone()).await.unwrap();
        }
        let over = tokio::time::timeout(Duration::from_millis(200), outbound.send(frame.clone()));
        assert!(over.await.is_err(), "a frame beyond the budget waits");
        let taken = receiver.recv().await.unwrap();
        drop(taken);
        tokio::time::timeout(Duration::from_secs(5), outbound.send(frame))
            .await
            .expect("room again once the writer took one")
            .unwrap();
        drop(receiver);
        assert!(
            outbound.send(vec![0; 1]).await.is_err(),
            "the writer is gone"
        );
    }
}
