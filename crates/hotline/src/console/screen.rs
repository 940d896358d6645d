//! What the console shows, and how it is laid out on any screen from 30 × 5 up.
//!
//! ```text
//!  hotline · north/desk · crisis (1 of 2)                          LINE UP · 1 ALARM
//!  relay neutral        up        rtt 3 ms   last ok 0.4 s ago
//!  party south          heard 0.9 s ago
//!  outbox 0 · undelivered 1 · unread 2 · receiving here
//!  ALARM #4 dropped (relay neutral) since 40 s: skipped messages 3..=3
//! ─ crisis ───────────────────────────────────────────────────────────────────
//! ● 12:01:03 south      delivered - · read -
//!     The exercise ends at 18:00.
//!     Second line of the same message.
//! ─────────────────────────────────────────────────────────────────────────────
//!  > typed text_
//!  Enter send · ↑↓ select · ^R read · ^A read all · PgUp/PgDn · Tab · Esc quit
//! ```
//!
//! Pure: [`draw`] lays a [`View`] (read from the store) and the [`Ui`] state (input,
//! selection, scroll, the last notice) into a ratatui frame, so that the same code
//! draws the terminal and the snapshot tests. Text from the other side passes through
//! [`inert_lines`]: every line of a message is shown, nothing in it acts on the
//! terminal.

use std::collections::BTreeSet;

use hotline_client::LogEntry;
use hotline_client::line::{PathState, Status};
use hotline_core::Precedence;
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;
use unicode_width::UnicodeWidthChar;

use crate::inert::{inert, inert_lines};

/// Who receives for this device while the console runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receiving {
    /// The console itself (it holds the receive lock).
    Here,
    /// Another process (a `sync --follow` service): the console displays and sends.
    Elsewhere(String),
}

/// What the screen shows, read from the store.
#[derive(Debug, Clone)]
pub struct View {
    pub me: String,
    pub channel: Option<String>,
    pub channels: usize,
    pub position: usize,
    pub status: Status,
    /// The newest messages of the channel, oldest first.
    pub log: Vec<LogEntry>,
    pub now_ms: u64,
    pub receiving: Receiving,
}

impl View {
    /// This device's party (the part of `me` before the slash).
    pub fn me_party(&self) -> &str {
        self.me.split('/').next().unwrap_or(&self.me)
    }

    /// Whether this device's party has not read message `index` (its own never count).
    pub fn unread(&self, index: usize) -> bool {
        self.log
            .get(index)
            .is_some_and(|e| e.from != self.me_party() && !e.read_by.contains(self.me_party()))
    }
}

/// The console's own state: what is typed, which message is selected, the last notice.
#[derive(Debug, Clone, Default)]
pub struct Ui {
    pub input: String,
    /// The last notice (sent, relayed, refused); shown instead of the key help.
    pub notice: String,
    /// The selected message (an index into the view's log), `None` following the newest.
    pub selected: Option<usize>,
    /// Without colour (NO_COLOR): states are told by words, emphasis by bold and reverse.
    pub monochrome: bool,
}

/// How the screen shows states, with or without colour.
struct Palette {
    monochrome: bool,
}

impl Palette {
    fn fg(&self, color: Color) -> Style {
        if self.monochrome {
            Style::default()
        } else {
            Style::default().fg(color)
        }
    }

    fn banner(&self, alarm: bool) -> Style {
        let style = Style::default().add_modifier(Modifier::BOLD);
        match (self.monochrome, alarm) {
            (true, _) => style.add_modifier(Modifier::REVERSED),
            (false, true) => style.fg(Color::White).bg(Color::Red),
            (false, false) => style.fg(Color::Black).bg(Color::Green),
        }
    }

    fn alarm(&self) -> Style {
        self.fg(Color::Red).add_modifier(Modifier::BOLD)
    }

    fn state(&self, state: PathState) -> Style {
        match state {
            PathState::Up => self.fg(Color::Green),
            PathState::Degraded | PathState::Unknown => self.fg(Color::Yellow),
            PathState::Down => self.alarm(),
        }
    }
}

/// The key help, shown when there is no notice.
pub const HELP: &str =
    "Enter send · ↑↓ select · ^R read · ^A read all · PgUp/PgDn · Tab · Esc quit";

