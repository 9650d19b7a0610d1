//! The plain values the stages hand each other: a captured change (capture → tail → rules), the
//! plan a batch of changes maps to (rules → apply → cache), an operator's invalidation (http →
//! the outbox → rules, like a change), and the vocabulary they share (operations, strategies, key parameters). No behaviour
//! lives here beyond small accessors: each stage owns what it does with these.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::types::Value;
use serde::{Deserialize, Serialize};

/// A map with a fast seeded hasher (foldhash, as hashbrown's default): for the maps the tail
/// fills for every outbox row (a batch's keys and tags, the capture layouts).
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The values a key gives its family's placeholders, by name (`book:42` → `[("id", "42")]`).
pub type Params = Vec<(String, String)>;

/// What a change to a watched table does to the keys a rule names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Remove the key; the next read misses and refills from the database.
    Delete,
    /// Remove now, recompute soon in the background.
    WriteBehind,
    /// Recompute now, before the change counts as applied: the next read is a fresh hit.
    WriteThrough,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Delete => "delete",
            Strategy::WriteBehind => "write-behind",
            Strategy::WriteThrough => "write-through",
        }
    }
}

/// A row operation, as the capture triggers record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::Insert, Op::Update, Op::Delete];

    /// The code a trigger writes into `cachetail_outbox.op`.
    pub fn code(self) -> i64 {
        match self {
            Op::Insert => 1,
            Op::Update => 2,
            Op::Delete => 3,
        }
    }

    pub fn from_code(code: i64) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.code() == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// One capture layout: the table and the columns its triggers record, in stored order.
#[derive(Debug)]
pub struct Layout {
    pub table: Arc<str>,
    pub columns: Vec<Arc<str>>,
}

impl Layout {
    /// The value of `column` in a decoded row of this layout.
    pub fn value<'r>(&self, row: &'r [Value], column: &str) -> Option<&'r Value> {
        let index = self.columns.iter().position(|c| &**c == column)?;
        row.get(index)
    }
}

/// One captured row change: the old image (update, delete) and the new one (insert, update).
#[derive(Debug)]
pub struct RowChange {
    pub layout: Arc<Layout>,
    pub op: Op,
    pub old: Option<Vec<Value>>,
    pub new: Option<Vec<Value>>,
}

/// What one outbox row records.
#[derive(Debug)]
pub enum ChangeBody {
    /// A row of a watched table changed.
    Row(RowChange),
    /// A row a conflict may have removed (a delete, recorded before SQLite resolved the conflict:
    /// `REPLACE` removed it, `OR IGNORE` or an upsert kept it). Mapped to keys as a delete.
    Replaced(RowChange),
    /// Changes to this table may have gone uncaptured (capture was just installed, reinstalled
    /// after a migration, resumed, or cannot be installed): drop what was read from it before.
    Flush { table: Arc<str> },
    /// The row could not be decoded: the values that depend on its table (everything, when the
    /// table is unknown) are dropped rather than leave anything stale.
    Unreadable(Unreadable),
    /// A position marker with nothing to apply (written by an older cachetail).
    Marker,
    /// An operator's action, applied at its own position by the daemon that applies the outbox,
    /// whichever daemon received it.
    Admin(AdminAction),
    /// The outbox was emptied or rebuilt by hand: changes may have gone unseen, everything is
    /// dropped.
    Reset,
}

/// Why an outbox row (or the capture layout it names) could not be decoded, and the table it
/// belongs to when that much is known.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    pub table: Option<Arc<str>>,
    pub reason: String,
}

/// An outbox row: its position and what it records.
#[derive(Debug)]
pub struct Change {
    pub position: u64,
    /// When the write ran (unix ms, SQLite's clock), if the capture recorded it.
    pub written_ms: Option<f64>,
    pub body: ChangeBody,
}

/// What to do to one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyAction {
    pub strategy: Strategy,
    /// The latest change in the batch that touched the key.
    pub position: u64,
}

/// The cache actions one batch calls for.
#[derive(Debug, Default)]
pub struct Plan {
    pub keys: FastMap<String, KeyAction>,
    /// Tag → the latest position that invalidated it.
    pub tags: FastMap<String, u64>,
    /// Set when a change could not be mapped to keys (a row of an unknown table, a template
    /// needing a column the row's capture did not record): everything is dropped at this position.
    pub flush_all: Option<u64>,
    /// Tables whose changes may have gone uncaptured, or whose rows could not be decoded → the
    /// latest such position: every family that depends on the table is dropped there.
    pub flush_tables: HashMap<Arc<str>, u64>,
    /// Families an operator flushed (by pattern, as in the config) → the latest position.
    pub flush_families: HashMap<String, u64>,
    /// Per rule (its index in the config): keys and tags it named, and keys it had recomputed.
    pub per_rule: HashMap<usize, (u64, u64)>,
    /// What derived rules' lookups are asked, per rule and lookup (their indices in the config):
    /// the tail runs them (`apply::lookups`) and adds the keys they find before the plan is
    /// applied.
    pub lookups: HashMap<(usize, usize), LookupAsk>,
}

impl Plan {
    /// Names `key` with `action`, merged with what the batch already asked of it: the strongest
    /// strategy, at the latest position.
    pub fn name_key(&mut self, key: &str, action: KeyAction) {
        match self.keys.get_mut(key) {
            Some(a) => {
                a.strategy = a.strategy.max(action.strategy);
                a.position = a.position.max(action.position);
            }
            None => {
                self.keys.insert(key.to_owned(), action);
            }
        }
    }
}

/// The changed rows' values of a lookup's input column within one batch, and the latest
/// position among them (the keys found are refreshed at it).
#[derive(Debug, Default)]
pub struct LookupAsk {
    pub values: Vec<Value>,
    pub position: u64,
}

/// What an operator asks to drop (the admin API). Written into the outbox as JSON
/// (`{"key":"book:1"}`, `"all"`), where the applying daemon reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminAction {
    Key(String),
    Tag(String),
    /// A family, by its pattern as written in the config.
    Family(String),
    All,
}
