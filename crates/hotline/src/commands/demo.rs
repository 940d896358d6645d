//! `hotline demo`: the whole story on loopback, with three real relays.
//!
//! Three relays (HTTPS, self-signed certificates pinned in their addresses, embedded
//! SQLite; one run by each side and a neutral one) and three devices (two sides and a
//! mediator), each with its own store in a temporary directory: they compare
//! fingerprints, open a channel through all three relays, exchange messages, lose the
//! neutral relay in the middle (the line stays up, `status` shows it down and alarms),
//! get it back and converge, exchange read receipts, and export and verify the
//! transcript.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, bail};
use hotline_client::Store;
use hotline_client::line::{PathState, Status};
use hotline_client::sync::sync_once;
use hotline_core::{Body, EnvelopeId, Export, Fingerprint, Message, Precedence, safety_number};
use hotline_relay::server::{self, Limits};
use hotline_relay::storage::SqliteStorage;
use hotline_relay::tls;
use serde_json::json;

use crate::exit;

struct Story {
    json: bool,
    runtime: tokio::runtime::Runtime,
    devices: Vec<Store>,
    /// The relay stopped on purpose: its failures are expected.
    down: Option<String>,
}

/// One relay of the demo, which can be stopped and started again on the same data and
/// address (so its pinned address stays the same).
struct DemoRelay {
    data: PathBuf,
    address: std::net::SocketAddr,
    url: String,
    running: Option<server::Running>,
}

impl DemoRelay {
    fn start(runtime: &tokio::runtime::Runtime, data: PathBuf) -> Result<DemoRelay> {
        let running = Self::serve(runtime, &data, "127.0.0.1:0".parse()?)?;
        let (cert, _) = tls::load_or_create(&data)?;
        let url = tls::relay_url(&running.address.to_string(), &tls::pin_of(&cert));
        Ok(DemoRelay {
            data,
            address: running.address,
            url,
            running: Some(running),
        })
    }

    fn serve(
        runtime: &tokio::runtime::Runtime,
        data: &Path,
        address: std::net::SocketAddr,
    ) -> Result<server::Running> {
        let (cert, key) = tls::load_or_create(data)?;
        let limits = Limits::default();
        let storage = SqliteStorage::open(&data.join("relay.db"), limits.quotas())?;
        let notary = hotline_relay::storage::Notary::new(&key)?;
        Ok(runtime.block_on(server::serve(
            address,
            tls::server_config(cert, key)?,
            notary,
            storage,
            limits,
        ))?)
    }

    fn stop(&mut self, runtime: &tokio::runtime::Runtime) {
        if let Some(running) = self.running.take() {
            runtime.block_on(running.shutdown());
        }
    }

    fn restart(&mut self, runtime: &tokio::runtime::Runtime) -> Result<()> {
        self.running = Some(Self::serve(runtime, &self.data, self.address)?);
        Ok(())
    }
}