fn ago(now_ms: u64, ms: Option<u64>) -> String {
    match ms {
        Some(ms) => {
            let seconds = now_ms.saturating_sub(ms) as f64 / 1e3;
            if seconds < 120.0 {
                format!("{seconds:.1} s ago")
            } else if seconds < 7200.0 {
                format!("{:.0} min ago", seconds / 60.0)
            } else {
                format!("{:.0} h ago", seconds / 3600.0)
            }
        }
        None => "never".into(),
    }
}

/// The first `width` columns of `text`.
fn clip(text: &str, width: usize) -> String {
    let mut used = 0;
    text.chars()
        .take_while(|c| {
            used += c.width().unwrap_or(0);
            used <= width
        })
        .collect()
}

/// `text` padded or cut to exactly `width` columns.
fn fixed(text: &str, width: usize) -> String {
    let text = clip(text, width);
    let used: usize = text.chars().map(|c| c.width().unwrap_or(0)).sum();
    format!("{text}{}", " ".repeat(width - used))
}

/// `text` broken into lines of at most `width` columns, at spaces where it can.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines = Vec::new();
    let mut line = String::new();
    let mut used = 0;
    for word in text.split_inclusive(' ') {
        // A word that fits goes whole onto this line or the next; the space after it
        // may fall off the end.
        let word_width: usize = word
            .trim_end()
            .chars()
            .map(|c| c.width().unwrap_or(0))
            .sum();
        if used + word_width.min(width) > width && used > 0 {
            lines.push(std::mem::take(&mut line).trim_end().to_owned());
            used = 0;
        }
        for c in word.chars() {
            let w = c.width().unwrap_or(0);
            if used + w > width {
                if c == ' ' {
                    continue;
                }
                lines.push(std::mem::take(&mut line));
                used = 0;
            }
            line.push(c);
            used += w;
        }
    }
    lines.push(line.trim_end().to_owned());
    lines
}

fn names(set: &BTreeSet<String>) -> String {
    if set.is_empty() {
        "-".into()
    } else {
        set.iter().map(|n| inert(n)).collect::<Vec<_>>().join(",")
    }
}

