//! `hotline console`: the duty officer's screen.
//!
//! ```text
//!  hotline console: north/desk, channel crisis (2 of 3)                  LINE UP
//!  relay https://…:8443  up        rtt 12 ms   last ok 3.1 s ago
//!  party south           heard 2.0 s ago
//!  ALARM #4 dropped (relay https://…) since 40 s: skipped messages 3..=3 …
//!  ─ messages ────────────────────────────────────────────────────────────
//!  12:01:03  north     [delivered: south; read: -]  The exercise ends at 18:00
//!  ─────────────────────────────────────────────────────────────────────────
//!  > typed text_
//!  Enter send · Ctrl-A read all · Tab next channel · Esc quit
//! ```
//!
//! The console receives as `sync --follow` does (on a thread of its own, with its own
//! store connection, holding the home's receive lock), and redraws from the database
//! whenever a report comes and every second: what it shows is exactly what `status` and
//! `log` would print at that moment. A message typed is stored (durable when the screen
//! says so) and handed to the relays at once, as `send` does. It needs a terminal; in
//! scripts, `sync --follow --json`, `status --json` and `log --json` say the same.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::style::{Color, Print, ResetColor, SetForegroundColor};
use crossterm::{cursor, execute, queue, terminal};
use hotline_client::line::Status;
use hotline_client::{LogEntry, Store};
use hotline_core::Body;

use crate::device::{Failure, Outcome, failure};
use crate::exit;
use crate::inert::inert;

/// One line of the screen and its colour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub text: String,
    pub color: Option<Color>,
}

impl Line {
    fn plain(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            color: None,
        }
    }

    fn colored(text: impl Into<String>, color: Color) -> Self {
        Self {
            text: text.into(),
            color: Some(color),
        }
    }
}

/// What the screen shows, read from the store.
#[derive(Debug, Clone)]
pub struct View {
    pub me: String,
    pub channel: Option<String>,
    pub channels: usize,
    pub position: usize,
    pub status: Status,
    pub log: Vec<LogEntry>,
    pub now_ms: u64,
}

