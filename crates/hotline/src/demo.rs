//! `hotline demo`: the whole story on loopback, with a real relay.
//!
//! A relay (HTTPS, self-signed certificate pinned in its address, embedded SQLite) and
//! three devices (two sides and a mediator), each with its own store in a temporary
//! directory: they compare fingerprints, open a channel through the relay, exchange
//! messages and read receipts, and export and verify the transcript.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, bail};
use hotline_client::Store;
use hotline_client::sync::sync_once;
use hotline_core::{Body, EnvelopeId, Export, Fingerprint, safety_number};
use hotline_relay::server::{self, Limits};
use hotline_relay::storage::SqliteStorage;
use hotline_relay::tls;
use serde_json::json;

use crate::exit;

struct Story {
    json: bool,
    runtime: tokio::runtime::Runtime,
    devices: Vec<Store>,
}

const NAMES: [&str; 3] = ["north", "south", "mediator"];

impl Story {
    fn say(&self, line: impl AsRef<str>) {
        if !self.json {
            out!("{}", line.as_ref());
        }
    }

    /// Every device syncs, twice, so that what one sends on the first pass reaches the
    /// others on the second.
    fn sync_all(&mut self) -> Result<()> {
        for _ in 0..2 {
            for device in &mut self.devices {
                let report = self.runtime.block_on(sync_once(device))?;
                if let Some(refused) = report.refused.first() {
                    bail!("a message was refused: {refused}");
                }
                if let Some((url, Some(error))) = report.relays.iter().find(|(_, e)| e.is_some()) {
                    bail!("relay {url} failed: {error}");
                }
            }
        }
        Ok(())
    }

    fn send(&mut self, index: usize, text: &str) -> Result<EnvelopeId> {
        let id = self.devices[index].send("crisis-line", Body::Text(text.into()), None)?;
        self.say(format!("   {:<9} {text}", NAMES[index]));
        Ok(id)
    }
}

fn temporary_directory() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "hotline-demo-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(dir)
}

pub fn run(json_output: bool) -> ExitCode {
    let dir = match temporary_directory() {
        Ok(dir) => dir,
        Err(error) => {
            eprintln!("hotline demo: cannot create a temporary directory: {error}");
            return ExitCode::from(exit::ERROR);
        }
    };
    let result = story(&dir, json_output);
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(summary) => {
            let ok = summary["transcripts_identical"] == true
                && summary["transcript_verified"] == true
                && summary["tampered_export_refused"] == true
                && summary["wrong_fingerprint_refused"] == true;
            if json_output {
                out!("{summary}");
            } else if ok {
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

fn story(dir: &Path, json_output: bool) -> Result<serde_json::Value> {
    tls::install_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let relay_dir = dir.join("relay");
    let (cert, key) = tls::load_or_create(&relay_dir)?;
    let pin = tls::pin_of(&cert);
    let limits = Limits::default();
    let storage = SqliteStorage::open(&relay_dir.join("relay.db"), limits.quota_per_log)?;
    let running = runtime.block_on(server::serve(
        "127.0.0.1:0".parse()?,
        tls::server_config(cert, key)?,
        storage,
        limits,
    ))?;
    let url = tls::relay_url(&running.address.to_string(), &pin);

    let mut devices = Vec::new();
    for name in NAMES {
        devices.push(Store::init(
            &dir.join(name),
            name,
            "duty-desk",
            std::slice::from_ref(&url),
        )?);
    }
    let mut story = Story {
        json: json_output,
        runtime,
        devices,
    };
    story.say(format!("0. A relay runs on loopback: {url}"));
    story.say("   (its certificate is pinned by the hash in its address)");

    story.say("1. Three parties create their device identities.");
    for device in &story.devices {
        let info = device.identity().info();
        story.say(format!(
            "   {:<9} fingerprint {}",
            info.party,
            info.fingerprint()
        ));
    }
    let fingerprints: Vec<Fingerprint> = story
        .devices
        .iter()
        .map(|d| d.identity().fingerprint())
        .collect();
    story.say(format!(
        "   north and south read their safety number to each other:\n   {}",
        safety_number(&fingerprints[0], &fingerprints[1])
    ));

    story
        .say("2. Each imports the others' contact cards with the fingerprint read over the phone.");
    let cards: Vec<Vec<u8>> = story
        .devices
        .iter()
        .map(Store::card)
        .collect::<Result<_, _>>()?;
    let wrong = Fingerprint::parse(&"1".repeat(30))?;
    let refused = story.devices[0]
        .import_card(&cards[1], &wrong)
        .is_err_and(|e| e.is_trust_refusal());
    story.say(format!(
        "   a card checked against a wrong fingerprint is refused: {}",
        if refused { "yes" } else { "NO" }
    ));
    for reader in 0..3 {
        for owner in 0..3 {
            if reader != owner {
                story.devices[reader].import_card(&cards[owner], &fingerprints[owner])?;
            }
        }
    }

    story.say(
        "3. north creates the channel \"crisis-line\" on the relay with south and the mediator.",
    );
    story.devices[0].create_channel(
        "crisis-line",
        &["south".into(), "mediator".into()],
        std::slice::from_ref(&url),
    )?;
    story.sync_all()?;
    for device in &mut story.devices[1..] {
        if device.channels()?.is_empty() {
            bail!("{} did not join", device.identity().info().party);
        }
    }
    story.say("   south and the mediator found their invitations on the relay and joined after checking every member.");

    story.say("4. Messages cross the line, through the relay.");
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
        let id = story.send(index, text)?;
        sent.push((index, id));
        story.sync_all()?;
    }

    story.say("5. People read and acknowledge; every device checkpoints its view of history.");
    for (reader, (_, id)) in [
        (1, sent[0]),
        (2, sent[0]),
        (0, sent[1]),
        (0, sent[2]),
        (1, sent[3]),
    ] {
        story.devices[reader].ack("crisis-line", &id.to_hex())?;
    }
    story.sync_all()?;
    for index in 0..3 {
        story.devices[index].export("crisis-line")?;
        story.sync_all()?;
    }
    let log = story.devices[0].log("crisis-line")?;
    for entry in &log {
        story.say(format!(
            "   message {} from {:<9} delivered to {:?}, read by {:?}",
            &entry.id.to_hex()[..12],
            entry.from,
            entry.delivered_to,
            entry.read_by
        ));
    }
    let mut delivered = 0;
    for (sender, id) in &sent {
        for (index, device) in story.devices.iter_mut().enumerate() {
            if index != *sender && device.log("crisis-line")?.iter().any(|e| e.id == *id) {
                delivered += 1;
            }
        }
    }

    story.say("6. north exports the transcript; anyone can verify it offline.");
    let export = story.devices[0].export("crisis-line")?;
    story.sync_all()?;
    let report = Export::verify(&export);
    let roots: BTreeSet<_> = story
        .devices
        .iter_mut()
        .map(|d| d.transcript_root("crisis-line"))
        .collect::<Result<_, _>>()?;
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
    let verified = report.is_ok();
    story.runtime.block_on(running.shutdown());
    Ok(json!({
        "parties": NAMES,
        "messages_sent": sent.len(),
        "messages_delivered": delivered,
        "transcripts_identical": identical,
        "transcript_verified": verified,
        "tampered_export_refused": tampered_refused,
        "wrong_fingerprint_refused": refused,
        "relays": [url],
    }))
}