const NAMES: [&str; 3] = ["north", "south", "mediator"];
const RELAY_NAMES: [&str; 3] = ["north's", "south's", "neutral"];
/// Link tests in the demo: every half second, so a dead relay shows within seconds.
const DEMO_LINK_TEST_MS: u64 = 500;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Story {
    fn say(&self, line: impl AsRef<str>) {
        if !self.json {
            out!("{}", line.as_ref());
        }
    }

    /// Every device syncs, twice, so that what one sends on the first pass reaches the
    /// others on the second.
    fn sync_all(&mut self) -> Result<usize> {
        let mut received = 0;
        for _ in 0..2 {
            received += self.sync_pass()?;
        }
        Ok(received)
    }

    /// Every device syncs once; returns how many messages moved (pushed or arrived).
    fn sync_pass(&mut self) -> Result<usize> {
        let mut received = 0;
        for device in &mut self.devices {
            let report = self.runtime.block_on(sync_once(device))?;
            if let Some(refused) = report.refused.first() {
                bail!("a message was refused: {refused}");
            }
            if let Some((url, Some(error))) = report
                .relays
                .iter()
                .find(|(url, e)| e.is_some() && self.down.as_ref() != Some(*url))
            {
                bail!("relay {url} failed: {error}");
            }
            received += report.received + report.pushed;
        }
        Ok(received)
    }

    /// Syncs until `done` holds for north's status, for at most `limit`.
    fn sync_until(
        &mut self,
        limit: std::time::Duration,
        done: impl Fn(&Status) -> bool,
    ) -> Result<Status> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            self.sync_pass()?;
            let status = self.devices[0].status(now_ms())?;
            if done(&status) || std::time::Instant::now() >= deadline {
                return Ok(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    fn show_relays(&self, status: &Status, names: &[(String, &str)]) {
        for relay in &status.relays {
            let name = names
                .iter()
                .find(|(url, _)| *url == relay.url)
                .map_or("?", |(_, name)| name);
            self.say(format!(
                "   relay {name:<8} {:<8} round trip {}",
                relay.state.as_str(),
                relay
                    .rtt_ms
                    .map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms"))
            ));
        }
    }

    fn send(&mut self, index: usize, text: &str) -> Result<EnvelopeId> {
        let id = self.devices[index].send("crisis-line", Body::text(text), None)?;
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
                && summary["relay_shown_down"] == true
                && summary["relay_down_alarm"] == true
                && summary["relay_recovered"] == true
                && summary["delivered_while_relay_down"] == 4
                && summary["tampered_export_refused"] == true
                && summary["wrong_fingerprint_refused"] == true
                && summary["flash_alarmed"] == true
                && summary["flash_read_first"] == true
                && summary["agreed_text_accepted"] == true
                && summary["agreed_text_proven"] == true;
            if json_output {
                out_json!(summary);
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
    let mut relays = Vec::new();
    for name in ["relay-north", "relay-south", "relay-neutral"] {
        relays.push(DemoRelay::start(&runtime, dir.join(name))?);
    }
    let urls: Vec<String> = relays.iter().map(|r| r.url.clone()).collect();
    let names: Vec<(String, &str)> = urls.iter().cloned().zip(RELAY_NAMES).collect();

    let mut devices = Vec::new();
    for name in NAMES {
        let mut device = Store::init(&dir.join(name), name, "duty-desk", &urls)?;
        device.set_link_test_interval(DEMO_LINK_TEST_MS)?;
        devices.push(device);
    }
    let mut story = Story {
        json: json_output,
        runtime,
        devices,
        down: None,
    };
    story.say("0. Three relays run on loopback, one run by each side and a neutral one:");
    for (url, name) in &names {
        story.say(format!("   {name:<8} {url}"));
    }
    story.say("   (each certificate is pinned by the hash in its address)");

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
        "3. north creates the channel \"crisis-line\" on all three relays with south and the mediator.",
    );
    story.devices[0].create_channel("crisis-line", &["south".into(), "mediator".into()], &urls)?;
    story.sync_all()?;
    for device in &mut story.devices[1..] {
        if device.channels()?.is_empty() {
            bail!("{} did not join", device.identity().info().party);
        }
    }
    story.say("   south and the mediator found their invitations on the relays and joined after checking every member.");
    story.say(format!(
        "   every device sends a link test every {DEMO_LINK_TEST_MS} ms; every other device answers it once per relay path."
    ));

    story.say("4. Messages cross the line, through every relay.");
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
    for (index, text) in &texts[..2] {
        let id = story.send(*index, text)?;
        sent.push((*index, id));
        story.sync_all()?;
    }
    let status = story.sync_until(std::time::Duration::from_secs(10), |status| {
        status.relays.iter().all(|r| r.state == PathState::Up)
    })?;
    story.say("   north's status:");
    story.show_relays(&status, &names);

    story.say("5. The neutral relay stops. The line stays up on the other two.");
    let stopped = urls[2].clone();
    relays[2].stop(&story.runtime);
    story.down = Some(stopped.clone());
    let mut sent_while_down = Vec::new();
    for (index, text) in &texts[2..] {
        let id = story.send(*index, text)?;
        sent_while_down.push((*index, id));
        story.sync_all()?;
    }
    let delivered_while_down = delivered_count(&mut story, &sent_while_down)?;
    story.say(format!(
        "   messages sent while it is down and delivered to every other party: {delivered_while_down} of {}",
        sent_while_down.len() * 2
    ));
    let window = std::time::Duration::from_millis(DEMO_LINK_TEST_MS * 3 + 3_000);
    let status = story.sync_until(window, |status| {
        status
            .relays
            .iter()
            .any(|r| r.url == stopped && r.state == PathState::Down)
    })?;
    let shown_down = status
        .relays
        .iter()
        .any(|r| r.url == stopped && r.state == PathState::Down);
    let alarmed = status
        .alarms
        .iter()
        .any(|a| a.kind == "relay-down" && a.relay.as_deref() == Some(stopped.as_str()));
    story.say("   north's status, three link-test intervals later:");
    story.show_relays(&status, &names);
    story.say(format!(
        "   alarm raised naming the neutral relay: {}",
        if alarmed { "yes" } else { "NO" }
    ));
    sent.extend(sent_while_down);

    story
        .say("6. The neutral relay comes back; what it missed is offered again and it catches up.");
    relays[2].restart(&story.runtime)?;
    story.down = None;
    let status = story.sync_until(window, |status| {
        status.relays.iter().all(|r| r.state == PathState::Up)
    })?;
    let recovered = status.relays.iter().all(|r| r.state == PathState::Up);
    story.show_relays(&status, &names);

    story.say("7. South sends a FLASH: read by 10 minutes, or south's device escalates.");
    let routine = story.send(2, "Mediator: the call is confirmed for 06:00 UTC.")?;
    sent.push((2, routine));
    let flash = story.devices[1].send(
        "crisis-line",
        Body::Message(Message {
            precedence: Precedence::Flash,
            text: "South: unidentified aircraft over the strait. Yours? Answer now.".into(),
            code: None,
        }),
        None,
    )?;
    story.say(format!(
        "   {:<9} FLASH South: unidentified aircraft over the strait. Yours? Answer now.",
        NAMES[1]
    ));
    sent.push((1, flash));
    story.sync_all()?;
    story.sync_all()?;
    let now = story.devices[0].now();
    let north_status = story.devices[0].status(now)?;
    let flash_alarmed = north_status
        .alarms
        .iter()
        .any(|a| a.kind == "flash" && a.message == Some(flash.to_hex()));
    story.say(format!(
        "   north's status shows the unread FLASH as an alarm: {}",
        if flash_alarmed { "yes" } else { "NO" }
    ));
    let first = story.devices[0]
        .ack_next("crisis-line")?
        .map(|(read, _)| read);
    let flash_read_first = first == Some(flash);
    story.say(format!(
        "   north's next unread message (ack --next) is the FLASH, not the earlier routine one: {}",
        if flash_read_first { "yes" } else { "NO" }
    ));
    story.sync_all()?;

    story.say(
        "8. North proposes an agreed text in two languages; it holds once every party signs it.",
    );
    let versions = vec![
        (
            "en".to_owned(),
            "Both sides hold all exercises within 50 km of the border until 18:00 UTC.".to_owned(),
        ),
        (
            "fr".to_owned(),
            "Les deux parties suspendent tout exercice à moins de 50 km de la frontière jusqu'à 18 h UTC."
                .to_owned(),
        ),
    ];
    let agreed = story.devices[0].propose_agreement("crisis-line", versions, None)?;
    story.sync_all()?;
    story.sync_all()?;
    for index in [1, 2] {
        story.devices[index].sign_agreement("crisis-line", &agreed.to_hex())?;
        story.say(format!(
            "   {:<9} signed agreed text {}",
            NAMES[index],
            &agreed.to_hex()[..12]
        ));
    }
    story.sync_all()?;
    story.sync_all()?;
    let agreed_state = story.devices[0]
        .agreement("crisis-line", &agreed.to_hex())?
        .state;
    story.say(format!(
        "   at north, the agreed text is {}",
        agreed_state.as_str()
    ));
    let agreed_text_accepted = agreed_state == hotline_client::store::AgreementState::Accepted;

    story.say("9. People read and acknowledge; every device checkpoints its view of history.");
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
            "   {}message {} from {:<9} delivered to {:?}, read by {:?}",
            crate::commands::level_mark(entry.precedence),
            &entry.id.to_hex()[..12],
            entry.from,
            entry.delivered_to,
            entry.read_by
        ));
    }
    let delivered = delivered_count(&mut story, &sent)?;

    story.say("10. north exports the transcript; anyone can verify it offline.");
    // Link tests pause so that the three transcripts can settle.
    for device in &mut story.devices {
        device.set_link_test_interval(3_600_000)?;
    }
    for _ in 0..20 {
        let moved = story.sync_pass()?;
        if moved == 0 {
            break;
        }
    }
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
    let agreed_text_proven = report.as_ref().is_ok_and(|report| report.accepted(&agreed));
    story.say(format!(
        "   the export proves the agreed text signed by every party: {}",
        if agreed_text_proven { "yes" } else { "NO" }
    ));
    for relay in &mut relays {
        relay.stop(&story.runtime);
    }
    Ok(json!({
        "parties": NAMES,
        "messages_sent": sent.len(),
        "messages_delivered": delivered,
        "transcripts_identical": identical,
        "transcript_verified": verified,
        "tampered_export_refused": tampered_refused,
        "wrong_fingerprint_refused": refused,
        "relays": urls,
        "relay_stopped": stopped,
        "relay_shown_down": shown_down,
        "relay_down_alarm": alarmed,
        "relay_recovered": recovered,
        "delivered_while_relay_down": delivered_while_down,
        "flash_alarmed": flash_alarmed,
        "flash_read_first": flash_read_first,
        "agreed_text_accepted": agreed_text_accepted,
        "agreed_text_proven": agreed_text_proven,
    }))
}

/// How many (message, recipient) pairs hold: every other device has the message.
fn delivered_count(story: &mut Story, sent: &[(usize, EnvelopeId)]) -> Result<usize> {
    let mut delivered = 0;
    for (sender, id) in sent {
        for (index, device) in story.devices.iter_mut().enumerate() {
            if index != *sender && device.log("crisis-line")?.iter().any(|e| e.id == *id) {
                delivered += 1;
            }
        }
    }
    Ok(delivered)
}