/// Lays the view out in `width` × `height` characters: header, relays, parties,
/// alarms, as many of the newest messages as fit, the input line and the key help.
pub fn render(view: &View, input: &str, flash: &str, width: usize, height: usize) -> Vec<Line> {
    let fit = |text: String| -> String { text.chars().take(width).collect() };
    let ago = |ms: Option<u64>| match ms {
        Some(ms) => format!("{:.1} s ago", view.now_ms.saturating_sub(ms) as f64 / 1e3),
        None => "never".into(),
    };
    let mut top = Vec::new();
    let line_state = if view.status.line_down() {
        "LINE DOWN"
    } else {
        "LINE UP"
    };
    let title = match &view.channel {
        Some(name) => format!(
            " hotline console: {}, channel {name} ({} of {})",
            view.me,
            view.position + 1,
            view.channels
        ),
        None => format!(" hotline console: {}, no channel yet", view.me),
    };
    // The line's state always shows, at the right; the title gives way.
    let room = width.saturating_sub(line_state.len() + 1);
    let title: String = title.chars().take(room).collect();
    let pad = room - title.chars().count();
    top.push(Line::colored(
        fit(format!("{title}{} {line_state}", " ".repeat(pad))),
        if view.status.line_down() {
            Color::Red
        } else {
            Color::Green
        },
    ));
    for relay in &view.status.relays {
        let rtt = relay
            .rtt_ms
            .map_or_else(|| "rtt -".to_owned(), |ms| format!("rtt {ms} ms"));
        let color = match relay.state.as_str() {
            "up" => Color::Green,
            "degraded" | "unknown" => Color::Yellow,
            _ => Color::Red,
        };
        let error = relay
            .error
            .as_deref()
            .map(|e| format!("  error: {e}"))
            .unwrap_or_default();
        top.push(Line::colored(
            fit(format!(
                " relay {}  {:<8}  {rtt}  last ok {}{error}",
                relay.name,
                relay.state.as_str(),
                ago(relay.last_ok_ms)
            )),
            color,
        ));
    }
    for party in &view.status.parties {
        top.push(Line::plain(fit(format!(
            " party {:<12} heard {}",
            party.party,
            ago(party.last_heard_ms)
        ))));
    }
    top.push(Line::plain(fit(format!(
        " outbox {} queued · {} of this party's messages unacknowledged",
        view.status.outbox, view.status.unacknowledged
    ))));
    let alarms = &view.status.alarms;
    for alarm in alarms.iter().take(4) {
        let about: Vec<String> = [
            alarm.relay.as_ref().map(|url| {
                let name = view
                    .status
                    .relays
                    .iter()
                    .find(|relay| relay.url == *url)
                    .map_or(url.as_str(), |relay| relay.name.as_str());
                format!("relay {name}")
            }),
            alarm.party.as_ref().map(|p| format!("party {p}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        top.push(Line::colored(
            fit(format!(
                " ALARM {}{} ({}) since {}: {}",
                alarm.id.map(|id| format!("#{id} ")).unwrap_or_default(),
                alarm.kind,
                about.join(", "),
                ago(Some(alarm.since_ms)),
                alarm.detail
            )),
            Color::Red,
        ));
    }
    if alarms.len() > 4 {
        top.push(Line::colored(
            fit(format!(
                " … {} more alarms: hotline status",
                alarms.len() - 4
            )),
            Color::Red,
        ));
    }
    top.push(Line::plain(fit(format!(
        " ─ messages {}",
        "─".repeat(width)
    ))));

    let bottom = vec![
        Line::plain(fit("─".repeat(width))),
        Line::plain(fit(format!(" > {input}"))),
        if flash.is_empty() {
            Line::plain(fit(
                " Enter send · Ctrl-A mark all read · Tab next channel · Esc quit".into(),
            ))
        } else {
            Line::colored(fit(format!(" {flash}")), Color::Yellow)
        },
    ];
    // The input line stays on screen however small it is: the header gives way first.
    top.truncate(height.saturating_sub(bottom.len()));
    let room = height.saturating_sub(top.len() + bottom.len());
    let first = view.log.len().saturating_sub(room);
    let mut lines = top;
    for entry in &view.log[first..] {
        let marks = |set: &std::collections::BTreeSet<String>| {
            if set.is_empty() {
                "-".to_owned()
            } else {
                set.iter().cloned().collect::<Vec<_>>().join(",")
            }
        };
        let secs = entry.time_ms / 1000;
        let clock = format!(
            "{:02}:{:02}:{:02}",
            secs / 3600 % 24,
            secs / 60 % 60,
            secs % 60
        );
        let unread_by_me =
            entry.from != view.me_party() && !entry.read_by.contains(view.me_party());
        let line = fit(format!(
            " {clock}  {:<10} [delivered: {}; read: {}]  {}",
            inert(&entry.from),
            marks(&entry.delivered_to),
            marks(&entry.read_by),
            inert(&entry.text)
        ));
        lines.push(if unread_by_me {
            Line::colored(line, Color::Cyan)
        } else {
            Line::plain(line)
        });
    }
    while lines.len() + bottom.len() < height {
        lines.push(Line::plain(""));
    }
    lines.extend(bottom);
    lines.truncate(height);
    lines
}

impl View {
    /// This device's party (the part of `me` before the slash).
    fn me_party(&self) -> &str {
        self.me.split('/').next().unwrap_or(&self.me)
    }

    fn read(store: &mut Store, position: usize) -> Result<View, Failure> {
        let info = store.identity().info().clone();
        let channels = store.channels()?;
        let position = if channels.is_empty() {
            0
        } else {
            position % channels.len()
        };
        let channel = channels.get(position).map(|c| c.name.clone());
        let log = match &channel {
            Some(name) => store.log(name)?,
            None => Vec::new(),
        };
        let now_ms = now_ms();
        Ok(View {
            me: format!("{}/{}", info.party, info.device),
            channel,
            channels: channels.len(),
            position,
            status: store.status(now_ms)?,
            log,
            now_ms,
        })
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Puts the terminal back however the console ends.
struct Screen;

impl Screen {
    fn enter() -> Result<Self, Failure> {
        terminal::enable_raw_mode()
            .map_err(|e| failure(format!("cannot use the terminal: {e}")))?;
        let screen = Screen;
        execute!(std::io::stdout(), terminal::EnterAlternateScreen)
            .map_err(|e| failure(format!("cannot use the terminal: {e}")))?;
        Ok(screen)
    }

    fn draw(&self, lines: &[Line], input_len: usize) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        queue!(out, terminal::Clear(terminal::ClearType::All))?;
        for (row, line) in lines.iter().enumerate() {
            queue!(out, cursor::MoveTo(0, row as u16))?;
            if let Some(color) = line.color {
                queue!(out, SetForegroundColor(color))?;
            }
            queue!(out, Print(&line.text), ResetColor)?;
        }
        let input_row = lines.len().saturating_sub(2) as u16;
        queue!(out, cursor::MoveTo((3 + input_len) as u16, input_row))?;
        out.flush()
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(std::io::stdout(), terminal::LeaveAlternateScreen);
        let _ = terminal::disable_raw_mode();
    }
}

/// Receives as `sync --follow` does until `stop` fires; tells `updates` after each
/// report.
fn follow(home: PathBuf, updates: mpsc::Sender<String>, stop: tokio::sync::oneshot::Receiver<()>) {
    let run = || -> Result<(), String> {
        let mut store = Store::open(&home).map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let config = hotline_client::sync::FollowConfig::default();
        runtime.block_on(async {
            let following = hotline_client::sync::follow(&mut store, &config, |report| {
                let note = if report.refused.is_empty() {
                    String::new()
                } else {
                    format!("refused: {}", report.refused.join("; "))
                };
                let _ = updates.send(note);
                std::ops::ControlFlow::Continue(())
            });
            tokio::select! {
                result = following => result.map_err(|e| e.to_string()),
                _ = stop => Ok(()),
            }
        })
    };
    if let Err(error) = run() {
        let _ = updates.send(format!("receiving stopped: {error}"));
    }
}

/// Hands the outbox to the relays at once, on a thread of its own; says how it went.
fn push(home: PathBuf, updates: mpsc::Sender<String>, what: String) {
    std::thread::spawn(move || {
        let report = (|| -> Result<String, String> {
            let mut store = Store::open(&home).map_err(|e| e.to_string())?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let pushed = runtime.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(5),
                    hotline_client::sync::push_once(&mut store),
                )
                .await
            });
            Ok(match pushed {
                Ok(Ok(report)) if report.relays.is_empty() => format!(
                    "{what}: stored; the channel has no relay (hotline bundle export hands it over)"
                ),
                Ok(Ok(report)) => {
                    let reached = report.relays.values().filter(|e| e.is_none()).count();
                    format!(
                        "{what}: stored; relayed to {reached} of {} relays",
                        report.relays.len()
                    )
                }
                Ok(Err(error)) => format!("{what}: stored; relaying failed: {error}"),
                Err(_) => format!("{what}: stored; no relay answered within 5 s (queued)"),
            })
        })();
        let _ = updates.send(report.unwrap_or_else(|e| format!("{what}: {e}")));
    });
}

