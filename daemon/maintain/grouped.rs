//! Stub: filled in by the grouped helper (see mod.rs for the contract).

use rusqlite::Connection;

use super::{Settled, Size};
use crate::db::Body;
use crate::types::RowChange;

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {}

/// Ok(None): the query is not of this shape. Err: it is, but cannot be maintained (why).
pub fn analyse(_query: &str) -> Result<Option<Plan>, String> {
    Ok(None)
}

impl Plan {
    pub fn columns(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    pub fn tables(&self) -> Vec<String> {
        Vec::new()
    }
}

pub struct State {}

impl State {
    pub fn build(_plan: &Plan, _conn: &Connection) -> rusqlite::Result<State> {
        Ok(State {})
    }

    pub fn apply(&mut self, _change: &RowChange) {}

    pub fn settle(&mut self, _conn: &Connection) -> rusqlite::Result<Settled> {
        Ok(Settled::default())
    }

    pub fn value(&mut self, _conn: &Connection, _many: bool) -> rusqlite::Result<Option<Body>> {
        Ok(None)
    }

    pub fn size(&self) -> Size {
        Size::default()
    }

    pub fn discard(self, _conn: &Connection) {}
}
