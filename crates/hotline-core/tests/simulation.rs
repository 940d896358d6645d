//! Deterministic, seeded simulations of a channel with two sides and a mediator.
//!
//! A relay is modelled as one ordered log; each device reads it through its own
//! delivery queue, which reorders within a window, delays, and duplicates. Everything
//! random comes from the seed, which every failure prints.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, VecDeque};

use hotline_core::{
    Body, Channel, ChannelError, DeviceIdentity, DeviceInfo, EnvelopeId, Event, Export, Outgoing,
    VerifiedContact, card::CardIn, create_card,
};
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Device {
    identity: DeviceIdentity,
    provider: OpenMlsRustCrypto,
    card: Vec<u8>,
    channel: Option<Channel>,
    /// Positions in the log not yet delivered, in delivery order.
    queue: VecDeque<usize>,
    /// Envelopes this device decrypted, for the "cannot read" checks.
    accepted: BTreeSet<EnvelopeId>,
}

impl Device {
    fn new(party: &str, rng: &mut ChaCha8Rng) -> Self {
        let identity = DeviceIdentity::generate(party, "desk", rng).unwrap();
        let provider = OpenMlsRustCrypto::default();
        let card = create_card(
            &identity,
            &provider,
            2,
            &["https://relay.test/#sha256=x".into()],
        )
        .unwrap();
        Self {
            identity,
            provider,
            card,
            channel: None,
            queue: VecDeque::new(),
            accepted: BTreeSet::new(),
        }
    }

    fn info(&self) -> DeviceInfo {
        self.identity.info().clone()
    }

    fn verify_card_of(&self, other: &Device) -> VerifiedContact {
        CardIn::decode(&other.card)
            .unwrap()
            .verify(&other.identity.fingerprint(), self.provider.crypto())
            .unwrap()
    }
}

struct World {
    rng: ChaCha8Rng,
    devices: Vec<Device>,
    log: Vec<Vec<u8>>,
    now_ms: u64,
    window: usize,
    duplicate_per_mille: u32,
}

const NORTH: usize = 0;
const SOUTH: usize = 1;
const MEDIATOR: usize = 2;
const LATECOMER: usize = 3;

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let devices = ["north", "south", "mediator", "observer"]
            .iter()
            .map(|party| Device::new(party, &mut rng))
            .collect();
        let window = rng.gen_range(1..12);
        let duplicate_per_mille = rng.gen_range(0..200);
        Self {
            rng,
            devices,
            log: Vec::new(),
            now_ms: 1_800_000_000_000,
            window,
            duplicate_per_mille,
        }
    }

    /// Appends to the relay log and schedules delivery to every device but the poster.
    fn post(&mut self, from: usize, bytes: Vec<u8>) {
        let position = self.log.len();
        self.log.push(bytes);
        for (index, device) in self.devices.iter_mut().enumerate() {
            if index != from && device.channel.is_some() {
                device.queue.push_back(position);
            }
        }
    }

    /// Posts what a committer operation produced, accepting the commit at once.
    fn post_commit(&mut self, committer: usize, outgoing: Outgoing) {
        let Outgoing::Commit(commit) = outgoing else {
            panic!("expected a commit")
        };
        self.post(committer, commit);
        let device = &mut self.devices[committer];
        let now = self.now_ms;
        let released = device
            .channel
            .as_mut()
            .unwrap()
            .commit_accepted(&device.provider, &device.identity, now)
            .unwrap();
        for out in released {
            match out {
                Outgoing::Message { bytes, .. } => self.post(committer, bytes),
                Outgoing::Welcome { to, bytes } => {
                    for key in to {
                        let joiner = self
                            .devices
                            .iter()
                            .position(|d| d.identity.key() == key)
                            .unwrap();
                        self.join(joiner, &bytes);
                    }
                }
                Outgoing::Commit(_) => panic!("a commit cannot release a commit"),
            }
        }
    }

    fn join(&mut self, joiner: usize, welcome: &[u8]) {
        let contacts: Vec<DeviceInfo> = self
            .devices
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != joiner)
            .map(|(_, device)| device.info())
            .collect();
        let device = &mut self.devices[joiner];
        let channel =
            Channel::join(&device.provider, &device.identity, welcome, &contacts).unwrap();
        device.channel = Some(channel);
        // A newcomer reads the relay log from its beginning: it must not be able to
        // read anything from before its join.
        device.queue = (0..self.log.len()).collect();
    }

    /// Delivers one queued message to `index`, out of order within the window.
    fn deliver_one(&mut self, index: usize) -> bool {
        let window = self.window;
        let duplicate = self.rng.gen_range(0..1000) < self.duplicate_per_mille;
        let device = &mut self.devices[index];
        if device.queue.is_empty() {
            return false;
        }
        let pick = self.rng.gen_range(0..device.queue.len().min(window));
        let Some(position) = device.queue.remove(pick) else {
            return false;
        };
        if duplicate {
            let back = self.rng.gen_range(0..=device.queue.len());
            device.queue.insert(back, position);
        }
        let Some(channel) = device.channel.as_mut() else {
            return true;
        };
        match channel.receive(&device.provider, &self.log[position]) {
            Ok(events) => {
                for event in events {
                    if let Event::Accepted(ids) = &event {
                        device.accepted.extend(ids.iter().copied());
                    }
                    assert!(
                        !matches!(
                            event,
                            Event::Fork { .. }
                                | Event::Refused(_)
                                | Event::UnverifiedMember(_)
                                | Event::BadEnvelope { .. }
                                | Event::Forgery { .. }
                        ),
                        "unexpected {event:?}"
                    );
                }
            }
            // Messages from before a join, or after a removal, cannot be read: that is
            // the point. Anything else is a failure.
            Err(ChannelError::Mls(error)) => {
                if std::env::var("SIM_DEBUG").is_ok() {
                    eprintln!("device {index} position {position}: {error}");
                }
            }
            Err(ChannelError::NotAMember) => {}
            Err(other) => panic!("device {index} failed to receive: {other}"),
        }
        true
    }

    fn commit_waiting_proposals(&mut self) {
        let device = &mut self.devices[NORTH];
        let Some(channel) = device.channel.as_mut() else {
            return;
        };
        if let Some(commit) = channel
            .commit_proposals(&device.provider, &device.identity)
            .unwrap()
        {
            self.post_commit(NORTH, commit);
        }
    }

    fn send(&mut self, index: usize, body: Body) -> Option<EnvelopeId> {
        self.now_ms += 1;
        let now = self.now_ms;
        let device = &mut self.devices[index];
        let channel = device.channel.as_mut()?;
        match channel.send(&device.provider, &device.identity, body, now, None) {
            Ok((id, bytes)) => {
                self.post(index, bytes);
                Some(id)
            }
            Err(ChannelError::AwaitingCommit)
            | Err(ChannelError::AwaitingHistory)
            | Err(ChannelError::NotAMember) => None,
            Err(other) => panic!("send failed: {other}"),
        }
    }

    fn deliver_everything(&mut self) {
        loop {
            self.commit_waiting_proposals();
            let mut progress = false;
            for index in 0..self.devices.len() {
                while self.deliver_one(index) {
                    progress = true;
                }
            }
            if !progress {
                break;
            }
        }
    }
}

