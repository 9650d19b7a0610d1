//! Running a family's query for one key: its parameters bound (never spliced), in one read
//! transaction together with the outbox head (the value's version) and the pause flag, encoded
//! as the JSON the endpoint serves.

use std::fmt::Write as _;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, Statement};

/// A value's JSON, exactly its bytes (cached for minutes: no growth slack, no shared header).
pub type Body = Box<[u8]>;

/// A computed value: the outbox position it read at and its JSON (None: no row, a 404).
pub struct Computed {
    pub version: u64,
    pub body: Option<Body>,
    /// Capture was paused when it was read: changes made since may have no outbox row, so
    /// nothing would ever mark this value stale. It may answer the request that read it, but
    /// it is never stored.
    pub paused: bool,
    /// `PRAGMA schema_version` in its read: the schema the query's comparisons were made under.
    pub schema_version: i64,
}

/// The newest outbox position (0 when nothing was ever captured).
pub fn read_head(conn: &Connection) -> rusqlite::Result<u64> {
    let id: i64 = conn
        .prepare_cached("SELECT coalesce(max(id), 0) FROM cachetail_outbox")?
        .query_row([], |row| row.get(0))?;
    Ok(u64::try_from(id).unwrap_or(0))
}

/// The newest outbox position and whether capture is paused, read together: a head read while
/// paused does not cover the writes made since (they have no outbox row).
pub fn read_head_and_pause(conn: &Connection) -> rusqlite::Result<(u64, bool)> {
    let (id, paused): (i64, bool) = conn
        .prepare_cached(
            "SELECT (SELECT coalesce(max(id), 0) FROM cachetail_outbox), \
                    EXISTS (SELECT 1 FROM cachetail_meta WHERE key = 'paused' AND value = '1')",
        )?
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    Ok((u64::try_from(id).unwrap_or(0), paused))
}

/// Runs `query` (a one-row family unless `many`) with `params`, in one read transaction with
/// the outbox head (and the pause flag, which says whether that head means anything, and the
/// schema version the query was read under).
pub fn compute(
    conn: &Connection,
    query: &str,
    many: bool,
    params: &[(String, String)],
) -> rusqlite::Result<Computed> {
    compute_with(conn, |conn| {
        let mut stmt = conn.prepare_cached(query)?;
        bind_params(&mut stmt, params)?;
        encode_rows(&mut stmt, many)
    })
}

/// Computes a value with `body` (which runs its statements on the connection it is given), in
/// one read transaction with the outbox head, the pause flag and the schema version, as
/// `compute` does for a family's query.
pub fn compute_with(
    conn: &Connection,
    body: impl FnOnce(&Connection) -> rusqlite::Result<Option<Body>>,
) -> rusqlite::Result<Computed> {
    let tx = conn.unchecked_transaction()?;
    let (version, paused, schema_version): (i64, bool, i64) = tx
        .prepare_cached(
            "SELECT (SELECT coalesce(max(id), 0) FROM cachetail_outbox), \
                    EXISTS (SELECT 1 FROM cachetail_meta WHERE key = 'paused' AND value = '1'), \
                    (SELECT schema_version FROM pragma_schema_version)",
        )?
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    let body = body(&tx)?;
    tx.commit()?;
    Ok(Computed {
        version: u64::try_from(version).unwrap_or(0),
        body,
        paused,
        schema_version,
    })
}

/// Binds each `:name` of the statement to the key parameter of that name. A value written the way
/// a key renders a number (`42`, `1.5`) is bound as that number, so `WHERE id = :id` matches
/// whatever the column's affinity; anything else is bound as text. Never spliced into the SQL.
fn bind_params(stmt: &mut Statement<'_>, params: &[(String, String)]) -> rusqlite::Result<()> {
    for index in 1..=stmt.parameter_count() {
        let name = stmt.parameter_name(index).unwrap_or("");
        let bare = name.trim_start_matches([':', '@', '$']);
        let Some((_, value)) = params.iter().find(|(n, _)| n == bare) else {
            return Err(rusqlite::Error::InvalidParameterName(name.to_owned()));
        };
        match bound(value) {
            Bound::Integer(i) => stmt.raw_bind_parameter(index, i)?,
            Bound::Real(r) => stmt.raw_bind_parameter(index, r)?,
            Bound::Text(text) => stmt.raw_bind_parameter(index, text)?,
        }
    }
    Ok(())
}

/// How a key's parameter is bound to its family's query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bound<'a> {
    /// Written exactly as a key renders an integer (`42`, not `042` or `+42`).
    Integer(i64),
    /// Written exactly as a key renders a real (`1.5`, not `1.50` or `1e0`).
    Real(f64),
    Text(&'a str),
}

/// How `text`, a key's parameter, is bound: as the number a key writes that way, else as text.
pub fn bound(text: &str) -> Bound<'_> {
    if let Some(i) = text.parse::<i64>().ok().filter(|i| i.to_string() == text) {
        return Bound::Integer(i);
    }
    match text.parse::<f64>() {
        Ok(r) if r.is_finite() && real_key_text(r) == text => Bound::Real(r),
        _ => Bound::Text(text),
    }
}

/// A real as keys write it: its shortest exact decimal form, without an exponent (`1.5`,
/// `100000000000000000000`); zero as `0` whatever its sign (`-0.0` equals `0` in SQLite, and an
/// integer zero renders `0`).
pub fn real_key_text(r: f64) -> String {
    if r == 0.0 {
        "0".to_owned()
    } else {
        r.to_string()
    }
}

/// Encodes the rows as JSON: an array of objects when `many`, else the first row's object
/// (None when there is no row).
pub fn encode_rows(stmt: &mut Statement<'_>, many: bool) -> rusqlite::Result<Option<Body>> {
    let names: Vec<String> = stmt
        .column_names()
        .map(|n| serde_json::to_string(n).unwrap_or_else(|_| "\"?\"".to_owned()))
        .collect();
    let mut out = String::with_capacity(256);
    let mut rows = stmt.raw_query();
    if many {
        out.push('[');
    }
    let mut count = 0usize;
    while let Some(row) = rows.next()? {
        if count > 0 {
            out.push(',');
        }
        out.push('{');
        for (i, name) in names.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(name);
            out.push(':');
            push_json(&mut out, row.get_ref(i)?);
        }
        out.push('}');
        count += 1;
        if !many {
            break;
        }
    }
    if many {
        out.push(']');
    } else if count == 0 {
        return Ok(None);
    }
    // Cached for minutes: keep exactly the bytes, not the growth slack of the buffer.
    Ok(Some(out.into_bytes().into_boxed_slice()))
}

/// One SQLite value as JSON: numbers as numbers (non-finite reals as null), text as strings,
/// blobs as lowercase hex strings.
fn push_json(out: &mut String, value: ValueRef<'_>) {
    match value {
        ValueRef::Null => out.push_str("null"),
        ValueRef::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        ValueRef::Real(r) if r.is_finite() => {
            let text = serde_json::to_string(&r).unwrap_or_else(|_| "null".to_owned());
            out.push_str(&text);
        }
        ValueRef::Real(_) => out.push_str("null"),
        ValueRef::Text(bytes) => {
            let text = String::from_utf8_lossy(bytes);
            out.push_str(&serde_json::to_string(&*text).unwrap_or_else(|_| "null".to_owned()));
        }
        ValueRef::Blob(bytes) => {
            out.push('"');
            for b in bytes {
                let _ = write!(out, "{b:02x}");
            }
            out.push('"');
        }
    }
}
