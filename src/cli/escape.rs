//! Producer text made safe for the operator's terminal.
//!
//! Exchange names, routing and ordering keys, headers, payloads and `last_error` are written
//! by producers (or quote what they wrote). Printed raw, an ESC sequence in one could
//! recolour, move the cursor, retitle the window, rewrite earlier lines or hide itself; a
//! bidi override could make text read differently from what it is. Every such character is
//! printed as a visible escape instead: `\x1b` for C0 controls and DEL, `\u{9b}` for C1
//! controls and bidi controls.

use std::{borrow::Cow, fmt::Write as _};

/// `s` with every control character escaped, newlines and tabs included (one line), and a
/// backslash doubled, so an escape is never ambiguous: a name holding the four characters
/// `\x0a` prints as `\\x0a`, a newline as `\x0a`.
pub fn one_line(s: &str) -> Cow<'_, str> {
    escape(s, false, true)
}

/// Payload text: every control character escaped except newlines and tabs, a backslash
/// doubled, and every line behind a `| ` gutter, so that no line of a producer's text can
/// pass for a field of the listing around it (a payload holding "\nlast error: …").
pub fn multi_line(s: &str) -> String {
    escape(s, true, true)
        .split('\n')
        .map(|line| format!("  | {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// [`one_line`] with backslashes left as they are: for log fields, whose text already holds
/// the escapes of Rust's `Debug` formatting.
pub fn controls(s: &str) -> Cow<'_, str> {
    escape(s, false, false)
}

/// [`one_line`], cut to `n` characters (a table cell: producer text of any length must not
/// widen every line of the table). The cut falls between whole characters of `s`, never inside the escape of one (a cell
/// ending `\u{…` reads as a broken escape).
pub fn cell(s: &str, n: usize) -> String {
    let safe = one_line(s);
    if safe.chars().count() <= n {
        return safe.into_owned();
    }
    let mut out = String::new();
    let mut width = 0;
    let mut one = [0u8; 4];
    for c in s.chars() {
        let escaped = one_line(c.encode_utf8(&mut one));
        let w = escaped.chars().count();
        if width + w > n.saturating_sub(1) {
            break;
        }
        out.push_str(&escaped);
        width += w;
    }
    out.push('…');
    out
}

fn escape(s: &str, keep_lines: bool, backslash: bool) -> Cow<'_, str> {
    let unsafe_char = |c: char| {
        (dangerous(c) && !(keep_lines && (c == '\n' || c == '\t'))) || (backslash && c == '\\')
    };
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if !unsafe_char(c) {
            out.push(c);
        } else if c == '\\' {
            out.push_str("\\\\");
        } else if (c as u32) < 0x80 {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    Cow::Owned(out)
}

/// C0 and C1 controls, DEL, and the Unicode bidi embedding, override and isolate controls
/// (and the line/paragraph separators some terminals treat as newlines).
fn dangerous(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{2028}' | '\u{2029}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_literal_backslash_never_reads_as_an_escape() {
        assert_eq!(one_line("lit\\x0a"), "lit\\\\x0a");
        assert_eq!(one_line("lit\n"), "lit\\x0a");
        assert_eq!(controls("a\\b\x1b"), "a\\b\\x1b");
    }

    #[test]
    fn a_cell_shows_every_control_character_and_is_cut() {
        assert_eq!(cell("a\nb\r\x1b[31m", 40), "a\\x0ab\\x0d\\x1b[31m");
        assert_eq!(cell("abcdef", 4), "abc…");
    }

    #[test]
    fn a_cell_is_cut_between_whole_escapes() {
        assert_eq!(cell("abc", 5), "abc");
        assert_eq!(cell("abcdefgh", 5), "abcd…");
        // `ab\u{9b}` is 9 characters: the escape does not fit in 5, and is left out whole.
        assert_eq!(cell("ab\u{9b}2J", 5), "ab…");
        assert_eq!(cell("ab\u{9b}2J", 9), "ab\\u{9b}…");
    }

    #[test]
    fn escape_sequences_become_visible_text() {
        assert_eq!(one_line("orders"), "orders");
        assert_eq!(one_line("ex\x1b[31mred"), "ex\\x1b[31mred");
        assert_eq!(one_line("a\nb\rc\u{7f}"), "a\\x0ab\\x0dc\\x7f");
        assert_eq!(one_line("csi\u{9b}2J"), "csi\\u{9b}2J");
        assert_eq!(one_line("\u{202e}txt.exe"), "\\u{202e}txt.exe");
        assert_eq!(
            multi_line("line 1\n\tline 2\x1b]0;t\x07"),
            "  | line 1\n  | \tline 2\\x1b]0;t\\x07"
        );
        assert_eq!(
            multi_line("x\nlast error:    FORGED"),
            "  | x\n  | last error:    FORGED",
            "no payload line starts where a field does"
        );
    }
}
