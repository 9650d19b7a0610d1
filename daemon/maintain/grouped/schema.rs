//! What the analysis needs the schema for: column affinities and collations (a change's value
//! names a group only where the comparisons on the way agree with `key IN (value)`), and primary
//! keys (a column read outside aggregates must be one value per group).

use rusqlite::Connection;

use super::analysis::{Analysis, Collation, Column};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Affinity {
    Integer,
    Text,
    Blob,
    Real,
    Numeric,
}

impl Affinity {
    /// SQLite's rules for a declared type (section 3.1 of "Datatypes In SQLite").
    fn of(declared: &str) -> Affinity {
        let t = declared.to_uppercase();
        if t.contains("INT") {
            Affinity::Integer
        } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
            Affinity::Text
        } else if t.contains("BLOB") || t.trim().is_empty() {
            Affinity::Blob
        } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
            Affinity::Real
        } else {
            Affinity::Numeric
        }
    }

    fn numeric(self) -> bool {
        matches!(self, Affinity::Integer | Affinity::Real | Affinity::Numeric)
    }

    /// A declared type with this affinity, for a state column.
    pub fn declared(self) -> &'static str {
        match self {
            Affinity::Integer => "INTEGER",
            Affinity::Text => "TEXT",
            Affinity::Blob => "BLOB",
            Affinity::Real => "REAL",
            Affinity::Numeric => "NUMERIC",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct ColumnInfo {
    pub affinity: Affinity,
    pub collation: String,
    pub integer_key: bool,
    pub sole_key: bool,
}

pub(super) fn column_info(conn: &Connection, column: &Column) -> Result<ColumnInfo, String> {
    let (declared, collation, _, primary_key, _) = conn
        .column_metadata(None::<&str>, column.table.as_str(), column.column.as_str())
        .map_err(|e| format!("{}.{}: {e}", column.alias, column.column))?;
    let declared = declared
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    let collation = collation
        .map(|c| c.to_string_lossy().to_uppercase())
        .unwrap_or_else(|| "BINARY".to_owned());
    let keys: i64 = conn
        .query_row(
            "SELECT count(*) FROM pragma_table_info(?1) WHERE pk > 0",
            [column.table.as_str()],
            |row| row.get(0),
        )
        .map_err(|e| format!("{}: {e}", column.table))?;
    let rowid = ["rowid", "oid", "_rowid_"].contains(&column.column.as_str()) && keys == 0;
    let sole_key = (primary_key && keys == 1) || rowid;
    Ok(ColumnInfo {
        affinity: Affinity::of(&declared),
        collation,
        integer_key: rowid || (sole_key && declared.eq_ignore_ascii_case("integer")),
        sole_key,
    })
}

/// `x = key` for any values of the column `x` matches exactly the rows `key IN (x's value)`
/// matches: the same collation, and the conversions `=` applies to the pair are the ones `IN`
/// applies to the value (a numeric key converts both to numbers; a text key converts an
/// untyped `x` to text; otherwise the same affinity).
fn agrees(x: &ColumnInfo, key: &ColumnInfo) -> bool {
    let converted = x.affinity == key.affinity
        || key.affinity.numeric()
        || (key.affinity == Affinity::Text && x.affinity == Affinity::Blob);
    x.collation == key.collation && converted
}

/// What the schema decided: per trace, the tie columns kept (None where the comparisons on the
/// way disagree), the group keys' column info, and each ORDER BY term's collation.
pub(super) struct Checked {
    pub ties: Vec<Option<Vec<String>>>,
    pub keys: Vec<ColumnInfo>,
    pub order: Vec<String>,
}

pub(super) fn check(conn: &Connection, analysis: &Analysis) -> Result<Checked, String> {
    let keys = analysis
        .keys
        .iter()
        .map(|k| column_info(conn, k))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ties = Vec::new();
    for trace in &analysis.traces {
        let kept = match &trace.ties {
            None => None,
            Some(columns) => {
                let mut all = true;
                for ((_, class), key) in columns.iter().zip(&keys) {
                    for member in class {
                        all &= agrees(&column_info(conn, member)?, key);
                    }
                }
                all.then(|| columns.iter().map(|(c, _)| c.clone()).collect())
            }
        };
        ties.push(kept);
    }
    for column in &analysis.bare {
        check_bare(conn, analysis, column)?;
    }
    let order = analysis
        .order
        .iter()
        .map(|term| match &term.collation {
            Collation::Binary => Ok("BINARY".to_owned()),
            Collation::Named(name) => Ok(name.to_uppercase()),
            Collation::Of(column) => column_info(conn, column).map(|i| i.collation),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Checked { ties, keys, order })
}

/// A column read outside aggregates must be one value per group: its table's primary key is a
/// group key, or its INTEGER PRIMARY KEY is tied to one by an equality.
fn check_bare(conn: &Connection, analysis: &Analysis, column: &Column) -> Result<(), String> {
    for key in &analysis.keys {
        if key.alias == column.alias && column_info(conn, key)?.sole_key {
            return Ok(());
        }
    }
    if analysis.keys.contains(column) {
        // Equal values are the same bytes: a BINARY key that stores one type per number.
        let info = column_info(conn, column)?;
        let typed = matches!(
            info.affinity,
            Affinity::Integer | Affinity::Text | Affinity::Real
        );
        if info.collation == "BINARY" && typed {
            return Ok(());
        }
        return Err(format!(
            "GROUP BY {}.{}: values of this column that compare equal can differ ({}), and SQLite shows any one of them: group by its table's primary key, or declare the column INTEGER, REAL or TEXT without a collation",
            column.alias,
            column.column,
            if info.collation == "BINARY" {
                "5 and 5.0"
            } else {
                "'A' and 'a' under a collation"
            }
        ));
    }
    for class in &analysis.key_classes {
        for member in class {
            if member.alias == column.alias && column_info(conn, member)?.integer_key {
                return Ok(());
            }
        }
    }
    Err(format!(
        "{}.{} is read outside an aggregate but is not one value per group (SQLite would pick it from any row of the group): group by its table's primary key, or wrap it in an aggregate (`max({}.{})`)",
        column.alias, column.column, column.alias, column.column
    ))
}
