//! Property tests: transcript convergence under any delivery order, tamper evidence of
//! exports, and decoders that round-trip and refuse garbage without panicking.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;

use hotline_core::card::CardIn;
use hotline_core::envelope::Reference;
use hotline_core::{
    Agreement, Body, ChannelId, Coded, Cosignature, DeviceIdentity, DeviceInfo, DeviceKey,
    Envelope, EnvelopeId, Export, MembershipNote, Message, NonResponse, PathNote, Precedence,
    Proposal, Transcript,
};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const CHANNEL: ChannelId = ChannelId([42; 32]);

/// Senders that each keep their own transcript, as devices do, and build envelopes
/// referencing what they have seen. `script` says who sends next and how many
/// envelopes each sender has received from the shared pool before sending.
fn history(script: &[(u8, u8, u8)]) -> (Vec<DeviceInfo>, Vec<(Envelope, EnvelopeId)>) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let identities: Vec<_> = ["north", "south", "mediator"]
        .iter()
        .map(|party| DeviceIdentity::generate(party, "desk", &mut rng).unwrap())
        .collect();
    let roster: Vec<DeviceInfo> = identities.iter().map(|i| i.info().clone()).collect();
    let mut views: Vec<Transcript> = (0..3)
        .map(|_| {
            let mut transcript = Transcript::new(CHANNEL);
            for info in &roster {
                transcript.admit(info);
            }
            transcript
        })
        .collect();
    let mut pool: Vec<(Envelope, EnvelopeId)> = Vec::new();
    let mut delivered = [0usize; 3];
    for (step, (who, catch_up, kind)) in script.iter().enumerate() {
        let who = usize::from(*who % 3);
        // Catch up on part of the pool, in pool order (a sender's own view is causal).
        let target = (delivered[who] + usize::from(*catch_up)).min(pool.len());
        for (envelope, id) in &pool[delivered[who]..target] {
            views[who].insert(envelope.clone(), *id).unwrap();
        }
        delivered[who] = target;
        let me = identities[who].key();
        let (seq, prev) = views[who]
            .head_of(&me)
            .map_or((1, EnvelopeId::NONE), |(seq, id, _)| (seq + 1, id));
        let (seen, lamport) = views[who].next_references(&me);
        let body = match kind % 4 {
            0 | 1 => Body::text(format!("step {step}")),
            2 => Body::ReadReceipt(seen.iter().map(|r| r.id).take(1).collect()),
            _ => {
                let (root, size) = views[who].root_for_next_checkpoint().unwrap();
                Body::Checkpoint {
                    root,
                    size,
                    horizon: 0,
                }
            }
        };
        let mut envelope = Envelope {
            channel: CHANNEL,
            sender: me,
            epoch: 1,
            seq,
            prev,
            prev_epoch: if seq == 1 { 0 } else { 1 },
            seen,
            lamport,
            claimed_time_ms: 1_000 + step as u64,
            body,
            deadline_ms: None,
            signature: None,
        };
        if matches!(envelope.body, Body::Checkpoint { .. }) {
            envelope.sign(&identities[who]);
        }
        let id = envelope.id();
        views[who].insert(envelope.clone(), id).unwrap();
        // A sender's own envelopes are in its view already: skip them on catch-up by
        // appending to the pool after moving its cursor past the end if it was there.
        if delivered[who] == pool.len() {
            delivered[who] += 1;
        }
        pool.push((envelope, id));
    }
    (roster, pool)
}

fn fresh(roster: &[DeviceInfo]) -> Transcript {
    let mut transcript = Transcript::new(CHANNEL);
    for info in roster {
        transcript.admit(info);
    }
    transcript
}