/// The header and the line's state: paths, parties, counts, alarms.
fn top(view: &View, width: usize, palette: &Palette) -> Vec<Line<'static>> {
    let status = &view.status;
    let down = status.line_down();
    let alarms = status.alarms.len();
    let state = match (down, alarms) {
        (true, _) => "LINE DOWN".to_owned(),
        (false, 0) => "LINE UP".to_owned(),
        (false, 1) => "LINE UP · 1 ALARM".to_owned(),
        (false, n) => format!("LINE UP · {n} ALARMS"),
    };
    let title = match &view.channel {
        Some(name) => format!(
            " hotline · {} · {} ({} of {})",
            view.me,
            inert(name),
            view.position + 1,
            view.channels
        ),
        None => format!(" hotline · {} · no channel yet", view.me),
    };
    // The line's state always shows, at the right; the title gives way.
    let state = clip(&state, width);
    let room = width.saturating_sub(state.chars().count() + 1);
    let mut lines = vec![Line::styled(
        format!("{} {state}", fixed(&title, room)),
        palette.banner(down || alarms > 0),
    )];
    // Names are cut before states are: up or down is visible at 80 columns.
    let name_width = status
        .relays
        .iter()
        .map(|r| r.name.chars().count())
        .chain(status.parties.iter().map(|p| p.party.chars().count()))
        .max()
        .unwrap_or(0)
        .clamp(8, 20);
    if status.relays.is_empty() {
        lines.push(Line::raw(clip(
            " no relay: messages go by hand (hotline bundle export)",
            width,
        )));
    }
    for relay in &status.relays {
        let rtt = relay
            .rtt_ms
            .map_or_else(|| "rtt -".to_owned(), |ms| format!("rtt {ms} ms"));
        let rest = format!(
            "  {rtt:<10} last ok {}{}",
            ago(view.now_ms, relay.last_ok_ms),
            relay
                .error
                .as_deref()
                .map(|e| format!("  error: {}", inert(e)))
                .unwrap_or_default()
        );
        let head = format!(" relay {} ", fixed(&inert(&relay.name), name_width));
        let state = format!("{:<8}", relay.state.as_str());
        let used = head.chars().count() + state.chars().count();
        lines.push(Line::from(vec![
            Span::raw(clip(&head, width)),
            Span::styled(
                clip(&state, width.saturating_sub(head.chars().count())),
                palette.state(relay.state),
            ),
            Span::raw(clip(&rest, width.saturating_sub(used))),
        ]));
    }
    for party in &status.parties {
        let mut line = vec![Span::raw(clip(
            &format!(
                " party {} heard {}",
                fixed(&inert(&party.party), name_width),
                ago(view.now_ms, party.last_heard_ms)
            ),
            width,
        ))];
        if !party.not_joined.is_empty() {
            let used = line[0].width();
            line.push(Span::styled(
                clip(
                    &format!(
                        " · invited, not joined: {}",
                        party
                            .not_joined
                            .iter()
                            .map(|c| inert(c))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    width.saturating_sub(used),
                ),
                palette.fg(Color::Yellow),
            ));
        }
        lines.push(Line::from(line));
    }
    let unread = (0..view.log.len()).filter(|&i| view.unread(i)).count();
    let receiving = match &view.receiving {
        Receiving::Here => "receiving here".to_owned(),
        Receiving::Elsewhere(holder) => format!("received by the follower ({holder})"),
    };
    lines.push(Line::raw(clip(
        &format!(
            " outbox {} · undelivered {} · unread {unread} · {receiving}",
            status.outbox, status.undelivered
        ),
        width,
    )));
    const SHOWN: usize = 3;
    for alarm in status.alarms.iter().take(SHOWN) {
        let about: Vec<String> = [
            alarm.relay.as_ref().map(|url| {
                let name = status
                    .relays
                    .iter()
                    .find(|relay| relay.url == *url)
                    .map_or(url.as_str(), |relay| relay.name.as_str());
                format!("relay {}", inert(name))
            }),
            alarm.party.as_ref().map(|p| format!("party {}", inert(p))),
        ]
        .into_iter()
        .flatten()
        .collect();
        lines.push(Line::styled(
            clip(
                &format!(
                    " ALARM {}{} ({}) since {}: {}",
                    alarm.id.map(|id| format!("#{id} ")).unwrap_or_default(),
                    alarm.kind,
                    about.join(", "),
                    ago(view.now_ms, Some(alarm.since_ms)).trim_end_matches(" ago"),
                    inert(&alarm.detail)
                ),
                width,
            ),
            palette.alarm(),
        ));
    }
    if alarms > SHOWN {
        lines.push(Line::styled(
            clip(
                &format!(" … {} more alarms: hotline status", alarms - SHOWN),
                width,
            ),
            palette.alarm(),
        ));
    }
    lines
}

/// Each message as lines: a header (time, sender, delivered, read) and its whole text,
/// wrapped. Returns the lines and, per message, the index of its first line.
fn messages(
    view: &View,
    ui: &Ui,
    width: usize,
    palette: &Palette,
) -> (Vec<Line<'static>>, Vec<usize>) {
    let mut lines = Vec::new();
    let mut starts = Vec::with_capacity(view.log.len());
    for (index, entry) in view.log.iter().enumerate() {
        starts.push(lines.len());
        let selected = ui.selected == Some(index);
        let unread = view.unread(index);
        let secs = entry.time_ms / 1000;
        let mark = match (selected, unread) {
            (true, _) => "▶",
            (false, true) => "●",
            (false, false) => " ",
        };
        let header = format!(
            "{mark} {:02}:{:02}:{:02} {} {}delivered {} · read {}{}{}",
            secs / 3600 % 24,
            secs / 60 % 60,
            secs % 60,
            fixed(&inert(&entry.from), 10),
            crate::commands::level_mark(entry.precedence),
            names(&entry.delivered_to),
            names(&entry.read_by),
            if unread { " · UNREAD" } else { "" },
            entry
                .deadline_ms
                .map(|ms| format!(" · deadline in {}", until(view.now_ms, ms)))
                .unwrap_or_default()
        );
        let mut style = if unread && entry.precedence == Precedence::Flash {
            palette.fg(Color::Red).add_modifier(Modifier::BOLD)
        } else if unread {
            palette.fg(Color::Cyan).add_modifier(Modifier::BOLD)
        } else {
            palette.fg(Color::DarkGray)
        };
        if selected {
            style = style.add_modifier(Modifier::REVERSED);
        }
        lines.push(Line::styled(clip(&header, width), style));
        for text in inert_lines(&entry.text) {
            for piece in wrap(&text, width.saturating_sub(4)) {
                lines.push(Line::raw(format!("    {piece}")));
            }
        }
    }
    (lines, starts)
}

