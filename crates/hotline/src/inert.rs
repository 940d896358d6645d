//! Text from the other side, made inert for a terminal.
//!
//! A counterpart's message (or name) is printed to the duty officer's terminal. Raw, it
//! could carry escape sequences (clear the screen, move the cursor, rewrite earlier
//! lines, set the window title), a carriage return or newline that forges a log line,
//! or bidirectional overrides that show text in another order than it was written.
//! [`inert`] shows every such character as a visible sign instead, on one line: control
//! characters as their Unicode control pictures (`␛[2J`, `⏎`), format characters that
//! reorder or hide text as `<U+202E>`. `--json` and exports keep the exact text.

/// `text` split at its line breaks, each line made inert: for screens that show a
/// multi-line message whole (nothing after the first line is hidden, and no line can
/// forge another: a carriage return or escape inside a line stays visible).
pub fn inert_lines(text: &str) -> Vec<String> {
    text.split('\n').map(inert).collect()
}

/// Whether a terminal could act on `c`, or show text around it in another order
/// than it was written: C0 and C1 controls, DEL, bidi embeddings, overrides, isolates
/// and marks, zero-width and other invisible format characters, line separators.
fn hostile(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}'
        | '\u{7f}'..='\u{9f}'
        | '\u{61c}'
        | '\u{200b}'..='\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{2069}'
        | '\u{feff}')
}

/// `text` with every control and reordering character made visible; one line.
pub fn inert(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push('⏎'),
            // C0 controls and DEL as their control pictures (U+2400..U+241F, U+2421).
            '\u{0}'..='\u{1f}' => out.push(char::from_u32(0x2400 + c as u32).unwrap_or('?')),
            '\u{7f}' => out.push('␡'),
            c if hostile(c) => out.push_str(&format!("<U+{:04X}>", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// A JSON text with every character a terminal could act on written as a `\uXXXX`
/// escape: the same value once parsed, nothing live on a screen. (Such characters can
/// only stand inside JSON strings, where the escape means the character itself.)
pub fn json_escaped(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if hostile(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{inert, inert_lines, json_escaped};

    #[test]
    fn escape_sequences_newlines_and_bidi_overrides_become_visible() {
        assert_eq!(
            inert("plain text, ümlaut, 日本"),
            "plain text, ümlaut, 日本"
        );
        assert_eq!(inert("\u{1b}[2J\u{1b}]0;title\u{7}"), "␛[2J␛]0;title␇");
        assert_eq!(inert("line one\nfake line\r"), "line one⏎fake line␍");
        assert_eq!(inert("tab\there\u{7f}"), "tab␉here␡");
        assert_eq!(inert("\u{9b}31m"), "<U+009B>31m");
        assert_eq!(
            inert("pay \u{202e}0001\u{202c} now\u{200b}"),
            "pay <U+202E>0001<U+202C> now<U+200B>"
        );
        assert_eq!(
            inert("\u{2066}x\u{2069}\u{feff}"),
            "<U+2066>x<U+2069><U+FEFF>"
        );
        assert_eq!(
            inert_lines("first\nsecond\r\u{1b}[1A"),
            ["first", "second␍␛[1A"]
        );
        let value = serde_json::json!({"text": "a\u{1b}[2J\u{7f}\u{9b}\u{202e}b\n"});
        let escaped = json_escaped(&value.to_string());
        assert_eq!(escaped, r#"{"text":"a\u001b[2J\u007f\u009b\u202eb\n"}"#);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&escaped).unwrap(),
            value
        );
        // Nothing that a terminal acts on is left.
        let hostile: String = (0u32..0x200).filter_map(char::from_u32).collect();
        assert!(!inert(&hostile).chars().any(|c| c.is_control()));
    }
}
