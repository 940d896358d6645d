//! What link-test frames say (probes, answers, receipts), and how link-test bodies and
//! availability records read in `log`. Depends on nothing but the core.

use hotline_core::{Availability, NonResponse};
use sha2::{Digest, Sha256};

const PROBE: u8 = 1;
const ANSWER: u8 = 2;
/// The payload of a delivery receipt: the frame's list of what its sender holds is the
/// receipt.
pub const RECEIPT: &[u8] = &[3];

/// The first 8 bytes of SHA-256 of a relay's address: how an answer names the path.
pub fn relay_tag(url: &str) -> [u8; 8] {
    let digest = Sha256::digest(url.as_bytes());
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&digest[..8]);
    tag
}

/// What a link-test payload says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkTest {
    Probe {
        nonce: [u8; 8],
    },
    /// `probe`: the SHA-256 of the probe's ciphertext (in transcripts written before
    /// link tests were ephemeral: the probe envelope's id).
    Answer {
        probe: [u8; 32],
        relay: [u8; 8],
    },
}

impl LinkTest {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            LinkTest::Probe { nonce } => [&[PROBE][..], nonce].concat(),
            LinkTest::Answer { probe, relay } => [&[ANSWER][..], probe, relay].concat(),
        }
    }

    /// `None` for anything else (the payload is the sender's own; unknown ones are
    /// ignored).
    pub fn decode(bytes: &[u8]) -> Option<LinkTest> {
        match bytes {
            [PROBE, nonce @ ..] if nonce.len() == 8 => Some(LinkTest::Probe {
                nonce: nonce.try_into().ok()?,
            }),
            [ANSWER, rest @ ..] if rest.len() == 40 => Some(LinkTest::Answer {
                probe: rest[..32].try_into().ok()?,
                relay: rest[32..].try_into().ok()?,
            }),
            _ => None,
        }
    }
}

/// How `log --link-tests` shows a link-test body of an older transcript.
pub fn describe_link_test(bytes: &[u8], relays: &[String]) -> String {
    match LinkTest::decode(bytes) {
        Some(LinkTest::Probe { .. }) => "[link test]".to_owned(),
        Some(LinkTest::Answer { probe, relay }) => format!(
            "[link test answer to {} via {}]",
            &hex::encode(probe)[..12],
            path_name(&relay, relays)
        ),
        None => "[link test, unknown form]".to_owned(),
    }
}

fn path_name(tag: &[u8; 8], relays: &[String]) -> String {
    relays
        .iter()
        .find(|url| relay_tag(url) == *tag)
        .map_or_else(|| hex::encode(tag), Clone::clone)
}

/// How `log --link-tests` shows an availability record.
pub fn describe_availability(record: &Availability) -> String {
    let paths: Vec<String> = record
        .paths
        .iter()
        .map(|path| {
            let outages = match path.outages_total {
                0 => String::new(),
                n => format!(
                    ", {n} outage(s): {}",
                    path.outages
                        .iter()
                        .map(|(from, to)| format!(
                            "{}–{}",
                            hotline_core::export::utc(*from),
                            hotline_core::export::utc(*to)
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            format!(
                "{} to {}: {}/{} answered, rtt min {} ms, median {} ms{outages}",
                path.relay,
                path.party,
                path.answered,
                path.sent,
                path.rtt_min_ms,
                path.rtt_median_ms
            )
        })
        .collect();
    format!(
        "[availability {} to {}: {}]",
        hotline_core::export::utc(record.from_ms),
        hotline_core::export::utc(record.to_ms),
        paths.join("; ")
    )
}

/// How `log` shows a non-response statement.
pub fn describe_non_response(statement: &NonResponse) -> String {
    let utc = hotline_core::export::utc;
    let paths: Vec<String> = statement
        .paths
        .iter()
        .map(|path| {
            format!(
                "{} {}{}",
                path.relay,
                if path.up { "up" } else { "down" },
                path.last_answer_ms
                    .map(|ms| format!(" (last answer {})", utc(ms)))
                    .unwrap_or_default()
            )
        })
        .collect();
    format!(
        "[no response: {} had not read {} ({}) by {}: {}; last heard {}; paths: {}]",
        statement.party,
        &statement.message.to_hex()[..12],
        statement.precedence.as_str().to_uppercase(),
        utc(statement.deadline_ms),
        if statement.delivered {
            "delivered to its device, not read"
        } else {
            "not delivered to its device"
        },
        statement
            .last_heard_ms
            .map_or_else(|| "never".to_owned(), utc),
        if paths.is_empty() {
            "none".to_owned()
        } else {
            paths.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_test_payloads_round_trip_and_refuse_garbage() {
        let probe = LinkTest::Probe { nonce: [7; 8] };
        assert_eq!(LinkTest::decode(&probe.encode()), Some(probe));
        let answer = LinkTest::Answer {
            probe: [3; 32],
            relay: relay_tag("https://127.0.0.1:1/#sha256=00"),
        };
        assert_eq!(LinkTest::decode(&answer.encode()), Some(answer.clone()));
        let mut long = answer.encode();
        long.push(0);
        for bad in [&[][..], &[1, 2, 3][..], &[9; 9][..], &long[..]] {
            assert_eq!(LinkTest::decode(bad), None);
        }
        assert_ne!(relay_tag("a"), relay_tag("b"));
    }
}
