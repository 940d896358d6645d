//! Seal + open of one envelope (envelope, MLS encrypt, MLS decrypt, transcript), beside
//! raw openmls create_message + process_message, and beside the per-envelope
//! signature design that hotline did not choose, in one run.
//!
//! `cargo bench -p hotline-core --bench envelope`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hotline_core::card::CardIn;
use hotline_core::{Body, Channel, DeviceIdentity, Outgoing, create_card};
use openmls::prelude::{
    DeserializeBytes as _, KeyPackage, MlsGroup, MlsGroupCreateConfig, MlsGroupJoinConfig,
    MlsMessageBodyIn, MlsMessageIn, ProcessedMessageContent, ProtocolMessage,
    SenderRatchetConfiguration, StagedWelcome,
};
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const SIZES: [usize; 3] = [100, 1024, 64 * 1024];

struct Pair {
    north: DeviceIdentity,
    north_provider: OpenMlsRustCrypto,
    south: DeviceIdentity,
    south_provider: OpenMlsRustCrypto,
}

fn pair() -> Pair {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    Pair {
        north: DeviceIdentity::generate("north", "desk", &mut rng).unwrap(),
        north_provider: OpenMlsRustCrypto::default(),
        south: DeviceIdentity::generate("south", "desk", &mut rng).unwrap(),
        south_provider: OpenMlsRustCrypto::default(),
    }
}

/// Two hotline channel ends, south joined.
fn hotline_pair(p: &Pair) -> (Channel, Channel) {
    let card = create_card(&p.south, &p.south_provider, 1, &[]).unwrap();
    let contact = CardIn::decode(&card)
        .unwrap()
        .verify(&p.south.fingerprint(), p.north_provider.crypto())
        .unwrap();
    let mut north = Channel::create(&p.north_provider, &p.north, "bench").unwrap();
    north
        .add(&p.north_provider, &p.north, vec![contact])
        .unwrap();
    let mut south = None;
    let mut notes = Vec::new();
    for out in north
        .commit_accepted(&p.north_provider, &p.north, 0)
        .unwrap()
    {
        match out {
            Outgoing::Welcome { bytes, .. } => {
                south = Some(
                    Channel::join(
                        &p.south_provider,
                        &p.south,
                        &bytes,
                        &[p.north.info().clone()],
                    )
                    .unwrap(),
                )
            }
            Outgoing::Message { bytes, .. } => notes.push(bytes),
            Outgoing::Commit(_) => unreachable!(),
        }
    }
    let mut south = south.unwrap();
    for note in notes {
        south.receive(&p.south_provider, &note).unwrap();
    }
    (north, south)
}

/// Two raw openmls groups with the same ciphersuite; with hotline's MLS settings (past
/// epochs kept readable, out-of-order tolerance, forward distance) or openmls's defaults.
fn raw_pair(p: &Pair, hotline_settings: bool) -> (MlsGroup, MlsGroup) {
    let ratchet = if hotline_settings {
        SenderRatchetConfiguration::new(
            hotline_core::channel::OUT_OF_ORDER_TOLERANCE,
            hotline_core::channel::MAXIMUM_FORWARD_DISTANCE,
        )
    } else {
        SenderRatchetConfiguration::default()
    };
    let past_epochs = if hotline_settings {
        hotline_core::channel::MAX_PAST_EPOCHS
    } else {
        0
    };
    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(hotline_core::CIPHERSUITE)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(past_epochs)
        .sender_ratchet_configuration(ratchet)
        .build();
    let mut north = MlsGroup::new(
        &p.north_provider,
        &p.north,
        &config,
        p.north.credential_with_key(),
    )
    .unwrap();
    let key_package = KeyPackage::builder()
        .build(
            hotline_core::CIPHERSUITE,
            &p.south_provider,
            &p.south,
            p.south.credential_with_key(),
        )
        .unwrap();
    let (_, welcome, _) = north
        .add_members(
            &p.north_provider,
            &p.north,
            &[key_package.key_package().clone()],
        )
        .unwrap();
    north.merge_pending_commit(&p.north_provider).unwrap();
    let welcome = MlsMessageIn::tls_deserialize_exact_bytes(&welcome.to_bytes().unwrap()).unwrap();
    let MlsMessageBodyIn::Welcome(welcome) = welcome.extract() else {
        unreachable!()
    };
    let join = MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .max_past_epochs(past_epochs)
        .sender_ratchet_configuration(ratchet)
        .build();
    let south = StagedWelcome::new_from_welcome(&p.south_provider, &join, welcome, None)
        .unwrap()
        .into_group(&p.south_provider)
        .unwrap();
    (north, south)
}

/// One message through raw openmls: create, serialize, parse, process.
fn raw_round_trip(p: &Pair, north: &mut MlsGroup, south: &mut MlsGroup, payload: &[u8]) {
    let message = north
        .create_message(&p.north_provider, &p.north, payload)
        .unwrap();
    let bytes = message.to_bytes().unwrap();
    let message = MlsMessageIn::tls_deserialize_exact_bytes(&bytes).unwrap();
    let protocol: ProtocolMessage = message.try_into_protocol_message().unwrap();
    let processed = south.process_message(&p.south_provider, protocol).unwrap();
    assert!(matches!(
        processed.into_content(),
        ProcessedMessageContent::ApplicationMessage(_)
    ));
}

fn seal_and_open(c: &mut Criterion) {
    let mut group = c.benchmark_group("seal+open");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        let payload = vec![b'x'; size];
        let text = String::from_utf8(payload.clone()).unwrap();

        for (name, hotline_settings) in [
            ("raw openmls", false),
            ("raw openmls, hotline's MLS settings", true),
        ] {
            let p = pair();
            let (mut north, mut south) = raw_pair(&p, hotline_settings);
            group.bench_with_input(BenchmarkId::new(name, size), &payload, |b, payload| {
                b.iter(|| {
                    raw_round_trip(&p, &mut north, &mut south, payload);
                })
            });
        }

        let p = pair();
        let (mut north, mut south) = hotline_pair(&p);
        let mut now = 0;
        group.bench_with_input(
            BenchmarkId::new("hotline envelope", size),
            &text,
            |b, text| {
                b.iter(|| {
                    now += 1;
                    let (_, bytes) = north
                        .send(
                            &p.north_provider,
                            &p.north,
                            Body::text(text.clone()),
                            now,
                            None,
                        )
                        .unwrap();
                    south.receive(&p.south_provider, &bytes).unwrap();
                })
            },
        );

        // The alternative design: a second Ed25519 signature on every envelope.
        let p = pair();
        let (mut north, mut south) = raw_pair(&p, false);
        group.bench_with_input(
            BenchmarkId::new("raw openmls + per-envelope signature", size),
            &payload,
            |b, payload| {
                b.iter(|| {
                    let signature = p.north.sign(payload);
                    raw_round_trip(&p, &mut north, &mut south, payload);
                    p.north.key().verify(payload, &signature).unwrap();
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, seal_and_open);
criterion_main!(benches);