fn script() -> impl Strategy<Value = Vec<(u8, u8, u8)>> {
    proptest::collection::vec((0u8..3, 0u8..6, 0u8..8), 1..40)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Whatever the order and duplication of delivery, every member ends with the same
    /// canonical transcript and root.
    #[test]
    fn convergence_under_any_delivery_order(
        script in script(),
        order in proptest::collection::vec(any::<prop::sample::Index>(), 0..120),
    ) {
        let (roster, pool) = history(&script);
        let mut reference = fresh(&roster);
        for (envelope, id) in &pool {
            reference.insert(envelope.clone(), *id).unwrap();
        }
        prop_assert!(reference.pending().is_empty());
        prop_assert!(reference.findings().is_empty(), "{:?}", reference.findings());

        // Deliver a random sequence (with repeats), then everything, in reverse.
        let mut shuffled = fresh(&roster);
        for index in &order {
            let (envelope, id) = &pool[index.index(pool.len())];
            shuffled.insert(envelope.clone(), *id).unwrap();
        }
        for (envelope, id) in pool.iter().rev() {
            shuffled.insert(envelope.clone(), *id).unwrap();
        }
        let ids = |t: &Transcript| t.canonical().unwrap().into_iter().map(|(id, _)| id).collect::<Vec<_>>();
        prop_assert_eq!(ids(&shuffled), ids(&reference));
        prop_assert_eq!(shuffled.root(), reference.root());
        prop_assert!(shuffled.pending().is_empty());
        prop_assert!(shuffled.findings().is_empty());
    }

    /// The settled prefix never changes once settled: whatever the delivery order, every
    /// settled root a member reported on the way is the root of the same prefix of the
    /// final canonical order, and an RFC 6962 consistency proof links it to the final
    /// settled root.
    #[test]
    fn the_settled_prefix_never_changes_whatever_the_delivery_order(
        script in script(),
        order in proptest::collection::vec(any::<prop::sample::Index>(), 0..120),
    ) {
        let (roster, pool) = history(&script);
        let mut reference = fresh(&roster);
        for (envelope, id) in &pool {
            reference.insert(envelope.clone(), *id).unwrap();
        }
        let canonical: Vec<EnvelopeId> = reference.canonical().unwrap().into_iter().map(|(id, _)| id).collect();

        let mut member = fresh(&roster);
        let mut reported = Vec::new();
        let deliveries = order
            .iter()
            .map(|index| index.index(pool.len()))
            .chain((0..pool.len()).rev());
        for index in deliveries {
            let (envelope, id) = &pool[index];
            member.insert(envelope.clone(), *id).unwrap();
            let size = member.settled_len();
            if let Some((last, _)) = reported.last() {
                prop_assert!(size >= *last, "the settled prefix shrank");
            }
            if size > 0 {
                reported.push((size, member.settled_root(size).unwrap()));
            }
        }
        prop_assert_eq!(member.root(), reference.root());
        prop_assert_eq!(
            member.root().unwrap(),
            hotline_core::transcript::merkle_root(canonical.iter())
        );
        let final_size = member.settled_len();
        prop_assert_eq!(final_size, reference.settled_len());
        let final_root = hotline_core::merkle::ct_root(member.settled_root(final_size).unwrap());
        for (size, root) in reported {
            let expected = hotline_core::transcript::merkle_root(canonical[..size as usize].iter());
            prop_assert_eq!(root, expected, "settled root at {} changed", size);
            let proof = member.consistency_proof(size, final_size).unwrap();
            prop_assert!(
                final_root
                    .verify_consistency(&hotline_core::merkle::ct_root(root), &proof)
                    .is_ok()
            );
        }
        // Every sender wrote at least once in most scripts: then something settled.
        let senders: std::collections::BTreeSet<_> = pool.iter().map(|(e, _)| e.sender).collect();
        if senders.len() == roster.len() {
            prop_assert!(final_size > 0);
        }
    }

    /// Dropping one envelope shows as a gap or a wait, never as a silent success.
    #[test]
    fn a_dropped_envelope_is_noticed(script in script(), drop in any::<prop::sample::Index>()) {
        let (roster, pool) = history(&script);
        let dropped = drop.index(pool.len());
        let mut transcript = fresh(&roster);
        for (index, (envelope, id)) in pool.iter().enumerate() {
            if index != dropped {
                transcript.insert(envelope.clone(), *id).unwrap();
            }
        }
        let referenced = pool.iter().any(|(envelope, _)| {
            envelope.prev == pool[dropped].1 || envelope.seen.iter().any(|r| r.id == pool[dropped].1)
        });
        if referenced {
            prop_assert!(!transcript.pending().is_empty());
        }
        prop_assert_eq!(transcript.len() + transcript.pending().len(), pool.len() - 1);
    }
}

