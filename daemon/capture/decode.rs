//! Reading what the triggers stored: `quote()`d SQL literals separated by commas (they decode
//! back to exactly the value written: integer, real, text, blob, NULL, commas and quotes
//! included), the capture layouts that name each row's columns, and the write time.
//!
//! What a hand edit or a careless app can leave there (text that is not UTF-8, a malformed
//! literal, a text value holding a NUL, a layout whose columns are not a JSON list) does not
//! decode: it is reported as such, never a panic or an error that stops the reader.

use std::sync::Arc;

use rusqlite::Connection;
use rusqlite::types::{Value, ValueRef};

use super::CaptureError;
use crate::types::{FastMap, Layout, Unreadable};

/// A Julian day (`cachetail_outbox.at`) as unix milliseconds.
pub fn julian_to_unix_ms(day: f64) -> f64 {
    (day - 2_440_587.5) * 86_400_000.0
}

/// A capture layout as recorded in `cachetail_capture`: its table and columns, or, when a hand
/// edit left them unreadable, why (with the table if that much reads).
pub type RecordedLayout = Result<Arc<Layout>, Unreadable>;

/// Every recorded layout by id (looked up for every outbox row read).
pub type Layouts = FastMap<i64, RecordedLayout>;

/// Every capture layout recorded in the database, by id. A layout that cannot be read does not
/// fail the others: the rows naming it are unreadable rows of its table.
pub fn load_layouts(conn: &Connection) -> Result<Layouts, CaptureError> {
    let mut stmt = conn.prepare("SELECT id, tbl, columns FROM cachetail_capture")?;
    let mut rows = stmt.query([])?;
    let mut layouts = Layouts::default();
    while let Some(row) = rows.next()? {
        // An INTEGER PRIMARY KEY: always an integer.
        let ValueRef::Integer(id) = row.get_ref(0)? else {
            continue;
        };
        layouts.insert(id, read_layout(id, row.get_ref(1)?, row.get_ref(2)?));
    }
    Ok(layouts)
}

fn read_layout(id: i64, table: ValueRef<'_>, columns: ValueRef<'_>) -> RecordedLayout {
    let table = utf8_text(table).map(Arc::<str>::from);
    let columns = utf8_text(columns)
        .and_then(|text| serde_json::from_str::<Vec<String>>(text).ok())
        .ok_or_else(|| Unreadable {
            table: table.clone(),
            reason: format!(
                "capture layout {id} has a column list that is not a JSON array of names"
            ),
        })?;
    let table = table.ok_or_else(|| Unreadable {
        table: None,
        reason: format!("capture layout {id} has a table name that is not UTF-8 text"),
    })?;
    Ok(Arc::new(Layout {
        table,
        columns: columns.into_iter().map(Arc::from).collect(),
    }))
}

/// A text value's characters, if it is text and valid UTF-8.
pub fn utf8_text(value: ValueRef<'_>) -> Option<&str> {
    match value {
        ValueRef::Text(bytes) => std::str::from_utf8(bytes).ok(),
        _ => None,
    }
}

/// What a capture trigger stores in place of a text value holding a NUL character: `quote()`
/// stops at the first NUL, so its literal would silently name another value.
pub const TEXT_WITH_NUL: &str = "TEXT_WITH_NUL";

/// Why the `old`/`new` text of an outbox row does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a list of `quote()`d literals (edited by hand, or not written by cachetail).
    Malformed,
    /// A text value held a NUL character (`TEXT_WITH_NUL`).
    TextWithNul,
}

/// Decodes the `old`/`new` text of an outbox row: `quote()`d literals separated by commas. Room
/// is made for the `expected` values its layout records (one allocation).
pub fn decode_values(text: &str, expected: usize) -> Result<Vec<Value>, DecodeError> {
    let bytes = text.as_bytes();
    let mut values = Vec::with_capacity(expected);
    let mut i = 0;
    loop {
        let (value, next) = decode_one(text, i)?;
        values.push(value);
        match bytes.get(next) {
            None => return Ok(values),
            Some(b',') => i = next + 1,
            Some(_) => return Err(DecodeError::Malformed),
        }
    }
}

