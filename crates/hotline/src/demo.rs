//! `hotline demo`: the whole story of a channel, in memory.
//!
//! Three parties (two sides and a mediator) create identities, compare fingerprints,
//! open a channel, exchange messages and read receipts, and export and verify the
//! transcript. The relay is, for now, an in-memory log that every device reads in
//! order; the networked relay replaces it without changing the story.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use hotline_core::card::CardIn;
use hotline_core::{
    Body, Channel, DeviceIdentity, DeviceInfo, EnvelopeId, Event, Export, Fingerprint, Outgoing,
    create_card, safety_number,
};
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;
use serde_json::json;

use crate::exit;

struct Party {
    identity: DeviceIdentity,
    provider: OpenMlsRustCrypto,
    card: Vec<u8>,
    channel: Option<Channel>,
    read_up_to: usize,
    received: BTreeSet<EnvelopeId>,
}

struct Story {
    parties: Vec<Party>,
    relay_log: Vec<Vec<u8>>,
    json: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Story {
    fn say(&self, line: impl AsRef<str>) {
        if !self.json {
            out!("{}", line.as_ref());
        }
    }

    fn channel_of(
        &mut self,
        index: usize,
    ) -> Result<(&mut Channel, &OpenMlsRustCrypto, &DeviceIdentity)> {
        let party = &mut self.parties[index];
        let channel = party.channel.as_mut().context("party has no channel")?;
        Ok((channel, &party.provider, &party.identity))
    }

    fn send(&mut self, index: usize, body: Body) -> Result<EnvelopeId> {
        let (channel, provider, identity) = self.channel_of(index)?;
        let (id, bytes) = channel.send(provider, identity, body, now_ms(), None)?;
        self.relay_log.push(bytes);
        Ok(id)
    }

    /// Every device reads the relay log up to its end.
    fn sync(&mut self) -> Result<()> {
        for party in &mut self.parties {
            let Some(channel) = party.channel.as_mut() else {
                continue;
            };
            while party.read_up_to < self.relay_log.len() {
                let bytes = &self.relay_log[party.read_up_to];
                party.read_up_to += 1;
                for event in channel.receive(&party.provider, bytes)? {
                    match event {
                        Event::Accepted(ids) => party.received.extend(ids),
                        Event::Fork { .. } | Event::Refused(_) | Event::UnverifiedMember(_) => {
                            bail!("{}: {event:?}", party.identity.info().party)
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }
}

pub fn run(json_output: bool) -> ExitCode {
    match story(json_output) {
        Ok(summary) => {
            let ok = summary["transcripts_identical"] == true
                && summary["transcript_verified"] == true
                && summary["tampered_export_refused"] == true
                && summary["wrong_fingerprint_refused"] == true;
            if json_output {
                out!("{summary}");
            } else {
                out!("\nEvery check held.");
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(exit::ERROR)
            }
        }
        Err(error) => {
            eprintln!("hotline demo: a check failed: {error:#}");
            ExitCode::from(exit::ERROR)
        }
    }
}

fn story(json_output: bool) -> Result<serde_json::Value> {
    let mut rng = rand::rngs::OsRng;
    let names = [
        ("north", "duty-desk"),
        ("south", "duty-desk"),
        ("mediator", "office"),
    ];
    let mut parties = Vec::new();
    for (party, device) in names {
        let identity = DeviceIdentity::generate(party, device, &mut rng)?;
        let provider = OpenMlsRustCrypto::default();
        let card = create_card(&identity, &provider, 4, &[])?;
        parties.push(Party {
            identity,
            provider,
            card,
            channel: None,
            read_up_to: 0,
            received: BTreeSet::new(),
        });
    }
    let mut story = Story {
        parties,
        relay_log: Vec::new(),
        json: json_output,
    };

    story.say("1. Three parties create their device identities.");
    for party in &story.parties {
        let info = party.identity.info();
        story.say(format!(
            "   {:<9} fingerprint {}",
            info.party,
            info.fingerprint()
        ));
    }
    let north_fp = story.parties[0].identity.fingerprint();
    let south_fp = story.parties[1].identity.fingerprint();
    story.say(format!(
        "   north and south read their safety number to each other:\n   {}",
        safety_number(&north_fp, &south_fp)
    ));

    story
        .say("2. Each imports the others' contact cards with the fingerprint read over the phone.");
    let wrong = Fingerprint::parse(&"1".repeat(30))?;
    let refused = CardIn::decode(&story.parties[1].card)?
        .verify(&wrong, story.parties[0].provider.crypto())
        .is_err();
    story.say(format!(
        "   a card checked against a wrong fingerprint is refused: {}",
        if refused { "yes" } else { "NO" }
    ));
    let mut verified = Vec::new();
    for other in [1, 2] {
        let card = CardIn::decode(&story.parties[other].card)?;
        let fingerprint = story.parties[other].identity.fingerprint();
        verified.push(card.verify(&fingerprint, story.parties[0].provider.crypto())?);
    }

    story.say("3. north creates the channel \"crisis-line\" and adds south and the mediator.");
    let north = &story.parties[0];
    let mut channel = Channel::create(&north.provider, &north.identity, "crisis-line")?;
    let Outgoing::Commit(commit) = channel.add(&north.provider, &north.identity, verified)? else {
        bail!("adding members did not produce a commit");
    };
    story.relay_log.push(commit);
    let released = channel.commit_accepted(&north.provider, &north.identity, now_ms())?;
    story.parties[0].channel = Some(channel);
    story.parties[0].read_up_to = story.relay_log.len();
    let mut welcome = None;
    for out in released {
        match out {
            Outgoing::Welcome { bytes, .. } => welcome = Some(bytes),
            Outgoing::Message { bytes, .. } => story.relay_log.push(bytes),
            Outgoing::Commit(_) => bail!("unexpected commit"),
        }
    }
    let welcome = welcome.ok_or_else(|| anyhow!("no Welcome was released"))?;
    let infos: Vec<DeviceInfo> = story
        .parties
        .iter()
        .map(|p| p.identity.info().clone())
        .collect();
    for index in [1, 2] {
        let party = &mut story.parties[index];
        let contacts: Vec<_> = infos
            .iter()
            .filter(|i| i.key != party.identity.key())
            .cloned()
            .collect();
        party.channel = Some(Channel::join(
            &party.provider,
            &party.identity,
            &welcome,
            &contacts,
        )?);
        // The Welcome carries the epoch after the commit: the commit itself is not for them.
        party.read_up_to = 1;
    }
    story.say("   south and the mediator join after checking every member against their verified contacts.");
    story.sync()?;

    story.say("4. Messages cross the line.");
    let texts = [
        (
            0,
            "North here. We see movement near the border; it is an exercise, not an advance.",
        ),
        (
            1,
            "South acknowledges. Request written notice of its end time.",
        ),
        (
            2,
            "Mediator: both messages received; proposing a call at 06:00 UTC.",
        ),
        (
            0,
            "North agrees to 06:00 UTC and will send the notice within the hour.",
        ),
    ];
    let mut sent = Vec::new();
    for (index, text) in texts {
        let id = story.send(index, Body::Text(text.into()))?;
        story.say(format!(
            "   {:<9} {}",
            story.parties[index].identity.info().party,
            text
        ));
        sent.push((index, id));
        story.sync()?;
    }

    story.say("5. People read and acknowledge; every device checkpoints its view of history.");
    for (reader, (_, id)) in [
        (1, sent[0]),
        (2, sent[0]),
        (0, sent[1]),
        (0, sent[2]),
        (1, sent[3]),
    ] {
        story.send(reader, Body::ReadReceipt(vec![id]))?;
    }
    story.sync()?;
    for index in 0..3 {
        let (channel, provider, identity) = story.channel_of(index)?;
        let (_, bytes) = channel.checkpoint(provider, identity, now_ms())?;
        story.relay_log.push(bytes);
        story.sync()?;
    }
    let mut delivered_count = 0;
    {
        let north = story.parties[0]
            .channel
            .as_ref()
            .context("north has no channel")?;
        for (sender, id) in &sent {
            let delivered = north.delivered_to(id);
            let read = north.read_by(id);
            story.say(format!(
                "   message {} from {:<9} delivered to {:?}, read by {:?}",
                &id.to_hex()[..12],
                story.parties[*sender].identity.info().party,
                delivered,
                read
            ));
        }
        for (sender, id) in &sent {
            delivered_count += story
                .parties
                .iter()
                .enumerate()
                .filter(|(index, party)| index != sender && party.received.contains(id))
                .count();
        }
    }

    story.say("6. north exports the transcript; anyone can verify it offline.");
    let (channel, provider, identity) = story.channel_of(0)?;
    let (_, bytes) = channel.checkpoint(provider, identity, now_ms())?;
    let export = Export::write(channel.transcript(), channel.name(), identity)?;
    story.relay_log.push(bytes);
    story.sync()?;
    let report = Export::verify(&export);
    let verified_ok = report.is_ok();
    let roots: BTreeSet<_> = story
        .parties
        .iter()
        .filter_map(|p| p.channel.as_ref())
        .map(|c| c.transcript().root())
        .collect();
    let identical = roots.len() == 1;
    let mut tampered = export.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x01;
    let tampered_refused = Export::verify(&tampered).is_err();
    if let Ok(report) = &report {
        story.say(format!(
            "   export of {} bytes verifies: {} envelopes, root {}",
            export.len(),
            report.envelopes,
            hex::encode(report.root)
        ));
    }
    story.say(format!(
        "   all three transcripts identical: {}",
        if identical { "yes" } else { "NO" }
    ));
    story.say(format!(
        "   the export with one bit flipped is refused: {}",
        if tampered_refused { "yes" } else { "NO" }
    ));

    Ok(json!({
        "parties": story.parties.iter().map(|p| p.identity.info().party.clone()).collect::<Vec<_>>(),
        "messages_sent": sent.len(),
        "messages_delivered": delivered_count,
        "transcripts_identical": identical,
        "transcript_verified": verified_ok,
        "tampered_export_refused": tampered_refused,
        "wrong_fingerprint_refused": refused,
        "relay": "in-memory (the networked relay is not built yet)",
    }))
}