/// One export of a small history, shared by the tamper tests.
fn sample_export() -> &'static Vec<u8> {
    static EXPORT: OnceLock<Vec<u8>> = OnceLock::new();
    EXPORT.get_or_init(|| {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let identity = DeviceIdentity::generate("north", "desk", &mut rng).unwrap();
        let other = DeviceIdentity::generate("south", "desk", &mut rng).unwrap();
        let mut transcript = fresh(&[identity.info().clone(), other.info().clone()]);
        let mut last = EnvelopeId::NONE;
        for seq in 1..=6u64 {
            let (seen, lamport) = transcript.next_references(&identity.key());
            let body = if seq == 6 {
                let (root, size) = transcript.root_for_next_checkpoint().unwrap();
                Body::Checkpoint {
                    root,
                    size,
                    horizon: 0,
                }
            } else if seq == 3 {
                Body::Message(Message {
                    precedence: Precedence::Flash,
                    text: "line 3".into(),
                    code: None,
                })
            } else if seq == 4 {
                Body::NonResponse(NonResponse {
                    message: last,
                    party: "south".into(),
                    precedence: Precedence::Flash,
                    deadline_ms: 99,
                    delivered: true,
                    last_heard_ms: Some(3),
                    paths: vec![PathNote {
                        relay: "https://127.0.0.1:1/#sha256=00".into(),
                        last_answer_ms: Some(2),
                        up: false,
                    }],
                })
            } else if seq == 5 {
                Body::Cosignature(Cosignature::sign(&identity, &CHANNEL, 0, 1, [3; 32]))
            } else {
                Body::text(format!("line {seq}"))
            };
            let mut envelope = Envelope {
                channel: CHANNEL,
                sender: identity.key(),
                epoch: 1,
                seq,
                prev: last,
                prev_epoch: if seq == 1 { 0 } else { 1 },
                seen,
                lamport,
                claimed_time_ms: seq,
                body,
                deadline_ms: Some(99),
                signature: None,
            };
            if envelope.body.kind().is_signed() {
                envelope.sign(&identity);
            }
            last = envelope.id();
            transcript.insert(envelope, last).unwrap();
        }
        Export::write(&transcript, "crisis", &identity).unwrap()
    })
}

