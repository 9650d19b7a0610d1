//! Text from outside printed for a person: row values, keys and tags rendered from them, what
//! clients send, SQL errors that quote them. Written raw to a terminal or a text log, such text
//! could recolour or clear the screen (ANSI escapes), rewrite a line (CR), forge a log line of its
//! own (LF) or reorder what is shown (bidi overrides). `Escaped` prints it with every such
//! character escaped: `\n`, `\r`, `\t`, `\x1b` (C0 controls, DEL, C1 controls) and `\u{202e}` (bidi
//! embeddings, overrides, isolates and marks, and the Unicode line and paragraph separators).
//! Everything else, `\` included, is printed as it is.
//!
//! Log fields that carry such text are written `%Escaped(&value)`, so the text and the JSON log
//! carry the same escaped value; `cachetail watch` escapes every line it prints.

use std::fmt::{self, Write};

/// Displays `T` with control characters and bidi controls escaped.
pub struct Escaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(EscapingWriter(f), "{}", self.0)
    }
}

impl<T: fmt::Display> fmt::Debug for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `text` with control characters and bidi controls escaped.
pub fn escape(text: &str) -> String {
    Escaped(text).to_string()
}

/// Whether a character could change how a terminal or a log viewer shows what follows it.
fn must_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// Escapes as it writes.
struct EscapingWriter<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl Write for EscapingWriter<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some((at, c)) = rest.char_indices().find(|&(_, c)| must_escape(c)) {
            self.0.write_str(&rest[..at])?;
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c if u32::from(c) < 0x100 => write!(self.0, "\\x{:02x}", u32::from(c))?,
                c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_bidi_overrides_are_escaped_and_the_rest_kept() {
        assert_eq!(
            escape("\x1b[31m\nFAKE LOG LINE\r\t\x00\x7f\u{9b}2J"),
            "\\x1b[31m\\nFAKE LOG LINE\\r\\t\\x00\\x7f\\x9b2J"
        );
        assert_eq!(
            escape("a\u{202e}b\u{2066}c\u{200f}d\u{2028}e"),
            "a\\u{202e}b\\u{2066}c\\u{200f}d\\u{2028}e"
        );
        assert_eq!(
            escape("book:42 «Ünïcödé» 書 \\n é"),
            "book:42 «Ünïcödé» 書 \\n é"
        );
        assert_eq!(format!("{:?}", Escaped("x\ny")), "x\\ny");
        let error = std::io::Error::other("bad JSON path: '\u{1b}]0;owned\u{7}'");
        assert_eq!(
            Escaped(&error).to_string(),
            "bad JSON path: '\\x1b]0;owned\\x07'"
        );
    }
}
