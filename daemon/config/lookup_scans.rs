//! Which derived rules' lookups would read a whole table on every batch: SQLite's plan for each
//! lookup (`EXPLAIN QUERY PLAN`), and for each table of the chain it reads by a full scan (or
//! through an automatic index, which is built by a full scan each time), the index that lets it
//! search instead. Run by `cachetail check`.

use rusqlite::Connection;

use super::{Config, RuleLookup};

/// One warning per table a derived rule's lookup scans, naming the index that would fix it.
pub fn lookup_scans(config: &Config, conn: &Connection) -> Vec<String> {
    let mut warnings = Vec::new();
    for rule in &config.rules {
        for lookup in &rule.lookups {
            for (table, column) in scanned(conn, lookup) {
                let fix = match column {
                    Some(column) => format!(
                        "CREATE INDEX {} ON {}({})",
                        identifier(&format!("{table}_{column}")),
                        identifier(&table),
                        identifier(&column)
                    ),
                    None => format!("index the column `{table}` is joined on"),
                };
                warnings.push(format!(
                    "lookup for {} on a change to `{}` (via {}) scans `{table}` on every batch: {fix}",
                    lookup.key.source(),
                    rule.table,
                    lookup.lookup.via
                ));
            }
        }
    }
    warnings
}

/// The tables (and, where the lookup's SQL tells, the column each is entered by) that the
/// lookup's plan reads by a scan. A lookup that does not prepare is `check`'s problem
/// elsewhere (the rule's table or column is gone): nothing here.
fn scanned(conn: &Connection, lookup: &RuleLookup) -> Vec<(String, Option<String>)> {
    let sql = format!("EXPLAIN QUERY PLAN {}?)", lookup.lookup.sql);
    let Ok(mut statement) = conn.prepare(&sql) else {
        return Vec::new();
    };
    let details: Vec<String> = match statement.query_map([rusqlite::types::Value::Null], |row| {
        row.get::<_, String>(3)
    }) {
        Ok(rows) => rows.filter_map(Result::ok).collect(),
        Err(_) => return Vec::new(),
    };
    let chain = Chain::parse(&lookup.lookup.sql);
    let mut found: Vec<(String, Option<String>)> = Vec::new();
    for detail in &details {
        let Some(alias) = scan_of(detail) else {
            continue;
        };
        let (table, column) = chain.entered(alias);
        if !found.iter().any(|(t, _)| *t == table) {
            found.push((table, column));
        }
    }
    found
}

/// The relation a plan line reads by a full scan (`SCAN b`, `SCAN b USING COVERING INDEX i`: the
/// whole index) or through an automatic index (`SEARCH b USING AUTOMATIC COVERING INDEX (x=?)`).
fn scan_of(detail: &str) -> Option<&str> {
    let end = |rest: &str| rest.find(" USING ").map_or(rest.len(), |i| i);
    if let Some(rest) = detail.strip_prefix("SCAN ") {
        return Some(&rest[..end(rest)]).filter(|r| !r.starts_with("CONSTANT ROW"));
    }
    let rest = detail.strip_prefix("SEARCH ")?;
    detail
        .contains(" USING AUTOMATIC ")
        .then(|| &rest[..end(rest)])
}

/// A lookup's relations as its SQL writes them (`FROM "books" AS "b" JOIN "t" AS "a" ON
/// "a"."in" = ... WHERE "b"."id" IN (`): alias → table, and the column each alias is entered by
/// (the left side of its `ON`, or of the `WHERE ... IN`).
#[derive(Default)]
struct Chain {
    relations: Vec<(String, String)>,
    entered_by: Vec<(String, String)>,
}

impl Chain {
    fn parse(sql: &str) -> Chain {
        let tokens = tokens(sql);
        let mut chain = Chain::default();
        for (i, token) in tokens.iter().enumerate() {
            let at = |k: usize| tokens.get(i + k).map(Token::text);
            if let (Token::Quoted(table), Some("AS"), Some(alias)) = (token, at(1), at(2)) {
                chain.relations.push((alias.to_owned(), table.clone()));
            }
            let keyword = matches!(token, Token::Word(w) if w == "ON" || w == "WHERE");
            if let (true, Some(alias), Some("."), Some(column)) = (keyword, at(1), at(2), at(3)) {
                chain.entered_by.push((alias.to_owned(), column.to_owned()));
            }
        }
        chain
    }

    /// The table behind `alias` (the alias itself when the SQL did not tell) and its column.
    fn entered(&self, alias: &str) -> (String, Option<String>) {
        let table = self
            .relations
            .iter()
            .find(|(a, _)| a == alias)
            .map_or_else(|| alias.to_owned(), |(_, t)| t.clone());
        let column = self
            .entered_by
            .iter()
            .find(|(a, _)| a == alias)
            .map(|(_, c)| c.clone());
        (table, column)
    }
}

enum Token {
    Quoted(String),
    Word(String),
    Mark(char),
}

impl Token {
    fn text(&self) -> &str {
        match self {
            Token::Quoted(s) | Token::Word(s) => s,
            Token::Mark('.') => ".",
            Token::Mark(_) => "",
        }
    }
}

/// Double-quoted identifiers (`""` inside is a quote), bare words, and other characters.
fn tokens(sql: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' {
            let mut name = String::new();
            while let Some(c) = chars.next() {
                if c != '"' {
                    name.push(c);
                } else if chars.peek() == Some(&'"') {
                    chars.next();
                    name.push('"');
                } else {
                    break;
                }
            }
            tokens.push(Token::Quoted(name));
        } else if c.is_ascii_alphanumeric() || c == '_' {
            let mut word = String::from(c);
            while let Some(&c) = chars
                .peek()
                .filter(|c| c.is_ascii_alphanumeric() || **c == '_')
            {
                word.push(c);
                chars.next();
            }
            tokens.push(Token::Word(word));
        } else if !c.is_whitespace() {
            tokens.push(Token::Mark(c));
        }
    }
    tokens
}

/// `name` as SQL: bare when it is a plain word, else double-quoted.
fn identifier(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_names_its_tables_and_the_columns_they_are_entered_by() {
        let chain = Chain::parse(
            r#"SELECT DISTINCT "b"."isbn", "c"."x" FROM "books" AS "b" JOIN "odd ""t""" AS "c" ON "c"."bk" = "b"."out" WHERE "b"."isbn" IN ("#,
        );
        assert_eq!(chain.entered("b"), ("books".into(), Some("isbn".into())));
        assert_eq!(chain.entered("c"), ("odd \"t\"".into(), Some("bk".into())));
        assert_eq!(chain.entered("z"), ("z".into(), None));
    }

    #[test]
    fn scans_and_automatic_indexes_are_scans_searches_are_not() {
        assert_eq!(scan_of("SCAN b"), Some("b"));
        assert_eq!(scan_of("SCAN b USING COVERING INDEX i"), Some("b"));
        assert_eq!(
            scan_of("SEARCH c USING AUTOMATIC COVERING INDEX (bk=?)"),
            Some("c")
        );
        assert_eq!(scan_of("SEARCH b USING INDEX books_isbn (isbn=?)"), None);
        assert_eq!(
            scan_of("SEARCH b USING INTEGER PRIMARY KEY (rowid=?)"),
            None
        );
        assert_eq!(scan_of("USE TEMP B-TREE FOR DISTINCT"), None);
        assert_eq!(identifier("books_isbn"), "books_isbn");
        assert_eq!(identifier("odd t"), "\"odd t\"");
    }
}