/// An export in which north proposes a text, signs it, and then sends a signature that
/// does not hold: the export verifies, counts the bad signature as invalid and never as
/// a signer, and the text is not accepted (south never signed).
#[test]
fn a_signature_that_does_not_hold_is_counted_never_accepted() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let north = DeviceIdentity::generate("north", "desk", &mut rng).unwrap();
    let south = DeviceIdentity::generate("south", "desk", &mut rng).unwrap();
    let mut transcript = fresh(&[north.info().clone(), south.info().clone()]);
    let versions = vec![("en".to_owned(), "Hold fire.".to_owned())];
    let mut last = EnvelopeId::NONE;
    let mut proposal = EnvelopeId::NONE;
    for seq in 1..=4u64 {
        let (seen, lamport) = transcript.next_references(&north.key());
        let body = match seq {
            1 => Body::Agreement(Agreement::Propose(Proposal {
                versions: versions.clone(),
                deadline_ms: None,
            })),
            2 | 3 => {
                let digest = hotline_core::agreement::digest(&CHANNEL, &proposal, &versions);
                let mut signature = hotline_core::agreement::sign(&north, &digest);
                if seq == 3 {
                    signature[0] ^= 1;
                }
                Body::Agreement(Agreement::Sign {
                    proposal,
                    digest,
                    signature,
                })
            }
            _ => {
                let (root, size) = transcript.root_for_next_checkpoint().unwrap();
                Body::Checkpoint {
                    root,
                    size,
                    horizon: 0,
                }
            }
        };
        let mut envelope = Envelope {
            channel: CHANNEL,
            sender: north.key(),
            epoch: 1,
            seq,
            prev: last,
            prev_epoch: if seq == 1 { 0 } else { 1 },
            seen,
            lamport,
            claimed_time_ms: seq,
            body,
            deadline_ms: None,
            signature: None,
        };
        if envelope.body.kind().is_signed() {
            envelope.sign(&north);
        }
        last = envelope.id();
        if seq == 1 {
            proposal = last;
        }
        transcript.insert(envelope, last).unwrap();
    }
    let export = Export::write(&transcript, "crisis", &north).unwrap();
    let report = Export::verify(&export).unwrap();
    let text = &report.agreements[&proposal];
    assert_eq!(text.signed.len(), 1);
    assert_eq!(text.invalid, 1);
    assert!(!report.accepted(&proposal), "south never signed");
}

#[test]
fn sample_export_verifies() {
    let report = Export::verify(sample_export()).unwrap();
    assert_eq!(report.envelopes, 6);
    assert_eq!(report.texts, 3);
    assert_eq!(report.non_responses, 1);
    assert_eq!(report.cosignatures, 1);
    assert_eq!(report.cosignatures_invalid, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// Changing any byte of an export makes verification fail.
    #[test]
    fn any_single_byte_change_fails_verification(index in any::<prop::sample::Index>(), mask in 1u8..=255) {
        let mut bytes = sample_export().clone();
        let position = index.index(bytes.len());
        bytes[position] ^= mask;
        prop_assert!(Export::verify(&bytes).is_err());
    }

    /// Truncating or extending an export makes verification fail.
    #[test]
    fn truncation_and_extension_fail(cut in any::<prop::sample::Index>(), extra in proptest::collection::vec(any::<u8>(), 1..16)) {
        let bytes = sample_export();
        prop_assert!(Export::verify(&bytes[..cut.index(bytes.len())]).is_err());
        let mut longer = bytes.clone();
        longer.extend(extra);
        prop_assert!(Export::verify(&longer).is_err());
    }

    /// Garbage never panics any decoder, and gets a typed error.
    #[test]
    fn decoders_refuse_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Envelope::decode(&bytes);
        let _ = CardIn::decode(&bytes);
        let _ = Export::verify(&bytes);
        let _ = DeviceIdentity::from_secret_bytes(&bytes);
        let _ = DeviceInfo::from_credential_bytes(&bytes);
    }

    /// Every envelope round-trips through its encoding, with the same id.
    #[test]
    fn envelope_round_trip(envelope in arbitrary_envelope()) {
        let bytes = envelope.encode();
        let (decoded, id) = Envelope::decode(&bytes).unwrap();
        prop_assert_eq!(&decoded, &envelope);
        prop_assert_eq!(id, envelope.id());
        // And any strict prefix is refused.
        for cut in [0, bytes.len() / 2, bytes.len() - 1] {
            prop_assert!(Envelope::decode(&bytes[..cut]).is_err());
        }
    }
}