fn decode_one(text: &str, start: usize) -> Result<(Value, usize), DecodeError> {
    use DecodeError::Malformed;
    let bytes = text.as_bytes();
    match bytes.get(start).ok_or(Malformed)? {
        b'\'' => {
            let mut out = String::new();
            let mut i = start + 1;
            loop {
                let rel = text[i..].find('\'').ok_or(Malformed)?;
                out.push_str(&text[i..i + rel]);
                i += rel + 1;
                if bytes.get(i) == Some(&b'\'') {
                    out.push('\'');
                    i += 1;
                } else {
                    return Ok((Value::Text(out), i));
                }
            }
        }
        b'X' | b'x' if bytes.get(start + 1) == Some(&b'\'') => {
            let body_start = start + 2;
            let len = text[body_start..].find('\'').ok_or(Malformed)?;
            Ok((
                Value::Blob(decode_hex(&bytes[body_start..body_start + len])?),
                body_start + len + 1,
            ))
        }
        _ => {
            let end = bytes[start..]
                .iter()
                .position(|&b| b == b',')
                .map_or(text.len(), |rel| start + rel);
            let token = &text[start..end];
            let value = if token == "NULL" {
                Value::Null
            } else if let Ok(i) = token.parse::<i64>() {
                Value::Integer(i)
            } else if let Ok(r) = token.parse::<f64>() {
                Value::Real(r)
            } else {
                match token {
                    "Inf" => Value::Real(f64::INFINITY),
                    "-Inf" => Value::Real(f64::NEG_INFINITY),
                    TEXT_WITH_NUL => return Err(DecodeError::TextWithNul),
                    _ => return Err(Malformed),
                }
            };
            Ok((value, end))
        }
    }
}

/// The bytes of a blob literal's hex digits (an even number of ASCII hex digits).
fn decode_hex(hex: &[u8]) -> Result<Vec<u8>, DecodeError> {
    if !hex.len().is_multiple_of(2) {
        return Err(DecodeError::Malformed);
    }
    hex.chunks_exact(2)
        .map(|pair| Some(hex_value(pair[0])? << 4 | hex_value(pair[1])?))
        .collect::<Option<Vec<u8>>>()
        .ok_or(DecodeError::Malformed)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_decode_to_what_sqlite_stored() {
        let conn = Connection::open_in_memory().expect("memory db");
        let text: String = conn
            .query_row(
                "SELECT quote(42) || ',' || quote(-7.25) || ',' || quote('it''s, a {key}:/é') || ',' || quote(NULL) || ',' || quote(x'00ff') || ',' || quote(1e300)",
                [],
                |row| row.get(0),
            )
            .expect("quote");
        let values = decode_values(&text, 0).expect("decodes");
        assert_eq!(
            values,
            vec![
                Value::Integer(42),
                Value::Real(-7.25),
                Value::Text("it's, a {key}:/é".into()),
                Value::Null,
                Value::Blob(vec![0, 255]),
                Value::Real(1e300),
            ]
        );
        assert_eq!(
            decode_values("'unterminated", 0),
            Err(DecodeError::Malformed)
        );
        assert_eq!(decode_values("1 2", 0), Err(DecodeError::Malformed));
    }

    #[test]
    fn malformed_literals_are_reported_never_a_panic() {
        assert_eq!(
            decode_values("X'aF09',x''", 0),
            Ok(vec![Value::Blob(vec![0xaf, 0x09]), Value::Blob(Vec::new())])
        );
        // Not hex, an odd count, or a character that is not ASCII inside a blob literal (slicing
        // two bytes there would split it).
        for text in [
            "X'zz'",
            "X'abc'",
            "X'a\u{e9}b'",
            "X'\u{e9}'",
            "x'",
            "X'ab",
            "'a'b",
            "",
        ] {
            assert_eq!(
                decode_values(text, 0),
                Err(DecodeError::Malformed),
                "{text}"
            );
        }
        assert_eq!(
            decode_values("1,TEXT_WITH_NUL", 0),
            Err(DecodeError::TextWithNul)
        );
    }

    #[test]
    fn a_layout_that_does_not_read_is_reported_with_its_table() {
        let conn = Connection::open_in_memory().expect("memory db");
        conn.execute_batch(
            "CREATE TABLE cachetail_capture (id INTEGER PRIMARY KEY, tbl TEXT NOT NULL, columns TEXT NOT NULL);
             INSERT INTO cachetail_capture VALUES (1, 'reviews', '[\"book_id\"]'), (2, 'reviews', '[oops'),
                 (3, CAST(X'FF' AS TEXT), '[]'), (4, 'users', CAST(X'5B5DFF' AS TEXT)), (5, 'books', 7);",
        )
        .expect("layouts");
        let layouts = load_layouts(&conn).expect("loads");
        let good = layouts[&1].as_ref().expect("readable");
        assert_eq!((&*good.table, good.columns.len()), ("reviews", 1));
        let table = |id: i64| layouts[&id].as_ref().err().map(|u| u.table.clone());
        assert_eq!(table(2), Some(Some("reviews".into())));
        assert_eq!(table(3), Some(None));
        assert_eq!(table(4), Some(Some("users".into())));
        assert_eq!(table(5), Some(Some("books".into())));
    }
}
