//! `hotline console`: the duty officer's screen (layout in [`screen`]).
//!
//! The console receives as `sync --follow` does (on a thread of its own, with its own
//! store connection, holding the home's receive lock), or, when a `sync --follow`
//! service already receives for this home, leaves receiving to it and only displays
//! and sends. It redraws from the database whenever a report comes and every second:
//! what it shows is what `status` and `log` would print at that moment. A message typed
//! is stored (durable when the screen says so) and handed to the relays at once, as
//! `send` does; read receipts likewise. It needs a terminal; in scripts,
//! `sync --follow --json`, `status --json` and `log --json` say the same.

mod screen;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crossterm::event::{
    self, DisableBracketedPaste, EnableBracketedPaste, Event, KeyCode, KeyEvent, KeyEventKind,
    KeyModifiers,
};
use crossterm::{execute, terminal};
use hotline_client::handoff::Handed;
use hotline_client::sync::Wake;
use hotline_client::{HomeError, Store};
use hotline_core::Body;
use ratatui::backend::CrosstermBackend;
use ratatui::layout::Rect;
use ratatui::{Terminal, TerminalOptions, Viewport};

use crate::commands::{Failure, Outcome, failure};
use crate::exit;
use screen::{Receiving, Ui, View};

/// How many characters the input line holds. Longer texts: `hotline send`.
const MAX_INPUT: usize = 4096;
/// How many of the newest messages the console reads at first; scrolling back past the
/// oldest read reads this many more, up to [`MAX_HISTORY`].
const HISTORY_STEP: usize = 200;
const MAX_HISTORY: usize = 10_000;

impl View {
    fn read(
        store: &mut Store,
        position: usize,
        history: usize,
        receiving: &Receiving,
    ) -> Result<View, Failure> {
        let info = store.identity().info().clone();
        let channels = store.channels()?;
        let position = if channels.is_empty() {
            0
        } else {
            position % channels.len()
        };
        let channel = channels.get(position).map(|c| c.name.clone());
        let log = match &channel {
            Some(name) => store.log_last(name, false, Some(history))?,
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
            receiving: receiving.clone(),
        })
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

type Screen = Terminal<CrosstermBackend<std::io::Stdout>>;

/// Puts the terminal back however the console ends.
struct Restore;

impl Restore {
    fn enter() -> Result<(Self, Screen), Failure> {
        let cannot = |e: std::io::Error| failure(format!("cannot use the terminal: {e}"));
        terminal::enable_raw_mode().map_err(cannot)?;
        let restore = Restore;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            EnableBracketedPaste
        )
        .map_err(cannot)?;
        // A terminal that does not say its size (some pseudo-terminals): 80 × 24.
        let viewport = match terminal::size() {
            Ok((width, height)) if width > 0 && height > 0 => Viewport::Fullscreen,
            _ => Viewport::Fixed(Rect::new(0, 0, 80, 24)),
        };
        let screen = Terminal::with_options(
            CrosstermBackend::new(std::io::stdout()),
            TerminalOptions { viewport },
        )
        .map_err(cannot)?;
        Ok((restore, screen))
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            DisableBracketedPaste,
            terminal::LeaveAlternateScreen,
            crossterm::cursor::Show
        );
        let _ = terminal::disable_raw_mode();
    }
}