fn arbitrary_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        ".{0,64}".prop_map(Body::text),
        (
            proptest::collection::btree_map("[a-z]{2}(-[A-Za-z]{1,4})?", ".{0,32}", 1..4),
            proptest::option::of(any::<u64>())
        )
            .prop_map(
                |(versions, deadline_ms)| Body::Agreement(Agreement::Propose(Proposal {
                    versions: versions.into_iter().collect(),
                    deadline_ms,
                }))
            ),
        (
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            proptest::collection::vec(any::<u8>(), 64)
        )
            .prop_map(
                |(proposal, digest, signature)| Body::Agreement(Agreement::Sign {
                    proposal: EnvelopeId(proposal),
                    digest,
                    signature: signature.try_into().unwrap(),
                })
            ),
        (
            any::<u64>(),
            any::<u64>(),
            any::<[u8; 32]>(),
            proptest::collection::vec(any::<u8>(), 64)
        )
            .prop_map(
                |(horizon, size, root, signature)| Body::Cosignature(Cosignature {
                    horizon,
                    size,
                    root,
                    signature: signature.try_into().unwrap(),
                })
            ),
        (any::<[u8; 32]>(), ".{0,64}").prop_map(|(proposal, reason)| Body::Agreement(
            Agreement::Reject {
                proposal: EnvelopeId(proposal),
                reason,
            }
        )),
        (
            0usize..4,
            any::<[u8; 32]>(),
            "[A-Z]{1,8}",
            proptest::collection::vec(("[a-z]{1,8}", ".{0,16}"), 0..4)
        )
            .prop_map(|(level, catalogue, id, fields)| Body::Message(Message {
                precedence: Precedence::ALL[level],
                text: String::new(),
                code: Some(Coded {
                    catalogue,
                    id,
                    fields
                }),
            })),
        (0usize..3, ".{0,64}").prop_map(|(level, text)| Body::Message(Message {
            precedence: Precedence::ALL[level],
            text,
            code: None,
        })),
        (
            any::<[u8; 32]>(),
            "[a-z]{1,12}",
            0usize..4,
            any::<u64>(),
            any::<bool>(),
            proptest::option::of(any::<u64>()),
            proptest::collection::vec(
                (
                    "https://[a-z]{1,8}\\.example/#sha256=[0-9a-f]{8}",
                    proptest::option::of(any::<u64>()),
                    any::<bool>()
                ),
                0..3
            ),
        )
            .prop_map(
                |(message, party, level, deadline_ms, delivered, last_heard_ms, paths)| {
                    Body::NonResponse(NonResponse {
                        message: EnvelopeId(message),
                        party,
                        precedence: Precedence::ALL[level],
                        deadline_ms,
                        delivered,
                        last_heard_ms,
                        paths: paths
                            .into_iter()
                            .map(|(relay, last_answer_ms, up)| PathNote {
                                relay,
                                last_answer_ms,
                                up,
                            })
                            .collect(),
                    })
                }
            ),
        proptest::collection::vec(any::<[u8; 32]>(), 0..4)
            .prop_map(|ids| Body::ReadReceipt(ids.into_iter().map(EnvelopeId).collect())),
        proptest::collection::vec(any::<u8>(), 0..32).prop_map(Body::LinkTest),
        ("[a-z]{1,12}", any::<[u8; 32]>()).prop_map(|(party, key)| Body::Membership(
            MembershipNote::Added {
                party,
                device: DeviceKey(key)
            }
        )),
        any::<u64>().prop_map(|epoch| Body::Membership(MembershipNote::KeyUpdated { epoch })),
    ]
}

fn arbitrary_envelope() -> impl Strategy<Value = Envelope> {
    (
        any::<[u8; 32]>(),
        1u64..1000,
        any::<[u8; 32]>(),
        proptest::collection::btree_map(any::<[u8; 32]>(), any::<[u8; 32]>(), 0..4),
        any::<u64>(),
        arbitrary_body(),
        proptest::option::of(any::<u64>()),
        0u64..10,
    )
        .prop_filter_map(
            "sender must not be in seen",
            |(sender, seq, prev, seen, time, body, deadline, epoch)| {
                if seen.contains_key(&sender) {
                    return None;
                }
                Some(Envelope {
                    channel: CHANNEL,
                    sender: DeviceKey(sender),
                    epoch,
                    seq,
                    prev: if seq == 1 {
                        EnvelopeId::NONE
                    } else {
                        EnvelopeId(prev)
                    },
                    prev_epoch: if seq == 1 { 0 } else { epoch },
                    seen: seen
                        .into_iter()
                        .map(|(s, id)| Reference {
                            sender: DeviceKey(s),
                            id: EnvelopeId(id),
                            epoch,
                        })
                        .collect(),
                    lamport: seq,
                    claimed_time_ms: time,
                    signature: body.kind().is_signed().then_some([7; 64]),
                    deadline_ms: deadline,
                    body,
                })
            },
        )
}

