//! An outbox row as the tail reads it, and what it records (`ChangeBody`). Whatever an app or a
//! hand edit put in the outbox reads: a row that does not decode (text that is not UTF-8 or
//! holds a NUL, a malformed literal, an op or layout that is not an integer, a layout whose
//! columns do not read) is `Unreadable`, with its table when the layout it names tells which.

use std::sync::Arc;

use rusqlite::types::ValueRef;

use crate::capture::{self, DecodeError, Layouts};
use crate::types::{ChangeBody, Layout, Op, RowChange, Unreadable};

/// An outbox row as stored, its text borrowed from SQLite's own buffers (valid until the
/// statement steps again: each row is decoded where it is read, nothing is copied first).
/// Whatever an app or a hand edit put in its columns reads: what does not fit (a layout or op
/// that is not an integer, text that is not UTF-8, a value that is not text) is kept as what it
/// was, for `decode` to report.
pub(super) struct RawRow<'r> {
    pub(super) id: i64,
    pub(super) layout: Result<i64, &'static str>,
    op: Result<i64, &'static str>,
    old: Result<Option<&'r str>, &'static str>,
    new: Result<Option<&'r str>, &'static str>,
    pub(super) at: Option<f64>,
}

impl<'r> RawRow<'r> {
    pub(super) fn read(row: &'r rusqlite::Row<'_>) -> rusqlite::Result<RawRow<'r>> {
        let integer = |value: ValueRef<'_>| match value {
            ValueRef::Integer(i) => Ok(i),
            _ => Err("a value that is not an integer"),
        };
        let text = |value: ValueRef<'r>| match value {
            ValueRef::Null => Ok(None),
            ValueRef::Text(_) => capture::utf8_text(value)
                .map(Some)
                .ok_or("text that is not valid UTF-8"),
            _ => Err("a value that is not text"),
        };
        Ok(RawRow {
            id: row.get(0)?,
            layout: integer(row.get_ref(1)?),
            op: integer(row.get_ref(2)?),
            old: text(row.get_ref(3)?),
            new: text(row.get_ref(4)?),
            at: match row.get_ref(5)? {
                ValueRef::Real(at) => Some(at),
                ValueRef::Integer(at) => Some(at as f64),
                _ => None,
            },
        })
    }

    /// What an outbox row records. A row that does not decode is `Unreadable`, with its table
    /// when the layout it names tells which.
    pub(super) fn decode(&self, layouts: &Layouts) -> ChangeBody {
        let id = self.id;
        match (self.op, &self.new) {
            // An admin action (or a bare position marker): its JSON in `new`.
            (Ok(capture::MARKER_OP), Ok(new)) => return capture::read_marker(id, *new),
            (Ok(capture::MARKER_OP), Err(what)) => {
                return ChangeBody::Unreadable(Unreadable {
                    table: None,
                    reason: format!("outbox row {id} is an admin action holding {what}"),
                });
            }
            (Ok(capture::RESET_OP), _) => return ChangeBody::Reset,
            _ => {}
        }
        let unreadable = |table: Option<&Arc<str>>, reason: String| {
            ChangeBody::Unreadable(Unreadable {
                table: table.cloned(),
                reason,
            })
        };
        let layout = match self.layout {
            Ok(layout) => layouts.get(&layout).ok_or(layout),
            Err(what) => {
                return unreadable(
                    None,
                    format!("outbox row {id} has {what} as its capture layout"),
                );
            }
        };
        let flush = self.op == Ok(capture::FLUSH_OP);
        let replaced = self.op == Ok(capture::REPLACED_OP);
        match layout {
            Ok(Ok(layout)) if flush => ChangeBody::Flush {
                table: Arc::clone(&layout.table),
            },
            Ok(Ok(layout)) => match self.decode_row(layout) {
                Ok(change) if replaced => ChangeBody::Replaced(change),
                Ok(change) => ChangeBody::Row(change),
                Err(reason) => unreadable(Some(&layout.table), format!("outbox row {id} {reason}")),
            },
            Ok(Err(Unreadable {
                table: Some(table), ..
            })) if flush => ChangeBody::Flush {
                table: Arc::clone(table),
            },
            Ok(Err(bad)) => unreadable(
                bad.table.as_ref(),
                format!("outbox row {id}: {}", bad.reason),
            ),
            Err(layout) => unreadable(
                None,
                format!("outbox row {id} names unknown capture layout {layout}"),
            ),
        }
    }

    /// A row change of `layout`, or why it does not decode (completing "outbox row {id} ...").
    fn decode_row(&self, layout: &Arc<Layout>) -> Result<RowChange, String> {
        let op = match self.op {
            Ok(capture::REPLACED_OP) => Op::Delete,
            Ok(code) => Op::from_code(code).ok_or_else(|| format!("has unknown op {code}"))?,
            Err(what) => return Err(format!("has {what} as its op")),
        };
        let values = |which: &str, stored: &Result<Option<&str>, &'static str>| match stored {
            Err(what) => Err(format!("has {what} in `{which}`")),
            Ok(None) if layout.columns.is_empty() => Ok(Some(Vec::new())),
            Ok(None) => Ok(None),
            Ok(Some(text)) => match capture::decode_values(text, layout.columns.len()) {
                Ok(values) if values.len() == layout.columns.len() => Ok(Some(values)),
                Ok(_) | Err(DecodeError::Malformed) => {
                    Err(format!("has malformed values in `{which}`: {text:?}"))
                }
                Err(DecodeError::TextWithNul) => Err(format!(
                    "has a text value holding a NUL character in `{which}`: no key can be rendered from it"
                )),
            },
        };
        let (old, new) = match op {
            Op::Insert => (None, values("new", &self.new)?),
            Op::Delete => (values("old", &self.old)?, None),
            Op::Update => (values("old", &self.old)?, values("new", &self.new)?),
        };
        Ok(RowChange {
            layout: Arc::clone(layout),
            op,
            old,
            new,
        })
    }
}