pub fn run(home: &Path, channel: Option<&str>) -> Outcome {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(Failure {
            message:
                "hotline console needs a terminal; in scripts use hotline sync --follow --json, \
                      hotline status --json and hotline log CHANNEL --json"
                    .into(),
            code: exit::USAGE,
        });
    }
    hotline_relay::tls::install_provider();
    let mut store = Store::open(home)?;
    let _lock = store.home().lock_receiving()?;
    let mut position = 0;
    if let Some(name) = channel {
        let channels = store.channels()?;
        position = channels
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| failure(format!("no channel {name:?}: see hotline channel list")))?;
    }
    let (updates, incoming) = mpsc::channel::<String>();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let follower = {
        let (home, updates) = (home.to_path_buf(), updates.clone());
        std::thread::spawn(move || follow(home, updates, stopped))
    };
    let screen = Screen::enter()?;
    let mut input = String::new();
    let mut flash = String::new();
    let mut view = View::read(&mut store, position)?;
    let mut refreshed = Instant::now();
    let mut shown: Vec<Line> = Vec::new();
    let result = loop {
        // A terminal that does not say its size (some pseudo-terminals): 80 × 24.
        let (width, height) = match terminal::size() {
            Ok((width, height)) if width > 0 && height > 0 => (width, height),
            _ => (80, 24),
        };
        let lines = render(&view, &input, &flash, width as usize, height as usize);
        if lines != shown {
            if let Err(error) = screen.draw(&lines, input.chars().count()) {
                break Err(failure(format!("cannot draw: {error}")));
            }
            shown = lines;
        }
        let mut changed = false;
        while let Ok(note) = incoming.try_recv() {
            if !note.is_empty() {
                flash = note;
            }
            changed = true;
        }
        if event::poll(Duration::from_millis(250)).unwrap_or(false) {
            let key = match event::read() {
                Ok(Event::Key(key)) if key.kind != KeyEventKind::Release => key,
                Ok(_) => continue,
                Err(error) => break Err(failure(format!("cannot read the keyboard: {error}"))),
            };
            match handle(key, &mut input) {
                Action::Quit => break Ok(()),
                Action::None => continue,
                Action::NextChannel => position = view.position + 1,
                Action::Send(text) => match &view.channel {
                    Some(name) => match store.send(name, Body::Text(text), None) {
                        Ok(id) => {
                            let what = format!("message {}", &id.to_hex()[..12]);
                            flash = format!("{what}: stored; relaying…");
                            push(home.to_path_buf(), updates.clone(), what);
                        }
                        Err(error) => flash = format!("not sent: {error}"),
                    },
                    None => flash = "no channel yet: create or join one first".into(),
                },
                Action::ReadAll => {
                    let me = view.me_party().to_owned();
                    let unread: Vec<String> = view
                        .log
                        .iter()
                        .filter(|e| e.from != me && !e.read_by.contains(&me))
                        .map(|e| e.id.to_hex())
                        .collect();
                    if let Some(name) = view.channel.clone() {
                        let mut marked = 0;
                        for id in &unread {
                            match store.ack(&name, id) {
                                Ok(_) => marked += 1,
                                Err(error) => {
                                    flash = format!("not marked read: {error}");
                                    break;
                                }
                            }
                        }
                        if marked > 0 {
                            flash = format!("{marked} marked read; receipts relaying…");
                            push(home.to_path_buf(), updates.clone(), "read receipts".into());
                        }
                    }
                }
            }
            changed = true;
        }
        if changed || refreshed.elapsed() >= Duration::from_secs(1) {
            match View::read(&mut store, position) {
                Ok(fresh) => view = fresh,
                Err(error) => flash = format!("cannot read the store: {}", error.message),
            }
            refreshed = Instant::now();
        }
    };
    drop(screen);
    let _ = stop.send(());
    let _ = follower.join();
    result
}