/// A checkpoint whose root is not the one this member computes over the same envelopes
/// is recorded as a `CheckpointMismatch` naming its sender (the sync engine raises a
/// `checkpoint` alarm); an honest one is not.
#[test]
fn a_lying_checkpoint_is_found_and_an_honest_one_is_not() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let north = DeviceIdentity::generate("north", "desk", &mut rng).unwrap();
    let south = DeviceIdentity::generate("south", "desk", &mut rng).unwrap();
    let roster = [north.info().clone(), south.info().clone()];
    let mut transcript = fresh(&roster);
    let envelope = |identity: &DeviceIdentity, transcript: &Transcript, body: Body| {
        let me = identity.key();
        let (seq, prev) = transcript
            .head_of(&me)
            .map_or((1, EnvelopeId::NONE), |(seq, id, _)| (seq + 1, id));
        let (seen, lamport) = transcript.next_references(&me);
        let mut envelope = Envelope {
            channel: CHANNEL,
            sender: me,
            epoch: 1,
            seq,
            prev,
            prev_epoch: if seq == 1 { 0 } else { 1 },
            seen,
            lamport,
            claimed_time_ms: 1_000,
            body,
            deadline_ms: None,
            signature: None,
        };
        if matches!(envelope.body, Body::Checkpoint { .. }) {
            envelope.sign(identity);
        }
        let id = envelope.id();
        (envelope, id)
    };
    let (text, id) = envelope(&north, &transcript, Body::text("hello"));
    transcript.insert(text, id).unwrap();
    let (root, size) = transcript.root_for_next_checkpoint().unwrap();
    let honest = Body::Checkpoint {
        root,
        size,
        horizon: 0,
    };
    let (checkpoint, id) = envelope(&south, &transcript, honest);
    transcript.insert(checkpoint, id).unwrap();
    assert!(
        transcript.findings().is_empty(),
        "{:?}",
        transcript.findings()
    );

    let (root, size) = transcript.root_for_next_checkpoint().unwrap();
    let mut wrong = root;
    wrong[0] ^= 1;
    let lying = Body::Checkpoint {
        root: wrong,
        size,
        horizon: 0,
    };
    let (checkpoint, id) = envelope(&south, &transcript, lying);
    transcript.insert(checkpoint, id).unwrap();
    assert!(
        matches!(
            transcript.findings(),
            [hotline_core::Finding::CheckpointMismatch { checkpoint, sender, claimed, computed }]
                if *checkpoint == id && *sender == south.key() && claimed.0 == wrong
                    && computed.0 == root
        ),
        "{:?}",
        transcript.findings()
    );
}

/// Seals a text envelope by `identity` over what `view` holds, and inserts it there.
fn write(view: &mut Transcript, identity: &DeviceIdentity, epoch: u64) -> (Envelope, EnvelopeId) {
    let me = identity.key();
    let (seq, prev) = view
        .head_of(&me)
        .map_or((1, EnvelopeId::NONE), |(seq, id, _)| (seq + 1, id));
    let (seen, lamport) = view.next_references(&me);
    let envelope = Envelope {
        channel: CHANNEL,
        sender: me,
        epoch,
        seq,
        prev,
        prev_epoch: if seq == 1 { 0 } else { epoch },
        seen,
        lamport,
        claimed_time_ms: lamport,
        body: Body::text(format!("{seq}")),
        deadline_ms: None,
        signature: None,
    };
    let id = envelope.id();
    view.insert(envelope.clone(), id).unwrap();
    (envelope, id)
}

