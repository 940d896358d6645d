//! Channel operations and their refusals, one device pair or trio at a time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hotline_core::card::{CardError, CardIn};
use hotline_core::{
    Body, Channel, ChannelError, DeviceIdentity, DeviceInfo, Event, Fingerprint, Outgoing,
    create_card,
};
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

struct Device {
    identity: DeviceIdentity,
    provider: OpenMlsRustCrypto,
    card: Vec<u8>,
}

fn device(party: &str, seed: u64) -> Device {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let identity = DeviceIdentity::generate(party, "desk", &mut rng).unwrap();
    let provider = OpenMlsRustCrypto::default();
    let card = create_card(&identity, &provider, 1, &[]).unwrap();
    Device {
        identity,
        provider,
        card,
    }
}

/// North creates a channel with `others`; returns north's channel, the Welcome and the
/// membership notes released with it.
fn channel_with(north: &Device, others: &[&Device]) -> (Channel, Vec<u8>, Vec<Vec<u8>>) {
    let mut channel = Channel::create(&north.provider, &north.identity, "crisis").unwrap();
    let contacts = others
        .iter()
        .map(|d| {
            CardIn::decode(&d.card)
                .unwrap()
                .verify(&d.identity.fingerprint(), north.provider.crypto())
                .unwrap()
        })
        .collect();
    let Outgoing::Commit(_) = channel
        .add(&north.provider, &north.identity, contacts)
        .unwrap()
    else {
        panic!()
    };
    let released = channel
        .commit_accepted(&north.provider, &north.identity, 1)
        .unwrap();
    let mut welcome = None;
    let mut notes = Vec::new();
    for out in released {
        match out {
            Outgoing::Welcome { bytes, .. } => welcome = Some(bytes),
            Outgoing::Message { bytes, .. } => notes.push(bytes),
            Outgoing::Commit(_) => panic!(),
        }
    }
    (channel, welcome.unwrap(), notes)
}

/// A channel of north and south, south joined and caught up with north's notes.
fn north_and_south(north: &Device, south: &Device) -> (Channel, Channel) {
    let (channel, welcome, notes) = channel_with(north, &[south]);
    let mut joined = Channel::join(
        &south.provider,
        &south.identity,
        &welcome,
        &[north.identity.info().clone()],
    )
    .unwrap();
    for note in notes {
        joined.receive(&south.provider, &note).unwrap();
    }
    (channel, joined)
}

#[test]
fn a_card_with_the_wrong_fingerprint_is_refused_with_a_typed_error() {
    let north = device("north", 1);
    let south = device("south", 2);
    let wrong = Fingerprint::parse(&"0".repeat(30)).unwrap();
    let error = CardIn::decode(&south.card)
        .unwrap()
        .verify(&wrong, north.provider.crypto())
        .unwrap_err();
    assert!(
        matches!(error, CardError::FingerprintMismatch { .. }),
        "{error}"
    );
    // Another device's fingerprint is just as wrong.
    let error = CardIn::decode(&south.card)
        .unwrap()
        .verify(&north.identity.fingerprint(), north.provider.crypto())
        .unwrap_err();
    assert!(matches!(error, CardError::FingerprintMismatch { .. }));
}

#[test]
fn a_card_altered_in_any_byte_is_refused() {
    let north = device("north", 1);
    let south = device("south", 2);
    for position in (0..south.card.len()).step_by(7) {
        let mut card = south.card.clone();
        card[position] ^= 0x20;
        let verified = CardIn::decode(&card)
            .and_then(|c| c.verify(&south.identity.fingerprint(), north.provider.crypto()));
        assert!(verified.is_err(), "byte {position} altered but accepted");
    }
}

#[test]
fn joining_is_refused_when_a_member_was_never_verified() {
    let north = device("north", 1);
    let south = device("south", 2);
    let mediator = device("mediator", 3);
    let (_, welcome, _) = channel_with(&north, &[&south, &mediator]);
    // South verified north but not the mediator.
    let error = Channel::join(
        &south.provider,
        &south.identity,
        &welcome,
        &[north.identity.info().clone()],
    )
    .unwrap_err();
    match error {
        ChannelError::TrustRefused { party, .. } => assert_eq!(party, "mediator"),
        other => panic!("expected TrustRefused, got {other}"),
    }
}

#[test]
fn joining_is_refused_when_a_verified_name_differs() {
    let north = device("north", 1);
    let south = device("south", 2);
    let (_, welcome, _) = channel_with(&north, &[&south]);
    let mut impostor: DeviceInfo = north.identity.info().clone();
    impostor.party = "someone-else".into();
    let error = Channel::join(&south.provider, &south.identity, &welcome, &[impostor]).unwrap_err();
    assert!(matches!(error, ChannelError::TrustRefused { .. }));
}

