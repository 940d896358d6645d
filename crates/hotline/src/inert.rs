//! Text from the other side, made inert for a terminal.
//!
//! A counterpart's message (or name) is printed to the duty officer's terminal. Raw, it
//! could carry escape sequences (clear the screen, move the cursor, rewrite earlier
//! lines, set the window title), a carriage return or newline that forges a log line,
//! or bidirectional overrides that show text in another order than it was written.
//! [`inert`] shows every such character as a visible sign instead, on one line: control
//! characters as their Unicode control pictures (`␛[2J`, `⏎`), format characters that
//! reorder or hide text as `<U+202E>`. `--json` and exports keep the exact text.

/// `text` with every control and reordering character made visible; one line.
pub fn inert(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push('⏎'),
            // C0 controls and DEL as their control pictures (U+2400..U+241F, U+2421).
            '\u{0}'..='\u{1f}' => out.push(char::from_u32(0x2400 + c as u32).unwrap_or('?')),
            '\u{7f}' => out.push('␡'),
            // C1 controls (U+0080..U+009F: CSI among them), bidi embeddings, overrides
            // and isolates, marks, zero-width and other invisible format characters.
            '\u{80}'..='\u{9f}'
            | '\u{61c}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}'
            | '\u{feff}' => out.push_str(&format!("<U+{:04X}>", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::inert;

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
        // Nothing that a terminal acts on is left.
        let hostile: String = (0u32..0x200).filter_map(char::from_u32).collect();
        assert!(!inert(&hostile).chars().any(|c| c.is_control()));
    }
}