#[test]
fn a_removed_members_late_envelope_cannot_rewrite_the_settled_prefix() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let [north, south, gone] = ["north", "south", "gone"]
        .map(|party| DeviceIdentity::generate(party, "desk", &mut rng).unwrap());
    let roster = [
        north.info().clone(),
        south.info().clone(),
        gone.info().clone(),
    ];
    let (mut at_north, mut at_south, mut at_gone) =
        (fresh(&roster), fresh(&roster), fresh(&roster));
    // Sealed before its removal, still in flight.
    let (late, late_id) = write(&mut at_gone, &gone, 1);
    at_north.retire(&gone.key()).unwrap();
    at_south.retire(&gone.key()).unwrap();
    let (n1, n1_id) = write(&mut at_north, &north, 1);
    at_south.insert(n1, n1_id).unwrap();
    let (s1, s1_id) = write(&mut at_south, &south, 1);
    at_north.insert(s1, s1_id).unwrap();
    write(&mut at_north, &north, 1);
    assert_eq!(
        at_north.settled_len(),
        2,
        "north's and south's first envelopes are final"
    );
    let before = at_north.root();
    let settled = at_north.settled_root(2).unwrap();
    assert!(matches!(
        at_north.insert(late, late_id),
        Err(hotline_core::transcript::Rejection::BehindSettled {
            lamport: 1,
            settled: 2
        })
    ));
    assert_eq!(at_north.root(), before);
    assert_eq!(at_north.settled_root(2).unwrap(), settled);
    assert_eq!(at_north.len(), 3);
}

#[test]
fn a_device_that_joined_a_running_channel_seals_only_after_hearing_from_the_others() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let [north, south] =
        ["north", "south"].map(|party| DeviceIdentity::generate(party, "desk", &mut rng).unwrap());
    let roster = [north.info().clone(), south.info().clone()];
    let mut joined = Transcript::with_horizon(CHANNEL, 3);
    let mut at_north = Transcript::with_horizon(CHANNEL, 3);
    for info in &roster {
        joined.admit(info);
        at_north.admit(info);
    }
    assert!(!joined.may_seal(&south.key()));
    let (note, note_id) = write(&mut at_north, &north, 3);
    joined.insert(note, note_id).unwrap();
    assert!(joined.may_seal(&south.key()));
    // The channel's creator (horizon 0) may always seal.
    assert!(fresh(&roster).may_seal(&north.key()));
}

#[test]
fn a_long_unsettled_tail_is_read_from_the_store_and_settles_whole() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let [north, south] =
        ["north", "south"].map(|party| DeviceIdentity::generate(party, "desk", &mut rng).unwrap());
    let roster = [north.info().clone(), south.info().clone()];
    let mut at_north = fresh(&roster);
    let count = hotline_core::transcript::MAX_TAIL_CACHE + 5;
    for _ in 0..count {
        write(&mut at_north, &north, 1);
    }
    // South wrote nothing: nothing is settled, and the tail outgrew its cache.
    assert_eq!(at_north.settled_len(), 0);
    let all = |t: &Transcript| {
        t.canonical()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect::<Vec<_>>()
    };
    let expected = hotline_core::transcript::merkle_root(all(&at_north).iter());
    assert_eq!(at_north.root().unwrap(), expected);
    // South answers over everything: all of north's settle at once.
    let mut at_south = fresh(&roster);
    for (id, envelope) in at_north.canonical().unwrap() {
        at_south.insert(envelope, id).unwrap();
    }
    let (reply, reply_id) = write(&mut at_south, &south, 1);
    at_north.insert(reply, reply_id).unwrap();
    assert_eq!(at_north.settled_len(), count as u64);
    assert_eq!(at_north.settled_root(count as u64).unwrap(), expected);
    assert_eq!(
        at_north.root().unwrap(),
        hotline_core::transcript::merkle_root(all(&at_north).iter())
    );
}

