//! A push handed to the follower that runs on the same home.
//!
//! `hotline sync --follow` and the console hold an authenticated stream connection to
//! every relay. A command in a process of its own (`hotline send`) would otherwise
//! open its own connections, sign a request per relay and post over the one-shot
//! route. The follower listens on a Unix socket in the home ([`SOCKET`], mode 0600 in
//! the 0700 home); a process that stored something connects, asks `push`, and reads
//! one JSON line: how the follower's push (begun after the question) went at each
//! relay. Nothing else crosses: what is pushed is the outbox in the database, so a
//! hand-off that fails loses nothing, and the asker then posts itself.

use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::sync::{Pushed, Wake};

/// The follower's socket, in the home.
pub const SOCKET: &str = "follower.sock";

/// The one question.
const REQUEST: &[u8] = b"push\n";
/// The longest answer read (one relay URL and one error per relay).
const MOST_ANSWER: u64 = 1 << 20;
/// Questions answered at once; more are closed at once (their askers post themselves).
const IN_FLIGHT: usize = 16;
/// How long the follower waits for a connection's question.
const ASKING: Duration = Duration::from_secs(1);
/// How long the follower waits for its push before giving up on the answer.
const PUSHING: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("another follower of this home answers on {0}")]
    Taken(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The socket served while this lives: dropping it stops answering and removes the
/// socket file.
#[derive(Debug)]
pub struct Listening {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Listening {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Answers, on `home`'s socket, questions to push by ringing `wake` (the wake of the
/// follower that runs on this home). A socket file nobody answers on is left from a
/// follower that stopped without removing it, and is replaced. Call it inside the
/// follower's Tokio runtime.
pub fn listen(home: &Path, wake: Wake) -> Result<Listening, ListenError> {
    let path = home.join(SOCKET);
    let failed = |source| ListenError::Io {
        path: path.clone(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            return Err(ListenError::Taken(path));
        }
        std::fs::remove_file(&path).map_err(failed)?;
    }
    let listener = tokio::net::UnixListener::bind(&path).map_err(failed)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let task = tokio::spawn(async move {
        loop {
            let connection = match listener.accept().await {
                Ok((connection, _)) => connection,
                // Out of file descriptors, say: the askers post themselves meanwhile.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                continue;
            };
            let wake = wake.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let _ = answer(connection, &wake).await;
            });
        }
    });
    Ok(Listening { path, task })
}

/// Reads one question on `connection`, has the follower push, and answers how it went.
async fn answer(mut connection: tokio::net::UnixStream, wake: &Wake) -> io::Result<()> {
    let mut question = [0u8; REQUEST.len()];
    tokio::time::timeout(ASKING, connection.read_exact(&mut question))
        .await
        .map_err(|_| io::ErrorKind::TimedOut)??;
    if question != REQUEST {
        return Err(io::ErrorKind::InvalidData.into());
    }
    let pushed = tokio::time::timeout(PUSHING, wake.ring_for_answer())
        .await
        .map_err(|_| io::ErrorKind::TimedOut)?
        .map_err(|_| io::ErrorKind::BrokenPipe)?;
    let mut line = serde_json::to_vec(&serde_json::json!({ "relays": pushed }))?;
    line.push(b'\n');
    connection.write_all(&line).await?;
    connection.shutdown().await
}

#[derive(serde::Deserialize)]
struct Answer {
    relays: Pushed,
}

/// How a hand-off went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handed {
    /// The follower pushed: what its push did at each relay.
    Pushed(Pushed),
    /// The follower took the question but did not answer in time (its push is slow, a
    /// relay hangs): it goes on pushing, and retries as it follows.
    Late,
    /// No follower took it (none runs, or it stopped before answering): the caller
    /// posts itself.
    NoFollower,
}