/// The scenario of the channel-core issue, under one seed.
fn run(seed: u64, messages: usize) {
    let mut world = World::new(seed);
    let contacts = |world: &World, of: usize, with: &[usize]| -> Vec<VerifiedContact> {
        with.iter()
            .map(|other| world.devices[of].verify_card_of(&world.devices[*other]))
            .collect()
    };

    // North creates the channel and invites south and the mediator.
    let north = &mut world.devices[NORTH];
    north.channel = Some(Channel::create(&north.provider, &north.identity, "crisis").unwrap());
    let invitees = contacts(&world, NORTH, &[SOUTH, MEDIATOR]);
    let north = &mut world.devices[NORTH];
    let commit = north
        .channel
        .as_mut()
        .unwrap()
        .add(&north.provider, &north.identity, invitees)
        .unwrap();
    world.post_commit(NORTH, commit);

    let mut texts = Vec::new();
    let mut removal_position = None;
    let mut join_position = None;
    let mut sent = 0;
    let mut steps = 0;
    while sent < messages {
        steps += 1;
        assert!(steps < messages * 50, "seed {seed}: no progress");
        world.commit_waiting_proposals();
        // Deliver a random amount to random devices.
        for _ in 0..world.rng.gen_range(0..4) {
            let index = world.rng.gen_range(0..world.devices.len());
            world.deliver_one(index);
        }
        let sender = world.rng.gen_range(0..world.devices.len());
        let roll = world.rng.gen_range(0..100);
        let body = match roll {
            0..=79 => Body::text(format!("message {sent} from {sender}")),
            80..=89 => {
                let known: Vec<_> = world.devices[sender].accepted.iter().copied().collect();
                if known.is_empty() {
                    continue;
                }
                let pick = known[world.rng.gen_range(0..known.len())];
                Body::ReadReceipt(vec![pick])
            }
            90..=94 => Body::Checkpoint {
                root: [0; 32],
                size: 0,
                horizon: 0,
            },
            _ => Body::LinkTest(world.rng.r#gen::<[u8; 8]>().to_vec()),
        };
        let is_text = matches!(body, Body::Message(_));
        if let Some(id) = world.send(sender, body) {
            sent += 1;
            if is_text {
                texts.push((sender, id));
            }
        }

        if sent == messages * 3 / 10 {
            // The committer refreshes its keys.
            let north = &mut world.devices[NORTH];
            let channel = north.channel.as_mut().unwrap();
            if let Ok(commit) = channel.update_keys(&north.provider, &north.identity) {
                world.post_commit(NORTH, commit);
            }
            sent += 1;
        }
        if sent == messages / 2 {
            // South refreshes its keys: a proposal that north commits.
            world.deliver_everything();
            let south = &mut world.devices[SOUTH];
            let channel = south.channel.as_mut().unwrap();
            let Outgoing::Message { bytes, .. } = channel
                .update_keys(&south.provider, &south.identity)
                .unwrap()
            else {
                panic!("a member's key update is a proposal")
            };
            world.post(SOUTH, bytes);
            sent += 1;
        }
        if sent == messages * 7 / 10 && removal_position.is_none() {
            let mediator = world.devices[MEDIATOR].identity.key();
            let north = &mut world.devices[NORTH];
            let commit = north
                .channel
                .as_mut()
                .unwrap()
                .remove(&north.provider, &north.identity, &[mediator])
                .unwrap();
            removal_position = Some(world.log.len());
            world.post_commit(NORTH, commit);
        }
        if sent == messages * 8 / 10 && join_position.is_none() {
            let invitee = contacts(&world, NORTH, &[LATECOMER]);
            let north = &mut world.devices[NORTH];
            let commit = north
                .channel
                .as_mut()
                .unwrap()
                .add(&north.provider, &north.identity, invitee)
                .unwrap();
            join_position = Some(world.log.len());
            world.post_commit(NORTH, commit);
        }
    }

    // Heal: deliver everything, then every active member checkpoints, then deliver again.
    world.deliver_everything();
    for index in [NORTH, SOUTH, LATECOMER] {
        assert!(
            world
                .send(
                    index,
                    Body::Checkpoint {
                        root: [0; 32],
                        size: 0,
                        horizon: 0
                    }
                )
                .is_some(),
            "seed {seed}"
        );
    }
    world.deliver_everything();

    let north = world.devices[NORTH].channel.as_ref().unwrap();
    let south = world.devices[SOUTH].channel.as_ref().unwrap();
    let late = world.devices[LATECOMER].channel.as_ref().unwrap();
    let mediator = world.devices[MEDIATOR].channel.as_ref().unwrap();

    // The founders converge on one canonical transcript and root.
    let order = |channel: &Channel| {
        channel
            .transcript()
            .canonical()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        order(north),
        order(south),
        "seed {seed}: transcripts differ"
    );
    assert_eq!(
        north.transcript().root(),
        south.transcript().root(),
        "seed {seed}"
    );
    // What both settled is the same final prefix, with the same root.
    let settled = north
        .transcript()
        .settled_len()
        .min(south.transcript().settled_len());
    assert_eq!(
        north.transcript().settled_root(settled).unwrap(),
        south.transcript().settled_root(settled).unwrap(),
        "seed {seed}: settled roots differ"
    );
    for channel in [north, south, late] {
        assert!(
            channel.transcript().pending().is_empty(),
            "seed {seed}: pending {:?}",
            channel.transcript().pending()
        );
        assert!(
            channel.transcript().findings().is_empty(),
            "seed {seed}: {:?}",
            channel.transcript().findings()
        );
    }
    assert!(north.transcript().len() > messages / 2);

    // The latecomer holds exactly what was sent from its join epoch on.
    let horizon = late.transcript().horizon();
    let expected: Vec<_> = north
        .transcript()
        .canonical()
        .unwrap()
        .into_iter()
        .filter(|(_, envelope)| envelope.epoch >= horizon)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(order(late), expected, "seed {seed}: latecomer's transcript");
    let before_join: BTreeSet<_> = north
        .transcript()
        .canonical()
        .unwrap()
        .into_iter()
        .filter(|(_, envelope)| envelope.epoch < horizon)
        .map(|(id, _)| id)
        .collect();
    assert!(
        world.devices[LATECOMER].accepted.is_disjoint(&before_join),
        "seed {seed}: latecomer read the past"
    );

    // The removed mediator read nothing sent after its removal.
    assert!(!mediator.is_active());
    let removal_epoch = mediator.epoch();
    let after_removal: BTreeSet<_> = north
        .transcript()
        .canonical()
        .unwrap()
        .into_iter()
        .filter(|(_, envelope)| envelope.epoch >= removal_epoch)
        .map(|(id, _)| id)
        .collect();
    assert!(!after_removal.is_empty());
    assert!(
        world.devices[MEDIATOR].accepted.is_disjoint(&after_removal),
        "seed {seed}: mediator read after removal"
    );

    // Every text reached every party present at the end, by the final checkpoints.
    for (_, id) in &texts {
        let delivered = north.delivered_to(id).unwrap();
        assert!(
            delivered.contains("north") && delivered.contains("south"),
            "seed {seed}: {delivered:?}"
        );
    }

    // Both founders' exports verify offline, with the same root.
    for index in [NORTH, SOUTH] {
        world.send(
            index,
            Body::Checkpoint {
                root: [0; 32],
                size: 0,
                horizon: 0,
            },
        );
        let device = &world.devices[index];
        let channel = device.channel.as_ref().unwrap();
        let export = Export::write(channel.transcript(), channel.name(), &device.identity).unwrap();
        let report = Export::verify(&export).unwrap();
        assert_eq!(report.root, channel.transcript().root().unwrap().0);
        world.deliver_everything();
    }
}

#[test]
fn three_parties_a_thousand_messages_converge() {
    run(1, 1000);
}

#[test]
fn many_seeds_converge() {
    let seeds: u64 = std::env::var("HOTLINE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    for seed in 100..100 + seeds {
        run(seed, 120);
    }
}