fn until(now_ms: u64, ms: u64) -> String {
    if ms <= now_ms {
        return "passed".into();
    }
    let seconds = (ms - now_ms) / 1000;
    if seconds < 120 {
        format!("{seconds} s")
    } else {
        format!("{} min", seconds / 60)
    }
}

/// Lays the view out in the frame: the line's state at the top (it gives way first on a
/// small screen, never the input line), the messages in the middle, newest at the
/// bottom unless a message is selected, the input and the key help at the bottom.
pub fn draw(frame: &mut Frame, view: &View, ui: &Ui) {
    let area = frame.area();
    let (width, height) = (area.width as usize, area.height as usize);
    if width == 0 || height == 0 {
        return;
    }
    let palette = Palette {
        monochrome: ui.monochrome,
    };
    let bottom_rows = height.min(3);
    let mut top = top(view, width, &palette);
    top.push(Line::raw(clip(
        &format!(
            "─ {} {}",
            view.channel.as_deref().map(inert).unwrap_or_default(),
            "─".repeat(width)
        ),
        width,
    )));
    top.truncate(height - bottom_rows);
    let pane_rows = height - bottom_rows - top.len();
    let row = |y: usize, rows: usize| Rect::new(area.x, area.y + y as u16, area.width, rows as u16);
    frame.render_widget(Paragraph::new(top.clone()), row(0, top.len()));

    let (lines, starts) = messages(view, ui, width, &palette);
    let newest_first_line = lines.len().saturating_sub(pane_rows);
    let first = match ui.selected.and_then(|i| starts.get(i)) {
        // A selected message shows at the top of the pane, unless the newest fit below it.
        Some(&start) => start.min(newest_first_line),
        None => newest_first_line,
    };
    let shown: Vec<Line> = lines.into_iter().skip(first).take(pane_rows).collect();
    frame.render_widget(Paragraph::new(shown), row(top.len(), pane_rows));

    let mut bottom = vec![
        Line::raw("─".repeat(width)),
        Line::raw(format!(
            " > {}",
            input_tail(&ui.input, width.saturating_sub(4))
        )),
        if ui.notice.is_empty() {
            Line::styled(
                clip(&format!(" {HELP}"), width),
                palette.fg(Color::DarkGray),
            )
        } else {
            Line::styled(
                clip(&format!(" {}", inert(&ui.notice)), width),
                palette.fg(Color::Yellow),
            )
        },
    ];
    bottom.drain(..3 - bottom_rows);
    let input_row = height - bottom_rows + usize::from(bottom_rows == 3);
    frame.render_widget(
        Paragraph::new(bottom),
        row(height - bottom_rows, bottom_rows),
    );
    let typed: usize = input_tail(&ui.input, width.saturating_sub(4))
        .chars()
        .map(|c| c.width().unwrap_or(0))
        .sum();
    frame.set_cursor_position((
        area.x + (3 + typed).min(width - 1) as u16,
        area.y + input_row.min(height - 1) as u16,
    ));
}