/// Receives as `sync --follow` does until `stop` fires; tells `updates` after each
/// report.
fn follow(
    home: PathBuf,
    updates: mpsc::Sender<String>,
    stop: tokio::sync::oneshot::Receiver<()>,
    wake: Wake,
) {
    let run = || -> Result<(), String> {
        let mut store = Store::open(&home).map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let config = hotline_client::sync::FollowConfig {
            wake,
            ..Default::default()
        };
        tracing::info!(home = %home.display(), "the console receives for this device");
        let mut first = true;
        let mut relays_up = std::collections::HashMap::new();
        runtime.block_on(async {
            let _listening =
                crate::commands::line::listen_for_hand_offs(store.home().path(), &config.wake);
            let following = hotline_client::sync::follow(&mut store, &config, |report| {
                crate::commands::line::log_report(report, first, false, false, &mut relays_up);
                first = false;
                let note = if !report.refused.is_empty() {
                    format!("refused: {}", report.refused.join("; "))
                } else if report.pushed > 0 {
                    // What this console stored, handed over by the follower.
                    format!("sent: {}", relayed_note(report))
                } else {
                    String::new()
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
        tracing::error!("receiving stopped: {}", crate::inert::inert(&error));
        let _ = updates.send(format!("receiving stopped: {error}"));
    }
}

/// Who hands what the console stores to the relays.
#[derive(Clone)]
enum Relaying {
    /// The console's own follower, over the stream connections it holds.
    Follower(Wake),
    /// A thread of its own (another process receives for this device).
    Itself,
}

/// "relayed to N of M relays", from a push's report.
fn relayed_note(report: &hotline_client::sync::SyncReport) -> String {
    pushed_note(&report.relays)
}

/// "relayed to N of M relays", from what a push did at each relay.
fn pushed_note(relays: &hotline_client::sync::Pushed) -> String {
    let reached = relays.values().filter(|e| e.is_none()).count();
    format!("relayed to {reached} of {} relays", relays.len())
}

/// Hands the outbox to the relays at once: rings the follower, or hands the push to
/// the follower that another process runs for this home, or pushes on a thread of its
/// own; and says how it went.
fn push(relaying: &Relaying, home: PathBuf, updates: mpsc::Sender<String>, what: String) {
    if let Relaying::Follower(wake) = relaying {
        wake.ring();
        return;
    }
    std::thread::spawn(move || {
        let report = (|| -> Result<String, String> {
            match hotline_client::handoff::hand_off(&home, Duration::from_secs(5)) {
                Handed::Pushed(pushed) => {
                    return Ok(format!(
                        "{what}: stored; handed to the follower, {}",
                        pushed_note(&pushed)
                    ));
                }
                Handed::Late => {
                    return Ok(format!(
                        "{what}: stored; handed to the follower, no relay answered within 5 s (queued)"
                    ));
                }
                Handed::NoFollower => {}
            }
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
                Ok(Ok(report)) => format!("{what}: stored; {}", relayed_note(&report)),
                Ok(Err(error)) => format!("{what}: stored; relaying failed: {error}"),
                Err(_) => format!("{what}: stored; no relay answered within 5 s (queued)"),
            })
        })();
        let note = report.unwrap_or_else(|e| format!("{what}: {e}"));
        tracing::info!("{}", crate::inert::inert(&note));
        let _ = updates.send(note);
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
    // Receive here, or leave it to the `sync --follow` service that holds the lock.
    let (lock, receiving) = match store.home().lock_receiving() {
        Ok(lock) => (Some(lock), Receiving::Here),
        Err(HomeError::Busy { holder }) => (None, Receiving::Elsewhere(holder)),
        Err(error) => return Err(error.into()),
    };
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
    let relaying = match lock {
        Some(_) => Relaying::Follower(Wake::default()),
        None => Relaying::Itself,
    };
    let follower = match &relaying {
        Relaying::Follower(wake) => {
            let (home, updates, wake) = (home.to_path_buf(), updates.clone(), wake.clone());
            Some(std::thread::spawn(move || {
                follow(home, updates, stopped, wake)
            }))
        }
        Relaying::Itself => None,
    };
    let mut ui = Ui {
        monochrome: std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
        ..Ui::default()
    };
    let mut history = HISTORY_STEP;
    let mut view = View::read(&mut store, position, history, &receiving)?;
    let (restore, mut screen) = Restore::enter()?;
    let mut refreshed = Instant::now();
    let result = loop {
        if let Err(error) = screen.draw(|frame| screen::draw(frame, &view, &ui)) {
            break Err(failure(format!("cannot draw: {error}")));
        }
        let mut reread = false;
        while let Ok(note) = incoming.try_recv() {
            if !note.is_empty() {
                ui.notice = note;
            }
            reread = true;
        }
        // Everything the keyboard has queued is handled before the next draw: a long
        // paste without bracketed paste costs one draw, not one per character.
        let mut wait = Duration::from_millis(250);
        let mut actions = Vec::new();
        let mut events = 0;
        while events < 100_000 && event::poll(wait).unwrap_or(false) {
            wait = Duration::ZERO;
            events += 1;
            match event::read() {
                Ok(Event::Key(key)) if key.kind != KeyEventKind::Release => {
                    actions.push(handle(key, &mut ui, view.log.len()));
                }
                Ok(Event::Paste(text)) => paste(&mut ui, &text),
                Ok(Event::Resize(..)) => {
                    let _ = screen.autoresize();
                }
                Ok(_) => {}
                Err(error) => {
                    actions.push(Action::Fail(format!("cannot read the keyboard: {error}")))
                }
            }
        }
        let mut quit = None;
        for action in actions {
            match action {
                Action::None => {}
                Action::Quit => quit = Some(Ok(())),
                Action::Fail(error) => quit = Some(Err(failure(error))),
                Action::NextChannel => {
                    position = view.position + 1;
                    ui.selected = None;
                    history = HISTORY_STEP;
                    reread = true;
                }
                Action::Older => {
                    if history < MAX_HISTORY && view.log.len() >= history {
                        history = (history + HISTORY_STEP).min(MAX_HISTORY);
                        reread = true;
                    }
                }
                Action::Send(text) => {
                    ui.notice = send(&mut store, &view, &relaying, home, &updates, text);
                    reread = true;
                }
                Action::Read(all) => {
                    ui.notice = read(&mut store, &view, &ui, all, &relaying, home, &updates);
                    reread = true;
                }
            }
        }
        if let Some(result) = quit {
            break result;
        }
        if reread || refreshed.elapsed() >= Duration::from_secs(1) {
            let before = view.log.len();
            match View::read(&mut store, position, history, &receiving) {
                Ok(fresh) => {
                    // Messages read back further shift the selection's index.
                    if let Some(selected) = ui.selected.as_mut() {
                        *selected += fresh.log.len().saturating_sub(before)
                            * usize::from(fresh.channel == view.channel && history > before);
                        *selected = (*selected).min(fresh.log.len().saturating_sub(1));
                    }
                    view = fresh;
                }
                Err(error) => ui.notice = format!("cannot read the store: {}", error.message),
            }
            refreshed = Instant::now();
        }
    };
    drop(screen);
    drop(restore);
    let _ = stop.send(());
    if let Some(follower) = follower {
        let _ = follower.join();
    }
    drop(lock);
    result
}

/// Stores a typed message and hands it to the relays; the notice to show.
fn send(
    store: &mut Store,
    view: &View,
    relaying: &Relaying,
    home: &Path,
    updates: &mpsc::Sender<String>,
    text: String,
) -> String {
    let Some(name) = &view.channel else {
        return "no channel yet: create or join one first".into();
    };
    match store.send(name, Body::text(text), None) {
        Ok(id) => {
            let what = format!("message {}", &id.to_hex()[..12]);
            tracing::info!(channel = %crate::inert::inert(name), "{what} sent from the console");
            push(relaying, home.to_path_buf(), updates.clone(), what.clone());
            format!("{what}: stored; relaying…")
        }
        Err(error) => {
            tracing::warn!("not sent: {error}");
            format!("not sent: {error}")
        }
    }
}

/// Marks the selected message (or, with none selected, the most urgent unread, the
/// oldest of its precedence) or every
/// unread one read, and hands the receipts to the relays; the notice to show.
fn read(
    store: &mut Store,
    view: &View,
    ui: &Ui,
    all: bool,
    relaying: &Relaying,
    home: &Path,
    updates: &mpsc::Sender<String>,
) -> String {
    let Some(name) = &view.channel else {
        return "no channel yet".into();
    };
    let unread: Vec<usize> = (0..view.log.len()).filter(|&i| view.unread(i)).collect();
    let chosen: Vec<usize> = match (all, ui.selected) {
        (true, _) => unread,
        (false, Some(index)) if view.unread(index) => vec![index],
        (false, Some(_)) => return "the selected message is read already".into(),
        (false, None) => unread
            .into_iter()
            .max_by_key(|&i| (view.log[i].precedence, std::cmp::Reverse(i)))
            .into_iter()
            .collect(),
    };
    if chosen.is_empty() {
        return "nothing unread".into();
    }
    let mut marked = 0;
    for index in chosen {
        if let Err(error) = store.ack(name, &view.log[index].id.to_hex()) {
            return format!("not marked read: {error}");
        }
        marked += 1;
    }
    push(
        relaying,
        home.to_path_buf(),
        updates.clone(),
        "read receipts".into(),
    );
    format!("{marked} marked read; receipts relaying…")
}

/// Adds pasted text to the input line, whole or not at all.
fn paste(ui: &mut Ui, text: &str) {
    let have = ui.input.chars().count();
    let pasted = text.chars().count();
    if have + pasted > MAX_INPUT {
        ui.notice = format!(
            "paste of {pasted} characters not taken: the input line holds {MAX_INPUT}; \
             longer texts with hotline send"
        );
    } else {
        ui.input.push_str(text);
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Action {
    None,
    Quit,
    Fail(String),
    NextChannel,
    /// Read older messages (the selection reached the oldest read so far).
    Older,
    Send(String),
    /// Mark read: every unread message (`true`) or the selected one.
    Read(bool),
}

/// What a key does to the console's state; `messages` is how many are shown.
fn handle(key: KeyEvent, ui: &mut Ui, messages: usize) -> Action {
    let control = key.modifiers.contains(KeyModifiers::CONTROL);
    let last = messages.checked_sub(1);
    let select = |ui: &mut Ui, by: isize| -> Action {
        let Some(last) = last else {
            return Action::None;
        };
        let from = ui.selected.unwrap_or(last + 1) as isize;
        let to = (from + by).clamp(0, last as isize) as usize;
        ui.selected = if by > 0 && from + by > last as isize {
            None
        } else {
            Some(to)
        };
        if ui.selected == Some(0) {
            Action::Older
        } else {
            Action::None
        }
    };
    match key.code {
        KeyCode::Esc => Action::Quit,
        KeyCode::Char('c' | 'd') if control => Action::Quit,
        KeyCode::Char('a') if control => Action::Read(true),
        KeyCode::Char('r') if control => Action::Read(false),
        KeyCode::Tab => Action::NextChannel,
        KeyCode::Up => select(ui, -1),
        KeyCode::Down => select(ui, 1),
        KeyCode::PageUp => select(ui, -5),
        KeyCode::PageDown => select(ui, 5),
        KeyCode::End => {
            ui.selected = None;
            Action::None
        }
        KeyCode::Enter => {
            let text = ui.input.trim().to_owned();
            ui.input.clear();
            if text.is_empty() {
                Action::None
            } else {
                Action::Send(text)
            }
        }
        KeyCode::Backspace => {
            ui.input.pop();
            Action::None
        }
        KeyCode::Char(c) if !control && !c.is_control() => {
            if ui.input.chars().count() < MAX_INPUT {
                ui.input.push(c);
            } else {
                ui.notice = format!(
                    "the input line holds {MAX_INPUT} characters; longer texts with hotline send"
                );
            }
            Action::None
        }
        _ => Action::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode, modifiers: KeyModifiers) -> KeyEvent {
        KeyEvent::new(code, modifiers)
    }

    #[test]
    fn keys_edit_send_select_and_quit() {
        let mut ui = Ui::default();
        for c in "hi".chars() {
            assert_eq!(
                handle(key(KeyCode::Char(c), KeyModifiers::NONE), &mut ui, 3),
                Action::None
            );
        }
        handle(key(KeyCode::Backspace, KeyModifiers::NONE), &mut ui, 3);
        assert_eq!(ui.input, "h");
        assert_eq!(
            handle(key(KeyCode::Enter, KeyModifiers::NONE), &mut ui, 3),
            Action::Send("h".into())
        );
        assert!(ui.input.is_empty());
        assert_eq!(
            handle(key(KeyCode::Enter, KeyModifiers::NONE), &mut ui, 3),
            Action::None,
            "an empty line sends nothing"
        );
        // Up selects the newest, then older; reaching the oldest asks for more history.
        handle(key(KeyCode::Up, KeyModifiers::NONE), &mut ui, 3);
        assert_eq!(ui.selected, Some(2));
        assert_eq!(
            handle(key(KeyCode::PageUp, KeyModifiers::NONE), &mut ui, 3),
            Action::Older
        );
        assert_eq!(ui.selected, Some(0));
        handle(key(KeyCode::PageDown, KeyModifiers::NONE), &mut ui, 3);
        assert_eq!(ui.selected, None, "past the newest: following again");
        assert_eq!(
            handle(key(KeyCode::Char('r'), KeyModifiers::CONTROL), &mut ui, 3),
            Action::Read(false)
        );
        assert_eq!(
            handle(key(KeyCode::Char('a'), KeyModifiers::CONTROL), &mut ui, 3),
            Action::Read(true)
        );
        assert_eq!(
            handle(key(KeyCode::Char('d'), KeyModifiers::CONTROL), &mut ui, 3),
            Action::Quit
        );
    }

    #[test]
    fn the_input_line_is_bounded_and_a_long_paste_is_refused_whole() {
        let mut ui = Ui::default();
        paste(&mut ui, "short paste\nsecond line");
        assert_eq!(ui.input, "short paste\nsecond line");
        let big = "x".repeat(1_100_000);
        paste(&mut ui, &big);
        assert_eq!(ui.input, "short paste\nsecond line", "nothing of it taken");
        assert!(
            ui.notice.contains("1100000 characters not taken"),
            "{}",
            ui.notice
        );
        ui.input = "y".repeat(MAX_INPUT);
        handle(key(KeyCode::Char('z'), KeyModifiers::NONE), &mut ui, 0);
        assert_eq!(ui.input.len(), MAX_INPUT);
        assert!(ui.notice.contains("holds 4096 characters"));
    }
}