#[test]
fn garbage_and_foreign_messages_change_nothing() {
    let north = device("north", 1);
    let south = device("south", 2);
    let (mut channel, mut joined) = north_and_south(&north, &south);
    let before = (joined.epoch(), joined.transcript().len());
    for garbage in [&b""[..], b"\x00\x01", &[0xff; 300][..]] {
        assert!(matches!(
            joined.receive(&south.provider, garbage),
            Err(ChannelError::Malformed(_))
        ));
    }
    // A message of another channel.
    let other = device("other", 9);
    let mut foreign = Channel::create(&other.provider, &other.identity, "elsewhere").unwrap();
    let (_, foreign_bytes) = foreign
        .send(&other.provider, &other.identity, Body::text("x"), 1, None)
        .unwrap();
    assert!(matches!(
        joined.receive(&south.provider, &foreign_bytes),
        Err(ChannelError::WrongChannel)
    ));
    // A real message altered in one byte.
    let (_, bytes) = channel
        .send(
            &north.provider,
            &north.identity,
            Body::text("hello"),
            2,
            None,
        )
        .unwrap();
    let mut altered = bytes.clone();
    let last = altered.len() - 3;
    altered[last] ^= 1;
    assert!(joined.receive(&south.provider, &altered).is_err());
    assert_eq!((joined.epoch(), joined.transcript().len()), before);
    // The genuine one still goes through, once.
    let events = joined.receive(&south.provider, &bytes).unwrap();
    assert!(matches!(events.as_slice(), [Event::Accepted(ids)] if ids.len() == 1));
    assert_eq!(
        joined.receive(&south.provider, &bytes).unwrap(),
        vec![Event::Duplicate]
    );
}

#[test]
fn only_the_committer_commits_and_hand_over_moves_the_role() {
    let north = device("north", 1);
    let south = device("south", 2);
    let (mut channel, mut joined) = north_and_south(&north, &south);
    assert_eq!(joined.committer(), north.identity.key());
    assert!(matches!(
        joined.remove(&south.provider, &south.identity, &[north.identity.key()]),
        Err(ChannelError::NotCommitter)
    ));
    let (_, handover) = channel
        .hand_over(&north.provider, &north.identity, south.identity.key(), 5)
        .unwrap();
    let events = joined.receive(&south.provider, &handover).unwrap();
    assert!(events.contains(&Event::CommitterChanged(south.identity.key())));
    assert!(joined.is_committer());
    assert!(!channel.is_committer());
    // South's commit is now the valid one, and north follows it.
    let Outgoing::Commit(commit) = joined
        .update_keys(&south.provider, &south.identity)
        .unwrap()
    else {
        panic!()
    };
    joined
        .commit_accepted(&south.provider, &south.identity, 6)
        .unwrap();
    let events = channel.receive(&north.provider, &commit).unwrap();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::EpochChanged { .. }))
    );
    assert_eq!(channel.epoch(), joined.epoch());
}

#[test]
fn a_commit_rejected_by_the_relay_leaves_the_channel_as_it_was() {
    let north = device("north", 1);
    let south = device("south", 2);
    let mut channel = Channel::create(&north.provider, &north.identity, "crisis").unwrap();
    let contact = CardIn::decode(&south.card)
        .unwrap()
        .verify(&south.identity.fingerprint(), north.provider.crypto())
        .unwrap();
    channel
        .add(&north.provider, &north.identity, vec![contact])
        .unwrap();
    assert!(matches!(
        channel.update_keys(&north.provider, &north.identity),
        Err(ChannelError::CommitPending)
    ));
    channel.commit_rejected(&north.provider).unwrap();
    assert_eq!(channel.epoch(), 0);
    assert_eq!(channel.members().len(), 1);
    // And the channel works on.
    channel
        .send(
            &north.provider,
            &north.identity,
            Body::text("still here"),
            3,
            None,
        )
        .unwrap();
}

/// An ephemeral frame reaches the other member with its payload, tells the sender what
/// the member holds (so a quiet line still shows delivery), and leaves both transcripts
/// as they were; a second opening of the same bytes is refused by MLS, changing nothing.
#[test]
fn ephemeral_frames_carry_delivery_without_entering_the_transcript() {
    let north = device("north", 1);
    let south = device("south", 2);
    let (mut north_channel, mut south_channel) = north_and_south(&north, &south);
    let (id, bytes) = north_channel
        .send(
            &north.provider,
            &north.identity,
            Body::text("hold the line"),
            10,
            None,
        )
        .unwrap();
    south_channel.receive(&south.provider, &bytes).unwrap();
    assert!(!north_channel.delivered_to(&id).unwrap().contains("south"));

    let (north_len, south_len) = (
        north_channel.transcript().len(),
        south_channel.transcript().len(),
    );
    let frame = south_channel
        .send_ephemeral(&south.provider, &south.identity, b"probe", 20)
        .unwrap();
    let events = north_channel.receive(&north.provider, &frame).unwrap();
    assert_eq!(
        events,
        [Event::Ephemeral {
            sender: south.identity.key(),
            sent_ms: 20,
            payload: b"probe".to_vec()
        }]
    );
    assert!(north_channel.delivered_to(&id).unwrap().contains("south"));
    assert_eq!(north_channel.transcript().len(), north_len);
    assert_eq!(south_channel.transcript().len(), south_len);
    // Delivery learnt from a frame survives a snapshot.
    let state = north_channel.transcript().state();
    assert!(
        state
            .held
            .iter()
            .any(|(device, held)| *device == south.identity.key()
                && held.contains(&(north.identity.key(), 2))),
        "{:?}",
        state.held
    );
    // The same bytes again: MLS spent their key; an error, and nothing changed.
    assert!(north_channel.receive(&north.provider, &frame).is_err());
    assert_eq!(north_channel.transcript().len(), north_len);
    assert!(matches!(
        south_channel.send_ephemeral(&south.provider, &south.identity, &[0; 4097], 30),
        Err(ChannelError::FrameTooLarge(4097))
    ));
}