/// Asks the follower running on `home`, if one does, to push now, and waits up to
/// `within` for how it went.
pub fn hand_off(home: &Path, within: Duration) -> Handed {
    let Ok(mut connection) = UnixStream::connect(home.join(SOCKET)) else {
        return Handed::NoFollower;
    };
    let asked = connection
        .set_write_timeout(Some(within))
        .and_then(|()| connection.set_read_timeout(Some(within)))
        .and_then(|()| connection.write_all(REQUEST));
    if asked.is_err() {
        return Handed::NoFollower;
    }
    let mut line = Vec::new();
    let read = io::BufReader::new(connection.take(MOST_ANSWER)).read_until(b'\n', &mut line);
    match read {
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Handed::Late
        }
        Err(_) => Handed::NoFollower,
        Ok(_) => match serde_json::from_slice::<Answer>(&line) {
            Ok(answer) => Handed::Pushed(answer.relays),
            Err(_) => Handed::NoFollower,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "hotline-handoff-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The follower's runtime: one worker, so that answers come while a test blocks.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A follower stand-in: pushes (answers one relay taken, one not) whenever rung.
    fn follower(wake: Wake) -> tokio::task::JoinHandle<usize> {
        tokio::spawn(async move {
            let mut pushes = 0;
            loop {
                let asking = wake.take_asking();
                if asking.is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    if pushes >= 1 {
                        return pushes;
                    }
                    continue;
                }
                pushes += 1;
                for answer in asking {
                    let pushed: Pushed = [
                        ("https://a".to_owned(), None),
                        ("https://b".to_owned(), Some("refused".to_owned())),
                    ]
                    .into();
                    let _ = answer.send(pushed);
                }
            }
        })
    }

    #[test]
    fn a_push_is_handed_to_the_follower_and_answered() {
        let home = home();
        let runtime = runtime();
        let wake = Wake::default();
        let listening = runtime
            .block_on(async { listen(&home, wake.clone()) })
            .unwrap();
        let mode = std::fs::metadata(listening.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let pushes = runtime.spawn(async move { follower(wake).await.unwrap() });
        let Handed::Pushed(pushed) = hand_off(&home, Duration::from_secs(5)) else {
            panic!("the follower did not answer");
        };
        assert_eq!(pushed.get("https://a"), Some(&None));
        assert_eq!(pushed.get("https://b"), Some(&Some("refused".to_owned())));
        assert_eq!(runtime.block_on(pushes).unwrap(), 1);
        // A second follower of the same home does not take the socket over.
        let again = runtime.block_on(async { listen(&home, Wake::default()) });
        assert!(matches!(again, Err(ListenError::Taken(_))), "{again:?}");
        // Stopped: the socket is gone, and nobody answers.
        drop(listening);
        assert!(!home.join(SOCKET).exists());
        assert_eq!(hand_off(&home, Duration::from_secs(1)), Handed::NoFollower);
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn a_follower_that_does_not_answer_in_time_keeps_the_push() {
        let home = home();
        let runtime = runtime();
        // Listening, but nobody pushes (a follower busy with a relay that hangs).
        let wake = Wake::default();
        let _listening = runtime
            .block_on(async { listen(&home, wake.clone()) })
            .unwrap();
        assert_eq!(hand_off(&home, Duration::from_millis(300)), Handed::Late);
        // It was asked, and answers the asker when its push ends.
        assert_eq!(wake.take_asking().len(), 1);
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn a_socket_left_by_a_stopped_follower_is_replaced_and_a_wrong_question_gets_nothing() {
        let home = home();
        // What a killed follower leaves: a socket file nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(home.join(SOCKET)).unwrap());
        assert!(home.join(SOCKET).exists());
        assert_eq!(hand_off(&home, Duration::from_secs(1)), Handed::NoFollower);
        let runtime = runtime();
        let wake = Wake::default();
        let _listening = runtime
            .block_on(async { listen(&home, wake.clone()) })
            .unwrap();
        let mut other = UnixStream::connect(home.join(SOCKET)).unwrap();
        other
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        other.write_all(b"pull\n").unwrap();
        let mut answer = Vec::new();
        other.read_to_end(&mut answer).unwrap();
        assert!(answer.is_empty(), "{answer:?}");
        // Nobody was asked to push.
        assert!(wake.take_asking().is_empty());
        std::fs::remove_dir_all(&home).unwrap();
    }
}
