//! Reading what the triggers stored: `quote()`d SQL literals separated by commas (they decode
//! back to exactly the value written: integer, real, text, blob, NULL, commas and quotes
//! included), the capture layouts that name each row's columns, and the write time.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::Connection;
use rusqlite::types::Value;

use super::CaptureError;
use crate::types::Layout;

/// A Julian day (`cachetail_outbox.at`) as unix milliseconds.
pub fn julian_to_unix_ms(day: f64) -> f64 {
    (day - 2_440_587.5) * 86_400_000.0
}

/// Every capture layout recorded in the database, by id.
pub fn load_layouts(conn: &Connection) -> Result<HashMap<i64, Arc<Layout>>, CaptureError> {
    let mut stmt = conn.prepare("SELECT id, tbl, columns FROM cachetail_capture")?;
    let rows = stmt.query_map([], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
        ))
    })?;
    let mut layouts = HashMap::new();
    for row in rows {
        let (id, table, columns) = row?;
        let columns: Vec<String> =
            serde_json::from_str(&columns).map_err(|_| CaptureError::Malformed {
                id,
                what: "capture layout columns",
                text: columns.clone(),
            })?;
        layouts.insert(
            id,
            Arc::new(Layout {
                table: table.into(),
                columns: columns.into_iter().map(Arc::from).collect(),
            }),
        );
    }
    Ok(layouts)
}

/// Decodes the `old`/`new` text of an outbox row: `quote()`d literals separated by commas.
pub fn decode_values(text: &str) -> Option<Vec<Value>> {
    let bytes = text.as_bytes();
    let mut values = Vec::new();
    let mut i = 0;
    loop {
        let (value, next) = decode_one(text, i)?;
        values.push(value);
        match bytes.get(next) {
            None => return Some(values),
            Some(b',') => i = next + 1,
            Some(_) => return None,
        }
    }
}

fn decode_one(text: &str, start: usize) -> Option<(Value, usize)> {
    let bytes = text.as_bytes();
    match bytes.get(start)? {
        b'\'' => {
            let mut out = String::new();
            let mut i = start + 1;
            loop {
                let rel = text[i..].find('\'')?;
                out.push_str(&text[i..i + rel]);
                i += rel + 1;
                if bytes.get(i) == Some(&b'\'') {
                    out.push('\'');
                    i += 1;
                } else {
                    return Some((Value::Text(out), i));
                }
            }
        }
        b'X' | b'x' if bytes.get(start + 1) == Some(&b'\'') => {
            let body_start = start + 2;
            let len = text[body_start..].find('\'')?;
            let hex = &text[body_start..body_start + len];
            if !hex.len().is_multiple_of(2) {
                return None;
            }
            let blob = (0..hex.len())
                .step_by(2)
                .map(|j| u8::from_str_radix(&hex[j..j + 2], 16).ok())
                .collect::<Option<Vec<u8>>>()?;
            Some((Value::Blob(blob), body_start + len + 1))
        }
        _ => {
            let end = text[start..]
                .find(',')
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
                    _ => return None,
                }
            };
            Some((value, end))
        }
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
        let values = decode_values(&text).expect("decodes");
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
        assert_eq!(decode_values("'unterminated"), None);
        assert_eq!(decode_values("1 2"), None);
    }
}