#[derive(Debug, PartialEq, Eq)]
enum Action {
    None,
    Quit,
    NextChannel,
    Send(String),
    ReadAll,
}

/// What a key does to the input line.
fn handle(key: KeyEvent, input: &mut String) -> Action {
    let control = key.modifiers.contains(KeyModifiers::CONTROL);
    match key.code {
        KeyCode::Esc => Action::Quit,
        KeyCode::Char('c' | 'd') if control => Action::Quit,
        KeyCode::Char('a') if control => Action::ReadAll,
        KeyCode::Tab => Action::NextChannel,
        KeyCode::Enter => {
            let text = input.trim().to_owned();
            input.clear();
            if text.is_empty() {
                Action::None
            } else {
                Action::Send(text)
            }
        }
        KeyCode::Backspace => {
            input.pop();
            Action::None
        }
        KeyCode::Char(c) if !control => {
            // A message is bounded by what an envelope may carry; the line, by sense.
            if input.len() < 4096 {
                input.push(c);
            }
            Action::None
        }
        _ => Action::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotline_client::line::{Alarm, PartyStatus, PathState, RelayStatus};

    fn view(state: PathState, alarms: usize, messages: usize) -> View {
        let log = (0..messages)
            .map(|n| LogEntry {
                id: hotline_core::EnvelopeId([n as u8; 32]),
                from: if n % 2 == 0 { "north" } else { "south" }.into(),
                time_ms: 1_800_000_000_000 + n as u64 * 1000,
                text: format!("message {n}"),
                deadline_ms: None,
                delivered_to: ["south".to_owned()].into(),
                read_by: Default::default(),
            })
            .collect();
        View {
            me: "north/desk".into(),
            channel: Some("crisis".into()),
            channels: 1,
            position: 0,
            status: Status {
                relays: vec![RelayStatus {
                    url: "https://127.0.0.1:8443/#sha256=00".into(),
                    name: "neutral".into(),
                    state,
                    rtt_ms: Some(12),
                    last_ok_ms: Some(1_800_000_000_000),
                    error: None,
                }],
                parties: vec![PartyStatus {
                    party: "south".into(),
                    last_heard_ms: None,
                }],
                outbox: 0,
                unacknowledged: 0,
                alarms: (0..alarms)
                    .map(|n| Alarm {
                        id: Some(n as u64),
                        kind: "dropped".into(),
                        relay: Some("https://127.0.0.1:8443/#sha256=00".into()),
                        party: None,
                        message: None,
                        since_ms: 1_800_000_000_000,
                        detail: "skipped".into(),
                    })
                    .collect(),
                interval_ms: 60_000,
            },
            log,
            now_ms: 1_800_000_010_000,
        }
    }

    #[test]
    fn the_screen_fits_and_shows_the_newest_messages_and_the_alarms() {
        let lines = render(&view(PathState::Up, 6, 50), "draft", "", 80, 20);
        assert_eq!(lines.len(), 20);
        assert!(lines.iter().all(|l| l.text.chars().count() <= 80));
        assert!(lines[0].text.ends_with("LINE UP"), "{:?}", lines[0]);
        assert!(lines.iter().any(|l| l.text.contains("ALARM #0 dropped")));
        assert!(lines.iter().any(|l| l.text.contains("2 more alarms")));
        // The newest message is just above the input line; older ones scrolled off.
        assert!(lines[16].text.contains("message 49"), "{:?}", lines[16]);
        assert!(!lines.iter().any(|l| l.text.contains("message 0 ")));
        assert_eq!(lines[18].text, " > draft");
        // South's messages are unread by north: highlighted.
        assert_eq!(lines[16].color, Some(Color::Cyan));
    }

    #[test]
    fn a_line_down_is_red_and_a_tiny_screen_still_fits() {
        let lines = render(&view(PathState::Down, 0, 3), "", "sent", 30, 5);
        assert_eq!(lines.len(), 5);
        assert!(lines.iter().all(|l| l.text.chars().count() <= 30));
        assert_eq!(lines[0].color, Some(Color::Red));
        assert!(lines[0].text.contains("LINE"), "{:?}", lines[0]);
        assert_eq!(lines[3].text, " > ", "the input line stays");
        assert_eq!(lines[4].text, " sent");
    }

    #[test]
    fn keys_edit_send_and_quit() {
        let key = |code, modifiers| KeyEvent::new(code, modifiers);
        let mut input = String::new();
        for c in "hi".chars() {
            assert_eq!(
                handle(key(KeyCode::Char(c), KeyModifiers::NONE), &mut input),
                Action::None
            );
        }
        handle(key(KeyCode::Backspace, KeyModifiers::NONE), &mut input);
        assert_eq!(input, "h");
        assert_eq!(
            handle(key(KeyCode::Enter, KeyModifiers::NONE), &mut input),
            Action::Send("h".into())
        );
        assert!(input.is_empty());
        assert_eq!(
            handle(key(KeyCode::Enter, KeyModifiers::NONE), &mut input),
            Action::None,
            "an empty line sends nothing"
        );
        assert_eq!(
            handle(key(KeyCode::Char('a'), KeyModifiers::CONTROL), &mut input),
            Action::ReadAll
        );
        assert_eq!(
            handle(key(KeyCode::Char('c'), KeyModifiers::CONTROL), &mut input),
            Action::Quit
        );
    }
}