/// The end of what is typed that fits in `width` columns (the cursor is at the end).
fn input_tail(input: &str, width: usize) -> String {
    let shown = inert(input);
    let mut used = 0;
    let mut tail: Vec<char> = shown
        .chars()
        .rev()
        .take_while(|c| {
            used += c.width().unwrap_or(0);
            used <= width
        })
        .collect();
    tail.reverse();
    tail.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotline_client::line::{Alarm, PartyStatus, RelayStatus};
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    const T0: u64 = 1_800_000_000_000;

    fn relay(name: &str, state: PathState, rtt_ms: Option<u64>) -> RelayStatus {
        RelayStatus {
            url: format!("https://{name}.example:8443/#sha256={}", "ab".repeat(32)),
            name: name.into(),
            state,
            rtt_ms,
            last_ok_ms: rtt_ms.map(|_| T0 - 400),
            error: None,
        }
    }

    fn entry(n: u8, from: &str, text: &str, read: bool) -> LogEntry {
        LogEntry {
            id: hotline_core::EnvelopeId([n; 32]),
            from: from.into(),
            time_ms: T0 - 60_000 + u64::from(n) * 1000,
            text: text.into(),
            precedence: hotline_core::Precedence::Routine,
            deadline_ms: None,
            delivered_to: [if from == "north" { "south" } else { "north" }.to_owned()].into(),
            read_by: if read {
                ["north".to_owned(), "south".to_owned()].into()
            } else {
                Default::default()
            },
        }
    }

    /// North's console on a line of three relays, one down, with a stored alarm, and a
    /// conversation that ends with a hostile message from south.
    fn crisis() -> View {
        let mut log: Vec<LogEntry> = (0..12)
            .map(|n| {
                let from = if n % 2 == 0 { "north" } else { "south" };
                entry(n, from, &format!("routine message number {n}"), true)
            })
            .collect();
        log.push(entry(
            12,
            "south",
            "Agreed: the exercise ends at 18:00 UTC. A longer sentence that has to wrap \
             onto a second line at eighty columns, and a third at forty.\nSecond line of \
             the same message.",
            false,
        ));
        log.push(entry(
            13,
            "south",
            "\u{1b}[2J\u{1b}[1;1Hforged screen\rLINE UP\u{7} pay \u{202e}0001\u{202c}\n\u{9b}31mlast",
            false,
        ));
        View {
            me: "north/desk".into(),
            channel: Some("crisis".into()),
            channels: 2,
            position: 0,
            status: Status {
                relays: vec![
                    relay("neutral", PathState::Up, Some(3)),
                    relay("north-relay", PathState::Up, Some(4)),
                    relay(
                        "a-relay-with-a-very-long-name-indeed",
                        PathState::Down,
                        None,
                    ),
                ],
                parties: vec![
                    PartyStatus {
                        party: "south".into(),
                        last_heard_ms: Some(T0 - 900),
                        not_joined: Vec::new(),
                    },
                    PartyStatus {
                        party: "mediator".into(),
                        last_heard_ms: None,
                        not_joined: vec!["trilateral".into()],
                    },
                ],
                outbox: 1,
                undelivered: 1,
                alarms: vec![Alarm {
                    id: Some(4),
                    kind: "dropped".into(),
                    receipts: Vec::new(),
                    relay: Some(relay("neutral", PathState::Up, None).url),
                    party: None,
                    message: None,
                    since_ms: T0 - 40_000,
                    detail: "skipped messages 3..=3 of south/desk".into(),
                }],
                interval_ms: 1000,
            },
            log,
            now_ms: T0,
            receiving: Receiving::Here,
        }
    }

    fn render(view: &View, ui: &Ui, width: u16, height: u16) -> Terminal<TestBackend> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| draw(frame, view, ui)).unwrap();
        terminal
    }

    /// The screen as text, one row per line, trailing spaces cut.
    fn text(terminal: &Terminal<TestBackend>) -> String {
        let buffer = terminal.backend().buffer();
        let mut out = String::new();
        for cells in buffer.content.chunks(buffer.area.width as usize) {
            let mut row = String::new();
            let mut skip = 0;
            for cell in cells {
                if skip == 0 {
                    row.push_str(cell.symbol());
                }
                let width: usize = cell.symbol().chars().map(|c| c.width().unwrap_or(0)).sum();
                skip = skip.max(width).saturating_sub(1);
            }
            out.push_str(row.trim_end());
            out.push('\n');
        }
        out
    }

    /// Compares the screen with `snapshots/NAME.txt` beside this file; with
    /// `HOTLINE_UPDATE_SNAPSHOTS=1` writes it instead (then read the diff before
    /// committing it).
    fn snapshot(name: &str, terminal: &Terminal<TestBackend>) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/console/snapshots")
            .join(format!("{name}.txt"));
        let shown = text(terminal);
        if std::env::var_os("HOTLINE_UPDATE_SNAPSHOTS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &shown).unwrap();
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; the screen was:\n{shown}\n(HOTLINE_UPDATE_SNAPSHOTS=1 writes it)",
                path.display()
            )
        });
        assert_eq!(
            shown, expected,
            "{name}: the screen differs from its snapshot"
        );
    }

    fn cells_in_row(terminal: &Terminal<TestBackend>, y: u16) -> Vec<ratatui::buffer::Cell> {
        let buffer = terminal.backend().buffer();
        (0..buffer.area.width)
            .map(|x| buffer.cell((x, y)).unwrap().clone())
            .collect()
    }

    #[test]
    fn a_watch_at_80_by_24_with_an_alarm_and_a_hostile_message() {
        let view = crisis();
        let terminal = render(&view, &Ui::default(), 80, 24);
        snapshot("crisis-80x24", &terminal);
        let shown = text(&terminal);
        // Up or down of every relay is visible, however long its name.
        assert!(shown.contains("a-relay-with-a-very- down"), "{shown}");
        // The header turns red beside the alarm.
        assert_eq!(cells_in_row(&terminal, 0)[0].bg, Color::Red);
        assert!(shown.lines().next().unwrap().ends_with("LINE UP · 1 ALARM"));
        // Nothing from the other side reaches the terminal as a control character,
        // and both lines of the hostile message are shown.
        assert!(!shown.chars().any(|c| c.is_control() && c != '\n'));
        assert!(shown.contains("␛[2J␛[1;1Hforged screen␍LINE UP␇ pay <U+202E>0001<U+202C>"));
        assert!(shown.contains("    <U+009B>31mlast"));
    }

    #[test]
    fn a_watch_at_120_by_40_shows_multi_line_messages_whole() {
        let view = crisis();
        let terminal = render(&view, &Ui::default(), 120, 40);
        snapshot("crisis-120x40", &terminal);
        let shown = text(&terminal);
        assert!(shown.contains("    Second line of the same message."));
        assert!(shown.contains("a-relay-with-a-very- down"), "{shown}");
    }

    #[test]
    fn a_selected_old_message_scrolls_the_pane_back_and_the_input_stays() {
        let view = crisis();
        let ui = Ui {
            input: "draft reply".into(),
            selected: Some(2),
            notice: "message 0a0b0c0d0e0f: stored; relayed to 2 of 3 relays".into(),
            ..Ui::default()
        };
        let terminal = render(&view, &ui, 80, 24);
        snapshot("selected-80x24", &terminal);
        let shown: Vec<String> = text(&terminal).lines().map(str::to_owned).collect();
        let pane_top = shown
            .iter()
            .position(|l| l.starts_with("─ crisis"))
            .unwrap()
            + 1;
        assert!(shown[pane_top].starts_with("▶ "), "{:?}", shown[pane_top]);
        assert_eq!(shown[22], " > draft reply");
        assert!(shown[23].contains("relayed to 2 of 3"));
    }

    #[test]
    fn a_line_down_is_said_in_words_without_colour_and_a_tiny_screen_keeps_the_input() {
        let mut view = crisis();
        for relay in &mut view.status.relays {
            relay.state = PathState::Down;
        }
        view.status.alarms.clear();
        let ui = Ui {
            monochrome: true,
            ..Ui::default()
        };
        let terminal = render(&view, &ui, 80, 24);
        let shown = text(&terminal);
        assert!(shown.lines().next().unwrap().ends_with("LINE DOWN"));
        let buffer = terminal.backend().buffer();
        assert!(
            buffer
                .content
                .iter()
                .all(|c| c.fg == Color::Reset && c.bg == Color::Reset),
            "NO_COLOR: no colour anywhere"
        );
        assert!(
            cells_in_row(&terminal, 0)[0]
                .modifier
                .contains(Modifier::REVERSED)
        );
        let tiny = render(&view, &Ui::default(), 30, 5);
        let shown: Vec<String> = text(&tiny).lines().map(str::to_owned).collect();
        assert_eq!(shown.len(), 5);
        assert!(shown[0].ends_with("LINE DOWN"), "{shown:?}");
        assert_eq!(shown[3], " >");
    }

    #[test]
    fn wrapping_breaks_at_spaces_and_cuts_what_cannot() {
        assert_eq!(wrap("one two three", 7), ["one two", "three"]);
        assert_eq!(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("", 10), [""]);
        assert_eq!(wrap("日本語テキスト", 6), ["日本語", "テキス", "ト"]);
        assert_eq!(input_tail("0123456789", 4), "6789");
    }
}