/// Seals `body` by `identity` in `epoch` over what `view` holds (signed when it is a
/// checkpoint), without inserting it.
fn seal(
    view: &Transcript,
    identity: &DeviceIdentity,
    epoch: u64,
    body: Body,
) -> (Envelope, EnvelopeId) {
    let me = identity.key();
    let (seq, prev, prev_epoch) = view
        .head_of(&me)
        .map_or((1, EnvelopeId::NONE, 0), |(seq, id, _)| {
            (seq + 1, id, view.head_epoch(&me).unwrap_or(0))
        });
    let (seen, lamport) = view.next_references(&me);
    let mut envelope = Envelope {
        channel: CHANNEL,
        sender: me,
        epoch,
        seq,
        prev,
        prev_epoch,
        seen,
        lamport,
        claimed_time_ms: lamport,
        body,
        deadline_ms: None,
        signature: None,
    };
    if envelope.body.kind().is_signed() {
        envelope.sign(identity);
    }
    let id = envelope.id();
    (envelope, id)
}

#[test]
fn the_creator_checks_the_checkpoints_of_devices_that_joined_later() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let [north, south] =
        ["north", "south"].map(|party| DeviceIdentity::generate(party, "desk", &mut rng).unwrap());
    // North created the channel (horizon 0) and wrote alone in epoch 0; south joined at
    // epoch 1. `told` heard of the join when it happened; `upgraded` did not (a channel
    // older than the horizon roots): it reads the settled prefix from the start.
    let mut told = Transcript::new(CHANNEL);
    told.admit(north.info());
    let alone = seal(&told, &north, 0, Body::text("before south"));
    told.insert(alone.0.clone(), alone.1).unwrap();
    let mut upgraded = Transcript::new(CHANNEL);
    upgraded.admit(north.info());
    upgraded.insert(alone.0, alone.1).unwrap();
    told.admit(south.info());
    told.note_horizon(1);
    upgraded.admit(south.info());
    let mut at_south = Transcript::with_horizon(CHANNEL, 1);
    at_south.admit(north.info());
    at_south.admit(south.info());
    let deliver = |envelope: &(Envelope, EnvelopeId), to: &mut [&mut Transcript]| {
        for view in to.iter_mut() {
            view.insert(envelope.0.clone(), envelope.1).unwrap();
        }
    };
    for round in 0..3 {
        let note = seal(&told, &north, 1, Body::text(format!("north {round}")));
        deliver(&note, &mut [&mut told, &mut upgraded, &mut at_south]);
        let reply = seal(&at_south, &south, 1, Body::text(format!("south {round}")));
        deliver(&reply, &mut [&mut told, &mut upgraded, &mut at_south]);
    }
    assert!(told.settled_len() >= 4, "{}", told.settled_len());

    let (root, size) = at_south.root_for_next_checkpoint().unwrap();
    assert_eq!(size, 6, "south holds epoch 1 only");
    let honest = seal(
        &at_south,
        &south,
        1,
        Body::Checkpoint {
            root,
            size,
            horizon: 1,
        },
    );
    deliver(&honest, &mut [&mut told, &mut upgraded, &mut at_south]);
    let (root, size) = at_south.root_for_next_checkpoint().unwrap();
    let mut wrong = root;
    wrong[0] ^= 1;
    let lying = seal(
        &at_south,
        &south,
        1,
        Body::Checkpoint {
            root: wrong,
            size,
            horizon: 1,
        },
    );
    deliver(&lying, &mut [&mut told, &mut upgraded]);
    for view in [&told, &upgraded] {
        assert!(
            matches!(
                view.findings(),
                [hotline_core::Finding::CheckpointMismatch { checkpoint, sender, claimed, computed }]
                    if *checkpoint == lying.1 && *sender == south.key() && claimed.0 == wrong
                        && *computed == (root, size)
            ),
            "{:?}",
            view.findings()
        );
    }
}
