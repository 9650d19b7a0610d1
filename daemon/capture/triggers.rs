//! The trigger text: for each watched table, `AFTER INSERT/UPDATE/DELETE` triggers recording the
//! captured columns, and `BEFORE INSERT/UPDATE` ones recording a row about to be removed by a
//! `REPLACE` conflict (SQLite fires no delete trigger for it). Only core SQLite (`quote()`, `||`,
//! `typeof`, `instr`, `char`).

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension};

use super::decode::TEXT_WITH_NUL;
use super::{FLUSH_OP, REPLACED_OP, TRIGGER_PREFIX, WRITTEN_AT};
use crate::db::quote_identifier;
use crate::types::Op;

/// Drops every cachetail trigger; returns how many there were.
pub(super) fn drop_all_triggers(conn: &Connection) -> rusqlite::Result<usize> {
    let triggers = installed_triggers(conn)?;
    for name in triggers.keys() {
        conn.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS {}",
            quote_identifier(name)
        ))?;
    }
    Ok(triggers.len())
}

pub(super) fn installed_triggers(conn: &Connection) -> rusqlite::Result<BTreeMap<String, String>> {
    let mut stmt = conn.prepare(
        "SELECT name, sql FROM sqlite_schema WHERE type = 'trigger' AND substr(name, 1, length(?1)) = ?1",
    )?;
    stmt.query_map([TRIGGER_PREFIX], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect()
}

pub(super) fn trigger_name(table: &str, kind: &str) -> String {
    format!("{TRIGGER_PREFIX}{kind}_{table}")
}

/// What the replace triggers need to know of a table: its unique keys and whether it has rowids.
pub(super) struct TableShape {
    without_rowid: bool,
    /// Each UNIQUE constraint or index (and a WITHOUT ROWID table's primary key): its columns
    /// with their collations. Expression indexes are left out (SQLite cannot name their values
    /// from a trigger).
    unique_keys: Vec<Vec<(String, String)>>,
    primary_key: Vec<String>,
}

impl TableShape {
    pub(super) fn read(conn: &Connection, table: &str) -> rusqlite::Result<TableShape> {
        let without_rowid: bool = conn
            .query_row(
                "SELECT wr FROM pragma_table_list WHERE name = ?1 AND schema = 'main'",
                [table],
                |row| row.get(0),
            )
            .optional()?
            .unwrap_or(false);
        let mut primary_key: Vec<(i64, String)> = conn
            .prepare("SELECT pk, name FROM pragma_table_info(?1) WHERE pk > 0")?
            .query_map([table], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        primary_key.sort();
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM pragma_index_list(?1) WHERE \"unique\" = 1")?
            .query_map([table], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut unique_keys = Vec::new();
        for index in indexes {
            let columns: Vec<(i64, Option<String>, Option<String>)> = conn
                .prepare("SELECT cid, name, coll FROM pragma_index_xinfo(?1) WHERE key = 1 ORDER BY seqno")?
                .query_map([&index], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            if columns
                .iter()
                .any(|(cid, name, _)| *cid < 0 || name.is_none())
            {
                continue;
            }
            unique_keys.push(
                columns
                    .into_iter()
                    .map(|(_, name, coll)| {
                        (
                            name.unwrap_or_default(),
                            coll.unwrap_or_else(|| "BINARY".to_owned()),
                        )
                    })
                    .collect(),
            );
        }
        Ok(TableShape {
            without_rowid,
            unique_keys,
            primary_key: primary_key.into_iter().map(|(_, name)| name).collect(),
        })
    }

    /// `row` conflicts with the NEW row on some unique key (rowid included).
    fn conflict(&self, row: &str) -> String {
        let mut alternatives: Vec<String> = self
            .unique_keys
            .iter()
            .map(|key| {
                let terms: Vec<String> = key
                    .iter()
                    .map(|(column, coll)| {
                        let c = quote_identifier(column);
                        format!("{row}.{c} = NEW.{c} COLLATE {}", quote_identifier(coll))
                    })
                    .collect();
                format!("({})", terms.join(" AND "))
            })
            .collect();
        if !self.without_rowid {
            alternatives.push(format!("{row}.rowid = NEW.rowid"));
        }
        alternatives.join(" OR ")
    }

    /// `row` is the OLD row itself.
    fn is_old_row(&self, row: &str) -> String {
        if self.without_rowid {
            let terms: Vec<String> = self
                .primary_key
                .iter()
                .map(|c| {
                    let c = quote_identifier(c);
                    format!("{row}.{c} IS OLD.{c}")
                })
                .collect();
            format!("({})", terms.join(" AND "))
        } else {
            format!("{row}.rowid = OLD.rowid")
        }
    }

    /// Only the rowid can make a REPLACE remove a row (a rowid table with no other UNIQUE key):
    /// then an insert given no rowid cannot conflict, and the replace trigger need not look.
    fn replaces_only_by_rowid(&self) -> bool {
        !self.without_rowid && self.unique_keys.is_empty()
    }

    /// A unique key's column changes in this UPDATE (only then can it replace another row).
    fn unique_column_changes(&self) -> String {
        let mut columns: Vec<&str> = self
            .unique_keys
            .iter()
            .flatten()
            .map(|(c, _)| c.as_str())
            .collect();
        columns.sort_unstable();
        columns.dedup();
        let mut terms: Vec<String> = columns
            .iter()
            .map(|c| {
                let c = quote_identifier(c);
                format!("NEW.{c} IS NOT OLD.{c}")
            })
            .collect();
        if !self.without_rowid {
            terms.push("NEW.rowid IS NOT OLD.rowid".to_owned());
        }
        terms.join(" OR ")
    }
}

/// How a trigger records one value: its `quote()`d literal, except for text holding a NUL
/// character, which `quote()` would cut short there (`'a'` for `a<NUL>b`: another value,
/// silently). Such text is recorded as `TEXT_WITH_NUL`, which the tail reads as a row it cannot
/// decode. `typeof` first, so that only text values pay for the scan.
fn captured_value(value: &str) -> String {
    format!(
        "CASE WHEN typeof({value}) = 'text' AND instr({value}, char(0)) THEN '{TEXT_WITH_NUL}' ELSE quote({value}) END"
    )
}

/// The capture triggers of one table, by name: AFTER INSERT / UPDATE / DELETE, and BEFORE INSERT /
/// UPDATE ones that record a row about to be replaced (REPLACE, `INSERT OR REPLACE`, `UPDATE OR
/// REPLACE` fire no delete trigger for it unless the writer turned `recursive_triggers` on).
pub(super) fn table_triggers(
    table: &str,
    layout: i64,
    columns: &[String],
    shape: &TableShape,
) -> Vec<(String, String)> {
    let values = |row: &str| -> String {
        if columns.is_empty() {
            return "NULL".to_owned();
        }
        columns
            .iter()
            .map(|c| captured_value(&format!("{row}.{}", quote_identifier(c))))
            .collect::<Vec<_>>()
            .join(" || ',' || ")
    };
    let t = quote_identifier(table);
    let named = |kind: &str, body: String| -> (String, String) {
        let name = trigger_name(table, kind);
        let sql = format!("CREATE TRIGGER {} {body}", quote_identifier(&name));
        (name, sql)
    };
    let outbox = "INSERT INTO cachetail_outbox";
    let (insert, update, delete) = (Op::Insert.code(), Op::Update.code(), Op::Delete.code());
    let removed = REPLACED_OP;
    let replaced = "cachetail_replaced";
    // On a table where only the rowid can conflict, the replace trigger looks only when the
    // insert names a rowid: in a BEFORE INSERT trigger `NEW.rowid` is -1 when SQLite is to choose
    // it (a new rowid, no conflict possible). An insert that names -1 itself is told apart after
    // the fact, by its AFTER INSERT trigger (SQLite never chooses -1): it is recorded as a flush
    // of the table, as the row it may have replaced went unrecorded.
    let (replace_when, insert_op) = if shape.replaces_only_by_rowid() {
        (
            "WHEN NEW.rowid <> -1 ",
            format!("CASE NEW.rowid WHEN -1 THEN {FLUSH_OP} ELSE {insert} END"),
        )
    } else {
        ("", insert.to_string())
    };
    vec![
        named(
            "insert",
            format!(
                "AFTER INSERT ON {t} BEGIN {outbox} (capture, op, new, at) VALUES ({layout}, {insert_op}, {}, {WRITTEN_AT}); END",
                values("NEW")
            ),
        ),
        named(
            "update",
            format!(
                "AFTER UPDATE ON {t} BEGIN {outbox} (capture, op, old, new, at) VALUES ({layout}, {update}, {}, {}, {WRITTEN_AT}); END",
                values("OLD"),
                values("NEW")
            ),
        ),
        named(
            "delete",
            format!(
                "AFTER DELETE ON {t} BEGIN {outbox} (capture, op, old, at) VALUES ({layout}, {delete}, {}, {WRITTEN_AT}); END",
                values("OLD")
            ),
        ),
        named(
            "replace_insert",
            format!(
                "BEFORE INSERT ON {t} {replace_when}BEGIN {outbox} (capture, op, old, at) SELECT {layout}, {removed}, {}, {WRITTEN_AT} FROM {t} AS {replaced} WHERE {}; END",
                values(replaced),
                shape.conflict(replaced)
            ),
        ),
        named(
            "replace_update",
            format!(
                "BEFORE UPDATE ON {t} WHEN {} BEGIN {outbox} (capture, op, old, at) SELECT {layout}, {removed}, {}, {WRITTEN_AT} FROM {t} AS {replaced} WHERE ({}) AND NOT {}; END",
                shape.unique_column_changes(),
                values(replaced),
                shape.conflict(replaced),
                shape.is_old_row(replaced)
            ),
        ),
    ]
}
